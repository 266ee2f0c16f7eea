"""Scripts written against the tinker API run unchanged through ``python -m loops_async.tinker``
(``import tinker``, ``from tinker import types``) against the local server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from loops_async.server import LocalServer

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def test_tinker_quickstart_shape(torch_server: LocalServer) -> None:
    env = {**os.environ, "TINKER_BASE_URL": torch_server.url}
    env.pop("LOOPS_BASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "loops_async.tinker", str(SCRIPTS / "pig_latin.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"Loss per token: ([0-9.]+)", done.stdout)]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    responses = re.findall(r"^(\d): ", done.stdout, flags=re.MULTILINE)
    assert responses == [str(i) for i in range(8)]
