"""The async RL loop of ``rl_asyncio.py``, unchanged, on trio.

    python examples/rl_trio.py [--steps 15] [--group 16] [--server URL]

loops_async's async API is written on anyio, so the same coroutine runs on either loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rl_asyncio import main as run


def main(argv: list[str] | None = None) -> list[float]:
    return run(argv, backend="trio")


if __name__ == "__main__":
    main()
