"""Background work a client owns (heartbeats, pollers): one owner, one set of rules.

:class:`BackgroundTasks` belongs to one client. Every task it starts runs inside a task group
that belongs to that client, on the loop that runs the task:

- inside ``async with client:`` on the caller's loop (asyncio or trio), the client's own group;
- otherwise on the process-wide portal's loop, in a group this owner hosts there (created on
  first use, replaced if the portal died).

The task's cancel scope is created by the task itself, on its own loop (a scope made in one
loop's context and entered in another never works on trio). An ``Exception`` a task raises is
logged and counted, never propagated: one broken heartbeat must not kill the portal, or the
client. Cancellation (a ``BaseException``) is never caught. ``cancel_all()`` and the handles'
``cancel()`` are thread-safe and never block; ``close()``/``aclose()`` also wait (bounded) for
the portal-hosted group to finish.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from . import _portal
from ._loop import running_loop, wake_soon

__all__ = ["BackgroundStatistics", "BackgroundTasks", "TaskHandle"]

log = logging.getLogger("loops_async")

CLOSE_WAIT = 5.0
"""Seconds ``close()`` waits for the portal-hosted tasks to finish after cancelling them."""


class TaskHandle:
    """One background task. ``cancel()`` is thread-safe, idempotent and never blocks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._scope: anyio.CancelScope | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._cancelled = False
        self.finished = threading.Event()
        """Set once the task has returned, failed or been cancelled."""

    def __repr__(self) -> str:
        state = "finished" if self.finished.is_set() else "running"
        return f"<TaskHandle {self.name} {state}>"

    def cancel(self) -> None:
        """Ask the task to stop (it may already have)."""
        with self._lock:
            self._cancelled = True
            scope, token = self._scope, self._token
        if scope is not None and token is not None:
            wake_soon(token, scope.cancel)

    def _bind(self, scope: anyio.CancelScope, token: anyio.lowlevel.EventLoopToken) -> None:
        with self._lock:
            self._scope, self._token = scope, token
            cancelled = self._cancelled
        if cancelled:
            scope.cancel()


class BackgroundStatistics:
    """Counters of a :class:`BackgroundTasks` (for tests and debugging)."""

    __slots__ = ("failed", "running", "started")

    def __init__(self, started: int, running: int, failed: int) -> None:
        self.started = started
        """Tasks started so far."""
        self.running = running
        """Tasks not finished yet."""
        self.failed = failed
        """Tasks that ended with an exception (logged)."""

    def __repr__(self) -> str:
        return (
            f"BackgroundStatistics(started={self.started}, running={self.running}, "
            f"failed={self.failed})"
        )


