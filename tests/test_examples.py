"""Every example runs (small sizes) against the embedded server, and so does the demo."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loops_async.demo import run_demo
from loops_async.server import LocalServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module", autouse=True)
def _examples_importable() -> None:
    sys.path.insert(0, str(EXAMPLES))


def example(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(name)


def test_sft_sync(torch_server: LocalServer) -> None:
    losses = example("sft_sync").main(["--steps", "8", "--server", torch_server.url])
    assert losses[-1] < losses[0]


def test_rl_asyncio(torch_server: LocalServer) -> None:
    rewards = example("rl_asyncio").main(
        ["--steps", "2", "--group", "4", "--server", torch_server.url]
    )
    assert len(rewards) == 2
    assert all(0.0 <= r <= 1.0 for r in rewards)


def test_rl_trio(torch_server: LocalServer) -> None:
    rewards = example("rl_trio").main(
        ["--steps", "1", "--group", "4", "--server", torch_server.url]
    )
    assert len(rewards) == 1


def test_pipelining(torch_server: LocalServer) -> None:
    serial, piped = example("pipelining").main(
        ["--steps", "3", "--env-ms", "20", "--server", torch_server.url]
    )
    assert serial > 0
    assert piped > 0


def test_examples_start_their_own_server_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPS_BASE_URL", raising=False)
    losses = example("sft_sync").main(["--steps", "1"])
    assert len(losses) == 1


def test_the_demo_improves_the_reward_and_plots(tmp_path: Path) -> None:
    """The main job as ``make demo`` runs it (default sizes), on an embedded server."""
    out = io.StringIO()
    result = run_demo(output=tmp_path, out=out)
    text = out.getvalue()
    assert result.after_rl["sampled reward"] > result.before_rl["sampled reward"]
    assert result.plot is not None
    assert result.plot.stat().st_size > 10_000
    assert result.checkpoint.startswith("bt://loops:")
    assert list((tmp_path / "data" / "runs").glob("*/weights/demo-final-0"))
    assert "after SFT  after RL" in text
    assert "checkpoint saved" in text


def test_tinker_rl_loop_through_the_runner(torch_server: LocalServer) -> None:
    """The tinker-cookbook-style GRPO example, run unchanged with ``python -m
    loops_async.tinker`` (``import tinker`` resolves to the layer)."""
    env = {**os.environ, "TINKER_BASE_URL": torch_server.url}
    env.pop("LOOPS_BASE_URL", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loops_async.tinker",
            str(EXAMPLES / "tinker_rl_loop.py"),
            "--steps",
            "2",
            "--group",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2
    assert "saved tinker://" in done.stdout
