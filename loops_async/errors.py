"""The exception tree of ``loops_async``.

Every exception the library raises on purpose derives from :class:`LoopsError`::

    LoopsError
    ├── ValidationError            bad input caught before anything is sent (also a ValueError)
    ├── SyncInAsyncContextError    a sync method called inside a running event loop
    │                              (also a RuntimeError); use the ``*_async`` twin
    ├── ClientClosedError          the client was closed (also a RuntimeError)
    ├── OperationTimeoutError      ``.result(timeout)`` or a ready wait ran out
    │                              (also a TimeoutError)
    │   └── SampleTimeoutError     a sample request timed out
    ├── TransportError             no HTTP response: connect / read / write failure
    │   ├── ConnectError
    │   └── ReadTimeoutError
    ├── ProtocolError              the server answered something this protocol does not allow
    ├── CheckpointSourceError      a checkpoint's files are not on presigned storage (volume)
    ├── DeploymentError            a trainer or sampler deployment ended (FAILED, STOPPED, ...)
    │   └── SamplerTerminatedError a sampler deployment reached a terminal status
    │                              (``deployment_id``, ``status``; also a RuntimeError)
    ├── APIStatusError             an HTTP error status
    │                              (``status_code``, ``method``, ``url``, ``message``)
    │   ├── BadRequestError             400
    │   ├── AuthenticationError         401
    │   ├── PermissionDeniedError       403
    │   ├── NotFoundError               404
    │   │   └── UnknownRequestError     404 when retrieving an operation: unknown id or expired
    │   ├── ConflictError               409
    │   ├── RequestTooLargeError        413
    │   ├── UnprocessableEntityError    422 (the server rejected the request as invalid)
    │   ├── RateLimitError              429
    │   └── InternalServerError         5xx
    │       └── ServerShutdownError     503: the server is shutting down
    ├── RemoteOpError              the operation ran on the server and failed
    │                              (``message``, ``error_class``, ``operation_id``)
    └── PartialSubmitError         a batch split into several operations was rejected part-way:
                                   ``accepted`` holds the futures of the chunks that will run,
                                   ``__cause__`` the rejection

HTTP errors are mapped to these classes at one boundary (the transport); ``httpx`` exceptions
never escape. Cancellation (``asyncio.CancelledError``, trio's ``Cancelled``) and
``KeyboardInterrupt`` are never caught or wrapped.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointSourceError",
    "ClientClosedError",
    "ConflictError",
    "ConnectError",
    "DeploymentError",
    "InternalServerError",
    "LoopsError",
    "NotFoundError",
    "OperationTimeoutError",
    "PartialSubmitError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "ReadTimeoutError",
    "RemoteOpError",
    "RequestTooLargeError",
    "SampleTimeoutError",
    "SamplerTerminatedError",
    "ServerShutdownError",
    "SyncInAsyncContextError",
    "TransportError",
    "UnknownRequestError",
    "UnprocessableEntityError",
    "ValidationError",
]


class LoopsError(Exception):
    """Root of every exception raised by ``loops_async``."""


class ValidationError(LoopsError, ValueError):
    """Bad input, caught by the client before anything was sent.

    The message names the offending field, e.g. ``data[0].loss_fn_inputs['weights']``.
    """


class SyncInAsyncContextError(LoopsError, RuntimeError):
    """A blocking (sync) method was called from inside a running event loop.

    Blocking there would stall the loop or deadlock; await the ``*_async`` twin instead.
    """


class ClientClosedError(LoopsError, RuntimeError):
    """The client was used after ``close()`` / ``aclose()``."""


class OperationTimeoutError(LoopsError, TimeoutError):
    """A wait with a deadline ran out: ``.result(timeout=...)``, or a server not ready in time.

    The operation itself may still complete on the server; the future can be waited on again.
    """


class SampleTimeoutError(OperationTimeoutError):
    """A sampling request did not answer in time.

    Attributes:
        timeout: the read timeout that ran out, in seconds (``None`` if unknown).
    """

    timeout: float | None

    def __init__(self, message: str = "", *, timeout: float | None = None) -> None:
        super().__init__(message or f"the sampler did not answer within {timeout} s")
        self.timeout = timeout


class TransportError(LoopsError):
    """The request got no HTTP response (connection refused or dropped, timeout, ...)."""


class ConnectError(TransportError):
    """Could not connect to the server."""


class ReadTimeoutError(TransportError):
    """The server accepted the connection but did not answer in time."""


class ProtocolError(LoopsError):
    """The server answered something the Loops protocol does not allow."""


class DeploymentError(LoopsError):
    """A trainer or sampler deployment reached a terminal state (FAILED, STOPPED, PREEMPTED,
    ...) while the client waited for it to become ready."""


class CheckpointSourceError(LoopsError):
    """A checkpoint's files cannot be fetched over presigned URLs (e.g. it lives on a
    volume); the message says where it is."""


class SamplerTerminatedError(DeploymentError, RuntimeError):
    """A sampler's deployment reached a terminal status (``DEPLOY_FAILED``, ``UNHEALTHY``,
    ``BUILD_FAILED``, ``INACTIVE``, ...): it will not serve.

    Attributes:
        deployment_id: the sampler's deployment id.
        status: the terminal status.
    """

    def __init__(self, deployment_id: str, status: str, message: str = "") -> None:
        super().__init__(message or f"sampler deployment {deployment_id} is {status}")
        self.deployment_id = deployment_id
        self.status = status


class APIStatusError(LoopsError):
    """The server answered with an HTTP error status.

    Attributes:
        status_code: the HTTP status.
        method: the request method.
        url: the request URL.
        message: the server's human-readable message (``detail``/``error``/``message``), if any.
        body: the raw response body (decoded JSON when possible, else text).
    """

    status_code: int
    method: str
    url: str
    message: str
    body: object

    def __init__(
        self, message: str, *, status_code: int, method: str, url: str, body: object = None
    ) -> None:
        super().__init__(f"{status_code} on {method} {url}: {message}")
        self.message = message
        self.status_code = status_code
        self.method = method
        self.url = url
        self.body = body


class BadRequestError(APIStatusError):
    """400 Bad Request."""


class AuthenticationError(APIStatusError):
    """401 Unauthorized: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403 Forbidden."""


class NotFoundError(APIStatusError):
    """404 Not Found."""


class UnknownRequestError(NotFoundError):
    """404 when retrieving an operation: the id is unknown or its result has expired."""


class ConflictError(APIStatusError):
    """409 Conflict."""


class RequestTooLargeError(APIStatusError):
    """413: the request body exceeds the server's limit."""


