"""Shared fixtures. Every async test runs on asyncio and on trio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loops_async.server import LocalServer


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def torch_server() -> Iterator[LocalServer]:
    """One real (torch) local server for the session, on 127.0.0.1 and a free port."""
    pytest.importorskip("torch")
    with LocalServer(backend="torch", seq_gap_timeout=1.0) as server:
        yield server


@pytest.fixture(scope="session")
def null_server() -> Iterator[LocalServer]:
    """A protocol-only local server (instant results of the right shapes)."""
    with LocalServer(backend="null", seq_gap_timeout=1.0) as server:
        yield server
