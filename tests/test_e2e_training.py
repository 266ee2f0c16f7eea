"""End to end: the client against the real local server (torch backend) over real HTTP."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from loops_async import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OperationFuture,
    ServiceClient,
    SyncInAsyncContextError,
    TensorData,
    TrainingClient,
    UnprocessableEntityError,
    ValidationError,
)
from loops_async.server import LocalServer

from ._data import MODEL, sft_batch, snippet_datum

LR = AdamParams(learning_rate=4e-5)
FAST = AdamParams(learning_rate=2e-3)


def adapter_of(server: LocalServer, path: str) -> dict[str, np.ndarray]:
    """The adapter tensors of a ``bt://loops:<run>/weights/<name>`` checkpoint on disk."""
    run_id, _, name = path.removeprefix("bt://loops:").partition("/weights/")
    return load_file(
        server.data_dir / "runs" / run_id / "weights" / name / "adapter_model.safetensors"
    )


def logprobs(out: ForwardBackwardOutput) -> np.ndarray:
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


# --------------------------------------------------------------------------- the documented example


def test_documented_sync_example(torch_server: LocalServer) -> None:
    service = ServiceClient(base_url=torch_server.url)
    training = service.create_lora_training_client(base_model=MODEL, rank=16)
    datum = snippet_datum()
    fb = training.forward_backward(data=[datum]).result(timeout=600.0)
    training.optim_step(AdamParams(learning_rate=4e-5)).result(timeout=600.0)
    save_resp = training.save_state(name="step-1").result(timeout=600.0)
    assert fb.loss > 0
    assert fb.loss_fn_outputs[0]["logprobs"].shape == [datum.model_input.length]
    assert save_resp.path == f"bt://loops:{training.run_id}/weights/step-1"
    assert (torch_server.data_dir / "runs" / training.run_id / "weights" / "step-1").is_dir()
    assert training.policy_version == 1
    assert training.health() is None
    info = training.get_info()
    assert (info.model_id, info.lora_rank, info.model_name) == (training.run_id, 16, MODEL)
    assert training.get_tokenizer().eos_token == "<|end|>"
    service.close()


@pytest.mark.anyio
async def test_documented_async_example(anyio_backend: str, torch_server: LocalServer) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        training = await service.create_lora_training_client_async(base_model=MODEL, rank=16)
        datum = snippet_datum()
        fut = await training.forward_backward_async(data=[datum])  # submitted when this returns
        opt = await training.optim_step_async(AdamParams(learning_rate=4e-5))  # pipelined
        out = await fut
        again = await fut.result_async(timeout=600.0)
        assert out is again
        assert out.loss > 0
        assert (await opt).metrics is not None
        saved = await (await training.save_state_async(name="step-1")).result_async(timeout=600)
        assert saved.path.endswith("/weights/step-1")
        assert await training.health_async() is None


@pytest.mark.anyio
async def test_sync_methods_inside_an_event_loop_raise(
    anyio_backend: str, torch_server: LocalServer
) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        with pytest.raises(SyncInAsyncContextError, match="create_lora_training_client_async"):
            service.create_lora_training_client(MODEL, rank=4)
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        with pytest.raises(SyncInAsyncContextError, match="forward_backward_async"):
            training.forward_backward([snippet_datum()])
        fut = await training.forward_async([snippet_datum()])
        with pytest.raises(SyncInAsyncContextError, match="result_async"):
            fut.result()
        await fut  # nothing was lost: the gate and the run are fine
        await (await training.optim_step_async(LR))


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_futures_cross_between_sync_and_async(torch_server: LocalServer, loop: str) -> None:
    service = ServiceClient(base_url=torch_server.url)
    training = service.create_lora_training_client(MODEL, rank=4)
    sync_made = training.forward([snippet_datum()])  # made on the portal's loop

    async def consume() -> tuple[float, OperationFuture[ForwardBackwardOutput]]:
        async_made = await training.forward_async([snippet_datum()])
        try:
            return (await sync_made).loss - (await async_made).loss, async_made
        finally:
            await service.aclose()  # closes this loop's connections and the portal's

    difference, async_made = anyio.run(consume, backend=loop)
    assert difference == pytest.approx(0.0, abs=1e-6)
    assert async_made.result(timeout=1).loss > 0, "memoised: no I/O after close"


# --------------------------------------------------------------------------- learning


def test_thirty_sft_steps_halve_the_loss(torch_server: LocalServer) -> None:
    batch = list(sft_batch(4))
    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=16, seed=1)
        losses = []
        for _ in range(30):
            fb = training.forward_backward(batch)
            training.optim_step(FAST)
            losses.append(fb.result(timeout=600).loss)
    assert losses[-1] <= losses[0] / 2, losses


