"""Submit-and-retrieve: the operation engine and :class:`OperationFuture`.

``POST {endpoint}/<op>`` with an ``Idempotency-Key`` that every retry reuses answers 202 with an
operation id; ``GET {endpoint}/operations/<id>`` is held by the server up to ~30 s and answers
200 (done or error), 408 (not yet: re-poll at once), 404, 502 or 503 (PROTOCOL §2).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import anyio
import anyio.lowlevel
import httpx
import msgspec

from . import _http, _portal, errors
from ._codec import decoder_for
from ._http import (
    POLL_READ_TIMEOUT,
    PROBE,
    TRAINER_POLL,
    TRAINER_SUBMIT,
    RouteTable,
    Transport,
)
from ._loop import current_loop
from ._wire import OPERATION_SCHEMA_VERSION, OpEnvelope, SubmitAccepted

__all__ = [
    "APIFuture",
    "ChainedFuture",
    "Endpoint",
    "OperationFuture",
    "accepted_operation_id",
    "decode_body",
    "idempotency_headers",
    "new_key",
    "poll_operation",
]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("loops_async")

SUBMIT_READ_TIMEOUT = 60.0
UNFINISHED_PAUSE = 1.0
"""Seconds to wait before re-polling after a 200 that is not a final status (PROTOCOL §8)."""


def decode_body(decoder: msgspec.json.Decoder[R], response: httpx.Response, what: str) -> R:
    """Decode a response body; an undecodable one is a :class:`~loops_async.errors.ProtocolError`
    naming ``what`` (the one place msgspec errors are mapped)."""
    try:
        return decoder.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise errors.ProtocolError(f"{what}: undecodable answer: {exc}") from exc


def new_key() -> str:
    """A random UUID4 as 32 hex digits: what ``uuid.uuid4().hex`` gives, at a third of its cost
    (no ``UUID`` object), for the keys every request carries."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def idempotency_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` plus a fresh ``Idempotency-Key`` that every retry of the request reuses."""
    return {**headers, "Idempotency-Key": new_key()}


async def poll_operation(
    transport: Transport,
    url: str,
    operation_id: str,
    result_type: type[T],
    *,
    table: RouteTable,
    headers: Mapping[str, str],
    window: float,
    operation: str | None = None,
) -> tuple[T, httpx.Response]:
    """Long-poll ``url`` (an operation of a trainer or a shared sampler) until it is done;
    return its decoded result and the final response.

    Raises :class:`~loops_async.errors.RemoteOpError` if it failed on the server,
    :class:`~loops_async.errors.UnknownRequestError` on 404, and what ``table`` maps otherwise.
    """
    decoder = decoder_for(OpEnvelope[result_type])  # type: ignore[valid-type]
    while True:
        response = await transport.send(
            "GET", url, table, window=window, headers=headers, timeout=POLL_READ_TIMEOUT
        )
        envelope: OpEnvelope[T] = decode_body(decoder, response, f"operation {operation_id}")
        if envelope.status == "done":
            if envelope.result is None:
                raise errors.ProtocolError(
                    f"operation {operation_id} is done but carries no result"
                )
            return envelope.result, response
        if envelope.status == "error":
            raise errors.RemoteOpError(
                envelope.error or "operation failed",
                envelope.error_class,
                operation_id=operation_id,
                run_id=headers.get("X-Run-Id"),
                operation=operation,
            )
        # "pending"/"running" in a 200: the server did not hold the poll; do not spin.
        await anyio.sleep(UNFINISHED_PAUSE * _http.RETRY_TIME_SCALE)


