"""Run the local server: in-process on a background thread (:class:`LocalServer`, for tests,
examples and benchmarks) or in the foreground (:func:`serve`, for ``loops-async serve``).

Download tokens (``/files/<token>``: their own credential, like presigned URLs) never reach the
logs: the ``uvicorn.access`` logger of every server started here redacts them
(:class:`RedactFileTokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG

from .app import create_app, get_state, get_storage_app
from .runs import ServerState
from .settings import ServerSettings

__all__ = ["LocalServer", "RedactFileTokens", "embedded", "serve"]

logger = logging.getLogger("loops_async.server")

LOCAL_SERVER_MAX_RUNS = 1024
"""``max_runs`` of a :class:`LocalServer` unless given (the CLI's default is 64)."""

_GRACEFUL_SHUTDOWN_S = 5.0
_START_TIMEOUT_S = 60.0


_FILE_TOKEN = re.compile(r"/files/[^/?#\s\"]+")
REDACTED = "/files/<redacted>"
"""What a ``/files/<token>`` path becomes in the logs."""


def _redact(text: str) -> str:
    return _FILE_TOKEN.sub(REDACTED, text)


class RedactFileTokens(logging.Filter):
    """A logging filter that replaces every ``/files/<token>`` download token in a record (its
    message and its arguments: uvicorn's access log passes the path as an argument) with
    ``/files/<redacted>``. It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always True."""
        if isinstance(record.msg, str) and "/files/" in record.msg:
            record.msg = _redact(record.msg)
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "/files/" in a for a in args):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict) and any(
            isinstance(a, str) and "/files/" in a for a in args.values()
        ):
            record.args = {k: _redact(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


_REDACT_FILE_TOKENS = RedactFileTokens()


def _install_log_redaction() -> None:
    """Put the token filter on uvicorn's loggers (idempotent; after uvicorn configured its
    logging, which keeps filters anyway)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(_REDACT_FILE_TOKENS)


class _CompanionServer(uvicorn.Server):
    """A uvicorn server run as a task beside the main one (the hosted profile's presigned
    storage): the main server owns the signals and tells it when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, telling the app first when it starts to shut down, so held long-polls
    answer 503 at once instead of keeping the shutdown waiting for their hold to end. With a
    ``companion`` (the presigned-storage server of the hosted profile) it starts the companion
    on the same event loop once it listens itself, and stops it when it stops."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        companion: tuple[_CompanionServer, socket.socket] | None = None,
    ) -> None:
        super().__init__(config)
        self._loops_state = state
        self._companion = companion
        self._companion_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Whether the server (and its companion, if any) accepts requests."""
        return self.started and (self._companion is None or self._companion[0].started)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self._companion is None or not self.started:
            return
        companion, sock = self._companion
        # uvicorn runs on asyncio: the companion is one more asyncio task of this loop.
        task = asyncio.ensure_future(companion.serve(sockets=[sock]))
        self._companion_task = task
        while not companion.started:
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise RuntimeError(f"the presigned-storage server failed to start: {error!r}")
            await asyncio.sleep(0.005)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._loops_state.begin_shutdown()
        if self._companion is not None:
            self._companion[0].should_exit = True
        await super().shutdown(sockets=sockets)
        task = self._companion_task
        if task is not None:
            if self.force_exit and self._companion is not None:
                self._companion[0].force_exit = True  # a forced stop stops both
            try:
                await asyncio.wait_for(task, _GRACEFUL_SHUTDOWN_S + 2.0)
            except Exception:  # a timeout included
                logger.warning("the presigned-storage server did not stop cleanly", exc_info=True)


def _uvicorn_config(
    app: Starlette, settings: ServerSettings, *, quiet: bool, lifespan: bool = True
) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on" if lifespan else "off",
        ws="none",
        log_level=settings.log_level,
        log_config=None if quiet else LOGGING_CONFIG,
        access_log=not quiet,
        timeout_graceful_shutdown=int(_GRACEFUL_SHUTDOWN_S),
        server_header=False,
    )
    _install_log_redaction()  # after Config(), which (re)configures uvicorn's loggers
    return config


def _origin(host: str, port: int) -> str:
    """``http://host:port`` as a client reaches a server bound to ``host`` (a wildcard address
    is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _make_server(
    app: Starlette, settings: ServerSettings, *, quiet: bool
) -> tuple[_UvicornServer, socket.socket | None]:
    """The uvicorn server of ``app`` and, in the hosted profile, the bound socket of its
    presigned-storage companion (``get_state(app).storage_url`` is set to it)."""
    state = get_state(app)
    storage_app = get_storage_app(app)
    companion: tuple[_CompanionServer, socket.socket] | None = None
    storage_sock: socket.socket | None = None
    if storage_app is not None:
        storage_sock = _bind(settings.host, settings.storage_port)
        port = int(storage_sock.getsockname()[1])
        state.storage_url = _origin(settings.host, port)
        config = _uvicorn_config(storage_app, settings, quiet=True, lifespan=False)
        config.access_log = not quiet
        companion = (_CompanionServer(config), storage_sock)
    server = _UvicornServer(_uvicorn_config(app, settings, quiet=quiet), state, companion)
    return server, storage_sock


def _configure_logging(level: str) -> None:
    """Send the server's own log records (``loops_async.*``) to stderr like uvicorn's."""
    pkg_logger = logging.getLogger("loops_async")
    pkg_logger.setLevel(LOG_LEVELS[level])
    if not pkg_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [%(name)s] %(message)s"))
        pkg_logger.addHandler(handler)


def serve(settings: ServerSettings) -> None:
    """Run the server in the foreground until interrupted (Ctrl-C / SIGTERM)."""
    _configure_logging(settings.log_level)
    app = create_app(settings)
    server, storage_sock = _make_server(app, settings, quiet=False)
    storage_url = get_state(app).storage_url
    if storage_url is not None:
        logger.info("presigned storage (hosted profile) on %s", storage_url)
    try:
        server.run()
    finally:
        if storage_sock is not None:
            storage_sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class LocalServer:
    """The local reference server in this process, on a background thread.

    ``LocalServer(**overrides)`` takes :class:`ServerSettings` fields (``backend="null"``,
    ``poll_hold=1.0``, ``api_key="k"``, ...). Defaults differ from the CLI's: ``port=0`` (a free
    port, chosen when the socket is bound), a fresh temporary ``data_dir`` that is deleted on
    :meth:`stop` (a ``data_dir`` you pass is kept), and ``max_runs=1024`` (a test session's
    shared server accumulates runs; ``loops-async serve`` keeps 64).

    Use it as a context manager (``with LocalServer(backend="null") as srv: ...``) or call
    :meth:`start` / :meth:`stop`. ``url`` is the base URL (``http://127.0.0.1:54321``) and
    ``state`` the live server state (runs, execution counters) for tests to read. With
    ``profile="hosted"`` a second listener serves checkpoint files as presigned storage would,
    at ``storage_url``.
    """

    def __init__(self, **overrides: Any) -> None:
        overrides.setdefault("port", 0)
        overrides.setdefault("log_level", "warning")
        overrides.setdefault("max_runs", LOCAL_SERVER_MAX_RUNS)
        self._temp_dir: Path | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None
        if overrides.get("data_dir") is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="loops-async-"))
            overrides["data_dir"] = self._temp_dir
            # Removed on stop(), or when this object is collected / at interpreter exit.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._temp_dir, True)
        try:
            self.settings = ServerSettings(**overrides)
        except BaseException:
            self._remove_temp_dir()
            raise
        self._app: Starlette | None = None
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._storage_sock: socket.socket | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._startup_error: BaseException | None = None

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        profile = "" if self.settings.profile == "local" else f" profile={self.settings.profile}"
        return f"<LocalServer {where} backend={self.settings.backend}{profile}>"

    # ----------------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("LocalServer is not started")
        return _origin(self.settings.host, self._port)

    @property
    def storage_url(self) -> str | None:
        """Hosted profile: the origin of the presigned-storage listener that checkpoint file
        URLs point to (``http://127.0.0.1:54322``), after :meth:`start`. None in the local
        profile (file URLs are on :attr:`url`)."""
        if self._app is None:
            raise RuntimeError("LocalServer is not started")
        return get_state(self._app).storage_url

    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("LocalServer is not started")
        return self._port

    @property
    def state(self) -> ServerState:
        """The live server state: ``state.runs[run_id].executions["forward_backward"]``, ...
        Read it; do not mutate it (it belongs to the server's event loop)."""
        if self._app is None:
            raise RuntimeError("LocalServer is not started")
        return get_state(self._app)

    @property
    def app(self) -> Starlette:
        """The ASGI app (after :meth:`start`).

        ``loops_async.server.app.get_body_gate(server.app)`` and its siblings read its parts."""
        if self._app is None:
            raise RuntimeError("LocalServer is not started")
        return self._app

    @property
    def data_dir(self) -> Path:
        """The data directory in use."""
        return self.settings.data_dir

    # ----------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = _START_TIMEOUT_S) -> LocalServer:
        """Bind the socket, start uvicorn on a thread and wait until it serves. Returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("a stopped LocalServer cannot be restarted; make a new one")
            if self._thread is not None:
                return self
            sock = _bind(self.settings.host, self.settings.port)
            self._sock = sock
            self._port = int(sock.getsockname()[1])
            app = create_app(self.settings)
            self._app = app
            server, self._storage_sock = _make_server(app, self.settings, quiet=True)
            self._server = server

            def run() -> None:
                try:
                    server.run(sockets=[sock])
                except BaseException as exc:  # SystemExit on a failed lifespan startup
                    self._startup_error = exc

            thread = threading.Thread(
                target=run, name=f"loops-async-server-{self._port}", daemon=True
            )
            self._thread = thread
            thread.start()
        deadline = time.monotonic() + timeout
        while not server.ready:
            if not thread.is_alive():
                error = self._startup_error
                self.stop()
                raise RuntimeError(f"the local server failed to start: {error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local server did not start within {timeout} s")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down (pending long-polls answer 503), free the port and delete a temporary data
        directory. Idempotent; bounded by ``timeout`` seconds (then the thread is abandoned)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, thread, sock = self._server, self._thread, self._sock
            storage_sock = self._storage_sock
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(2.0)
            if thread.is_alive():
                logger.warning("the local server thread did not stop within %.1f s", timeout)
        for open_sock in (sock, storage_sock):
            if open_sock is not None:
                open_sock.close()
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self._temp_dir = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def embedded(url: str | None = None, **settings: Any) -> Iterator[str]:
    """Yield the URL of a Loops server: ``url`` (or ``$LOOPS_BASE_URL``) when given, else a
    :class:`LocalServer` started for the duration of the block with ``settings``.

    The one-liner the examples use so they run against the embedded server by default and
    against any Loops server with ``--server URL``::

        with embedded(args.server) as url:
            service = ServiceClient(base_url=url)
    """
    url = url or os.environ.get("LOOPS_BASE_URL")
    if url:
        yield url
        return
    with LocalServer(**settings) as server:
        yield server.url
