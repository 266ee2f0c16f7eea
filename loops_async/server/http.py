"""HTTP plumbing shared by every route module of the local server (no routes here).

- Responses and rejections: :func:`_json`, :class:`HTTPError` (raised by handlers),
  :func:`cold_start_error` (the hosted profile's proxy answers), :func:`_error_body`,
  :func:`_send_json` (for ASGI middleware) and the Starlette exception handlers
  (:func:`exception_handlers`). Every rejection is a JSON ``{"detail", "error_class"}``; only a
  hosted-profile cold start leaves ``error_class`` out (clients retry it, PROTOCOL.md §8).
- Request bodies: :func:`_decode` (JSON into a msgspec type, :class:`InvalidRequest` naming
  the field), :class:`BodyGate` (large bodies are read and decoded a few at a time, on worker
  threads) and :func:`drain` (consume a body that is ignored without buffering it).
- :class:`HandlerBase`: what every handler class needs (team and shutdown checks).

This module imports no route module, so route modules import it without a cycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.to_thread
import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from .._codec import encode as _encode
from .backend import InvalidRequest
from .hosted import retry_after_header

if TYPE_CHECKING:
    from .runs import ServerState

__all__ = [
    "LARGE_BODY_BYTES",
    "BodyGate",
    "HTTPError",
    "HandlerBase",
    "ReadBody",
    "cold_start_error",
    "drain",
    "exception_handlers",
]

T = TypeVar("T")

LARGE_BODY_BYTES = 1 << 20
"""A body above this many bytes is *large*: it is read and decoded under the
:class:`BodyGate` limit, and decoded and validated on a worker thread."""


# --------------------------------------------------------------------------- responses


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response of ``obj`` (anything msgspec encodes)."""
    return Response(
        _encode(obj), status_code=status, headers=headers, media_type="application/json"
    )


