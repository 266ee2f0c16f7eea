"""tinker's exception names, as subclasses of the ``loops_async`` exceptions they stand for.

tinker code catches ``tinker.BadRequestError``, ``tinker.APIStatusError``,
``tinker.TinkerError``...; ``loops_async`` code catches :mod:`loops_async.errors`. An error that
leaves the layer is an instance of both: :func:`translate` turns a core exception into the
matching tinker class, which also derives from the core class (``tinker.BadRequestError`` is a
``loops_async.BadRequestError``)::

    TinkerError (also a LoopsError)
    ├── APIError
    │   ├── APIStatusError             (also APIStatusError): status_code, message
    │   │   ├── BadRequestError 400, AuthenticationError 401, BillingError 402,
    │   │   │   PermissionDeniedError 403, NotFoundError 404, ConflictError 409,
    │   │   │   UnprocessableEntityError 422, RateLimitError 429, InternalServerError 5xx
    │   ├── APIConnectionError         (also TransportError)
    │   │   └── APITimeoutError        (also ReadTimeoutError)
    │   └── APIResponseValidationError (also ProtocolError)
    └── RequestFailedError             (also RemoteOpError): the operation failed on the server

Bad input stays a ``ValueError``/``TypeError`` (``loops_async.ValidationError``), a
``.result(timeout)`` that runs out a ``TimeoutError``, a closed client a ``RuntimeError``, as in
tinker. Any other ``loops_async`` error (a deployment that failed, a split batch rejected
part-way, ...) is re-raised as a class deriving from both ``TinkerError`` and its own class.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .. import errors
from .types import RequestErrorCategory

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BillingError",
    "ConflictError",
    "ExperimentalWarning",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "TinkerError",
    "UnprocessableEntityError",
    "translate",
    "translating",
]


class TinkerError(errors.LoopsError):
    """Root of tinker's exceptions (a :class:`loops_async.LoopsError`)."""


class APIError(TinkerError):
    """An error talking to the service: ``message``; ``request`` and ``body`` are ``None``
    (this layer does not keep the raw exchange)."""

    message: str = ""
    request: Any = None
    response: Any = None
    body: object | None = None


class APIStatusError(APIError, errors.APIStatusError):
    """The server answered an HTTP error status (``status_code``)."""


class BadRequestError(APIStatusError, errors.BadRequestError):
    """400."""


class AuthenticationError(APIStatusError, errors.AuthenticationError):
    """401."""


class BillingError(APIStatusError):
    """402 (the Loops service does not send it; kept for tinker code that catches it)."""


class PermissionDeniedError(APIStatusError, errors.PermissionDeniedError):
    """403."""


class NotFoundError(APIStatusError, errors.NotFoundError):
    """404."""


class ConflictError(APIStatusError, errors.ConflictError):
    """409."""


class UnprocessableEntityError(APIStatusError, errors.UnprocessableEntityError):
    """422: the server rejected the request as invalid."""


class RateLimitError(APIStatusError, errors.RateLimitError):
    """429."""


class InternalServerError(APIStatusError, errors.InternalServerError):
    """5xx."""


class APIConnectionError(APIError, errors.TransportError):
    """No HTTP response: the connection failed."""


class APITimeoutError(APIConnectionError, errors.ReadTimeoutError):
    """No HTTP response in time."""


class APIResponseValidationError(APIError, errors.ProtocolError):
    """The server answered something the protocol does not allow."""

    status_code: int | None = None


class RequestFailedError(TinkerError, errors.RemoteOpError):
    """The operation ran on the server and failed: ``request_id`` is its operation id and
    ``category`` says whose fault it was (``User`` for a rejected input)."""

    @property
    def request_id(self) -> str:
        """The id of the operation that failed."""
        return str(getattr(self, "operation_id", "") or "")

    @property
    def category(self) -> RequestErrorCategory:
        """``User`` when the server blamed the input, else ``Unknown``."""
        error_class = str(getattr(self, "error_class", "") or "")
        if any(word in error_class.lower() for word in ("value", "validation", "user", "input")):
            return RequestErrorCategory.User
        return RequestErrorCategory.Unknown


class ExperimentalWarning(FutureWarning):
    """Warns about an experimental API (kept for tinker code that filters it)."""


_EXPLICIT: dict[type[BaseException], type[TinkerError]] = {
    errors.APIStatusError: APIStatusError,
    errors.BadRequestError: BadRequestError,
    errors.AuthenticationError: AuthenticationError,
    errors.PermissionDeniedError: PermissionDeniedError,
    errors.NotFoundError: NotFoundError,
    errors.ConflictError: ConflictError,
    errors.UnprocessableEntityError: UnprocessableEntityError,
    errors.RateLimitError: RateLimitError,
    errors.InternalServerError: InternalServerError,
    errors.TransportError: APIConnectionError,
    errors.ConnectError: APIConnectionError,
    errors.ReadTimeoutError: APITimeoutError,
    errors.ProtocolError: APIResponseValidationError,
    errors.RemoteOpError: RequestFailedError,
}

_KEEP = (
    errors.ValidationError,
    errors.OperationTimeoutError,
    errors.ClientClosedError,
    errors.SyncInAsyncContextError,
)
"""Core errors that tinker raises as built-in exceptions too (ValueError, TimeoutError,
RuntimeError): left as they are."""

_combined: dict[type[BaseException], type[TinkerError]] = {}
_combined_lock = threading.Lock()


def _tinker_class(cls: type[errors.LoopsError]) -> type[TinkerError]:
    """The tinker class for core class ``cls``: its explicit twin, else a class deriving from
    the nearest mapped ancestor's twin (or ``TinkerError``) and from ``cls`` itself."""
    explicit = _EXPLICIT.get(cls)
    if explicit is not None:
        return explicit
    with _combined_lock:
        made = _combined.get(cls)
        if made is None:
            base: type[TinkerError] = TinkerError
            for ancestor in cls.__mro__[1:]:
                if ancestor in _EXPLICIT:
                    base = _EXPLICIT[ancestor]
                    break
            made = type(cls.__name__, (base, cls), {"__module__": __name__, "__doc__": cls.__doc__})
            _combined[cls] = made
        return made


def translate(exc: BaseException) -> BaseException:
    """``exc`` as a tinker exception (see the module docstring); anything that is not a
    ``loops_async`` error, or already a tinker one, is returned unchanged."""
    if not isinstance(exc, errors.LoopsError) or isinstance(exc, (TinkerError, *_KEEP)):
        return exc
    cls = _tinker_class(type(exc))
    new = cls.__new__(cls)
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    if "message" not in new.__dict__:
        new.message = str(exc)  # type: ignore[attr-defined]
    new.__cause__ = exc.__cause__
    new.__context__ = exc.__context__
    new.__suppress_context__ = exc.__suppress_context__
    return new.with_traceback(exc.__traceback__)


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Re-raise a ``loops_async`` error from the block as its tinker class (:func:`translate`;
    the original is kept as ``__context__``)."""
    try:
        yield
    except Exception as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc.__cause__
