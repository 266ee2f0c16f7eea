"""HTTP transport: one ``httpx.AsyncClient`` per event loop, the protocol headers, and the one
place where HTTP failures become :mod:`loops_async.errors` exceptions."""

from __future__ import annotations

import logging
import os
import random
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import msgspec

from . import errors
from ._loop import current_loop
from ._version import __version__

__all__ = ["Backoff", "Transport", "error_for_response", "is_permanent_rejection"]

log = logging.getLogger("loops_async")

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
    """Whether a 4xx says it will never change (PROTOCOL §1): any 422; a 4xx with
    ``X-Baseten-Error-Source: 06``; a 400 whose body's error type is ``BadRequestError``; or a
    deactivated model (source ``01`` + code ``631``)."""
    status = response.status_code
    if status == 422:
        return True
    source = response.headers.get("x-baseten-error-source")
    if 400 <= status < 500 and source == "06":
        return True
    if source == "01" and response.headers.get("x-baseten-error-code") == "631":
        return True
    if status == 400:
        body = _body_of(response)
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and err.get("type") == "BadRequestError":
                return True
            if body.get("type") == "BadRequestError":
                return True
    return False


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
        pause = self.next_delay() if delay is None else delay
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


@dataclass(frozen=True, slots=True)
class _LoopClient:
    """One event loop's HTTP client and its in-flight limiter."""

    token: anyio.lowlevel.EventLoopToken
    client: httpx.AsyncClient
    limiter: anyio.Semaphore


_live_transports: weakref.WeakSet[Transport] = weakref.WeakSet()


def _forget_clients_after_fork() -> None:
    # The child must not reuse the parent's sockets or loops: drop (never close) them.
    for transport in list(_live_transports):
        transport._clients.clear()
        transport._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


class Transport:
    """Headers, timeouts and per-event-loop ``httpx.AsyncClient`` objects.

    An ``httpx.AsyncClient`` belongs to the loop it was first used on, so a transport used from
    the portal thread and from a user's loop keeps one per loop. ``aclose``/``close`` close them
    all, each on its own loop.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        timeout: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._config: dict[str, Any] = {
            "api_key": api_key,
            "timeout": timeout,
            "max_connections": max_connections,
            "extra_headers": dict(extra_headers or {}),
        }
        headers = {"User-Agent": USER_AGENT, "X-Baseten-Accept-Error": "1"}
        if api_key:
            headers["Authorization"] = f"Api-Key {api_key}"
        if extra_headers:
            headers.update(extra_headers)
        self._headers = headers
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0), pool=None)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._custom_transport = transport
        self._max_in_flight = max_connections
        self._clients: dict[object, _LoopClient] = {}
        self._lock = threading.Lock()
        self._closed = False
        _live_transports.add(self)

    def __repr__(self) -> str:
        # Never show the Authorization header.
        return f"<Transport loops={len(self._clients)} closed={self._closed}>"

    def config(self) -> dict[str, Any]:
        """Constructor arguments that recreate an equivalent transport (in another process);
        a custom ``httpx`` transport is not carried over. Holds the API key: keep it private."""
        return dict(self._config)

    @property
    def closed(self) -> bool:
        """Whether ``aclose``/``close`` was called."""
        return self._closed

    def _client(self) -> _LoopClient:
        token = current_loop()
        key = token.native_token
        entry = self._clients.get(key)
        if entry is not None:
            return entry
        with self._lock:
            if self._closed:
                raise errors.ClientClosedError("the client is closed")
            entry = self._clients.get(key)
            if entry is None:
                client = httpx.AsyncClient(
                    headers=self._headers,
                    timeout=self._timeout,
                    limits=self._limits,
                    transport=self._custom_transport,
                    follow_redirects=False,
                )
                limiter = anyio.Semaphore(self._max_in_flight, fast_acquire=True)
                entry = self._clients[key] = _LoopClient(token, client, limiter)
        return entry

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request on this loop's client. Transport failures become
        :class:`~loops_async.errors.TransportError`; statuses are left to the caller."""
        entry = self._client()
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
        except httpx.ConnectError as exc:
            raise errors.ConnectError(f"cannot connect for {method} {url}: {exc}") from exc
        except httpx.ReadTimeout as exc:
            raise errors.ReadTimeoutError(f"no answer in time for {method} {url}") from exc
        except httpx.TransportError as exc:
            raise errors.TransportError(f"{type(exc).__name__} for {method} {url}: {exc}") from exc

    async def download(self, url: str, out: Path) -> int:
        """Stream ``GET url`` into the file ``out``; returns the number of bytes written."""
        entry = self._client()
        written = 0
        try:
            async with entry.limiter, entry.client.stream("GET", url) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise error_for_response(response)
                async with await anyio.open_file(out, "wb") as sink:
                    async for chunk in response.aiter_bytes(1 << 20):
                        await sink.write(chunk)
                        written += len(chunk)
        except httpx.TransportError as exc:
            raise errors.TransportError(f"{type(exc).__name__} downloading {url}: {exc}") from exc
        return written

    async def aclose(self) -> None:
        """Close every loop's client: this loop's directly, others on their own loops."""
        self._closed = True
        with self._lock:
            entries = list(self._clients.items())
            self._clients.clear()
        try:
            here: object | None = current_loop().native_token
        except anyio.NoEventLoopError:
            here = None
        others: list[_LoopClient] = []
        for key, entry in entries:
            if key is here:
                await entry.client.aclose()
            else:
                others.append(entry)
        if others:
            await anyio.to_thread.run_sync(_close_on_their_loops, others)

    def close(self) -> None:
        """Close every loop's client from a thread that runs no event loop."""
        self._closed = True
        with self._lock:
            entries = list(self._clients.values())
            self._clients.clear()
        _close_on_their_loops(entries)


def _close_on_their_loops(entries: list[_LoopClient]) -> None:
    import anyio.from_thread

    for entry in entries:
        try:
            anyio.from_thread.run(entry.client.aclose, token=entry.token)
        except anyio.RunFinishedError:
            # That loop is gone; its sockets went with it.
            pass
        except Exception:  # pragma: no cover - closing must not raise
            log.debug("error closing an HTTP client", exc_info=True)