class Endpoint:
    """A trainer's base URL, the headers its requests carry, and the retry window."""

    def __init__(
        self,
        transport: Transport,
        base_url: str,
        *,
        headers: Mapping[str, str],
        ready_timeout: float,
        timeout: float | None = None,
    ) -> None:
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        self.ready_timeout = ready_timeout
        self.timeout = SUBMIT_READ_TIMEOUT if timeout is None else timeout
        """Read timeout of a submit."""

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` under this endpoint."""
        return f"{self.base_url}/{path.lstrip('/')}"

    async def probe(
        self, path: str, *, params: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> httpx.Response:
        """GET ``path`` once and return the response, whatever its status (health checks)."""
        return await self.transport.send(
            "GET",
            self.url(path),
            PROBE,
            window=0.0,
            headers=self.headers,
            params=params,
            timeout=timeout,
        )

    async def submit(self, op: str, body: bytes) -> str:
        """POST an operation and return its id once accepted (202).

        Retries, with the same ``Idempotency-Key``, transport failures, 408/429/502/504 and
        400/404 not marked permanent (a server still starting), with jittered exponential
        back-off bounded by ``ready_timeout`` (:data:`~loops_async._http.TRAINER_SUBMIT`). 503
        and permanent rejections raise at once.
        """
        response = await self.transport.send(
            "POST",
            self.url(op),
            TRAINER_SUBMIT,
            window=self.ready_timeout,
            content=body,
            headers=idempotency_headers(self.headers),
            timeout=self.timeout,
        )
        return accepted_operation_id(response)

    async def retrieve(
        self, operation_id: str, result_type: type[T], operation: str | None = None
    ) -> T:
        """Long-poll an operation until it is done; return its decoded result
        (:func:`poll_operation` with :data:`~loops_async._http.TRAINER_POLL`)."""
        result, _ = await poll_operation(
            self.transport,
            self.url(f"operations/{quote(operation_id, safe='')}"),
            operation_id,
            result_type,
            table=TRAINER_POLL,
            headers=self.headers,
            window=self.ready_timeout,
            operation=operation,
        )
        return result


def accepted_operation_id(response: httpx.Response) -> str:
    """The operation id of a 202 answer (``ProtocolError`` if missing or of another schema)."""
    accepted: SubmitAccepted = decode_body(decoder_for(SubmitAccepted), response, "submit")
    if not accepted.operation_id:
        raise errors.ProtocolError("submit was accepted without an operation_id")
    if accepted.schema_version != OPERATION_SCHEMA_VERSION:
        raise errors.ProtocolError(
            f"unsupported operation schema_version {accepted.schema_version}"
        )
    return accepted.operation_id


_FINAL_ERRORS = (
    errors.RemoteOpError,
    errors.UnknownRequestError,
    errors.ProtocolError,
    errors.DeploymentError,
    errors.ValidationError,
    errors.UnprocessableEntityError,
)
"""Errors that end a future for good (memoised); others (timeouts, transport) may be retried by
waiting again."""


class APIFuture(abc.ABC, Generic[T]):
    """The pending result of a request the server is working on.

    - ``fut.result(timeout=None)`` blocks (sync code);
    - ``await fut`` or ``await fut.result_async(timeout=None)`` awaits (asyncio or trio);
    - ``fut.done()`` says whether the result is already here, without I/O.

    The result (or a final error) is retrieved once and memoised; concurrent waiters on one
    event loop share a single retrieval. A future made by the sync API can be awaited in async
    code and the other way round. A timeout raises
    :class:`~loops_async.errors.OperationTimeoutError` and leaves the future usable: wait again
    to keep waiting.
    """

    operation_id: str = ""
    """The server's id of the operation (the first chunk's for a split batch; ``""`` when
    the future does not stand for one operation)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._has_outcome = False
        self._result: T | None = None
        self._error: BaseException | None = None
        self._inflight: dict[object, anyio.Event] = {}
        self._observers: list[Callable[[T], object]] = []

    def _observe(self, callback: Callable[[T], object]) -> None:
        """Call ``callback(result)`` once the result is retrieved (at once if it already is);
        a failing callback is logged, never raised."""
        with self._lock:
            if not self._has_outcome:
                self._observers.append(callback)
                return
        if self._error is None:
            _notify(callback, self._result)

    def __repr__(self) -> str:
        state = "done" if self._has_outcome else "pending"
        return f"<{type(self).__name__} {self._describe()} {state}>"

    def _describe(self) -> str:
        return ""

    @abc.abstractmethod
    async def _fetch(self) -> T:
        """Produce the result. Called by one waiter per loop at a time."""

    def done(self) -> bool:
        """Whether the outcome has been retrieved (never does I/O)."""
        return self._has_outcome

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _settle(self, result: T | None, error: BaseException | None) -> None:
        with self._lock:
            if self._has_outcome:
                return
            self._result = result
            self._error = error
            self._has_outcome = True
            observers, self._observers = self._observers, []
        if error is None:
            for callback in observers:
                _notify(callback, result)

    async def _retrieve_once(self) -> None:
        try:
            result = await self._fetch()
        except _FINAL_ERRORS as exc:
            self._settle(None, exc)
        else:
            self._settle(result, None)

    async def _wait(self) -> T:
        key = current_loop().native_token
        while not self._has_outcome:
            with self._lock:
                event = self._inflight.get(key)
                leader = event is None
                if leader:
                    event = self._inflight[key] = anyio.Event()
            assert event is not None
            if not leader:
                await event.wait()  # the leader finished, failed or was cancelled: re-check
                continue
            try:
                await self._retrieve_once()
            finally:
                with self._lock:
                    del self._inflight[key]
                event.set()
        return self._outcome()

    async def result_async(self, timeout: float | None = None) -> T:
        """Wait for the result on the current event loop; raise the operation's error.

        Raises :class:`~loops_async.errors.OperationTimeoutError` after ``timeout`` seconds.
        """
        if self._has_outcome:
            return self._outcome()
        if timeout is None:
            return await self._wait()
        # Only our own deadline becomes "not done after": an OperationTimeoutError (or any
        # TimeoutError) raised inside, e.g. by a policy-version wait, keeps its message and cause.
        with anyio.move_on_after(timeout) as scope:
            return await self._wait()
        if self._has_outcome:
            return self._outcome()
        assert scope.cancelled_caught
        raise errors.OperationTimeoutError(
            f"{self._describe() or 'request'} not done after {timeout} s"
        )

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is here and return it (raise the operation's error).

        Raises :class:`~loops_async.errors.OperationTimeoutError` after ``timeout`` seconds,
        and :class:`~loops_async.errors.SyncInAsyncContextError` inside an event loop.
        """
        if self._has_outcome:
            return self._outcome()
        return _portal.run(self.result_async, timeout, twin="result_async")

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


def _notify(callback: Callable[[Any], object], result: Any) -> None:
    try:
        callback(result)
    except Exception:
        log.warning("a result observer failed", exc_info=True)


class OperationFuture(APIFuture[T]):
    """The pending result of a submitted operation (see :class:`APIFuture`); its
    ``operation_id`` is the server's id. The result is retrieved by long-polling
    ``GET /operations/<id>``."""

    def __init__(
        self,
        operation_id: str,
        *,
        endpoint: Endpoint,
        result_type: type[T],
        transform: Callable[[T], T] | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__()
        self.operation_id = operation_id
        """The server's id of this operation."""
        self.operation = operation
        """The operation's name (``"forward_backward"``, ...), if known."""
        self._endpoint = endpoint
        self._result_type = result_type
        self._transform = transform

    def _describe(self) -> str:
        return f"operation {self.operation_id} ({self._result_type.__name__})"

    async def _fetch(self) -> T:
        result = await self._endpoint.retrieve(self.operation_id, self._result_type, self.operation)
        if self._transform is not None:
            result = self._transform(result)
        return result


class ChainedFuture(APIFuture[T]):
    """A future whose result is computed from another future's result by an async step (for
    example: publish weights, then wait for the sampler and build a sampling client)."""

    def __init__(
        self, inner: APIFuture[Any], then: Callable[[Any], Awaitable[T]], *, what: str
    ) -> None:
        super().__init__()
        self._inner = inner
        self._then = then
        self._what = what
        self.operation_id = inner.operation_id

    def _describe(self) -> str:
        return self._what

    async def _fetch(self) -> T:
        return await self._then(await self._inner.result_async())
