"""The README and quickstart code blocks run as written; the CLI and the demo work."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import loops_async
from loops_async.cli import main
from loops_async.server import LocalServer

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_URL = "http://127.0.0.1:8700"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_code_blocks_run_as_written(
    doc: str, torch_server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = python_blocks(ROOT / doc)
    assert blocks
    namespace: dict[str, object] = {"__name__": "__doc__"}
    assert any(DOCUMENTED_URL in block for block in blocks)
    for block in blocks:  # one namespace, in order, like a reader pasting them
        exec(compile(block.replace(DOCUMENTED_URL, torch_server.url), doc, "exec"), namespace)
    assert capsys.readouterr().out.strip()


def test_all_is_sorted_and_complete() -> None:
    assert loops_async.__all__ == sorted(loops_async.__all__)
    public = {n for n in dir(loops_async) if not n.startswith("_")} - {
        "errors",
        "types",
        "service",
        "training",
        "sampling",
        "tokenizer",
        "tracking",
        "server",
        "cli",
        "demo",
        "tinker",
    }
    assert public <= set(loops_async.__all__) | {"__version__"}
    for name in loops_async.__all__:
        obj = getattr(loops_async, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_demo_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--sft-steps", "2", "--steps", "2", "--output", str(tmp_path)])
    assert status in (0, 1)  # 1: two RL steps did not raise the reward (they need not)
    out = capsys.readouterr().out
    assert "RL [" in out
    assert "checkpoint saved: bt://loops:" in out
    assert (tmp_path / "loops-demo.png").is_file()


def test_api_reference_is_current_and_complete() -> None:
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_api_docs import documented_names

    assert (
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    ), "docs/api.md is stale: python scripts/gen_api_docs.py"
    errors_and_version = {n for n in loops_async.__all__ if n.endswith("Error")} | {"__version__"}
    assert set(loops_async.__all__) - errors_and_version <= documented_names()
    exceptions_doc = (ROOT / "docs" / "exceptions.md").read_text(encoding="utf-8")
    for name in errors_and_version - {"__version__"}:
        assert name in exceptions_doc, name


def test_docs_pages_are_linked() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name in nav, page.name
