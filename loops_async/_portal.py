"""The process-wide blocking portal that runs the sync API's coroutines.

One daemon thread, started on first use, runs an asyncio loop hosting an
:class:`anyio.from_thread.BlockingPortal`. Every sync method is ``run(coroutine_fn, ...)`` on it,
so the sync and async APIs share one implementation. ``run`` hands the call over with one
wake-up of the loop and is woken once when it finishes (``BlockingPortal.start_task_soon`` waits
for a second hand-off, the spawn, and wakes the caller through a ``Condition``: about half the
CPU of a sync round trip's portal crossings).

- A sync call from a thread that runs an event loop (including the portal's own thread) raises
  :class:`~loops_async.errors.SyncInAsyncContextError` naming the ``*_async`` twin.
- ``KeyboardInterrupt`` (or any exception) while a sync call waits cancels the coroutine on the
  portal before it propagates.
- A portal whose loop died is replaced on next use.
- After ``os.fork()`` the child starts its own portal on first use; it never touches the
  parent's thread or sockets.
- The thread is a daemon and is stopped by an ``atexit`` hook with a bounded join, so it never
  holds up interpreter exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.from_thread import BlockingPortal

from ._loop import running_loop
from .errors import SyncInAsyncContextError

__all__ = ["ensure_sync_context", "get_portal", "run", "shutdown", "spawn"]

log = logging.getLogger("loops_async")

T = TypeVar("T")

_STOP_TIMEOUT = 5.0


class _PortalThread:
    hosts: anyio.abc.TaskGroup
    """Hosts the per-client background task groups (see :mod:`loops_async._background`); each
    host catches its children's failures, so nothing can kill this group or the portal."""
    calls: anyio.abc.TaskGroup
    """Runs the sync API's calls (:func:`run`)."""
    token: anyio.lowlevel.EventLoopToken

    def __init__(self) -> None:
        self.ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._main, name="loops-async-portal", daemon=True)
        self.thread.start()
        self.portal = self.ready.result()

    def _main(self) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal, anyio.create_task_group() as hosts:
                self.hosts = hosts
                async with anyio.create_task_group() as calls:
                    self.calls = calls
                    self.token = anyio.lowlevel.current_token()
                    self.ready.set_result(portal)
                    await portal.sleep_until_stopped()
                    calls.cancel_scope.cancel()
                hosts.cancel_scope.cancel()

        try:
            anyio.run(serve)
        except BaseException as exc:  # pragma: no cover - reported to the starter, or logged
            if not self.ready.done():
                self.ready.set_exception(exc)
            else:
                log.error("the loops_async portal thread stopped", exc_info=True)
        finally:
            self.finished.set()

    def submit(self, call: _Task[Any]) -> None:
        """Start ``call`` on the loop (thread-safe, non-blocking; ``RuntimeError`` when the loop
        has ended)."""
        try:
            self.token.backend_class.run_sync_soon(
                call.start, (self.calls,), self.token.native_token
            )
        except anyio.RunFinishedError as exc:
            raise RuntimeError("the loops_async portal has stopped") from exc

    def cancel(self, call: _Task[Any]) -> None:
        """Cancel ``call`` on the loop (thread-safe, non-blocking; nothing if it has ended)."""
        try:
            self.token.backend_class.run_sync_soon(call.cancel, (), self.token.native_token)
        except (anyio.RunFinishedError, RuntimeError):
            pass

    @property
    def alive(self) -> bool:
        """Whether the loop still runs (a portal whose loop ended is replaced on next use)."""
        return not self.finished.is_set() and self.thread.is_alive()

    def stop(self) -> None:
        if self.alive:
            try:
                self.portal.call(self.portal.stop, True)
            except Exception:  # pragma: no cover - the loop already went away
                pass
            self.thread.join(_STOP_TIMEOUT)


