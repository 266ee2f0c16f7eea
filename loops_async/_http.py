"""HTTP transport and request policy: per-event-loop ``httpx.AsyncClient`` objects in two lanes,
the protocol headers, the one retry loop (:meth:`Transport.send`) with a status table per route
kind, and the one place where HTTP failures become :mod:`loops_async.errors` exceptions."""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
import urllib.request
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import msgspec

from . import errors
from ._direct import DirectPool
from ._loop import current_loop, running_loop
from ._version import __version__

__all__ = [
    "CONTROL_READ",
    "CONTROL_WRITE",
    "PROBE",
    "RETRY_TIME_SCALE",
    "SAMPLE",
    "SAMPLER_MODELS",
    "SAMPLER_POLL",
    "TRAINER_POLL",
    "TRAINER_SUBMIT",
    "Backoff",
    "Lane",
    "ReadTimeout",
    "RouteTable",
    "Transport",
    "error_for_response",
    "is_permanent_rejection",
    "map_httpx_error",
    "retry_after",
]

log = logging.getLogger("loops_async")
_httpx_log = logging.getLogger("httpx")

USER_AGENT = f"loops-async/{__version__}"
POLL_READ_TIMEOUT = 35.0
"""Read timeout of a long-poll: above the server's ~30 s hold, so an idle poll gets 408."""

_STATUS_ERRORS: dict[int, type[errors.APIStatusError]] = {
    400: errors.BadRequestError,
    401: errors.AuthenticationError,
    403: errors.PermissionDeniedError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    413: errors.RequestTooLargeError,
    422: errors.UnprocessableEntityError,
    429: errors.RateLimitError,
    503: errors.ServerShutdownError,
}


def _body_of(response: httpx.Response) -> object:
    try:
        return msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return response.text


def _message_of(body: object) -> str:
    """The first human message in an error body (``detail``, ``error`` or ``message``)."""
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            value = body.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict):
                inner = _message_of(value)
                if inner:
                    return inner
            if isinstance(value, list) and value:
                return "; ".join(str(v) for v in value)
        return ""
    if isinstance(body, str):
        return body.strip()[:2000]
    return ""


def error_for_response(
    response: httpx.Response, cls: type[errors.APIStatusError] | None = None
) -> errors.APIStatusError:
    """The exception for an HTTP error ``response`` (one subclass per meaningful status)."""
    body = _body_of(response)
    status = response.status_code
    if cls is None:
        cls = _STATUS_ERRORS.get(status)
        if cls is None:
            cls = errors.InternalServerError if status >= 500 else errors.APIStatusError
    message = _message_of(body) or response.reason_phrase or "HTTP error"
    return cls(
        message,
        status_code=status,
        method=response.request.method,
        url=str(response.request.url),
        body=body,
    )


def is_permanent_rejection(response: httpx.Response) -> bool:
    """Whether a rejection says it will never change (PROTOCOL §1): any 422; a 4xx with
    ``X-Baseten-Error-Source: 06``; a 400 whose body's error type is ``BadRequestError``; a
    deactivated model (source ``01`` + code ``631``); or a body that names its ``error_class``
    (the local server's rejections, its shutdown 503 included)."""
    status = response.status_code
    if status == 422:
        return True
    source = response.headers.get("x-baseten-error-source")
    if 400 <= status < 500 and source == "06":
        return True
    if source == "01" and response.headers.get("x-baseten-error-code") == "631":
        return True
    body = _body_of(response)
    if isinstance(body, dict) and isinstance(body.get("error_class"), str):
        # A server that names the error class has looked at the request and answered: it is
        # not a proxy or a starting replica talking (the local server marks every error so).
        return True
    if status == 400 and isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("type") == "BadRequestError":
            return True
        if body.get("type") == "BadRequestError":
            return True
    return False


RETRY_TIME_SCALE = 1.0
"""Multiplies every retry pause (back-off steps, fixed pauses, ``Retry-After``); tests that
inject thousands of faults shrink it. Deadlines (windows) are not scaled."""


