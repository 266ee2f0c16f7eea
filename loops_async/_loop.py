"""Event-loop identity and cross-loop wake-ups, on anyio's public token API only.

A client object can be used from the portal's loop (sync API) and from a user's asyncio or trio
loop at the same time. Objects bound to a loop (httpx clients, anyio events) are keyed by the
loop's native token; a waiter parked on one loop is woken from another without blocking either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = [
    "LoopKey",
    "ThreadSafeGate",
    "current_loop",
    "in_event_loop",
    "running_loop",
    "wake_soon",
]

LoopKey = object


def current_loop() -> anyio.lowlevel.EventLoopToken:
    """The token of the event loop running in this thread (raises if there is none)."""
    return anyio.lowlevel.current_token()


def running_loop() -> anyio.lowlevel.EventLoopToken | None:
    """The token of the event loop running in this thread, or ``None`` when there is none.

    A worker thread started by ``asyncio.to_thread`` inherits the loop's context, so anyio
    believes asyncio is running there and asyncio itself raises ``RuntimeError``: that thread
    runs no loop, and a blocking call from it is fine.
    """
    try:
        return anyio.lowlevel.current_token()
    except (anyio.NoEventLoopError, RuntimeError):
        return None


def in_event_loop() -> bool:
    """Whether an asyncio or trio loop is running in this thread."""
    return running_loop() is not None


def wake_soon(token: anyio.lowlevel.EventLoopToken, func: Callable[[], object]) -> None:
    """Run ``func`` on ``token``'s loop: now if that loop is this thread's, else scheduled
    (thread-safe, non-blocking). A loop that has finished is ignored."""
    here = running_loop()
    if here is not None and here.native_token is token.native_token:
        func()
        return
    try:
        token.backend_class.run_sync_soon(func, (), token.native_token)
    except (anyio.RunFinishedError, RuntimeError):
        pass  # that loop has finished (trio) or is closed (asyncio)


class ThreadSafeGate:
    """Admits integer tickets in order: ticket ``k`` may pass once every ticket below ``k``
    (from ``first``) has been released. Waiters may sit on any event loop; ``release`` may be
    called from any thread, is idempotent, and never blocks.

    This is the ``seq_id`` ordering gate: the POST of seq ``k + 1`` goes once seq ``k``'s POST
    was accepted (or given up), so program order is wire order without waiting for results.
    """

    def __init__(self, first: int = 1) -> None:
        self._lock = threading.Lock()
        self._next = first  # next ticket to hand out
        self._released_below = first  # every ticket < this is released
        self._pending: set[int] = set()  # released tickets >= _released_below
        self._waiters: dict[int, tuple[anyio.lowlevel.EventLoopToken, anyio.Event]] = {}

    def reserve(self, count: int = 1) -> int:
        """Hand out ``count`` consecutive tickets; returns the first."""
        with self._lock:
            first = self._next
            self._next += count
            return first

    @property
    def next_ticket(self) -> int:
        """The ticket the next ``reserve`` will hand out."""
        return self._next

    async def wait_turn(self, ticket: int) -> None:
        """Wait until every ticket below ``ticket`` has been released."""
        with self._lock:
            if ticket <= self._released_below:
                return
            event = anyio.Event()
            self._waiters[ticket] = (current_loop(), event)
        try:
            await event.wait()
        finally:
            with self._lock:
                self._waiters.pop(ticket, None)

    def release(self, ticket: int) -> None:
        """Mark ``ticket`` done (accepted, failed or abandoned). Safe to call twice."""
        wake: tuple[anyio.lowlevel.EventLoopToken, anyio.Event] | None = None
        with self._lock:
            if ticket < self._released_below or ticket in self._pending:
                return
            self._pending.add(ticket)
            while self._released_below in self._pending:
                self._pending.discard(self._released_below)
                self._released_below += 1
            wake = self._waiters.get(self._released_below)
        if wake is not None:
            token, event = wake
            wake_soon(token, event.set)

    def statistics(self) -> tuple[int, int]:
        """``(tickets handed out, tickets released in order)`` — for tests and debugging."""
        with self._lock:
            return self._next - 1, self._released_below - 1
