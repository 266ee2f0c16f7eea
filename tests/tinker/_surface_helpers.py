"""The comparison machinery of ``test_surface.py``: tinker 0.38's recorded surface against
``loops_async.tinker``.

``tests/data/tinker_surface.json`` was extracted (by AST, never imported) from the tinker 0.38.0
wheel; its ``note`` key describes the format. Everything here is pure introspection of the
layer: no network, no clients built.

Every problem found carries a *key* (``"Class"``, ``"Class.method"``, ``"Class.method(param)"``,
``"Class.attr"``, ``"module.Name"``) so that the test can excuse deliberate differences by key
and can tell which excuses no longer excuse anything.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import json
import re
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

SURFACE: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "tinker_surface.json").read_text()
)
LAYER = "loops_async.tinker"
EMPTY = inspect.Parameter.empty

DATA_KINDS = frozenset({"pydantic", "dataclass"})
"""tinker class kinds whose constructor is user-facing (checked field by field)."""

CHECKED_DUNDERS = frozenset({"__await__", "__enter__", "__exit__"})
"""Dunder methods whose presence and signature matter to tinker code (besides ``__init__``)."""


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    section: str = "classes"
    """Where tinker records the name: classes, exceptions, type_aliases, constants, functions."""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass
class Audit:
    missing: list[tuple[str, str]] = field(default_factory=list)
    """(tinker module, name) pairs the layer lacks."""
    missing_modules: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    checked: int = 0
    """How many names, members and signatures were compared."""


# ------------------------------------------------------------------------------ lookups


def layer_module(tinker_module: str) -> ModuleType | None:
    """``loops_async.tinker.<x>`` for ``tinker.<x>``, or None when it does not import."""
    name = LAYER + tinker_module[len("tinker") :]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_MISSING: Any = object()


def locate(name: str, spec: dict[str, Any]) -> Any:
    """The layer's object for tinker's ``name``, looked up where tinker exposes it."""
    for module_name in [*spec.get("importable_from", []), spec.get("module", "")]:
        if not module_name:
            continue
        module = layer_module(module_name)
        if module is not None:
            value = getattr(module, name, _MISSING)
            if value is not _MISSING:
                return value
    return _MISSING


def is_missing(value: Any) -> bool:
    return value is _MISSING


# ----------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class Factory:
    """A default made by a factory (dataclass ``default_factory``, msgspec's, pydantic's)."""

    make: Any

    def __repr__(self) -> str:
        return f"<factory: {getattr(self.make, '__name__', self.make)!s}>"


def _loose_equal(mine: Any, theirs: Any) -> bool:
    if isinstance(mine, enum.Enum):
        mine = mine.value
    if isinstance(mine, bool) or isinstance(theirs, bool):
        return type(mine) is type(theirs) and mine == theirs
    if isinstance(mine, int | float) and isinstance(theirs, int | float):
        return float(mine) == float(theirs)
    if isinstance(mine, tuple | list) and isinstance(theirs, tuple | list):
        return len(mine) == len(theirs) and all(map(_loose_equal, mine, theirs))
    try:
        return bool(mine == theirs)
    except Exception:
        return False


_CALL = re.compile(r"^(\w+)\(\)$")
_FACTORY = re.compile(r"^<factory: (\w+)>$")


def same_default(mine: Any, theirs: str | None) -> bool:
    """Whether our default (``EMPTY`` when required) matches tinker's recorded repr (None
    when required there). ``1`` and ``1.0``, quote styles, enum members and their values,
    and equivalent factories compare equal."""
    if theirs is None:
        return mine is EMPTY
    if mine is EMPTY:
        return False
    if isinstance(mine, Factory):
        made = mine.make()
        factory = _FACTORY.match(theirs)
        if factory:
            return _loose_equal(made, eval(factory.group(1))())  # dict / list / set
        mine = made
    elif (factory := _FACTORY.match(theirs)) is not None:
        return _loose_equal(mine, eval(factory.group(1))())
    try:
        value = ast.literal_eval(theirs)
    except (ValueError, SyntaxError):
        pass
    else:
        return _loose_equal(mine, value)
    call = _CALL.match(theirs)
    if call:  # "RetryConfig()": an instance made with no arguments
        kind = type(mine)
        return kind.__name__ == call.group(1) and _loose_equal(mine, kind())
    if theirs.startswith("(") and isinstance(mine, tuple):  # a tuple of classes
        names = [part.strip().rsplit(".", 1)[-1] for part in theirs.strip("()").split(",")]
        return sorted(names) == sorted(getattr(c, "__name__", repr(c)) for c in mine)
    return _normalise(repr(mine)) == _normalise(theirs)


def _normalise(text: str) -> str:
    return text.replace('"', "'").replace("types.", "").strip()


def show(default: Any) -> str:
    return "required" if default is EMPTY else repr(default)


# --------------------------------------------------------------------------- signatures


def _static(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return _MISSING


def method_kind(cls: type, name: str) -> str:
    raw = _static(cls, name)
    if isinstance(raw, staticmethod):
        return "staticmethod"
    if isinstance(raw, classmethod):
        return "classmethod"
    if isinstance(raw, property | cached_property):
        return "property"
    return "method"


def method_parameters(cls: type, name: str) -> list[inspect.Parameter] | None:
    """Our method's parameters as a caller sees them (no ``self``/``cls``)."""
    raw = _static(cls, name)
    try:
        signature = inspect.signature(getattr(cls, name))
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if (
        not isinstance(raw, staticmethod | classmethod)
        and params
        and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)
    ):
        params = params[1:]  # self
    return params


