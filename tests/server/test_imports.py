"""The import structure of the server package: the torch engine loads without the sampler
machinery (only :mod:`~loops_async.server.sampler_engine`), nothing in the package goes through
the :mod:`~loops_async.server.sampler` facade, the facade still exports every name, and the
modules' runtime imports form no cycle."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import loops_async.server

SERVER_DIR = Path(loops_async.server.__file__).parent
PACKAGE = "loops_async.server"

# loops_async.server's __init__ imports the app (and with it every route module): load single
# submodules without it, as test_security does.
_BARE_PACKAGE = (
    "import sys, types, pathlib\n"
    "import loops_async\n"
    "pkg = types.ModuleType('loops_async.server')\n"
    "pkg.__path__ = [str(pathlib.Path(loops_async.__file__).parent / 'server')]\n"
    "sys.modules['loops_async.server'] = pkg\n"
)


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _loaded_server_modules(code: str) -> set[str]:
    """The ``loops_async.server`` submodules loaded after running ``code`` in a fresh
    interpreter."""
    out = _run(
        code + "\nprint(' '.join(sorted(m.rpartition('.')[2] for m in sys.modules "
        "if m.startswith('loops_async.server.'))))\n"
    )
    return set(out.split())


# --------------------------------------------------------------------------- the engine cut


def test_torch_sampler_does_not_import_the_sampler_facade() -> None:
    loaded = _loaded_server_modules("import sys\nimport loops_async.server.torch_sampler\n")
    assert "torch_sampler" in loaded
    assert "sampler" not in loaded, "loops_async.server.sampler was imported"


def test_torch_sampler_needs_only_the_engine_contract() -> None:
    loaded = _loaded_server_modules(_BARE_PACKAGE + "import loops_async.server.torch_sampler\n")
    assert "sampler_engine" in loaded
    machinery = {
        "sampler",
        "sampler_batcher",
        "sampler_registry",
        "sampler_validation",
        "shared_sampler",
        "sampler_routes",
        "runs",
        "app",
    }
    assert not loaded & machinery, f"torch_sampler pulled in {sorted(loaded & machinery)}"


def test_no_server_module_goes_through_the_facade() -> None:
    """The whole server (app, routes, registry, engines' contract) loads without the facade."""
    loaded = _loaded_server_modules(
        "import sys\nimport loops_async.server\nimport loops_async.server.local\n"
    )
    assert {"app", "runs", "sampler_routes", "sampler_registry"} <= loaded
    assert "sampler" not in loaded


def test_facade_reexports_every_name() -> None:
    facade = importlib.import_module(f"{PACKAGE}.sampler")
    homes = {
        name: importlib.import_module(f"{PACKAGE}.{name}")
        for name in (
            "sampler_engine",
            "null_sampler",
            "sampler_validation",
            "sampler_batcher",
            "sampler_registry",
        )
    }
    for name in facade.__all__:
        value = getattr(facade, name)
        defined_in = [mod for mod, module in homes.items() if name in module.__all__]
        assert len(defined_in) == 1, (name, defined_in)
        assert getattr(homes[defined_in[0]], name) is value, name
    every = {name for module in homes.values() for name in module.__all__}
    assert every == set(facade.__all__)


# --------------------------------------------------------------------------- no cycles


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


_LOAD_TIME = (ast.With, ast.For, ast.While, ast.ClassDef)
"""Blocks whose body runs when the module loads."""
_DEFERRED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.AsyncFor, ast.AsyncWith)
"""Blocks whose body runs later, if at all."""


def _imports(body: list[ast.stmt], *, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module loads, never those under ``if
    TYPE_CHECKING:``; with ``deferred`` also those inside functions (imports put off
    until first use, which may still close a cycle at run time)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _imports(node.body, deferred=deferred)
            found += _imports(node.orelse, deferred=deferred)
        elif isinstance(node, ast.Try):
            found += _imports(node.body, deferred=deferred)
            for handler in node.handlers:
                found += _imports(handler.body, deferred=deferred)
            found += _imports(node.orelse, deferred=deferred)
            found += _imports(node.finalbody, deferred=deferred)
        elif isinstance(node, _LOAD_TIME) or (deferred and isinstance(node, _DEFERRED)):
            found += _imports(node.body, deferred=deferred)
            found += _imports(getattr(node, "orelse", []), deferred=deferred)
    return found


def _server_module(dotted: str, modules: set[str]) -> str | None:
    prefix = PACKAGE + "."
    if not dotted.startswith(prefix):
        return None
    name = dotted.removeprefix(prefix).split(".")[0]
    return name if name in modules else None


def _import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the server modules it imports at load time (and, with ``deferred``, later)."""
    modules = {path.stem for path in SERVER_DIR.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(SERVER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = PACKAGE.split(".")
        deps: set[str] = set()
        for node in _imports(tree.body, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package[: len(package) - node.level + 1] if node.level else []
                parent = ".".join([*base, *([node.module] if node.module else [])])
                # `from . import x` may name a submodule: count both readings.
                targets = [parent] + [f"{parent}.{alias.name}" for alias in node.names]
            for target in targets:
                found = _server_module(target, modules)
                if found is not None and found != path.stem:
                    deps.add(found)
        graph[path.stem] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_import_graph_reads_the_package() -> None:
    graph = _import_graph()
    assert graph["torch_sampler"] >= {"sampler_engine", "lora", "models"}
    assert "sampler" not in graph["torch_sampler"]
    assert graph["sampler_engine"] <= {"models"}
    # Only the facade imports the facade's name; nothing inside the package imports it.
    assert not [module for module, deps in graph.items() if "sampler" in deps]


def test_server_modules_have_no_import_cycle() -> None:
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_even_through_deferred_imports() -> None:
    """Imports put off into functions (the torch engine, shared samplers) close no cycle either:
    the engines and shared samplers depend on the sampler modules, never the other way round at
    load time."""
    graph = _import_graph(deferred=True)
    assert "torch_sampler" in graph["sampler_registry"]  # the deferred edges are read
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b"}}, ["b", "b"]),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert _find_cycle(graph) == expected