class HTTPError(Exception):
    """Raised by a handler to answer ``status`` with ``{"detail": ...}``.

    ``proxy=True`` answers the way the hosted service's proxy does in front of a starting
    replica: ``{"detail"}`` without any ``error_class``, which tells clients the answer is not
    final (they retry it). Only the hosted profile's cold starts use it."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        error_class: str | None = None,
        headers: Mapping[str, str] | None = None,
        proxy: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error_class = error_class
        self.headers = dict(headers or {})
        self.proxy = proxy


def cold_start_error(status: int, detail: str, retry_after: float | None = None) -> HTTPError:
    """A hosted-profile cold-start answer (404, or 503 with ``Retry-After``): no
    ``error_class``, so clients retry it (PROTOCOL.md §8)."""
    headers = {} if retry_after is None else {"Retry-After": retry_after_header(retry_after)}
    return HTTPError(status, detail, headers=headers, proxy=True)


def _error_body(detail: str, error_class: str | None = None) -> dict[str, str]:
    """``{"detail": ..., "error_class": ...}`` (``error_class`` left out when None)."""
    body = {"detail": detail}
    if error_class is not None:
        body["error_class"] = error_class
    return body


_DEFAULT_ERROR_CLASS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "LimitExceededError",
}
"""Every final rejection of this server names its class: a client can tell a considered answer
from a proxy's or a starting replica's (the hosted service's cold-start 400/404/503 carry none
and are retried, PROTOCOL §8). A 503 names one only when it is final (shutdown, failed load);
"still loading" does not."""


async def _send_json(
    send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a whole JSON response through a raw ASGI ``send`` (for middleware)."""
    payload = _encode(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    error_class = None if exc.proxy else exc.error_class or _DEFAULT_ERROR_CLASS.get(exc.status)
    return _json(_error_body(exc.detail, error_class), exc.status, exc.headers)


async def _on_invalid(request: Request, exc: Exception) -> Response:
    return _json(_error_body(str(exc), "ValidationError"), 422)


async def _on_starlette_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    error_class = _DEFAULT_ERROR_CLASS.get(exc.status_code)
    return _json(_error_body(str(detail), error_class), exc.status_code, exc.headers)


async def _on_internal(request: Request, exc: Exception) -> Response:
    return _json(_error_body("internal server error", type(exc).__name__), 500)


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(*, invalid: bool = True) -> dict[Any, ExceptionHandler]:
    """The Starlette ``exception_handlers`` of the server's apps: :class:`HTTPError`, Starlette's
    own 404/405, any other exception (500), and :class:`InvalidRequest` (422) unless
    ``invalid`` is False."""
    handlers: dict[Any, ExceptionHandler] = {
        HTTPError: _on_http_error,
        HTTPException: _on_starlette_http,
        Exception: _on_internal,
    }
    if invalid:
        handlers[InvalidRequest] = _on_invalid
    return handlers


# --------------------------------------------------------------------------- bodies


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decode(typ: type[T], body: bytes) -> T:
    """Decode a JSON body into ``typ``; :class:`InvalidRequest` naming the field if it does
    not fit. Pure: safe on a worker thread."""
    decoder = _decoders.get(typ)
    if decoder is None:
        decoder = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return cast(T, decoder.decode(body))
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None


async def drain(request: Request) -> None:
    """Consume a request body the route ignores, without keeping it in memory (the body cap
    still applies)."""
    async for _ in request.stream():
        pass


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # the guard middleware already refused it


class ReadBody:
    """A request body read through a :class:`BodyGate`."""

    def __init__(self, raw: bytes, *, large: bool) -> None:
        self.raw = raw
        """The body's bytes."""
        self.large = large
        """Whether it is over :data:`LARGE_BODY_BYTES` (then it holds a gate permit)."""

    def __repr__(self) -> str:
        return f"<ReadBody {len(self.raw)} bytes{' large' if self.large else ''}>"

    async def run(self, parse: Callable[[bytes], T]) -> T:
        """``parse(raw)``: inline for a small body, on a worker thread for a large one (the
        thread is waited for even when the request is cancelled, so the permit is held as
        long as the body is in use)."""
        if self.large:
            return await anyio.to_thread.run_sync(parse, self.raw)
        return parse(self.raw)


class BodyGate:
    """At most ``limit`` large request bodies (over ``threshold`` bytes) are read, decoded and
    validated at once; the others wait their turn (FIFO) before their body is read, so memory
    stays bounded by about ``limit`` times the body cap. Large bodies are decoded on worker
    threads; small ones pass straight through, inline, and never wait.

    A body that announces its size (``Content-Length``) waits before it is read; a streamed
    one (no ``Content-Length``) is read first and waits before it is decoded.

    ``active``, ``peak``, ``waiting`` and ``admitted`` count what went through (for tests and
    diagnostics). Lives on the server's event loop."""

    def __init__(self, limit: int, *, threshold: int = LARGE_BODY_BYTES) -> None:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit!r}")
        self.limit = limit
        self.threshold = threshold
        self.active = 0
        """Large bodies being read or decoded now."""
        self.peak = 0
        """The most large bodies ever read or decoded at once (never above ``limit``)."""
        self.waiting = 0
        """Large bodies waiting for a permit now."""
        self.admitted = 0
        """Large bodies that got a permit so far."""
        self._semaphore = anyio.Semaphore(limit, fast_acquire=True)

    def __repr__(self) -> str:
        return (
            f"<BodyGate limit={self.limit} active={self.active} waiting={self.waiting} "
            f"peak={self.peak}>"
        )

    @asynccontextmanager
    async def _permit(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.admitted += 1
        self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()

    @asynccontextmanager
    async def body(self, request: Request) -> AsyncIterator[ReadBody]:
        """Read ``request``'s body, holding a permit for as long as the block runs when the
        body is large."""
        async with AsyncExitStack() as stack:
            declared = _declared_length(request)
            holding = declared is not None and declared > self.threshold
            if holding:
                await stack.enter_async_context(self._permit())
            raw = await request.body()
            large = len(raw) > self.threshold
            if large and not holding:
                await stack.enter_async_context(self._permit())
            yield ReadBody(raw, large=large or holding)

    async def parse(self, request: Request, parse: Callable[[bytes], T]) -> T:
        """Read the body and return ``parse(body)`` (on a worker thread when large)."""
        async with self.body(request) as body:
            return await body.run(parse)


# --------------------------------------------------------------------------- handlers


class HandlerBase:
    """What every route-handler class shares: the live state, the settings, the body gate,
    and the team and shutdown checks."""

    def __init__(self, state: ServerState, gate: BodyGate | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.gate = gate if gate is not None else BodyGate(state.settings.max_concurrent_decodes)
        """Limits large body decodes (shared by every handler class of one app)."""

    def _team(self, request: Request) -> None:
        team = request.path_params.get("team_id")
        if team is not None and team != self.state.TEAM_ID:
            raise HTTPError(
                404,
                f"unknown team {team!r}; the local server has one team, {self.state.TEAM_ID!r}",
            )

    def _not_shutting_down(self) -> None:
        if self.state.shutting_down:
            raise HTTPError(503, "the server is shutting down", error_class="ServerShutdownError")
