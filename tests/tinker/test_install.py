"""``import tinker`` aliasing: the generated module table, the alias submodules,
``loops_async.tinker.install()`` and ``python -m loops_async.tinker``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from loops_async.server import LocalServer
from loops_async.tinker import _install
from loops_async.tinker._install import (
    TinkerAlreadyInstalledError,
    install,
    is_installed,
    register_submodules,
    uninstall,
)
from loops_async.tinker._modules import MODULES, TOP_LEVEL

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "loops_async.tinker"
TYPES = f"{PACKAGE}.types"


def _in_tree(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ("tinker", PACKAGE))


def _synthesized(module: object) -> bool:
    spec = getattr(module, "__spec__", None)
    return getattr(spec, "loader", None) is _install._LOADER


def _usable_types() -> ModuleType | None:
    """The real ``loops_async.tinker.types`` when it imports and has TensorData."""
    try:
        module = importlib.import_module(TYPES)
    except Exception:  # not written yet (or mid-edit): the tests use a stand-in
        return None
    return module if hasattr(module, "TensorData") else None


@pytest.fixture
def layer() -> Iterator[ModuleType]:
    """``loops_async.tinker`` with its alias submodules; afterwards no ``tinker`` alias, the
    finder gone and ``sys.modules`` / the package namespace as they were."""
    saved_modules = {n: m for n, m in sys.modules.items() if _in_tree(n)}
    saved_meta_path = list(sys.meta_path)
    package = importlib.import_module(PACKAGE)
    saved_attrs = dict(vars(package))
    created: list[ModuleType] = []
    if _usable_types() is None:
        stand_in = ModuleType(TYPES, "Test stand-in for loops_async.tinker.types.")
        stand_in.TensorData = type("TensorData", (), {})
        created.append(stand_in)
        for name in [n for n in sys.modules if n.startswith(TYPES + ".")]:
            del sys.modules[name]  # rebuilt below on the stand-in (restored afterwards)
        sys.modules[TYPES] = stand_in
        package.types = stand_in
    register_submodules()  # loops_async/tinker/__init__.py calls it too
    yield package
    uninstall()
    sys.meta_path[:] = saved_meta_path
    for name in [n for n in sys.modules if _in_tree(n) and n not in saved_modules]:
        module = sys.modules[name]
        if not name.startswith(PACKAGE) or _synthesized(module) or module in created:
            del sys.modules[name]  # real modules imported meanwhile stay (no double loads)
    sys.modules.update(saved_modules)
    for key in [k for k in vars(package) if k not in saved_attrs]:
        if _synthesized(vars(package)[key]):
            delattr(package, key)
    vars(package).update(saved_attrs)


@pytest.fixture
def real_tinker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake real tinker distribution on sys.path."""
    pkg = tmp_path / "site" / "tinker"
    (pkg / "types").mkdir(parents=True)
    (pkg / "__init__.py").write_text("REAL = True\n", encoding="utf-8")
    (pkg / "types" / "__init__.py").write_text("REAL = True\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(pkg.parent))
    return pkg


REAL_TINKER = _install._real_tinker() is not None
"""A real tinker is installed here (e.g. with tinker-cookbook's dependencies): the tests that are
not about refusing it ask to shadow it."""


def _run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("TINKER_BASE_URL", "LOOPS_BASE_URL")
    }
    paths = [str(ROOT), *env.pop("PYTHONPATH", "").split(os.pathsep)]
    environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    environ.update(env)
    shadow = ("--shadow",) if REAL_TINKER else ()
    return subprocess.run(
        [sys.executable, "-m", "loops_async.tinker", *shadow, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---------------------------------------------------------------------------- the table


def test_module_table_is_generated_and_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_tinker_modules", ROOT / "scripts" / "gen_tinker_modules.py"
    )
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, "stale: python scripts/gen_tinker_modules.py"

    surface = json.loads((ROOT / "tests" / "data" / "tinker_surface.json").read_text("utf-8"))
    for module, names in surface["modules"].items():
        if module == "tinker":
            assert set(names) <= set(TOP_LEVEL)
        else:
            assert set(names) <= set(MODULES[module.removeprefix("tinker.")]), module
    assert MODULES["lib"] == ()  # an intermediate package
    assert "TensorData" in MODULES["types.tensor_data"]
    for suffix in MODULES:  # every parent is in the table (or is the package itself)
        parent = suffix.rpartition(".")[0]
        assert not parent or parent in MODULES, suffix


# ----------------------------------------------------------------------- alias submodules


def test_register_submodules_builds_the_tinker_layout(layer: ModuleType) -> None:
    types_module = sys.modules[TYPES]
    for suffix, names in MODULES.items():
        module = sys.modules[f"{PACKAGE}.{suffix}"]
        parent_name, _, child = f"{PACKAGE}.{suffix}".rpartition(".")
        assert getattr(sys.modules[parent_name], child) is module
        if suffix == "types":
            continue
        assert _synthesized(module), suffix
        assert "Alias" in (module.__doc__ or "")
        assert set(module.__all__) <= set(names)
        for name in module.__all__:
            expected = getattr(types_module, name, None) or getattr(layer, name)
            assert getattr(module, name) is expected, (suffix, name)
        has_children = any(other.startswith(suffix + ".") for other in MODULES)
        assert (getattr(module, "__path__", None) == []) is has_children, suffix

    import loops_async.tinker.types.tensor_data

    assert loops_async.tinker.types.tensor_data.TensorData is types_module.TensorData
    from loops_async.tinker.types.tensor_data import TensorData

    assert TensorData is types_module.TensorData
    with pytest.raises(ImportError):
        from loops_async.tinker.lib import NotATinkerName  # noqa: F401


def test_register_submodules_is_idempotent(layer: ModuleType) -> None:
    before = {n: m for n, m in sys.modules.items() if n.startswith(PACKAGE + ".")}
    register_submodules()
    after = {n: m for n, m in sys.modules.items() if n.startswith(PACKAGE + ".")}
    assert after == before
    assert all(after[n] is before[n] for n in before)


def test_alias_submodules_see_names_defined_later(layer: ModuleType) -> None:
    # a name the layer did not have at registration is found on first access
    module = sys.modules[f"{PACKAGE}.lib.public_interfaces.rest_client"]
    had = "RestClient" in vars(layer)
    sentinel = type("RestClient", (), {})
    if not had:
        layer.RestClient = sentinel
    from loops_async.tinker.lib.public_interfaces.rest_client import RestClient

    assert RestClient is layer.RestClient
    assert "RestClient" in module.__all__
    if not had:
        del layer.RestClient
        vars(module).pop("RestClient", None)
        module.__all__.remove("RestClient")


# ------------------------------------------------------------------------------- install


def test_install_aliases_tinker(layer: ModuleType) -> None:
    assert not is_installed()
    install(shadow=REAL_TINKER)
    install(shadow=REAL_TINKER)  # idempotent
    assert is_installed()
    import tinker
    import tinker.lib.public_interfaces.training_client as training_module
    from tinker import types
    from tinker.types.tensor_data import TensorData

    assert tinker is layer
    assert types is sys.modules[TYPES]
    assert TensorData is sys.modules[TYPES].TensorData
    assert sys.modules["tinker.types"] is sys.modules[TYPES]
    assert training_module is sys.modules[f"{PACKAGE}.lib.public_interfaces.training_client"]
    assert importlib.import_module("tinker.lib") is sys.modules[f"{PACKAGE}.lib"]
    with pytest.raises(ImportError):
        from tinker.lib import NotATinkerName  # noqa: F401
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tinker.not_a_module")

    uninstall()
    assert not is_installed()
    assert not any(n == "tinker" or n.startswith("tinker.") for n in sys.modules)
    assert not any(getattr(f, "_loops_async_tinker_alias", False) for f in sys.meta_path)


def test_finder_loads_each_module_once(layer: ModuleType) -> None:
    install(shadow=REAL_TINKER)
    # a real submodule imported first through its tinker name ...
    sys.modules.pop(f"{PACKAGE}.__main__", None)
    sys.modules.pop("tinker.__main__", None)
    main_module = importlib.import_module("tinker.__main__")
    assert main_module is sys.modules[f"{PACKAGE}.__main__"]
    assert main_module.__name__ == f"{PACKAGE}.__main__"
    assert getattr(main_module.__spec__, "name", None) == main_module.__name__
    assert layer.__main__ is main_module
    # ... and one imported first under its own name
    sys.modules.pop("tinker._modules", None)
    assert importlib.import_module("tinker._modules") is sys.modules[f"{PACKAGE}._modules"]


def test_install_refuses_to_shadow_a_real_tinker(layer: ModuleType, real_tinker: Path) -> None:
    with pytest.raises(TinkerAlreadyInstalledError) as info:
        install()
    assert str(real_tinker) in str(info.value)
    assert "shadow=True" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert not is_installed()
    assert "tinker" not in sys.modules

    install(shadow=True)
    import tinker

    assert tinker is layer
    assert not hasattr(tinker, "REAL")
    uninstall()
    install(shadow=True)  # find_spec now goes through our finder: still detected
    uninstall()
    with pytest.raises(TinkerAlreadyInstalledError):
        install()


def test_install_shadow_drops_an_imported_real_tinker(layer: ModuleType, real_tinker: Path) -> None:
    import tinker
    import tinker.types

    real, real_types = tinker, tinker.types
    assert real.REAL
    with pytest.raises(TinkerAlreadyInstalledError, match="shadow"):
        install()
    assert sys.modules["tinker"] is real

    install(shadow=True)
    assert sys.modules["tinker"] is layer
    assert sys.modules["tinker.types"] is sys.modules[TYPES]
    uninstall()  # the real modules come back
    assert sys.modules["tinker"] is real
    assert sys.modules["tinker.types"] is real_types


# ------------------------------------------------------------------ python -m loops_async.tinker


def test_main_runs_a_script_with_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import tinker
            import tinker.types.tensor_data as td
            from tinker import types
            print(json.dumps({
                "argv": sys.argv, "name": tinker.__name__, "td": td.__name__,
                "same": sys.modules["tinker.types"] is sys.modules["loops_async.tinker.types"],
                "path0": sys.path[0], "main": __name__,
            }))
            sys.exit(7)
            """
        ),
        encoding="utf-8",
    )
    result = _run(str(script), "--flag", "x", "-m", "--shadow", "--")
    assert result.returncode == 7, result.stderr
    out = json.loads(result.stdout)
    assert out == {
        "argv": [str(script), "--flag", "x", "-m", "--shadow", "--"],
        "name": "loops_async.tinker",
        "td": "loops_async.tinker.types.tensor_data",
        "same": True,
        "path0": os.path.realpath(tmp_path),
        "main": "__main__",
    }


def test_main_runs_a_module(tmp_path: Path) -> None:
    (tmp_path / "tinker_job.py").write_text(
        "import sys, tinker\nprint(tinker.__name__, __name__, sys.argv[1:])\nsys.exit(3)\n",
        encoding="utf-8",
    )
    result = _run("-m", "tinker_job", "-v", "--x=1", PYTHONPATH=str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert result.stdout.split("\n")[0] == "loops_async.tinker __main__ ['-v', '--x=1']"


def test_main_local_starts_a_server(tmp_path: Path) -> None:
    script = tmp_path / "ping.py"
    script.write_text(
        "import os, httpx\n"
        "url = os.environ['TINKER_BASE_URL']\n"
        "print(url, httpx.get(url + '/').status_code)\n",
        encoding="utf-8",
    )
    result = _run("--local", str(script))
    assert result.returncode == 0, result.stderr
    url, status = result.stdout.split()[-2:]
    assert url.startswith("http://127.0.0.1:")
    assert status == "200"


SPAWN_SCRIPT = """
import multiprocessing
import subprocess
import sys

import tinker


def work(sampler):
    import tinker

    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    response = sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=2)).result(timeout=60)
    return tinker.__name__, len(response.sequences[0].tokens)