class UnprocessableEntityError(APIStatusError):
    """422: the server rejected the request as invalid; the message names the field."""


class RateLimitError(APIStatusError):
    """429 Too Many Requests."""


class InternalServerError(APIStatusError):
    """A 5xx status."""


class ServerShutdownError(InternalServerError):
    """503: the server is shutting down and will not finish this request."""


class RemoteOpError(LoopsError):
    """An operation was accepted and ran on the server, and failed there.

    Attributes:
        message: the server's error message.
        error_class: the server-side exception class name (e.g. ``"ValidationError"``).
        operation_id: the id of the failed operation.
        run_id: the training run (``None`` for a sampler's operation).
        operation: the operation's name (``"forward_backward"``, ``"sample"``, ...).
        context: ``run_id``, ``operation`` and ``operation_id`` as a dict (for logging).
        descriptor: the same as one string.
    """

    message: str
    error_class: str | None
    operation_id: str | None
    run_id: str | None
    operation: str | None

    def __init__(
        self,
        message: str,
        error_class: str | None = None,
        *,
        operation_id: str | None = None,
        run_id: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.message = message
        self.error_class = error_class
        self.operation_id = operation_id
        self.run_id = run_id
        self.operation = operation
        where = f" ({self.descriptor})" if self.context else ""
        kind = f"{error_class}: " if error_class else ""
        super().__init__(f"{kind}{message}{where}")

    @property
    def context(self) -> dict[str, str]:
        """The operation's coordinates that are known, by name."""
        pairs = {
            "run_id": self.run_id,
            "operation": self.operation,
            "operation_id": self.operation_id,
        }
        return {key: value for key, value in pairs.items() if value}

    @property
    def descriptor(self) -> str:
        """The context as ``key=value, ...``."""
        return ", ".join(f"{key}={value}" for key, value in self.context.items())


class PartialSubmitError(LoopsError):
    """A ``forward`` / ``forward_backward`` batch too big for one request was split into several
    operations, and the server rejected one of them after it had accepted others.

    The accepted chunks run (their gradients accumulate before the next ``optim_step``); the
    rejected and unsent ones do not. The rejection itself is ``__cause__``.

    Attributes:
        accepted: the futures of the accepted chunks, in batch order (await them to see their
            losses, or to know they finished).
        accepted_ranges: ``(start, end)`` datum index ranges of ``data`` those chunks cover.
        rejected_ranges: the ranges that will not run (the rejected chunk and any never sent).
    """

    def __init__(
        self,
        message: str,
        *,
        accepted: list[Any],
        accepted_ranges: list[tuple[int, int]],
        rejected_ranges: list[tuple[int, int]],
    ) -> None:
        super().__init__(message)
        self.accepted = accepted
        self.accepted_ranges = accepted_ranges
        self.rejected_ranges = rejected_ranges