class _Task(Generic[T]):
    """One coroutine run on the portal's loop, cancellable from the caller's side (before or
    after it started); its outcome goes to :meth:`_deliver`, exactly once."""

    __slots__ = ("args", "cancelled", "func", "scope")

    def __init__(self, func: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False

    def _deliver(self, result: T | None, error: BaseException | None) -> None:
        raise NotImplementedError

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """On the loop: spawn the call (or fail it, if it cannot be)."""
        try:
            group.start_soon(self._run)
        except BaseException as exc:
            self._deliver(None, exc)
            if not isinstance(exc, Exception):
                raise

    def cancel(self) -> None:
        """On the loop: cancel the call (before or after it started)."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    async def _run(self) -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            with anyio.CancelScope() as scope:
                self.scope = scope
                if self.cancelled:
                    scope.cancel()
                result = await self.func(*self.args)
            if scope.cancelled_caught:
                error = concurrent.futures.CancelledError()
        except anyio.get_cancelled_exc_class():
            error = concurrent.futures.CancelledError()  # the portal is stopping
            raise
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: as BlockingPortal
        finally:
            self.scope = None
            self._deliver(result, error)


class _Call(_Task[T]):
    """One sync call on the portal's loop. The caller blocks on ``done``, a lock the loop
    releases once, when the call has an outcome."""

    __slots__ = ("done", "error", "result")

    def __init__(self, func: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        super().__init__(func, args)
        self.done = threading.Lock()
        self.done.acquire()
        self.result: T | None = None
        self.error: BaseException | None = None

    def _deliver(self, result: T | None, error: BaseException | None) -> None:
        self.result = result
        self.error = error
        self.done.release()

    def wait(self, thread: _PortalThread) -> None:
        """In the caller's thread: block until the call has an outcome."""
        while not self.done.acquire(timeout=_LIVENESS_CHECK):
            if not thread.alive:
                raise RuntimeError("the loops_async portal stopped during a call")

    def outcome(self) -> T:
        """The call's result, or its exception raised."""
        if self.error is not None:
            error, self.error = self.error, None  # no reference cycle through the traceback
            raise error
        return self.result  # type: ignore[return-value]


class _Spawn(_Task[T]):
    """One call started on the portal's loop without waiting for it: its outcome goes to a
    :class:`concurrent.futures.Future`; cancelling that future cancels the call."""

    __slots__ = ("future",)

    def __init__(
        self,
        func: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        future: concurrent.futures.Future[T],
    ) -> None:
        super().__init__(func, args)
        self.future = future

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """On the loop: spawn the call, unless its future was cancelled meanwhile."""
        if self.future.cancelled():
            self.cancelled = True
        super().start(group)

    def _deliver(self, result: T | None, error: BaseException | None) -> None:
        _settle(self.future, result, error)


def _settle(
    future: concurrent.futures.Future[T], result: T | None, error: BaseException | None
) -> None:
    """Give ``future`` its outcome unless it already has one (it may have been cancelled)."""
    try:
        if error is None:
            future.set_result(result)  # type: ignore[arg-type]
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


_LIVENESS_CHECK = 5.0
"""Seconds between checks, while a sync call waits, that the portal's loop still runs."""

_lock = threading.Lock()
_current: _PortalThread | None = None


def _portal_thread() -> _PortalThread:
    """The running portal thread, started (or replaced, if its loop died) on demand."""
    global _current
    current = _current
    if current is not None and current.alive:
        return current
    with _lock:
        if _current is None or not _current.alive:
            if _current is not None:
                log.warning("the loops_async portal thread had stopped; starting a new one")
            _current = _PortalThread()
        return _current


def get_portal() -> BlockingPortal:
    """The process-wide portal, started on first use and replaced if its loop has died."""
    return _portal_thread().portal


def shutdown() -> None:
    """Stop the portal thread (it restarts on next use). Called at interpreter exit."""
    global _current
    with _lock:
        current, _current = _current, None
    if current is not None and threading.current_thread() is not current.thread:
        current.stop()


def _after_fork_in_child() -> None:
    global _current, _lock
    _current = None
    _lock = threading.Lock()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def ensure_sync_context(twin: str) -> None:
    """Raise :class:`SyncInAsyncContextError` when called inside a running event loop."""
    if running_loop() is None:
        return
    raise SyncInAsyncContextError(
        f"this is the blocking API and an event loop is running in this thread; "
        f"use `await ...{twin}(...)` instead"
    )


def run(func: Callable[..., Awaitable[T]], *args: Any, twin: str, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` on the portal and block for its result.

    ``twin`` names the async method to suggest when called inside an event loop.
    """
    ensure_sync_context(twin)
    if kwargs:
        func = functools.partial(func, **kwargs)
    thread = _portal_thread()
    call = _Call(func, args)
    thread.submit(call)
    try:
        call.wait(thread)
    except BaseException:
        # KeyboardInterrupt (or anything else) while waiting: cancel the coroutine too.
        thread.cancel(call)
        raise
    return call.outcome()


def spawn(
    func: Callable[..., Awaitable[T]],
    *args: Any,
    future: concurrent.futures.Future[T] | None = None,
) -> concurrent.futures.Future[T]:
    """Start ``func(*args)`` on the portal and return at once (from any thread, even one that
    runs an event loop): the returned ``future`` (a new one unless given) gets the outcome.
    Cancelling it cancels the call. Calls spawned from one thread start in spawn order."""
    if future is None:
        future = concurrent.futures.Future()
    thread = _portal_thread()
    call = _Spawn(func, args, future)
    thread.submit(call)

    def cancelled(done: concurrent.futures.Future[T]) -> None:
        if done.cancelled():
            thread.cancel(call)

    future.add_done_callback(cancelled)
    return future
