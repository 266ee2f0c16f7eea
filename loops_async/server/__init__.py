"""The local reference server: a real trainer and control plane speaking the Loops protocol.

``LocalServer`` runs it in-process on a free port (tests, examples, benchmarks);
``loops-async serve`` runs it in the foreground. See PROTOCOL.md for the routes.
"""

from __future__ import annotations

from .app import create_app
from .local import LocalServer, embedded, serve
from .settings import ServerSettings

__all__ = ["LocalServer", "ServerSettings", "create_app", "embedded", "serve"]
