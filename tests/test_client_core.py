"""The client core's lifecycle and request policy: one test (or more) per bug of issue 9.

Each test first builds the failing situation the issue describes, through ``httpx.MockTransport``
(``_fake_loops.FakeLoops``) or the real local server, on asyncio and on trio.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import msgspec
import pytest

from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    SamplingParams,
    ServiceClient,
    TensorData,
    _http,
    _portal,
)
from loops_async import errors as E
from loops_async._background import BackgroundTasks
from loops_async._operation import APIFuture, ChainedFuture
from loops_async.server import LocalServer

from ._fake_loops import BASE, FakeLoops

pytestmark = pytest.mark.anyio

DATUM = Datum(
    model_input=ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": TensorData(data=[2, 3, 4], dtype="int64", shape=[3])},
)


def service_for(fake: FakeLoops, **kwargs: object) -> ServiceClient:
    options: dict[str, object] = {"heartbeat_interval": 0, "ready_timeout": 5.0}
    options.update(kwargs)
    return ServiceClient(BASE, http_transport=fake.transport(), **options)  # type: ignore[arg-type]


class _Done(APIFuture[int]):
    def __init__(self, value: int) -> None:
        super().__init__()
        self._value = value

    async def _fetch(self) -> int:
        return self._value


async def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (bounded; a loaded machine may be slow)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - polling a counter of the fake server
            await anyio.sleep(0.02)


# 1 ------------------------------------------------------------------ background failures


def test_a_failing_background_task_does_not_kill_the_portal() -> None:
    """An exception in a background task is logged and counted; later sync calls work."""
    tasks = BackgroundTasks("test")
    finished = threading.Event()

    async def broken() -> None:
        try:
            raise httpx.DecodingError("broken gzip body")
        finally:
            finished.set()

    before = _portal._portal_thread()
    handle = tasks.spawn(broken, name="broken")
    assert finished.wait(5)
    assert handle.finished.wait(5)
    assert tasks.statistics().failed == 1
    assert _portal._portal_thread() is before, "the same portal is still alive"
    assert _portal.run(_async_value, 7, twin="x") == 7
    tasks.close()


async def _async_value(value: int) -> int:
    await anyio.lowlevel.checkpoint()
    return value


def test_a_heartbeat_with_a_corrupt_body_keeps_the_client_working() -> None:
    """The issue's case: the heartbeat's 200 has a broken gzip body (httpx.DecodingError)."""
    fake = FakeLoops()
    with service_for(fake, heartbeat_interval=0.02) as service:
        training = service.create_lora_training_client("m", rank=4)
        fake.health_body = lambda: httpx.Response(
            200, content=b"\x1f\x8bgarbage", headers={"Content-Encoding": "gzip"}
        )
        before = fake.health_checks
        deadline = time.monotonic() + 10  # a loaded machine may be slow; never gate on time
        while fake.health_checks <= before + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.health_checks > before + 2, "the heartbeat keeps running"
        assert training.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=10)
        assert service.statistics()["background_failed"] == 0
    assert service.statistics()["background_running"] == 0


def test_get_portal_replaces_a_dead_portal() -> None:
    dead = _portal._portal_thread()
    dead.portal.call(dead.portal.stop, True)  # the loop ends as if it had crashed
    dead.thread.join(5)
    assert not dead.alive
    assert _portal.run(_async_value, 3, twin="x") == 3
    assert _portal._portal_thread() is not dead


# 2 ------------------------------------------------------------------ trio without async with


async def test_heartbeat_runs_without_async_with(anyio_backend: str) -> None:
    """Without ``async with`` (on trio too) the heartbeat runs on the portal's loop."""
    fake = FakeLoops()
    service = service_for(fake, heartbeat_interval=0.02)
    try:
        await service.create_lora_training_client_async("m", rank=4)
        before = fake.health_checks
        await _eventually(lambda: fake.health_checks > before + 2)
        stats = service.statistics()
        assert stats["background_running"] == 1
    finally:
        await service.aclose()
    assert service.statistics()["background_running"] == 0


