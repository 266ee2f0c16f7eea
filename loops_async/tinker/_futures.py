"""tinker's futures, over the process-wide portal of :mod:`loops_async._portal`.

Every sync method of the layer returns at once: it starts a coroutine of the one async core on
the portal (:func:`spawn`) and hands back an :class:`AwaitableConcurrentFuture`, which is at the
same time

- a tinker :class:`APIFuture`: ``.result(timeout)``, ``await fut``, ``await
  fut.result_async(timeout)``, ``fut.future()``, ``await fut.coroutine()``;
- a :class:`concurrent.futures.Future` (``done()``, ``cancel()``, ``add_done_callback``), as
  tinker's ``sample()`` futures are.

Awaiting works on any event loop, asyncio or trio: the portal wakes the awaiting loop through
its thread-safe entry point and never blocks on it. A ``.result()`` from inside a running event
loop blocks that loop (tinker allows it and logs a warning; so does this layer); from the
portal's own thread it would deadlock, and raises ``RuntimeError`` instead.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

import anyio

from .. import _portal
from .._loop import current_loop, running_loop, wake_soon
from ._errors import translating

__all__ = ["APIFuture", "AwaitableConcurrentFuture", "done_future", "spawn"]

log = logging.getLogger("loops_async.tinker")

T = TypeVar("T")

_warned_blocking = threading.Event()


class APIFuture(abc.ABC, Generic[T]):
    """The result of a request to come (tinker's ``APIFuture``).

    ``result(timeout=None)`` blocks; ``await fut`` / ``await fut.result_async(timeout=None)``
    awaits (asyncio or trio); ``future()`` is a :class:`concurrent.futures.Future` of the same
    result; ``coroutine()`` a coroutine of it (for ``asyncio.gather``). A timeout raises
    ``TimeoutError``.
    """

    @abc.abstractmethod
    async def result_async(self, timeout: float | None = None) -> T:
        """Wait for the result on the running event loop."""

    @abc.abstractmethod
    def result(self, timeout: float | None = None) -> T:
        """Block until the result is here and return it (raise the request's error)."""

    @abc.abstractmethod
    def future(self) -> concurrent.futures.Future[T]:
        """The result as a :class:`concurrent.futures.Future`."""

    async def coroutine(self) -> T:
        """A coroutine that returns the result (``await fut.coroutine()`` is ``await fut``)."""
        return await self.result_async()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class AwaitableConcurrentFuture(concurrent.futures.Future[T], APIFuture[T]):
    """A :class:`concurrent.futures.Future` that is also a tinker :class:`APIFuture`.

    ``cancel_on_abandon``: cancelling an ``await`` of it (or its ``result_async`` timing out)
    cancels the request too (samples); otherwise the request goes on and only the wait stops
    (training operations, which the trainer runs in order whatever happens).
    """

    def __init__(self, *, cancel_on_abandon: bool = False) -> None:
        super().__init__()
        self._cancel_on_abandon = cancel_on_abandon

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.lower()}>"

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is here (``TimeoutError`` after ``timeout`` seconds)."""
        if not self.done():
            _check_blocking_allowed()
        return super().result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        """Wait for the result on the running event loop (asyncio or trio) without blocking
        it; ``TimeoutError`` after ``timeout`` seconds."""
        if not self.done():
            token = current_loop()
            event = anyio.Event()
            self.add_done_callback(lambda _: wake_soon(token, event.set))
            try:
                if timeout is None:
                    await event.wait()
                else:
                    with anyio.fail_after(timeout):
                        await event.wait()
            except BaseException:
                if self._cancel_on_abandon and not self.done():
                    self.cancel()
                raise
        return super().result(0)

    def future(self) -> concurrent.futures.Future[T]:
        """This object: it is a :class:`concurrent.futures.Future` already."""
        return self


def _check_blocking_allowed() -> None:
    loop = running_loop()
    if loop is None:
        return
    if threading.current_thread().name == "loops-async-portal":
        raise RuntimeError(
            "blocking .result() on the loops_async portal thread would deadlock; await it"
        )
    if not _warned_blocking.is_set():
        _warned_blocking.set()
        log.warning(
            "a blocking .result() was called inside a running event loop; it blocks the loop "
            "until the result is here (await the future instead)"
        )


async def _translated(func: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    with translating():
        return await func(*args)


def spawn(
    func: Callable[..., Awaitable[T]], *args: Any, cancel_on_abandon: bool = False
) -> AwaitableConcurrentFuture[T]:
    """Start ``func(*args)`` on the portal now (never blocks; safe inside a running event loop)
    and return its future; ``loops_async`` errors come out as tinker's classes."""
    future: AwaitableConcurrentFuture[T] = AwaitableConcurrentFuture(
        cancel_on_abandon=cancel_on_abandon
    )
    _portal.spawn(_translated, func, args, future=future)
    return future


def done_future(value: T) -> AwaitableConcurrentFuture[T]:
    """A future that already holds ``value``."""
    future: AwaitableConcurrentFuture[T] = AwaitableConcurrentFuture()
    future.set_result(value)
    return future


S = TypeVar("S")


class SelfFuture(APIFuture[S]):
    """A client that is usable at once and is also a future of itself (tinker's
    ``Backcompat*ClientFuture``): ``.result()`` / ``await`` wait until it is provisioned and
    return the client itself; its methods may be called before that (they queue behind it)."""

    _ready: AwaitableConcurrentFuture[Any]

    def done(self) -> bool:
        """Whether the client is provisioned (or failed to be)."""
        return self._ready.done()

    def result(self, timeout: float | None = None) -> S:
        """Block until the client is provisioned; returns the client itself."""
        self._ready.result(timeout)
        return self  # type: ignore[return-value]

    async def result_async(self, timeout: float | None = None) -> S:
        """Wait (asyncio or trio) until the client is provisioned; returns the client."""
        await self._ready.result_async(timeout)
        return self  # type: ignore[return-value]

    def future(self) -> concurrent.futures.Future[S]:
        """A :class:`concurrent.futures.Future` that resolves to the client."""
        out: AwaitableConcurrentFuture[S] = AwaitableConcurrentFuture()

        def settle(ready: concurrent.futures.Future[Any]) -> None:
            error = None if ready.cancelled() else ready.exception()
            if ready.cancelled():
                out.cancel()
            elif error is not None:
                out.set_exception(error)
            else:
                out.set_result(self)  # type: ignore[arg-type]

        self._ready.add_done_callback(settle)
        return out
