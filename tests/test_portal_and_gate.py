"""The blocking portal (a checklist after anyio's test_from_thread) and the seq ordering gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from loops_async import SyncInAsyncContextError, _portal
from loops_async._loop import ThreadSafeGate

# --------------------------------------------------------------------------- portal


async def _answer(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x * 2


def test_sync_call_runs_on_the_portal_thread() -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert _portal.run(where, twin="x") == "loops-async-portal"
    assert _portal.run(_answer, 21, twin="x") == 42


@pytest.mark.anyio
async def test_sync_call_inside_an_event_loop_raises(anyio_backend: str) -> None:
    with pytest.raises(SyncInAsyncContextError, match="forward_backward_async"):
        _portal.run(_answer, 1, twin="forward_backward_async")


def test_sync_call_from_the_portal_thread_raises() -> None:
    async def nested() -> None:
        _portal.run(_answer, 1, twin="optim_step_async")

    with pytest.raises(SyncInAsyncContextError, match="optim_step_async"):
        _portal.run(nested, twin="x")


def test_sync_call_from_a_worker_thread_is_fine() -> None:
    async def main() -> int:
        return await anyio.to_thread.run_sync(lambda: _portal.run(_answer, 5, twin="x"))

    assert anyio.run(main) == 10


def test_exceptions_propagate_unwrapped() -> None:
    async def boom() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        _portal.run(boom, twin="x")


def test_keyboard_interrupt_cancels_the_portal_task() -> None:
    cancelled = threading.Event()
    started = threading.Event()

    async def forever() -> None:
        try:
            started.set()
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    def interrupt() -> None:
        started.wait(5)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C

    threading.Thread(target=interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        _portal.run(forever, twin="x")
    assert cancelled.wait(5), "the coroutine on the portal was not cancelled"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_portal_is_fork_safe() -> None:
    parent_thread = _portal.run(_thread_ident, twin="x")
    parent_portal = _portal.get_portal()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = _portal.run(_answer, 4, twin="x") == 8
            ok = ok and _portal.get_portal() is not parent_portal
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _portal.run(_thread_ident, twin="x") == parent_thread


async def _thread_ident() -> int:
    return threading.get_ident()


def test_interpreter_exit_does_not_hang_with_work_in_flight() -> None:
    script = textwrap.dedent(
        """
        import anyio
        from loops_async._background import BackgroundTasks
        from loops_async.service import ServiceClient

        tasks = BackgroundTasks("test")
        tasks.spawn(anyio.sleep_forever, name="forever")   # never ends on its own
        ServiceClient("http://127.0.0.1:9")        # a client that is never closed
        print("bye", flush=True)
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bye"
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- gate


@pytest.mark.anyio
async def test_gate_admits_in_ticket_order(anyio_backend: str) -> None:
    gate = ThreadSafeGate()
    order: list[int] = []
    tickets = [gate.reserve() for _ in range(5)]

    async def post(ticket: int, delay: float) -> None:
        await anyio.sleep(delay)
        await gate.wait_turn(ticket)
        order.append(ticket)
        gate.release(ticket)

    async with anyio.create_task_group() as tg:
        # Later tickets arrive first; they still pass in order.
        for ticket, delay in zip(tickets, [0.05, 0.04, 0.03, 0.0, 0.01], strict=True):
            tg.start_soon(post, ticket, delay)
    assert order == tickets


@pytest.mark.anyio
async def test_cancelled_waiter_releases_its_ticket(anyio_backend: str) -> None:
    gate = ThreadSafeGate()
    first, second, third = gate.reserve(), gate.reserve(), gate.reserve()

    async def cancelled_post() -> None:
        try:
            await gate.wait_turn(second)
        finally:
            gate.release(second)

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_post)
        await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    gate.release(first)
    with anyio.fail_after(1):
        await gate.wait_turn(third)  # not stranded by the cancelled one
    gate.release(first)  # idempotent
    assert gate.statistics() == (3, 2)


def test_gate_wakes_a_waiter_on_another_loop() -> None:
    gate = ThreadSafeGate()
    first, second = gate.reserve(), gate.reserve()

    async def wait_second() -> str:
        await gate.wait_turn(second)
        return "passed"

    future = _portal.get_portal().start_task_soon(wait_second)
    time.sleep(0.05)
    assert not future.done()
    gate.release(first)  # from this thread, which runs no loop
    assert future.result(timeout=5) == "passed"
