"""tinker's module layout for ``loops_async.tinker``, and ``import tinker`` aliasing.

:func:`register_submodules` (run when ``loops_async.tinker`` is imported) gives the layer every
submodule path tinker has (``loops_async.tinker.types.tensor_data``,
``loops_async.tinker.lib.public_interfaces.rest_client``, ...; the table is
:data:`loops_async.tinker._modules.MODULES`) as small alias modules whose attributes are the
layer's own objects. :func:`install` then makes ``import tinker`` and every ``tinker.<x>``
resolve to those very module objects, so code written for tinker runs unchanged::

    import loops_async.tinker

    loops_async.tinker.install()
    import tinker  # is loops_async.tinker

A real ``tinker`` distribution is never shadowed unless asked (``install(shadow=True)``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._modules import MODULES

__all__ = [
    "TinkerAlreadyInstalledError",
    "install",
    "is_installed",
    "register_submodules",
    "uninstall",
]

_PACKAGE = __name__.rpartition(".")[0]  # "loops_async.tinker"
_ALIAS = "tinker"
_TYPES = f"{_PACKAGE}.types"
_MARK = "_loops_async_tinker_alias"
_ORIGIN = f"alias module of {_PACKAGE}"
_MISSING: Any = object()

_lock = threading.RLock()
_shadowed: dict[str, ModuleType] = {}
"""The real tinker modules ``install(shadow=True)`` took out of ``sys.modules``."""

# The entries of MODULES that have entries below them (packages), computed once.
_PACKAGES: frozenset[str] = frozenset(
    ".".join(parts[:i])
    for parts in (suffix.split(".") for suffix in MODULES)
    for i in range(1, len(parts))
)
_ORDER: tuple[str, ...] = tuple(sorted(MODULES, key=lambda s: (s.count("."), s)))


class TinkerAlreadyInstalledError(RuntimeError):
    """A real ``tinker`` package is importable (or imported), and :func:`install` was not
    asked to shadow it (``install(shadow=True)``, ``python -m loops_async.tinker --shadow``)."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(
            f"a real tinker package is installed ({location}); loops_async.tinker does not "
            "shadow it unless asked: pass shadow=True to loops_async.tinker.install() "
            "(or --shadow to python -m loops_async.tinker) to make `import tinker` use "
            "loops_async.tinker anyway"
        )


# --------------------------------------------------------------------- alias submodules


class _SubmoduleLoader(importlib.abc.Loader):
    """Fills an alias submodule from the layer (``importlib.reload`` refills it)."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        suffix = module.__name__[len(_PACKAGE) + 1 :]
        names = MODULES[suffix]
        sources = _sources()
        present: list[str] = []
        for name in names:
            value = _lookup(sources, name)
            if value is not _MISSING:
                setattr(module, name, value)
                present.append(name)
        module.__doc__ = (
            f"Alias of tinker's ``tinker.{suffix}``: the names it exposes, as provided by "
            f"``{_PACKAGE}`` (see ``{_PACKAGE}._install``)."
        )
        namespace = vars(module)
        namespace["__all__"] = present
        namespace["__getattr__"] = _late_getattr(module, frozenset(names))


_LOADER = _SubmoduleLoader()


def _sources() -> tuple[ModuleType, ...]:
    """Where alias submodules look names up: ``loops_async.tinker.types``, then the package."""
    found = [sys.modules.get(_TYPES), sys.modules.get(_PACKAGE)]
    return tuple(m for m in found if m is not None)


def _lookup(sources: Sequence[ModuleType], name: str, *, dynamic: bool = False) -> Any:
    """``name`` in the first source that has it. Registration reads the namespaces only
    (``dynamic=False``: no module ``__getattr__`` runs as a side effect of importing the
    layer); an access to a name not found then goes through ``getattr``."""
    for source in sources:
        value = getattr(source, name, _MISSING) if dynamic else vars(source).get(name, _MISSING)
        if value is not _MISSING:
            return value
    return _MISSING


def _late_getattr(module: ModuleType, names: frozenset[str]) -> Any:
    """A module ``__getattr__``: a listed name the layer defined after registration."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = _lookup(_sources(), name, dynamic=True)
            if value is not _MISSING:
                setattr(module, name, value)
                exported = vars(module).get("__all__")
                if isinstance(exported, list) and name not in exported:
                    exported.append(name)
                return value
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

    return __getattr__


