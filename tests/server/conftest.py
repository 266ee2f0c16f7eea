"""Fixtures of the server tests. Each module defines its own ``server`` (settings differ);
``client`` and ``trainer`` build on whichever one is in scope."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from loops_async.server import LocalServer

from ._http import Trainer


@pytest.fixture
def client(server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


@pytest.fixture
def trainer(client: httpx.Client) -> Trainer:
    t = Trainer(client)
    t.init()
    return t