def test_pipelined_steps_equal_sequential_steps(torch_server: LocalServer) -> None:
    batch = list(sft_batch(2))
    with ServiceClient(base_url=torch_server.url) as service:
        piped = service.create_lora_training_client(MODEL, rank=8, seed=7)
        futures = []
        for _ in range(10):  # submit all 20 ops without waiting
            futures.append(piped.forward_backward(batch))
            futures.append(piped.optim_step(FAST))
        steps = [f.result(timeout=600).metrics["step"] for f in futures[1::2]]  # type: ignore[index,union-attr]
        assert steps == [float(i) for i in range(1, 11)], "results in submission order"
        piped_path = piped.save_state("piped").result(timeout=600).path

        serial = service.create_lora_training_client(MODEL, rank=8, seed=7)
        for _ in range(10):
            serial.forward_backward(batch).result(timeout=600)
            serial.optim_step(FAST).result(timeout=600)
        serial_path = serial.save_state("serial").result(timeout=600).path

    a, b = adapter_of(torch_server, piped_path), adapter_of(torch_server, serial_path)
    assert a
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-7, err_msg=key)


@pytest.mark.anyio
async def test_pipelining_many_ops_in_flight(anyio_backend: str, torch_server: LocalServer) -> None:
    batch = list(sft_batch(2))
    async with ServiceClient(base_url=torch_server.url) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        futures: list[OperationFuture[object]] = []
        for _ in range(5):
            futures.append(await training.forward_backward_async(batch))  # type: ignore[arg-type]
            futures.append(await training.optim_step_async(FAST))  # type: ignore[arg-type]
        results: list[object] = [None] * len(futures)

        async def wait(i: int) -> None:
            results[i] = await futures[i]

        async with anyio.create_task_group() as tg:
            for i in reversed(range(len(futures))):  # awaited in any order
                tg.start_soon(wait, i)
        assert [r.metrics["step"] for r in results[1::2]] == [1.0, 2.0, 3.0, 4.0, 5.0]  # type: ignore[attr-defined]
        assert training.policy_version == 5


def test_save_and_resume_with_optimizer_is_exact(torch_server: LocalServer) -> None:
    batch = list(sft_batch(4))
    probe = [sft_batch(8)[5]]

    def five_steps(training: TrainingClient) -> None:
        for _ in range(5):
            training.forward_backward(batch)
            training.optim_step(FAST)

    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=3)
        five_steps(training)
        saved = training.save_state("resume-point").result(timeout=600)
        five_steps(training)
        first = logprobs(training.forward(probe).result(timeout=600))

        loaded = training.load_state_with_optimizer(saved.path).result(timeout=600)
        assert loaded.step == 5
        assert loaded.path == saved.path
        assert training.policy_version == 5
        five_steps(training)
        second = logprobs(training.forward(probe).result(timeout=600))
        np.testing.assert_allclose(second, first, atol=1e-5)

        reset = training.load_state(saved.path).result(timeout=600)
        assert reset.step == 0, "load_state resets the optimizer step"
        assert training.policy_version == 0
        opt = training.optim_step(FAST).result(timeout=600)
        assert opt.metrics is not None
        assert opt.metrics["step"] == 1.0


# --------------------------------------------------------------------------- reliability


class DropFirstResponse(httpx.AsyncBaseTransport):
    """Forwards requests to the server but loses the response of the first POST to ``op``:
    the server ran it, the client saw a dropped connection and retries."""

    def __init__(self, op: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._op = op
        self.dropped = 0
        self.keys: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.url.path.endswith("/" + self._op):
            self.keys.append(request.headers["idempotency-key"])
            if not self.dropped:
                self.dropped += 1
                await response.aread()
                await response.aclose()
                raise httpx.ReadError("connection lost", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.anyio
async def test_retried_submit_runs_once(anyio_backend: str, torch_server: LocalServer) -> None:
    transport = DropFirstResponse("forward_backward")
    async with ServiceClient(base_url=torch_server.url, http_transport=transport) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        out = await (await training.forward_backward_async([snippet_datum()]))
        assert out.loss > 0
    assert transport.dropped == 1
    assert len(transport.keys) == 2
    assert len(set(transport.keys)) == 1, "same key on retry"
    assert torch_server.state.runs[training.run_id].executions["forward_backward"] == 1


@pytest.mark.anyio
async def test_cancelled_submit_does_not_strand_the_gate(
    anyio_backend: str, torch_server: LocalServer
) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before its POST could go
            await training.forward_backward_async([snippet_datum()])
        with anyio.fail_after(60):
            out = await (await training.forward_async([snippet_datum()]))
        assert out.loss > 0


# --------------------------------------------------------------------------- bad input


def _datum(tokens: list[int], targets: TensorData) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets}
    )