def _import_real(name: str) -> ModuleType | None:
    """Import a real (on-disk) submodule of the layer; None when there is none."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def _is_on_disk(parent: ModuleType, name: str) -> bool:
    path = getattr(parent, "__path__", None)
    if not path:  # a plain module or an alias package: no files below it
        return False
    return importlib.machinery.PathFinder.find_spec(name, list(path)) is not None


def register_submodules() -> None:
    """Create (once) the ``loops_async.tinker.<x>`` alias module of every tinker submodule.

    Each is registered in ``sys.modules`` and as an attribute of its parent, and holds the
    names tinker exposes there (:data:`~loops_async.tinker._modules.MODULES`) as found in
    ``loops_async.tinker.types``, else in ``loops_async.tinker``; names the layer does not
    provide are absent (``from tinker.x import Missing`` raises ImportError). ``types`` (and
    any other submodule that exists as a file) is the real module, not an alias. Idempotent
    and cheap (a few dict look-ups per submodule once created).
    """
    modules = sys.modules
    if modules.get(_TYPES) is None:
        _import_real(_TYPES)
    for suffix in _ORDER:
        name = f"{_PACKAGE}.{suffix}"
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name)
        if parent is None:  # a real module that is missing: skip its subtree
            continue
        module = modules.get(name)
        if module is None:
            if suffix == "types":  # import attempted above: it is missing
                continue
            if _is_on_disk(parent, name):
                module = _import_real(name)
                if module is None:
                    continue
            else:
                spec = importlib.machinery.ModuleSpec(
                    name, _LOADER, origin=_ORIGIN, is_package=suffix in _PACKAGES
                )
                module = importlib.util.module_from_spec(spec)
                _LOADER.exec_module(module)
                modules[name] = module
        current = vars(parent).get(child)
        if current is not module and (current is None or isinstance(current, ModuleType)):
            setattr(parent, child, module)


# ------------------------------------------------------------------------- import tinker


class _TinkerAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``tinker.<x>`` to the module object of ``loops_async.tinker.<x>``.

    The module is imported under its own name only; the alias name is bound to that very
    object (the loader swaps it into ``sys.modules``), so nothing is loaded twice.
    """

    _loops_async_tinker_alias = True

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ALIAS and not fullname.startswith(_ALIAS + "."):
            return None
        real = _PACKAGE + fullname[len(_ALIAS) :]
        module = sys.modules.get(real)
        if module is None:
            try:
                found = importlib.util.find_spec(real)
            except (ImportError, ValueError):
                return None
            if found is None:
                return None
            is_package = found.submodule_search_locations is not None
        else:
            is_package = hasattr(module, "__path__")
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=f"alias of {real}", is_package=is_package
        )
        spec.loader_state = real
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder: exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None
        sys.modules[spec.name] = importlib.import_module(str(spec.loader_state))


def _ours(module: object) -> bool:
    name = getattr(module, "__name__", None)
    return isinstance(name, str) and (name == _PACKAGE or name.startswith(_PACKAGE + "."))


def _alias_names() -> list[str]:
    return [n for n in sys.modules if n == _ALIAS or n.startswith(_ALIAS + ".")]


def _has_finder() -> bool:
    return any(getattr(f, _MARK, False) for f in sys.meta_path)


def _drop_finders() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _MARK, False)]


def _location(module: object) -> str:
    path = getattr(module, "__file__", None) or list(getattr(module, "__path__", None) or [])
    return f"imported from {path}" if path else f"imported as {module!r}"


def _real_tinker() -> str | None:
    """Where a real tinker is (imported or importable), or None when there is none."""
    current = sys.modules.get(_ALIAS)
    if current is not None:
        return None if _ours(current) else _location(current)
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # loops_async/
    for finder in sys.meta_path:
        if getattr(finder, _MARK, False):  # our own finder would find ourselves
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(_ALIAS, None)
        except Exception:  # a third-party finder misbehaving is not a tinker install
            continue
        if spec is None:
            continue
        if spec.origin in (None, "namespace"):  # a directory named tinker, not a package
            continue
        where = spec.origin or next(iter(spec.submodule_search_locations or []), None)
        if where and os.path.abspath(where).startswith(ours + os.sep):
            return None  # a shim shipped inside loops_async
        return f"found at {where or spec.name!r}"
    return None


def is_installed() -> bool:
    """Whether ``import tinker`` currently resolves to ``loops_async.tinker``."""
    package = sys.modules.get(_PACKAGE)
    return package is not None and sys.modules.get(_ALIAS) is package and _has_finder()


def install(*, shadow: bool = False) -> None:
    """Make ``import tinker`` (and every ``tinker.<x>``) resolve to ``loops_async.tinker``.

    ``tinker.<x>`` is the very module object ``loops_async.tinker.<x>`` (nothing is loaded
    twice): aliases for what is imported now go into ``sys.modules``, and a finder at the
    front of ``sys.meta_path`` resolves the rest on first import. Idempotent.

    Raises:
        TinkerAlreadyInstalledError: a real ``tinker`` is imported or importable; with
            ``shadow=True`` its modules are dropped from ``sys.modules`` (:func:`uninstall`
            puts them back) and ``import tinker`` gives ``loops_async.tinker`` anyway.
    """
    with _lock:
        if is_installed():
            return
        real = _real_tinker()
        if real is not None and not shadow:
            raise TinkerAlreadyInstalledError(real)
        package = importlib.import_module(_PACKAGE)
        register_submodules()
        for name in _alias_names():
            module = sys.modules[name]
            if not _ours(module):
                _shadowed[name] = module
                del sys.modules[name]
        prefix = _PACKAGE + "."
        for name, module in list(sys.modules.items()):
            if name.startswith(prefix):
                sys.modules[_ALIAS + name[len(_PACKAGE) :]] = module
        sys.modules[_ALIAS] = package
        _drop_finders()
        sys.meta_path.insert(0, _TinkerAliasFinder())


def uninstall() -> None:
    """Undo :func:`install`: drop the ``tinker`` aliases and the finder, and put back any
    real tinker modules ``install(shadow=True)`` took out (for tests)."""
    with _lock:
        _drop_finders()
        for name in _alias_names():
            if _ours(sys.modules[name]):
                del sys.modules[name]
        for name, module in _shadowed.items():
            sys.modules.setdefault(name, module)
        _shadowed.clear()