async def test_heartbeat_runs_in_the_callers_group_with_async_with(anyio_backend: str) -> None:
    fake = FakeLoops()
    async with service_for(fake, heartbeat_interval=0.02) as service:
        await service.create_lora_training_client_async("m", rank=4)
        before = fake.health_checks
        await _eventually(lambda: fake.health_checks > before + 2)
        assert anyio.get_current_task().name  # still inside the caller's loop
        assert len(anyio.get_running_tasks()) >= 2, "the heartbeat is a task on this loop"
    assert service.statistics()["background_running"] == 0


# 3 ------------------------------------------------------------------ per-loop transports


def test_close_does_not_hang_on_a_stopped_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http, "CLOSE_TIMEOUT", 0.5)
    fake = FakeLoops()
    service = service_for(fake)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.get_server_capabilities_async())
    except E.LoopsError:
        pass  # the fake has no capabilities route; the loop's client exists all the same
    assert service.statistics()["http_loops"] == 1
    started = time.monotonic()
    service.close()  # the loop is stopped but not closed: nobody runs its callbacks
    assert time.monotonic() - started < 3.0
    loop.close()


def test_short_lived_loops_do_not_pile_up_clients() -> None:
    fake = FakeLoops()
    service = service_for(fake)

    async def use() -> None:
        await service.create_lora_training_client_async("m", rank=4)

    for _ in range(5):
        asyncio.run(use())
    assert service.statistics()["http_loops"] == 1, "finished loops were dropped"
    for _ in range(3):
        anyio.run(use, backend="trio")
    assert service.statistics()["http_loops"] == 1
    service.close()
    assert service.statistics()["http_loops"] == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_loop_that_shuts_down_closes_its_connections(
    backend: str, null_server: LocalServer
) -> None:
    """A client used from short-lived loops and never closed in them: each loop's shutdown
    (``asyncio.run``'s ``shutdown_asyncgens``, the end of ``trio.run``) closes that loop's
    sockets, so none is left for the garbage collector to find open."""
    service = ServiceClient(base_url=null_server.url, heartbeat_interval=0)

    async def use() -> None:
        sampler = await service.create_sampling_client_async(base_model="loops-local/tiny-chat")
        await sampler.sample_async(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            anyio.run(use, backend=backend)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    service.close()


# 4 ------------------------------------------------------------------ timeouts keep causes


async def test_an_inner_timeout_keeps_its_message(anyio_backend: str) -> None:
    async def then(value: int) -> int:
        raise E.OperationTimeoutError(f"sampler did not reach policy version {value}")

    future = ChainedFuture(_Done(4), then, what="publish and sampler")
    with pytest.raises(E.OperationTimeoutError, match="policy version 4"):
        await future.result_async(timeout=30)


async def test_our_own_deadline_says_not_done(anyio_backend: str) -> None:
    async def then(value: int) -> int:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    future = ChainedFuture(_Done(1), then, what="slow thing")
    with pytest.raises(E.OperationTimeoutError, match=r"not done after 0\.1 s"):
        await future.result_async(timeout=0.1)


# 5 ------------------------------------------------------------------ shielded cleanup


async def test_a_cancelled_download_leaves_no_partial_directory(
    anyio_backend: str, tmp_path: Path
) -> None:
    started = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/loops/checkpoints":
            return httpx.Response(
                200,
                json={
                    "checkpoints": [
                        {"id": "c1", "run_id": "r", "checkpoint_id": "a", "target": "trainer"}
                    ]
                },
            )
        if path.endswith("/source"):
            return httpx.Response(200, json={"source": {"kind": "s3"}})
        if path.endswith("/files"):
            files = [{"url": f"{BASE}/blob/{i}", "relative_file_name": f"f{i}"} for i in range(2)]
            return httpx.Response(200, json={"presigned_urls": files, "next_page_token": None})
        if path == "/blob/1":
            started.set()
            await anyio.sleep_forever()
        return httpx.Response(200, content=b"x" * 10)

    async with (
        ServiceClient(BASE, http_transport=httpx.MockTransport(handler)) as service,
        anyio.create_task_group() as group,
    ):

        async def download() -> None:
            await service.download_checkpoint_async(
                "bt://loops:r/weights/a", dest_dir=tmp_path / "d"
            )

        group.start_soon(download)
        await started.wait()
        group.cancel_scope.cancel()
    left = [p async for p in anyio.Path(tmp_path).iterdir()]
    assert left == [], "neither the target nor the partial directory"


async def test_aclose_closes_connections_when_cancelled(anyio_backend: str) -> None:
    service = service_for(FakeLoops())
    await service.create_lora_training_client_async("m", rank=4)
    assert service.statistics()["http_loops"] == 1
    with anyio.CancelScope() as scope:
        scope.cancel()
        await service.aclose()
    assert service.statistics()["http_loops"] == 0


# 6 ------------------------------------------------------------------ state on acknowledgement


async def test_state_advances_when_acknowledged(
    anyio_backend: str, null_server: LocalServer
) -> None:
    async with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async("loops-local/tiny-chat", 4)
        for _ in range(2):
            await training.forward_backward_async([DATUM])
            await training.optim_step_async(AdamParams(learning_rate=1e-3))
        assert training.policy_version == 2, "no result was read"
        save = await training.save_state_async("s")
        await training.save_weights_for_sampler_async("p1", bump_version=True)  # unread
        path = (await save).path
        sampler = await training.create_sampling_client_async(path)
        assert sampler.min_policy_version == 3, "floor = the unread publish's version + 1"


# 7 ------------------------------------------------------------------ sync calls from workers


async def test_a_sync_call_from_a_worker_thread_works(anyio_backend: str) -> None:
    """``asyncio.to_thread`` copies the loop's context into the worker: that thread still runs
    no loop, so a blocking call there is fine."""
    service = service_for(FakeLoops())

    def blocking() -> int:
        training = service.create_lora_training_client("m", rank=4)
        return (
            training.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=10).metrics["step"]
        )

    try:
        if anyio_backend == "asyncio":
            step = await asyncio.to_thread(blocking)
        else:
            step = await anyio.to_thread.run_sync(blocking)
        assert step == 1
    finally:
        await service.aclose()