class _PortalHost:
    """This owner's task group on the portal's loop. All of its state is touched on that loop
    only (requests arrive through :func:`wake_soon`)."""

    def __init__(self, owner: BackgroundTasks, portal: _portal._PortalThread) -> None:
        self.portal = portal
        self.token: anyio.lowlevel.EventLoopToken = portal.token
        self.group: anyio.abc.TaskGroup | None = None
        self.scope: anyio.CancelScope | None = None
        self.pending: list[tuple[TaskHandle, Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self.stopping = False
        self.finished = threading.Event()
        self._owner = weakref.ref(owner)

    def submit(
        self, handle: TaskHandle, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        """Queue a task (called on the portal's loop)."""
        if self.stopping:
            handle.finished.set()
            return
        if self.group is None:
            self.pending.append((handle, func, args))
            if len(self.pending) == 1 and self.scope is None:
                self.portal.hosts.start_soon(self._main, name="loops-async-background-host")
            return
        owner = self._owner()
        if owner is None:
            handle.finished.set()
            return
        self.group.start_soon(owner._guard, handle, func, args, name=handle.name)

    def stop(self) -> None:
        """Cancel the group (called on the portal's loop)."""
        self.stopping = True
        for handle, _, _ in self.pending:
            handle.finished.set()
        self.pending.clear()
        if self.scope is not None:
            self.scope.cancel()
        elif self.group is None:
            self.finished.set()

    async def _main(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self.scope = scope
                if self.stopping:
                    scope.cancel()
                async with anyio.create_task_group() as group:
                    self.group = group
                    pending, self.pending = self.pending, []
                    for handle, func, args in pending:
                        self.submit(handle, func, args)
                    await anyio.sleep_forever()
        finally:
            self.group = None
            self.finished.set()


_live: weakref.WeakSet[BackgroundTasks] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # The child has no portal thread: drop (never touch) the parent's hosts.
    for owner in list(_live):
        owner._host = None
        owner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class BackgroundTasks:
    """The background tasks of one client (see the module docstring)."""

    def __init__(self, owner: str) -> None:
        self._owner_name = owner
        self._lock = threading.Lock()
        self._group: anyio.abc.TaskGroup | None = None
        self._group_token: anyio.lowlevel.EventLoopToken | None = None
        self._host: _PortalHost | None = None
        self._handles: weakref.WeakSet[TaskHandle] = weakref.WeakSet()
        self._started = 0
        self._failed = 0
        self._running = 0
        self._closed = False
        _live.add(self)

    def __repr__(self) -> str:
        return f"<BackgroundTasks of {self._owner_name} {self.statistics()!r}>"

    # ------------------------------------------------------------------ the caller's group

    def bind(self, group: anyio.abc.TaskGroup) -> None:
        """Host tasks started on the current loop in ``group`` (``async with client``)."""
        token = running_loop()
        assert token is not None, "bind() runs inside the client's async with"
        with self._lock:
            self._group, self._group_token = group, token

    def unbind(self) -> None:
        """Stop hosting tasks in the caller's group (it is about to close)."""
        with self._lock:
            self._group = self._group_token = None

    # ------------------------------------------------------------------ starting tasks

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> TaskHandle:
        """Run ``func(*args)`` in the background until it returns or is cancelled; never
        blocks. From inside ``async with client`` on that client's loop, the task runs there;
        from anywhere else (a sync call, another loop), on the portal's loop."""
        handle = TaskHandle(name)
        here = running_loop()
        with self._lock:
            if self._closed:
                handle.finished.set()
                return handle
            self._handles.add(handle)
            group, token = self._group, self._group_token
        if (
            group is not None
            and token is not None
            and here is not None
            and here.native_token is token.native_token
        ):
            group.start_soon(self._guard, handle, func, args, name=name)
            return handle
        host = self._portal_host()
        wake_soon(host.token, lambda: host.submit(handle, func, args))
        return handle

    def _portal_host(self) -> _PortalHost:
        portal = _portal._portal_thread()
        with self._lock:
            host = self._host
            if host is None or host.portal is not portal:
                host = self._host = _PortalHost(self, portal)
            return host

    async def _guard(
        self, handle: TaskHandle, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        token = anyio.lowlevel.current_token()
        with self._lock:
            self._started += 1
            self._running += 1
        try:
            with anyio.CancelScope() as scope:  # made here, on the loop that runs the task
                handle._bind(scope, token)
                try:
                    await func(*args)
                except Exception:
                    with self._lock:
                        self._failed += 1
                    log.warning(
                        "background task %s of %s failed",
                        handle.name,
                        self._owner_name,
                        exc_info=True,
                    )
        finally:
            with self._lock:
                self._running -= 1
            handle.finished.set()

    # ------------------------------------------------------------------ stopping

    def statistics(self) -> BackgroundStatistics:
        """Tasks started, still running and failed so far."""
        with self._lock:
            return BackgroundStatistics(self._started, self._running, self._failed)

    def cancel_all(self) -> _PortalHost | None:
        """Cancel every task and stop hosting new ones; thread-safe, never blocks. Returns the
        portal host to wait for, if there is one."""
        with self._lock:
            self._closed = True
            handles = list(self._handles)
            host, self._host = self._host, None
        for handle in handles:
            handle.cancel()
        if host is not None:
            wake_soon(host.token, host.stop)
        return host

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Cancel every task, then wait (at most ``timeout`` s) for the portal-hosted ones to
        finish. Call from a thread that runs no event loop, or from any loop (no wait then)."""
        host = self.cancel_all()
        if host is None or running_loop() is not None:
            return
        if not host.finished.wait(timeout):
            log.debug("background tasks of %s still running after %s s", self._owner_name, timeout)

    async def aclose(self, timeout: float = CLOSE_WAIT) -> None:
        """Async twin of :meth:`close`: waits without blocking this loop."""
        host = self.cancel_all()
        if host is None:
            return
        here = running_loop()
        if here is not None and here.native_token is host.token.native_token:
            return  # on the portal's own loop: the cancellation runs right after us
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(host.finished.wait, timeout, abandon_on_cancel=True)