@pytest.mark.parametrize(
    ("data", "loss_fn", "match"),
    [
        ([], "cross_entropy", "empty data list"),
        (
            [_datum([1, 2, 3], TensorData(data=[2, 3], dtype="int64", shape=[3]))],
            "cross_entropy",
            r"data\[0\]\.loss_fn_inputs\['target_tokens'\]: shape \[3\] has 3 elements",
        ),
        (
            [_datum([1, 2, 3], TensorData(data=[2, 3, 4], dtype="int8", shape=[3]))],
            "cross_entropy",
            "unknown dtype 'int8'",
        ),
        (
            [_datum([1, 2, 3], TensorData(data=[2, 3], dtype="int64", shape=[2]))],
            "cross_entropy",
            "first dimension must equal the model input length 3",
        ),
        (
            [_datum([1, -2], TensorData(data=[2, 3], dtype="int64"))],
            "cross_entropy",
            "non-negative",
        ),
        ([snippet_datum()], "dpo", "odd number of datums"),
    ],
)
def test_bad_input_is_caught_before_sending(
    torch_server: LocalServer, data: list[Datum], loss_fn: str, match: str
) -> None:
    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        before = dict(torch_server.state.runs[training.run_id].executions)
        with pytest.raises(ValidationError, match=match):
            training.forward_backward(data, loss_fn)
        with pytest.raises(ValidationError):
            training.optim_step(AdamParams(learning_rate=-1.0))
        with pytest.raises(ValidationError, match="checkpoint names"):
            training.save_state("../escape")
        assert dict(torch_server.state.runs[training.run_id].executions) == before
        # nothing was lost: the next op goes through at once
        assert training.forward([snippet_datum()]).result(timeout=600).loss > 0


@pytest.mark.anyio
async def test_bad_input_only_the_server_can_see(
    anyio_backend: str, torch_server: LocalServer
) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        out_of_vocab = _datum([1, 2, 50_000], TensorData(data=[2, 3, 4], dtype="int64"))
        with pytest.raises(UnprocessableEntityError, match="vocab"):
            await training.forward_backward_async([out_of_vocab])
        with pytest.raises(UnprocessableEntityError, match="loss_fn"):
            await training.forward_backward_async([snippet_datum()], "no_such_loss")
        missing = f"bt://loops:{training.run_id}/weights/never-saved"
        with pytest.raises(UnprocessableEntityError, match="never-saved"):
            await training.load_state_async(missing)
        # the server keeps serving
        await training.health_async()  # raises when unhealthy
        assert (await (await training.forward_async([snippet_datum()]))).loss > 0


@pytest.mark.anyio
async def test_heartbeat_pings_health(anyio_backend: str, torch_server: LocalServer) -> None:
    seen: list[str] = []

    class Spy(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            return await super().handle_async_request(request)

    async with ServiceClient(
        base_url=torch_server.url, heartbeat_interval=0.1, http_transport=Spy()
    ) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        before = seen.count(f"/runs/{training.run_id}/health")
        await anyio.sleep(0.55)
        during = seen.count(f"/runs/{training.run_id}/health") - before
        await training.aclose()
        await anyio.sleep(0.3)
        after = seen.count(f"/runs/{training.run_id}/health") - before - during
    assert during >= 3
    assert after <= 1


def test_local_model_directory_path(tmp_path: Path) -> None:
    """A local Hugging Face model directory trains through the client too."""
    from loops_async.server.torch_models import save_builtin_as_directory

    model_dir = tmp_path / "my-model"
    save_builtin_as_directory(MODEL, model_dir)
    with LocalServer(backend="torch") as server, ServiceClient(base_url=server.url) as service:
        training = service.create_lora_training_client(str(model_dir), rank=4)
        out = training.forward_backward([snippet_datum()]).result(timeout=600)
        training.optim_step(FAST).result(timeout=600)
        assert out.loss > 0
        assert training.get_tokenizer().eos_token == "<|end|>"


def test_a_rejected_submit_does_not_stall_the_next_op(null_server: LocalServer) -> None:
    """A 422 burns its seq_id; the server passes over it at once, not after seq_gap_timeout."""
    import time

    with ServiceClient(base_url=null_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        out_of_vocab = _datum([1, 2, 50_000], TensorData(data=[2, 3, 4], dtype="int64"))
        with pytest.raises(UnprocessableEntityError):
            training.forward_backward([out_of_vocab])
        start = time.monotonic()
        training.forward([snippet_datum()]).result(timeout=60)
        assert time.monotonic() - start < 0.9 * null_server.settings.seq_gap_timeout