async def test_a_sync_call_on_the_loop_still_names_the_twin(anyio_backend: str) -> None:
    service = service_for(FakeLoops())
    with pytest.raises(E.SyncInAsyncContextError, match="create_lora_training_client_async"):
        service.create_lora_training_client("m", rank=4)
    await service.aclose()


# 8 ------------------------------------------------------------------ lanes


async def test_a_flood_of_samples_never_delays_a_submit(anyio_backend: str) -> None:
    gate = anyio.Event()
    fake = FakeLoops(sample_gate=gate)
    async with service_for(fake, max_connections=4, max_sampling_connections=4) as service:
        training = await service.create_lora_training_client_async("m", rank=4)
        sampler = await (await training.save_weights_and_get_sampling_client_async("p"))
        async with anyio.create_task_group() as group:
            for i in range(16):  # 4x the sampling lane: 12 wait in the client's queue
                group.start_soon(sampler.sample_async, ModelInput.from_ints([i + 1]))
            await anyio.sleep(0.1)
            with anyio.fail_after(5):
                future = await training.forward_backward_async([DATUM])
                await future
            assert not gate.is_set()
            gate.set()


# 9 ------------------------------------------------------------------ partial chunk rejections


async def test_a_batch_rejected_part_way_hands_back_the_accepted_chunks(
    anyio_backend: str,
) -> None:
    def reject_second(request: httpx.Request, body: dict[str, object]) -> httpx.Response | None:
        if request.url.path.endswith("forward_backward") and body["seq_id"] == 3:
            return httpx.Response(422, json={"detail": "data[0]: too long"})
        return None

    fake = FakeLoops(on_submit=reject_second)
    data = [DATUM] * 6
    async with service_for(fake, max_request_bytes=4096 + 400) as service:
        training = await service.create_lora_training_client_async("m", rank=4)
        with pytest.raises(E.PartialSubmitError) as caught:
            await training.forward_backward_async(data)
        error = caught.value
        assert isinstance(error.__cause__, E.UnprocessableEntityError)
        assert error.accepted_ranges
        assert error.accepted_ranges[0][0] == 0
        assert error.rejected_ranges
        covered = sorted(error.accepted_ranges + error.rejected_ranges)
        assert covered[0][0] == 0
        assert covered[-1][1] == len(data)
        for future in error.accepted:
            assert (await future).loss >= 2
        # The gate was not stranded: the next op goes through.
        step = await training.optim_step_async(AdamParams(learning_rate=1e-3))
        assert (await step).metrics["step"] == 1