class Backoff:
    """Exponential back-off with jitter (``base * 2**n`` capped at ``cap``) within a time
    budget of ``window`` seconds from creation."""

    def __init__(self, window: float, *, base: float = 0.25, cap: float = 8.0) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0
        self.deadline = anyio.current_time() + window

    def next_delay(self) -> float:
        """The next delay in seconds."""
        ceiling = min(self._cap, self._base * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # jitter, not crypto

    async def wait(self, delay: float | None = None) -> bool:
        """Sleep before the next attempt (``delay``, e.g. a ``Retry-After``, or the next
        back-off step) and return True; return False at once if that would pass the deadline."""
        pause = (self.next_delay() if delay is None else delay) * RETRY_TIME_SCALE
        if anyio.current_time() + pause > self.deadline:
            return False
        await anyio.sleep(pause)
        return True


class _OneShotBody(httpx.AsyncByteStream):
    """A request body that yields its bytes once, from a plain iterator rather than httpx's
    async generator: a request cancelled mid-send on trio then leaves no unfinalised
    generator behind (which trio reports as a ResourceWarning)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _OneShotBody._Iterator:
        return _OneShotBody._Iterator(self._data)

    async def aclose(self) -> None:
        """Nothing to release."""

    class _Iterator:
        def __init__(self, data: bytes) -> None:
            self._data: bytes | None = data

        def __aiter__(self) -> _OneShotBody._Iterator:
            return self

        async def __anext__(self) -> bytes:
            if self._data is None:
                raise StopAsyncIteration
            data, self._data = self._data, None
            return data


class Lane(enum.Enum):
    """Which in-flight limit a request queues for. Samples (up to ``sample_timeout`` each,
    thousands at once) never queue ahead of a trainer submit, a long-poll, a heartbeat or a
    control-plane call: each lane has its own limit, and the loop's connection pool holds both
    lanes' requests at once."""

    CONTROL = "control"
    """Trainer operations (submits, long-polls, health) and the control plane."""
    SAMPLING = "sampling"
    """Sample requests and shared samplers' operation polls."""


class ReadTimeout(enum.Enum):
    """What a request policy does when a response does not come within the read timeout."""

    AGAIN = "again"
    """Send again at once (a long-poll whose hold outlived our read timeout)."""
    RETRY = "retry"
    """Send again after back-off, like any transport failure."""
    RAISE = "raise"
    """Give up (raise the table's ``read_timeout_error``)."""


@dataclass(frozen=True, slots=True)
class RouteTable:
    """How one kind of request is sent and retried: the request policy's status table.

    Every request of the client goes through :meth:`Transport.send` with one of these. A status
    in ``success`` returns the response; ``again`` re-sends at once (no back-off: a long-poll's
    "not yet"); ``transient`` re-sends after ``Retry-After`` or back-off (a fixed ``pause`` if
    set), within the caller's window; ``not_ready`` does the same unless the rejection is marked
    permanent (PROTOCOL §1); anything else raises the mapped :mod:`~loops_async.errors` class.
    Connection failures (the request never reached the server) are always retried; other
    transport failures only when ``retry_transport`` (an idempotent request).
    """

    name: str
    lane: Lane
    success: frozenset[int]
    again: frozenset[int] = frozenset()
    transient: frozenset[int] = frozenset()
    not_ready: frozenset[int] = frozenset()
    pause: float | None = None
    retry_transport: bool = True
    read_timeout: ReadTimeout = ReadTimeout.RETRY
    read_timeout_error: type[errors.LoopsError] = errors.ReadTimeoutError
    status_errors: Mapping[int, type[errors.APIStatusError]] = field(default_factory=dict)


_2XX = frozenset(range(200, 300))
TRANSIENT_PAUSE = 2.0
"""Seconds before re-polling an operation after a 502/503/504 (PROTOCOL §2)."""

TRAINER_SUBMIT = RouteTable(
    "trainer submit",
    Lane.CONTROL,
    success=_2XX,
    transient=frozenset({408, 429, 502, 504}),
    not_ready=frozenset({400, 404, 503}),
)
"""``POST {trainer}/<op>`` with an ``Idempotency-Key``: every retry is safe. 400/404/503 mean a
trainer still starting on the hosted service (PROTOCOL §8) unless marked permanent."""
TRAINER_POLL = RouteTable(
    "trainer poll",
    Lane.CONTROL,
    success=frozenset({200}),
    again=frozenset({408}),
    transient=frozenset({502, 504}),
    pause=TRANSIENT_PAUSE,
    read_timeout=ReadTimeout.AGAIN,
    status_errors={404: errors.UnknownRequestError},
)
"""``GET {trainer}/operations/<id>``: 503 is a shutdown and raises."""
SAMPLE = RouteTable(
    "sample",
    Lane.SAMPLING,
    success=frozenset({200, 202}),
    transient=frozenset({408, 429, 502, 504}),
    not_ready=frozenset({400, 404, 503}),
    read_timeout=ReadTimeout.RAISE,
    read_timeout_error=errors.SampleTimeoutError,
)
"""``POST {sampler}/sample``: 200 is the answer, 202 an operation (shared samplers); 408 is
the policy-version gate; 400/404/503 a sampler still starting (PROTOCOL §8)."""
SAMPLER_POLL = RouteTable(
    "sampler poll",
    Lane.SAMPLING,
    success=frozenset({200}),
    again=frozenset({408}),
    transient=frozenset({502, 503, 504}),
    pause=TRANSIENT_PAUSE,
    read_timeout=ReadTimeout.AGAIN,
    status_errors={404: errors.UnknownRequestError},
)
"""``GET {sampler}/operations/<id>`` of a shared sampler (503 + ``Retry-After`` re-polls)."""
SAMPLER_MODELS = RouteTable(
    "sampler models",
    Lane.SAMPLING,
    success=_2XX,
    transient=frozenset({408, 429, 502, 504}),
    not_ready=frozenset({400, 404, 503}),
)
"""``GET {sampler}/v1/models``: retried while the sampler starts."""
CONTROL_READ = RouteTable(
    "control read", Lane.CONTROL, success=_2XX, transient=frozenset({502, 503, 504})
)
"""Control-plane GETs (and other idempotent reads)."""
CONTROL_WRITE = RouteTable("control write", Lane.CONTROL, success=_2XX, retry_transport=False)
"""Control-plane POSTs: only a connection that never reached the server is retried."""
PROBE = RouteTable("probe", Lane.CONTROL, success=frozenset(range(100, 600)), retry_transport=False)
"""One attempt whose every status goes back to the caller (health, readiness and version
probes, whose own loops decide)."""


@dataclass(slots=True)
class _LaneClient:
    client: httpx.AsyncClient
    limiter: anyio.Semaphore
    direct: DirectPool | None = None
    """The loop's direct path (see :mod:`loops_async._direct`), shared by its lanes; ``None``
    with a custom transport or proxies from the environment."""


@dataclass(slots=True, weakref_slot=True, eq=False)
class _LoopClients:
    """One event loop's HTTP clients, one per lane. The loop is held weakly."""

    backend: Any
    native: weakref.ref[object]
    lanes: dict[Lane, _LaneClient]

    def clients(self) -> list[httpx.AsyncClient]:
        """The distinct HTTP clients of this loop's lanes."""
        return list({id(lane.client): lane.client for lane in self.lanes.values()}.values())

    async def aclose(self) -> None:
        """Close this loop's connections (call it on this loop)."""
        pools = {id(lane.direct): lane.direct for lane in self.lanes.values() if lane.direct}
        for pool in pools.values():
            await pool.aclose()
        for client in self.clients():
            await client.aclose()

    def token(self) -> anyio.lowlevel.EventLoopToken | None:
        native = self.native()
        return None if native is None else anyio.lowlevel.EventLoopToken(self.backend, native)

    def runs(self) -> bool:
        """Whether the loop can run a callback now: not ended, and (asyncio) running."""
        native = self.native()
        if native is None or self.finished():
            return False
        is_running = getattr(native, "is_running", None)
        return bool(is_running()) if callable(is_running) else True

    def finished(self) -> bool:
        """Whether the loop has ended (collected, closed, or its run returned)."""
        native = self.native()
        if native is None:
            return True
        try:
            self.backend.run_sync_soon(_noop, (), native)
        except anyio.RunFinishedError:
            return True
        except RuntimeError:
            return True
        return False


def _noop() -> None:
    pass


_closers: weakref.WeakKeyDictionary[object, _LoopCloser] = weakref.WeakKeyDictionary()
_closers_lock = threading.Lock()


class _LoopCloser:
    """Closes the HTTP clients of one event loop when that loop shuts down.

    An async generator, first iterated on the loop, is registered by the loop's async-generator
    hooks; ``asyncio.run`` (``shutdown_asyncgens``) and the end of ``trio.run`` close the ones
    still alive, which runs its ``finally`` on that loop, while it can still await: the loop's
    clients close their sockets there. Held strongly (in :data:`_closers`, keyed weakly by the
    loop) so that it is never garbage-collected unfinished while its loop runs. A loop that
    never closes its async generators (a hand-run asyncio loop) leaves its clients to be dropped,
    as before.
    """

    __slots__ = ("__weakref__", "agen", "entries")

    def __init__(self) -> None:
        self.entries: weakref.WeakSet[_LoopClients] = weakref.WeakSet()
        self.agen = self._run()

    async def _run(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            entries, self.entries = list(self.entries), weakref.WeakSet()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                for entry in entries:
                    try:
                        await entry.aclose()
                    except Exception:  # pragma: no cover - closing must not raise
                        log.debug("error closing an HTTP client at loop shutdown", exc_info=True)

    def start(self) -> None:
        """Run the generator to its ``yield`` now (on the loop): this registers it with the
        loop's async-generator hooks."""
        step = self.agen.asend(None)
        try:
            step.send(None)
        except StopIteration:
            return
        step.close()  # pragma: no cover - the generator yields at once
        raise RuntimeError("the loop closer did not stop at its first yield")  # pragma: no cover


def close_with_loop(native: object, entry: _LoopClients) -> None:
    """Have ``entry``'s clients closed when the loop ``native`` (this thread's) shuts down."""
    with _closers_lock:
        closer = _closers.get(native)
        fresh = closer is None
        if closer is None:
            closer = _closers[native] = _LoopCloser()
        closer.entries.add(entry)
    if fresh:
        try:
            closer.start()
        except Exception:  # pragma: no cover - a loop without async-generator hooks
            log.debug("cannot close HTTP clients at this loop's shutdown", exc_info=True)


CLOSE_TIMEOUT = 5.0
"""Seconds ``close()``/``aclose()`` wait for the connections of other loops to close."""

_live_transports: weakref.WeakSet[Transport] = weakref.WeakSet()


def _forget_clients_after_fork() -> None:
    # The child must not reuse the parent's sockets or loops: drop (never close) them.
    for transport in list(_live_transports):
        transport._loops.clear()
        transport._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


class Transport:
    """Headers, timeouts, lanes and per-event-loop ``httpx.AsyncClient`` objects; the one place
    where requests are sent, retried (:meth:`send`) and their failures mapped to
    :mod:`loops_async.errors`.

    An ``httpx.AsyncClient`` belongs to the loop it was first used on, so a transport used from
    the portal thread and from a user's loop keeps one per loop (and per :class:`Lane`). Loops
    are held weakly; the clients of a loop that has ended are dropped the next time a new loop
    shows up. ``aclose``/``close`` close the rest, each on its own loop, within
    :data:`CLOSE_TIMEOUT`.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        timeout: float,
        max_connections: int,
        max_sampling_connections: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        sampling = max_connections if max_sampling_connections is None else max_sampling_connections
        self._config: dict[str, Any] = {
            "api_key": api_key,
            "timeout": timeout,
            "max_connections": max_connections,
            "max_sampling_connections": sampling,
            "extra_headers": dict(extra_headers or {}),
        }
        headers = {"User-Agent": USER_AGENT, "X-Baseten-Accept-Error": "1"}
        if api_key:
            headers["Authorization"] = f"Api-Key {api_key}"
        if extra_headers:
            headers.update(extra_headers)
        self._headers = headers
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0), pool=None)
        self._timeouts: dict[str, float | None] = self._timeout.as_dict()
        self._read_timeouts: dict[float, dict[str, float | None]] = {}
        self._lane_limits = {Lane.CONTROL: max_connections, Lane.SAMPLING: sampling}
        self._custom_transport = transport
        self._loops: dict[int, _LoopClients] = {}
        self._lock = threading.Lock()
        self._closed = False
        _live_transports.add(self)

    def __repr__(self) -> str:
        # Never show the Authorization header.
        return f"<Transport loops={len(self._loops)} closed={self._closed}>"

    def config(self) -> dict[str, Any]:
        """Constructor arguments that recreate an equivalent transport (in another process);
        a custom ``httpx`` transport is not carried over. Holds the API key: keep it private."""
        return dict(self._config)

    @property
    def closed(self) -> bool:
        """Whether ``aclose``/``close`` was called."""
        return self._closed

    def loop_count(self) -> int:
        """How many event loops this transport holds HTTP clients for (tests, debugging)."""
        with self._lock:
            return len(self._loops)

    def _lane(self, lane: Lane) -> _LaneClient:
        token = current_loop()
        native = token.native_token
        entry = self._loops.get(id(native))
        if entry is not None and entry.native() is native:
            return entry.lanes[lane]
        stale: list[_LoopClients] = []
        with self._lock:
            if self._closed:
                raise errors.ClientClosedError("the client is closed")
            entry = self._loops.get(id(native))
            if entry is None or entry.native() is not native:
                for key, other in list(self._loops.items()):
                    if other.finished():
                        stale.append(self._loops.pop(key))
                entry = self._loops[id(native)] = _LoopClients(
                    token.backend_class,
                    weakref.ref(native),
                    self._new_lanes(token.backend_class.current_time),
                )
                close_with_loop(native, entry)
        if stale:
            log.debug("dropped the HTTP clients of %d finished event loop(s)", len(stale))
        return entry.lanes[lane]

    def _new_lanes(self, clock: Callable[[], float]) -> dict[Lane, _LaneClient]:
        """One connection pool for the loop, sized to hold every lane's requests at once, and
        one in-flight limiter per lane: a request never waits in the pool, so a lane waits only
        for its own traffic, and warm connections are reused across lanes."""
        total = sum(self._lane_limits.values())
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        client = httpx.AsyncClient(
            headers=self._headers,
            timeout=self._timeout,
            limits=limits,
            transport=self._custom_transport,
            follow_redirects=False,
        )
        direct = None
        if (
            self._custom_transport is None
            and not _environment_proxies()
            and os.environ.get("LOOPS_ASYNC_HTTP_DIRECT", "1") != "0"
        ):
            direct = DirectPool(
                default_headers=list(client.headers.raw),
                keepalive_expiry=limits.keepalive_expiry or 0.0,
                clock=clock,
            )
        return {
            lane: _LaneClient(client, anyio.Semaphore(limit, fast_acquire=True), direct)
            for lane, limit in self._lane_limits.items()
        }

    async def request(
        self,
        method: str,
        url: str,
        *,
        lane: Lane = Lane.CONTROL,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request on this loop's client for ``lane``, once. Failures without a
        response become :class:`~loops_async.errors.TransportError` (or
        :class:`~loops_async.errors.ProtocolError`); statuses are left to the caller."""
        entry = self._lane(lane)
        direct = entry.direct
        if direct is not None and params is None and direct.accepts(url):
            return await self._request_direct(entry, direct, method, url, content, headers, timeout)
        req_headers = dict(headers) if headers else {}
        if content is not None:
            req_headers.setdefault("Content-Type", "application/json")
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(
                self._timeout.connect, read=timeout, write=self._timeout.write, pool=None
            )
        try:
            # Queue here (FIFO, O(1)) rather than in httpcore's pool, whose bookkeeping grows
            # with the number of waiting requests: thousands of samples in flight stay cheap.
            async with entry.limiter:
                request = entry.client.build_request(
                    method, url, content=content, headers=req_headers, params=params, **extra
                )
                request.stream = _OneShotBody(content or b"")
                return await entry.client.send(request)
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, method, url) from exc
        except httpx.InvalidURL as exc:
            raise errors.ProtocolError(f"invalid URL for {method} {url}: {exc}") from exc

    async def _request_direct(
        self,
        entry: _LaneClient,
        direct: DirectPool,
        method: str,
        url: str,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> httpx.Response:
        """:meth:`request` one level below httpx (:mod:`loops_async._direct`)."""
        timeouts = self._timeouts if timeout is None else self._timeouts_for(timeout)
        try:
            async with entry.limiter:
                response = await direct.send(
                    method, url, content=content, headers=headers, timeouts=timeouts
                )
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, method, url) from exc
        if _httpx_log.isEnabledFor(logging.INFO):  # the line httpx logs for each request
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"',
                method,
                response.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        if "set-cookie" in response.headers:
            # From now on this loop goes through httpx, whose cookie jar sends them back.
            entry.client.cookies.extract_cookies(response)
            direct.enabled = False
        return response

    def _timeouts_for(self, read: float) -> dict[str, float | None]:
        found = self._read_timeouts.get(read)
        if found is None:
            found = {**self._timeouts, "read": read}
            if len(self._read_timeouts) < 64:
                self._read_timeouts[read] = found
        return found

    async def send(
        self,
        method: str,
        url: str,
        table: RouteTable,
        *,
        window: float,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send a request under ``table``'s policy until a ``success`` status comes back; raise
        the mapped error otherwise. Retries stop when the next pause would pass ``window``
        seconds from now; the last failure is raised."""
        backoff = Backoff(window)
        while True:
            failure: errors.LoopsError
            pause: float | None = None
            try:
                response = await self.request(
                    method,
                    url,
                    lane=table.lane,
                    content=content,
                    headers=headers,
                    params=params,
                    timeout=timeout,
                )
            except errors.ReadTimeoutError as exc:
                if table.read_timeout is ReadTimeout.AGAIN:
                    continue
                if table.read_timeout is ReadTimeout.RAISE:
                    if isinstance(exc, table.read_timeout_error):
                        raise
                    error = table.read_timeout_error(
                        f"no answer from {method} {url} within {timeout or 0:g} s"
                    )
                    if isinstance(error, errors.SampleTimeoutError):
                        error.timeout = timeout
                    raise error from exc
                failure = exc
            except errors.ConnectError as exc:
                failure = exc
            except errors.TransportError as exc:
                if not table.retry_transport:
                    raise
                failure = exc
            else:
                status = response.status_code
                if status in table.success:
                    return response
                if status in table.again:
                    continue
                failure = error_for_response(response, table.status_errors.get(status))
                retryable = status in table.transient or (
                    status in table.not_ready and not is_permanent_rejection(response)
                )
                if not retryable:
                    raise failure
                pause = retry_after(response)
                if pause is None:
                    pause = table.pause
            if not await backoff.wait(pause):
                raise failure

    async def download(self, url: str, out: Path, *, trusted_origin: str) -> int:
        """Stream ``GET url`` into the file ``out``; returns the number of bytes written.

        A URL on another origin than ``trusted_origin`` (presigned object storage) gets none of
        the client's default headers: no ``Authorization`` (storage refuses a second auth
        mechanism, and the key must not leak), no protocol headers (PROTOCOL §8)."""
        entry = self._lane(Lane.CONTROL)
        written = 0
        try:
            request = entry.client.build_request("GET", url)
            if _origin(url) != _origin(trusted_origin):
                for name in self._headers:
                    request.headers.pop(name, None)
            async with entry.limiter:
                response = await entry.client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        await response.aread()
                        raise error_for_response(response)
                    async with await anyio.open_file(out, "wb") as sink:
                        async for chunk in response.aiter_bytes(1 << 20):
                            await sink.write(chunk)
                            written += len(chunk)
                finally:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, "GET", url) from exc
        return written

    def _take_all(self) -> list[_LoopClients]:
        self._closed = True
        with self._lock:
            entries = list(self._loops.values())
            self._loops.clear()
        return entries

    async def aclose(self, timeout: float | None = None) -> None:
        """Close every loop's clients: this loop's directly, others on their own loops, within
        ``timeout`` seconds (default :data:`CLOSE_TIMEOUT`; shielded: a cancelled caller still
        closes)."""
        timeout = CLOSE_TIMEOUT if timeout is None else timeout
        entries = self._take_all()
        here = running_loop()
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            others: list[_LoopClients] = []
            for entry in entries:
                if here is not None and entry.native() is here.native_token:
                    await entry.aclose()
                else:
                    others.append(entry)
            if others:
                await anyio.to_thread.run_sync(
                    _close_on_their_loops, others, timeout, abandon_on_cancel=True
                )

    def close(self, timeout: float | None = None) -> None:
        """Close every loop's clients from a thread that runs no event loop, within
        ``timeout`` seconds (default :data:`CLOSE_TIMEOUT`)."""
        _close_on_their_loops(self._take_all(), CLOSE_TIMEOUT if timeout is None else timeout)


def _environment_proxies() -> bool:
    """Whether the environment names a proxy (httpx would route through it: keep httpx)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


def map_httpx_error(exc: httpx.HTTPError, method: str, url: str) -> errors.LoopsError:
    """The :mod:`loops_async.errors` exception for an ``httpx`` failure (the one mapping)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return errors.ConnectError(f"cannot connect for {method} {url}: {exc}")
    if isinstance(exc, httpx.ReadTimeout):
        return errors.ReadTimeoutError(f"no answer in time for {method} {url}")
    if isinstance(exc, httpx.DecodingError):
        return errors.TransportError(
            f"the response to {method} {url} could not be decoded (a corrupt or cut body): {exc}"
        )
    if isinstance(exc, httpx.TransportError):
        return errors.TransportError(f"{type(exc).__name__} for {method} {url}: {exc}")
    return errors.ProtocolError(f"{type(exc).__name__} for {method} {url}: {exc}")


def retry_after(response: httpx.Response) -> float | None:
    """A response's ``Retry-After`` in seconds (capped at 60), if it has a usable one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return None


def _close_on_their_loops(entries: list[_LoopClients], timeout: float) -> None:
    """Close each entry's clients on its own loop, in parallel helper threads, waiting at most
    ``timeout`` seconds in all. A loop that has ended (its sockets went with it) or that does
    not run (stopped but not closed) is given up on, never waited for forever."""
    import anyio.from_thread

    def close_one(entry: _LoopClients) -> None:
        token = entry.token()
        if token is None:
            return
        try:
            anyio.from_thread.run(entry.aclose, token=token)
        except anyio.RunFinishedError:
            return  # that loop is gone
        except Exception:  # pragma: no cover - closing must not raise
            log.debug("error closing an HTTP client", exc_info=True)

    deadline = time.monotonic() + timeout
    threads = []
    for entry in entries:
        if not entry.runs():
            continue  # ended, or an asyncio loop stopped but not closed: nobody would close
        thread = threading.Thread(target=close_one, args=(entry,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.debug("an event loop did not close its HTTP clients within %s s", timeout)