if __name__ == "__main__":
    sampler = tinker.ServiceClient().create_sampling_client(base_model="loops-local/tiny-chat")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print(*pool.apply(work, (sampler.result(timeout=60),)))
    child = [sys.executable, "-c", "import tinker; print(tinker.__name__)"]
    print(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip())
"""


def test_child_processes_import_the_layer_too(tmp_path: Path, null_server: LocalServer) -> None:
    """Spawn workers (tinker-cookbook's rollout executor) and subprocesses of a script run
    by ``python -m loops_async.tinker`` get the alias too, and a pickled SamplingClient
    samples there."""
    script = tmp_path / "spawner.py"
    script.write_text(SPAWN_SCRIPT, encoding="utf-8")
    result = _run(str(script), TINKER_BASE_URL=null_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["loops_async.tinker 2", "loops_async.tinker"]


def test_main_local_keeps_an_existing_url(
    layer: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loops_async.tinker.__main__ import main

    script = tmp_path / "show.py"
    script.write_text(
        "import os, tinker\nprint('URL', os.environ['TINKER_BASE_URL'])\n", encoding="utf-8"
    )
    monkeypatch.setenv("TINKER_BASE_URL", "http://example.invalid:1")
    monkeypatch.delenv("LOOPS_BASE_URL", raising=False)
    shadow = ["--shadow"] if REAL_TINKER else []
    assert main([*shadow, "--local", str(script)]) == 0
    captured = capsys.readouterr()
    assert "already set: http://example.invalid:1" in captured.err
    assert captured.out == "URL http://example.invalid:1\n"
    assert os.environ["TINKER_BASE_URL"] == "http://example.invalid:1"


def test_main_in_process_contract(
    layer: ModuleType,
    real_tinker: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loops_async.tinker.__main__ import _split, main

    assert _split(["--shadow", "s.py", "-m", "--local"]) == (
        ["--shadow", "s.py"],
        ["-m", "--local"],
    )
    assert _split(["--local", "-m", "pkg.mod", "-h"]) == (["--local", "-m", "pkg.mod"], ["-h"])
    assert _split(["-mpkg", "a"]) == (["-m", "pkg"], ["a"])
    assert _split(["--", "-odd.py", "--x"]) == (["--", "-odd.py"], ["--x"])

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m loops_async.tinker" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--bogus", "s.py"])
    assert exit_info.value.code == 2
    assert main([str(tmp_path / "missing.py")]) == 2
    capsys.readouterr()

    script = tmp_path / "odd.py"
    script.write_text("import sys, tinker\nprint(sys.argv[1:], hasattr(tinker, 'REAL'))\n", "utf-8")
    saved_argv = list(sys.argv)
    assert main([str(script)]) == 2  # the real tinker on sys.path is not shadowed ...
    assert "--shadow" in capsys.readouterr().err
    assert main(["--shadow", "--", str(script), "-x"]) == 0  # ... unless asked
    assert capsys.readouterr().out == "['-x'] False\n"
    assert sys.argv == saved_argv