async def test_a_batch_rejected_at_its_first_chunk_raises_the_rejection(
    anyio_backend: str,
) -> None:
    def reject(request: httpx.Request, body: dict[str, object]) -> httpx.Response | None:
        if request.url.path.endswith("forward_backward"):
            return httpx.Response(422, json={"detail": "nope"})
        return None

    async with service_for(FakeLoops(on_submit=reject), max_request_bytes=4096 + 400) as service:
        training = await service.create_lora_training_client_async("m", rank=4)
        with pytest.raises(E.UnprocessableEntityError):
            await training.forward_backward_async([DATUM] * 6)


# 10 ------------------------------------------------------------------ one request policy


async def test_corrupt_bodies_are_retried_with_the_same_key(anyio_backend: str) -> None:
    keys: list[str] = []
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path.endswith("/optim_step"):
            keys.append(request.headers["idempotency-key"])
            calls += 1
            if calls == 1:  # processed, but the answer is a corrupt gzip body
                return httpx.Response(
                    202, content=b"\x1f\x8bxx", headers={"Content-Encoding": "gzip"}
                )
        return await fake(request)

    fake = FakeLoops()
    async with ServiceClient(
        BASE, http_transport=httpx.MockTransport(handler), heartbeat_interval=0
    ) as service:
        training = await service.create_lora_training_client_async("m", rank=4)
        future = await training.optim_step_async(AdamParams(learning_rate=1e-3))
        assert (await future).metrics["step"] == 1
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert max(fake.executed.values()) == 1


@pytest.mark.parametrize(
    ("body", "route"),
    [(b"not json", "poll"), (b'{"status": 3}', "poll"), (b"<html>", "control")],
)
async def test_undecodable_bodies_are_protocol_errors(
    anyio_backend: str, body: bytes, route: str
) -> None:
    optim_ops: set[str] = set()

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/optim_step"):
            optim_ops.add(request.headers["idempotency-key"])
        if route == "poll" and path.rsplit("/", 1)[-1] in optim_ops:
            return httpx.Response(200, content=body)
        if route == "control" and path == "/v1/loops/capabilities":
            return httpx.Response(200, content=body)
        return await fake(request)

    fake = FakeLoops()
    async with ServiceClient(
        BASE, http_transport=httpx.MockTransport(handler), heartbeat_interval=0
    ) as service:
        if route == "control":
            with pytest.raises(E.ProtocolError):
                await service.get_server_capabilities_async()
            return
        training = await service.create_lora_training_client_async("m", rank=4)
        future = await training.optim_step_async(AdamParams(learning_rate=1e-3))
        with pytest.raises(E.ProtocolError):
            await future


def test_every_route_kind_has_one_status_table() -> None:
    tables = [
        _http.TRAINER_SUBMIT,
        _http.TRAINER_POLL,
        _http.SAMPLE,
        _http.SAMPLER_POLL,
        _http.CONTROL_READ,
        _http.CONTROL_WRITE,
    ]
    assert len({t.name for t in tables}) == len(tables)
    assert _http.SAMPLE.lane is _http.Lane.SAMPLING
    assert _http.SAMPLER_POLL.lane is _http.Lane.SAMPLING
    assert all(t.lane is _http.Lane.CONTROL for t in tables if "samp" not in t.name)
    for table in tables:
        assert not (table.transient & table.success), table.name


def test_the_status_table_is_the_only_retry_loop() -> None:
    """No module but ``_http`` sends a request in a loop of its own."""
    root = Path(__file__).parent.parent / "loops_async"
    for module in ("_operation.py", "_control.py", "sampling.py", "training.py", "service.py"):
        text = (root / module).read_text()
        assert "transport.request(" not in text or module == "sampling.py", module
        # readiness and version waits poll for a state; they are not request retry loops
        assert "while True" not in text or module in (
            "_operation.py",
            "_control.py",
            "sampling.py",
        ), module
        assert "msgspec.DecodeError" not in text or module == "_operation.py", module
    assert msgspec  # the codec is used through decode_body only
