"""Large batches: split into several operations, merged into one future (PROTOCOL §5)."""

from __future__ import annotations

import anyio
import httpx
import msgspec
import numpy as np
import pytest

from loops_async import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    ServiceClient,
    TensorData,
    ValidationError,
)
from loops_async._chunking import merge_outputs, split
from loops_async._codec import encode
from loops_async.server import LocalServer

from .test_e2e_training import adapter_of

MODEL = "loops-local/tiny-chat"
FAST = AdamParams(learning_rate=2e-3)


def datum(rng: np.random.Generator, length: int = 200, k: int = 1) -> Datum:
    tokens = rng.integers(3, 1000, length + 1)
    targets = np.repeat(tokens[1:, None], k, axis=1) if k > 1 else tokens[1:]
    weights = rng.random(targets.shape).astype(np.float64)  # long decimal expansions: big JSON
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(targets),
            "weights": TensorData.from_numpy(weights, dtype="float64"),
        },
    )


def test_split_respects_the_limit_and_pairs() -> None:
    assert split([10] * 10, limit=4096 + 33, pairs=False) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split([10] * 10, limit=4096 + 33, pairs=True) == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 8),
        (8, 10),
    ]
    assert split([1, 1], limit=10**6, pairs=False) == [(0, 2)]
    with pytest.raises(ValidationError, match=r"data\[1\]: encodes to"):
        split([10, 10**6, 10], limit=4096 + 100, pairs=False)
    with pytest.raises(ValidationError, match="dpo pair"):
        split([60, 60], limit=4096 + 100, pairs=True)


def test_merge_weights_by_datum_count() -> None:
    lp = TensorData(data=[0.0], dtype="float32")
    a = ForwardBackwardOutput(loss=1.0, loss_fn_outputs=[{"logprobs": lp}] * 3, metrics={"m": 1.0})
    b = ForwardBackwardOutput(loss=4.0, loss_fn_outputs=[{"logprobs": lp}], metrics={"m": 5.0})
    merged = merge_outputs([a, b], [3, 1])
    assert merged.loss == pytest.approx(1.75)
    assert merged.metrics == {"m": pytest.approx(2.0)}
    assert len(merged.loss_fn_outputs) == 4


@pytest.mark.anyio
async def test_chunks_get_contiguous_seq_ids_and_merge_in_order(
    anyio_backend: str, null_server: LocalServer
) -> None:
    rng = np.random.default_rng(0)
    data = [datum(rng, length=50 + i) for i in range(12)]
    async with ServiceClient(null_server.url, max_request_bytes=12_000) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        fut = await training.forward_backward_async(data)
        out = await fut
        after = await (await training.optim_step_async(FAST))
    ops = null_server.state.runs[training.run_id].ops
    chunk_seqs = [seq for seq, kind, _ in ops.history if kind == "forward_backward"]
    assert len(chunk_seqs) == len(fut.operation_ids) > 1  # type: ignore[attr-defined]
    assert chunk_seqs == list(range(2, 2 + len(chunk_seqs))), "contiguous, after init (seq 1)"
    assert [kind for _, kind, _ in ops.history][-1] == "optim_step"
    assert after.metrics is not None
    # one output per datum, in order (the null backend's logprobs are shaped like the targets)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[50 + i] for i in range(12)]


@pytest.mark.anyio
async def test_dpo_pairs_are_never_split(anyio_backend: str, null_server: LocalServer) -> None:
    rng = np.random.default_rng(1)
    data = []
    for _ in range(6):
        d = datum(rng, length=40)
        d.loss_fn_inputs["ref_logprobs"] = TensorData.from_numpy(np.zeros(40, dtype=np.float32))
        data.append(d)
    sizes: list[int] = []

    class Spy(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/forward_backward"):
                sizes.append(len(msgspec.json.decode(request.content)["data"]))
            return await super().handle_async_request(request)

    async with ServiceClient(
        null_server.url, max_request_bytes=9_000, http_transport=Spy()
    ) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        fut = await training.forward_backward_async(data, "dpo")
        await fut
    assert sum(sizes) == 6
    assert len(sizes) > 1
    assert all(n % 2 == 0 for n in sizes), sizes


def test_a_datum_over_the_limit_is_refused_before_sending(null_server: LocalServer) -> None:
    rng = np.random.default_rng(2)
    with ServiceClient(null_server.url, max_request_bytes=8_000) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        with pytest.raises(ValidationError, match=r"data\[1\]: encodes to"):
            training.forward_backward([datum(rng, 10), datum(rng, 2000)])
        assert training.forward([datum(rng, 10)]).result(timeout=30).loss_fn_outputs


@pytest.mark.anyio
async def test_cancelling_a_chunked_submit_releases_every_seq(
    anyio_backend: str, null_server: LocalServer
) -> None:
    rng = np.random.default_rng(3)
    data = [datum(rng, 60) for _ in range(10)]
    async with ServiceClient(null_server.url, max_request_bytes=10_000) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        with anyio.move_on_after(0.0005):
            await training.forward_backward_async(data)
        handed_out, released = training._gate.statistics()
        assert handed_out == released, "the whole reserved range is released"
        with anyio.fail_after(30):
            out = await (await training.forward_async([data[0]]))
        assert out.loss_fn_outputs


def test_a_40_mib_batch_trains_like_small_calls(torch_server: LocalServer) -> None:
    rng = np.random.default_rng(4)
    # (N, K) targets with float64 weights: ~40 MiB of JSON for a modest amount of compute.
    data = [datum(rng, length=500, k=64) for _ in range(60)]
    body_bytes = sum(len(encode(d)) for d in data)
    assert body_bytes > 40 * 2**20
    with ServiceClient(torch_server.url) as service:
        chunked = service.create_lora_training_client(MODEL, rank=4, seed=8)
        fut = chunked.forward_backward(data)
        chunked.optim_step(FAST)
        out = fut.result(timeout=600)
        assert len(fut.operation_ids) >= 2  # type: ignore[attr-defined]
        assert len(out.loss_fn_outputs) == 60
        a = adapter_of(torch_server, chunked.save_state("chunked").result(timeout=600).path)

        small = service.create_lora_training_client(MODEL, rank=4, seed=8)
        for i in range(0, 60, 6):
            small.forward_backward(data[i : i + 6])
        small.optim_step(FAST)
        b = adapter_of(torch_server, small.save_state("small").result(timeout=600).path)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def test_one_batch_of_8_equals_two_of_4(torch_server: LocalServer) -> None:
    rng = np.random.default_rng(5)
    data = [datum(rng, length=30) for _ in range(8)]
    with ServiceClient(torch_server.url) as service:
        one = service.create_lora_training_client(MODEL, rank=4, seed=9)
        one.forward_backward(data)
        one.optim_step(FAST)
        a = adapter_of(torch_server, one.save_state("one").result(timeout=600).path)
        two = service.create_lora_training_client(MODEL, rank=4, seed=9)
        two.forward_backward(data[:4])
        two.forward(data[4:])  # a forward between leaves the gradient buffer untouched
        two.forward_backward(data[4:])
        two.optim_step(FAST)
        b = adapter_of(torch_server, two.save_state("two").result(timeout=600).path)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