def function_parameters(func: Any) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None


def constructor_parameters(cls: type) -> list[inspect.Parameter] | None:
    """What ``cls(...)`` accepts, with factory defaults resolved to :class:`Factory`."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    factories: dict[str, Any] = {}
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        for struct_field in msgspec.structs.fields(cls):
            if struct_field.default_factory is not msgspec.NODEFAULT:
                factories[struct_field.name] = struct_field.default_factory
    elif dataclasses.is_dataclass(cls):
        for data_field in dataclasses.fields(cls):
            if data_field.default_factory is not dataclasses.MISSING:
                factories[data_field.name] = data_field.default_factory
    else:
        model_fields = getattr(cls, "model_fields", None)  # pydantic
        if isinstance(model_fields, dict):
            for name, info in model_fields.items():
                if getattr(info, "default_factory", None) is not None:
                    factories[name] = info.default_factory
    return [
        p.replace(default=Factory(factories[p.name])) if p.name in factories else p for p in params
    ]


def _var(kind: str) -> inspect._ParameterKind:
    return inspect._ParameterKind[kind]


def compare_parameters(
    key: str, theirs: list[dict[str, Any]], ours: list[inspect.Parameter]
) -> Iterator[Problem]:
    """tinker's parameters against ours: every one of tinker's by name, kind, position and
    default. Ours may add keyword-only parameters with defaults and a ``**kwargs``."""
    by_name = {p.name: p for p in ours if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    positional = [p.name for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kinds = {p.kind for p in ours}
    their_names = set()
    theirs = [p for p in theirs if not (p["name"].startswith("_") and p["default"] is not None)]
    their_positional = [
        p["name"] for p in theirs if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    ]
    for param in theirs:
        name, kind = param["name"], _var(param["kind"])
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            star = "*" if kind is inspect.Parameter.VAR_POSITIONAL else "**"
            if kind not in kinds:
                yield Problem(f"{key}({star}{name})", f"no {star}{name} here (tinker has one)")
            continue
        their_names.add(name)
        where = f"{key}({name})"
        mine = by_name.get(name)
        if mine is None:
            swallowed = (
                " (only swallowed by **kwargs)" if inspect.Parameter.VAR_KEYWORD in kinds else ""
            )
            yield Problem(where, f"missing parameter{swallowed}")
            continue
        if mine.kind is not kind:
            yield Problem(where, f"is {mine.kind.description} here, {kind.description} in tinker")
        elif name in their_positional and positional.index(name) != their_positional.index(name):
            yield Problem(
                where,
                f"is positional parameter {positional.index(name)} here, "
                f"{their_positional.index(name)} in tinker",
            )
        if not same_default(mine.default, param["default"]):
            yield Problem(
                where,
                f"default is {show(mine.default)} here, {param['default'] or 'required'} in tinker",
            )
    for mine in ours:
        if mine.name in their_names or mine.kind is mine.VAR_KEYWORD:
            continue
        if mine.kind is mine.VAR_POSITIONAL:
            yield Problem(f"{key}(*{mine.name})", "extra *args here (tinker has none)")
        elif mine.kind is not mine.KEYWORD_ONLY:
            yield Problem(
                f"{key}({mine.name})",
                f"extra {mine.kind.description} parameter here (only keyword-only extras with "
                "defaults are allowed)",
            )
        elif mine.default is EMPTY:
            yield Problem(f"{key}({mine.name})", "extra required keyword-only parameter here")


def compare_fields(key: str, cls: type, fields: list[dict[str, Any]]) -> Iterator[Problem]:
    """A pydantic model's fields (keyword-only constructor) against our constructor: each by
    name (or validation alias), requiredness and default; order and kind do not matter, as
    long as it can be passed by keyword."""
    ours = constructor_parameters(cls)
    if ours is None:
        yield Problem(key, "no inspectable constructor")
        return
    by_name = {p.name: p for p in ours if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in ours)
    tag_field = tag = None
    if issubclass(cls, msgspec.Struct):
        tag_field, tag = cls.__struct_config__.tag_field, cls.__struct_config__.tag
    their_names = set()
    for info in fields:
        name = info["name"]
        their_names.add(name)
        where = f"{key}({name})"
        if name == tag_field and name not in by_name:
            # msgspec's tag: set by the class, readable as an attribute, never passed.
            if not same_default(tag, info["default"]):
                yield Problem(where, f"tag is {tag!r} here, {info['default']} in tinker")
            continue
        mine = by_name.get(name)
        if mine is None:
            alias = (info.get("field_options") or {}).get("validation_alias", "")
            for choice in re.findall(r"'(\w+)'", alias):
                mine = by_name.get(choice)
                if mine is not None:
                    break
        if mine is None:
            swallowed = " (only swallowed by **kwargs)" if has_var_kw else ""
            yield Problem(where, f"missing field{swallowed}")
            continue
        if mine.kind is mine.POSITIONAL_ONLY:
            yield Problem(where, "cannot be passed by keyword here")
        theirs = None if info["required"] else info["default"]
        if not same_default(mine.default, theirs):
            yield Problem(
                where, f"default is {show(mine.default)} here, {theirs or 'required'} in tinker"
            )
    for mine in ours:
        if (
            mine.name not in their_names
            and mine.default is EMPTY
            and mine.kind
            not in (
                mine.VAR_POSITIONAL,
                mine.VAR_KEYWORD,
            )
        ):
            yield Problem(f"{key}({mine.name})", "extra required field here (not in tinker)")


# --------------------------------------------------------------------------- attributes


@cache
def _assigned_on_self(cls: type) -> frozenset[str]:
    """Names assigned as ``self.X`` (or ``object.__setattr__(self, "X", ...)``) in the source
    of ``cls`` and of its bases defined in ``loops_async``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("loops_async"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "__setattr__"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                names.add(node.args[1].value)
    return frozenset(names)


def has_attribute(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a class attribute, property, struct or
    dataclass field, annotated or slotted attribute, or one the class sets on ``self``."""
    if hasattr(cls, name):
        return True
    if issubclass(cls, msgspec.Struct) and name in cls.__struct_fields__:
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    if name in (getattr(cls, "model_fields", None) or {}):
        return True
    for klass in cls.__mro__:
        own = vars(klass)
        if name in own.get("__annotations__", {}) or name in own.get("__slots__", ()):
            return True
    return name in _assigned_on_self(cls)


# -------------------------------------------------------------------------------- audit

CLASS_CONSTRUCTORS_CHECKED = frozenset({"ServiceClient"})
"""Plain (non-data) tinker classes whose constructor is compared too. Data types (pydantic
models, dataclasses) always are. The other clients' constructors take tinker-internal holders
(``TrainingClient``, ``SamplingClient``, ``RestClient``, ``AdminClient``), and the futures'
take tinker's own futures, but ``ServiceClient(base_url=..., api_key=...)`` is how every
tinker script starts."""


def _is_forwarder(params: list[dict[str, Any]] | None) -> bool:
    return bool(params) and all(p["kind"].startswith("VAR_") for p in params or [])


def _tinker_bases(spec: dict[str, Any], section: str = "classes") -> list[str]:
    """The tinker classes among ``spec``'s bases (``Generic[...]`` arguments stripped)."""
    names = [base.split("[", 1)[0] for base in spec.get("bases", [])]
    return [name for name in names if name in SURFACE[section]]


def _inherited_attributes(spec: dict[str, Any], cls: type, section: str) -> set[str]:
    """Attributes tinker declares on a base that ours derives from too (checked there)."""
    names: set[str] = set()
    for base in _tinker_bases(spec, section):
        base_spec = SURFACE[section][base]
        ours = locate(base, base_spec)
        if isinstance(ours, type) and issubclass(cls, ours):
            names.update(base_spec.get("attributes") or [])
    return names


def _owner(
    name: str, spec: dict[str, Any], method: str
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The tinker class whose definition of ``method`` applies to ``name``, with its
    parameters and metadata. A ``(*args, **kwargs)`` forwarder (``BackcompatTrainingClientFuture.
    forward`` forwards to ``TrainingClient.forward``) resolves to the base it forwards to."""
    params = spec["methods"][method]
    meta = spec.get("method_meta", {}).get(method, {})
    if _is_forwarder(params):
        for base in _tinker_bases(spec):
            base_spec = SURFACE["classes"][base]
            base_params = base_spec.get("methods", {}).get(method)
            if base_params is not None and not _is_forwarder(base_params):
                return base, base_params, base_spec.get("method_meta", {}).get(method, {})
    owner = meta.get("defined_in", "").rsplit(".", 1)[-1] or name
    return owner, params, meta


def _same_object(tinker_name: str, ours: Any) -> bool:
    """Whether tinker class ``tinker_name`` is provided by this very object (then what it
    defines is checked under its own name, not again under every alias)."""
    spec = SURFACE["classes"].get(tinker_name)
    return spec is not None and locate(tinker_name, spec) is ours


def class_problems(name: str, spec: dict[str, Any], cls: Any, audit: Audit) -> Iterator[Problem]:
    kind = spec["kind"]
    if not isinstance(cls, type):
        yield Problem(name, f"is {cls!r} here, a class ({kind}) in tinker")
        return
    if kind == "enum":
        members = getattr(cls, "__members__", {})
        for member in spec.get("members", []):
            audit.checked += 1
            mine = members.get(member["name"])
            if mine is None:
                yield Problem(f"{name}.{member['name']}", "missing enum member")
            elif not _loose_equal(mine.value, _literal(member["value"])):
                yield Problem(
                    f"{name}.{member['name']}",
                    f"value is {mine.value!r} here, {member['value']} in tinker",
                )
        return
    if kind == "typeddict":
        return  # only its name matters (checked with the module names)
    inherited = _inherited_attributes(spec, cls, "classes")
    for method, declared in spec.get("methods", {}).items():
        if declared is None:  # a property: checked with the attributes
            continue
        owner, params, meta = _owner(name, spec, method)
        if owner != name and _same_object(owner, cls):
            continue  # checked under the owner's name
        key = f"{name}.{method}"
        if method == "__init__":
            if kind == "pydantic":
                continue  # compared field by field below
            if kind != "dataclass" and name not in CLASS_CONSTRUCTORS_CHECKED:
                continue
            audit.checked += 1
            ours = constructor_parameters(cls)
            if ours is None:
                yield Problem(key, "no inspectable constructor")
            else:
                yield from compare_parameters(key, params, ours)
            continue
        if method.startswith("_") and method not in CHECKED_DUNDERS:
            continue
        audit.checked += 1
        if not hasattr(cls, method):
            yield Problem(key, "missing method")
            continue
        their_kind, our_kind = meta.get("kind", "method"), method_kind(cls, method)
        if their_kind in ("classmethod", "staticmethod") and our_kind not in (
            "classmethod",
            "staticmethod",
        ):
            yield Problem(key, f"is a {our_kind} here, a {their_kind} in tinker")
            continue
        if our_kind == "property":
            yield Problem(key, f"is a property here, a {their_kind} in tinker")
            continue
        is_async = inspect.iscoroutinefunction(getattr(cls, method))
        if bool(meta.get("is_async")) != is_async:
            yield Problem(
                key,
                f"{'a coroutine function' if is_async else 'not a coroutine function'} here, "
                f"{'a coroutine function' if meta.get('is_async') else 'a plain function'} "
                "in tinker",
            )
        ours = method_parameters(cls, method)
        if ours is None:
            yield Problem(key, "no inspectable signature")
            continue
        yield from compare_parameters(key, params, ours)
    if kind == "pydantic" and spec.get("fields") is not None:
        audit.checked += 1
        yield from compare_fields(f"{name}.__init__", cls, spec["fields"])
    for attribute in spec.get("attributes") or []:
        if attribute in inherited:
            continue
        audit.checked += 1
        if not has_attribute(cls, attribute):
            yield Problem(f"{name}.{attribute}", "missing attribute")


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _exception_problems(
    name: str, spec: dict[str, Any], cls: Any, audit: Audit
) -> Iterator[Problem]:
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        yield Problem(name, f"is {cls!r} here, an exception class in tinker")
        return
    mro = [klass.__name__ for klass in cls.__mro__]
    bases = [base.split("[", 1)[0] for base in spec.get("bases", [])]
    bases += [base.rsplit(".", 1)[-1] for base in spec.get("tinker_bases_mro") or []]
    for base in dict.fromkeys(bases):
        audit.checked += 1
        if base not in mro:
            yield Problem(f"{name}({base})", f"{base} is not among its bases here ({mro})")
    if "tinker._exceptions.TinkerError" in (spec.get("tinker_bases_mro") or []):
        layer = importlib.import_module(LAYER)
        if not issubclass(cls, layer.TinkerError):
            yield Problem(name, f"not a subclass of {LAYER}.TinkerError")
    # The constructors are not compared: the layer makes these (from the core exceptions),
    # tinker code catches them and reads their attributes.
    inherited = _inherited_attributes(spec, cls, "exceptions")
    for attribute in spec.get("attributes") or []:
        if attribute in inherited:
            continue
        audit.checked += 1
        if not has_attribute(cls, attribute):
            yield Problem(f"{name}.{attribute}", "missing attribute")


def _alias_problems(name: str, spec: dict[str, Any], ours: Any, audit: Audit) -> Iterator[Problem]:
    values = spec.get("literal_values")
    if values is None:
        return  # unions and plain aliases: only the name is compared
    audit.checked += 1
    if isinstance(ours, type) and issubclass(ours, enum.Enum):
        mine = [member.value for member in ours]
    elif typing.get_origin(ours) is typing.Literal:
        mine = list(typing.get_args(ours))
    else:
        yield Problem(name, f"is {ours!r} here, Literal{values} in tinker")
        return
    for value in values:
        if value not in mine:
            yield Problem(f"{name}.{value}", f"{value!r} is not among its values here ({mine})")


def _constant_problems(
    name: str, spec: dict[str, Any], ours: Any, audit: Audit
) -> Iterator[Problem]:
    text = spec["value"]
    match = re.match(r"^('[^']*'|\"[^\"]*\")", text)
    if match is None:
        return  # not a literal (an alias of a function, ...): only the name is compared
    audit.checked += 1
    if ours != ast.literal_eval(match.group(1)):
        yield Problem(name, f"is {ours!r} here, {match.group(1)} in tinker")


def audit_layer() -> Audit:
    """Compare everything recorded in the surface file with the layer (raw: nothing is
    excused here)."""
    audit = Audit()
    for module_name, names in SURFACE["modules"].items():
        module = layer_module(module_name)
        if module is None:
            audit.missing_modules.append(module_name)
            continue
        for name in names:
            audit.checked += 1
            if not hasattr(module, name):
                audit.missing.append((module_name, name))
    sections = (
        ("classes", class_problems),
        ("exceptions", _exception_problems),
        ("type_aliases", _alias_problems),
        ("constants", _constant_problems),
    )
    for section, check in sections:
        for name, spec in SURFACE[section].items():
            ours = locate(name, spec)
            if ours is _MISSING:
                continue  # reported with the module names
            audit.problems.extend(
                replace(p, section=section) for p in check(name, spec, ours, audit)
            )
    for name, spec in SURFACE["functions"].items():
        ours = locate(name, spec)
        if ours is _MISSING:
            continue
        audit.checked += 1
        found: list[Problem] = []
        if bool(spec.get("is_async")) != inspect.iscoroutinefunction(ours):
            found.append(Problem(name, "async-ness differs from tinker"))
        params = function_parameters(ours)
        if params is None:
            found.append(Problem(name, "no inspectable signature"))
        else:
            found.extend(compare_parameters(name, spec["params"], params))
        audit.problems.extend(replace(p, section="functions") for p in found)
    return audit
