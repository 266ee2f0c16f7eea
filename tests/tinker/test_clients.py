"""tinker-style client code against the local server: sync scripts, asyncio and trio code, sync
calls made inside a running event loop, ordering, paths, errors, the RestClient."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
from collections.abc import Iterator

import anyio
import pytest

import loops_async
import loops_async.tinker as tinker
from loops_async import _portal
from loops_async.server import LocalServer
from loops_async.tinker._futures import AwaitableConcurrentFuture

MODEL = "loops-local/tiny-chat"
PROMPT = tinker.ModelInput.from_ints([5, 6, 7, 8])


def datum(n: int = 4, offset: int = 1) -> tinker.Datum:
    tokens = list(range(offset, offset + n + 1))
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
    )


@pytest.fixture
def service(null_server: LocalServer) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=null_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def slow_sampler() -> Iterator[LocalServer]:
    """A protocol-only server whose samples take 5 s (to cancel them midway)."""
    with LocalServer(backend="null", null_sample_delay=5.0) as server:
        yield server


# --------------------------------------------------------------------------- sync scripts


def test_sync_script(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8)
    assert isinstance(training, tinker.APIFuture)
    assert isinstance(training, tinker.BackcompatTrainingClientFuture)
    fb = training.forward_backward([datum(), datum(offset=9)], "cross_entropy")
    opt = training.optim_step(tinker.AdamParams(learning_rate=1e-3))
    assert isinstance(fb, concurrent.futures.Future)
    out = fb.result(timeout=60)
    assert len(out.loss_fn_outputs) == 2
    assert out.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (4,)
    assert opt.result(timeout=60).metrics == {"step": 1.0, "learning_rate": 1e-3, "grad_norm": 0.0}
    assert training.result() is training
    assert training.get_info().model_id == training.model_id

    saved = training.save_state("ckpt").result()
    assert saved.path == f"tinker://{training.model_id}/weights/ckpt"
    parsed = tinker.ParsedCheckpointTinkerPath.from_tinker_path(saved.path)
    assert parsed.training_run_id == training.model_id

    sampler = training.save_weights_and_get_sampling_client()
    response = sampler.sample(PROMPT, 3, tinker.SamplingParams(max_tokens=5)).result(timeout=60)
    assert isinstance(response, tinker.SampleResponse)
    assert len(response.sequences) == 3
    assert len({s.sequence_id for s in response.sequences}) == 3
    for seq in response.sequences:
        assert isinstance(seq, tinker.SampledSequence)
        assert len(seq.tokens) == 5
        assert seq.logprobs is not None
        assert len(seq.logprobs) == 5
        assert seq.stop_reason in ("length", "stop")
    logprobs = sampler.compute_logprobs(PROMPT).result(timeout=60)
    assert len(logprobs) == PROMPT.length
    assert logprobs[0] is None
    assert sampler.get_base_model() == MODEL


def test_calls_run_in_call_order(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8)
    steps = []
    for _ in range(25):  # submitted back to back, never waited on in between
        training.forward_backward([datum()], "cross_entropy")
        steps.append(training.optim_step(tinker.AdamParams(learning_rate=1e-4)))
    assert [f.result(timeout=60).metrics["step"] for f in steps] == [float(i) for i in range(1, 26)]


def test_calls_never_block_even_before_provisioning(service: tinker.ServiceClient) -> None:
    """Calls on a client still being provisioned return at once and run once it exists."""
    ready: AwaitableConcurrentFuture[loops_async.TrainingClient] = AwaitableConcurrentFuture()
    training = tinker.TrainingClient(service, ready)
    fb = training.forward_backward([datum()], "cross_entropy")
    opt = training.optim_step(tinker.AdamParams())
    assert not fb.done()
    assert not opt.done()
    assert not training.done()
    ready.set_result(service.loops_client.create_lora_training_client(MODEL, rank=8))
    assert opt.result(timeout=60).metrics is not None
    assert fb.result(timeout=60).loss_fn_outputs
    assert training.result(timeout=1) is training


def test_provisioning_failure_reaches_every_call(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client("no/such-model", rank=8)
    fb = training.forward_backward([datum()], "cross_entropy")
    with pytest.raises(tinker.UnprocessableEntityError, match="unknown base_model"):
        training.result(timeout=60)
    with pytest.raises(tinker.UnprocessableEntityError):
        fb.result(timeout=60)


def test_tinker_paths_round_trip(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8)
    training.forward_backward([datum()], "cross_entropy")
    training.optim_step(tinker.AdamParams())
    state = training.save_state("resume").result(timeout=60)
    weights = training.save_weights_for_sampler("serve").result(timeout=60)
    assert weights.path == f"tinker://{training.model_id}/sampler_weights/serve"

    resumed = service.create_training_client_from_state_with_optimizer(state.path).result(60)
    assert resumed.model_id != training.model_id
    fresh = service.create_training_client_from_state(state.path).result(timeout=60)
    assert fresh.forward([datum()], "cross_entropy").result(timeout=60).loss_fn_outputs
    assert training.load_state(state.path).result(timeout=60) is not None
    assert training.load_state_with_optimizer(state.path).result(timeout=60) is not None

    from_path = service.create_sampling_client(model_path=weights.path)
    assert from_path.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2)).result(60).sequences
    own = training.create_sampling_client(weights.path)
    assert own.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2)).result(60).sequences
    base = service.create_sampling_client(base_model=MODEL)
    assert base.sample(PROMPT, 2, tinker.SamplingParams(max_tokens=2)).result(60).sequences


# --------------------------------------------------------------------------- errors


def test_bad_input_is_refused_before_sending(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8)
    with pytest.raises(ValueError, match="No data provided"):
        training.forward_backward([], "cross_entropy")
    with pytest.raises(ValueError, match=r"'gspo' is not supported.*cross_entropy"):
        training.forward_backward([datum()], "gspo")
    with pytest.raises(ValueError, match="not both"):
        training.optim_step(tinker.AdamParams(), adam_params=tinker.AdamParams())
    with pytest.raises(TypeError, match="Expected AdamParams"):
        training.optim_step(tinker.DimuonParams(learning_rate=1e-3))
    with pytest.raises(ValueError, match="tinker://"):
        training.load_state("tinker://too/many/parts/here")
    with pytest.raises(ValueError, match="model_path or base_model"):
        service.create_sampling_client()
    sampler = service.create_sampling_client(base_model=MODEL)
    with pytest.raises(ValueError, match="topk_sample_logprobs"):
        sampler.sample(PROMPT, 1, tinker.SamplingParams(), topk_sample_logprobs=2)
    with pytest.raises(ValueError, match="include_prompt_logprobs"):
        sampler.sample(PROMPT, 1, tinker.SamplingParams(), prompt_logprobs_last_n=2)
    with pytest.raises(ValueError, match="Adam only"):
        service.create_lora_training_client(MODEL, optimizer=tinker.DimuonOptimizerConfig())


def test_server_rejections_are_tinker_and_loops_errors(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8)
    bad = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 10**9]},
    )
    with pytest.raises((tinker.BadRequestError, tinker.UnprocessableEntityError)) as caught:
        training.forward_backward([bad], "cross_entropy").result(timeout=60)
    error = caught.value
    assert isinstance(error, tinker.APIStatusError)
    assert isinstance(error, tinker.TinkerError)
    assert isinstance(error, loops_async.APIStatusError)
    assert 400 <= error.status_code < 500
    assert "outside the vocabulary" in str(error)
    # the client is still usable, and later calls keep their order
    assert training.optim_step(tinker.AdamParams()).result(timeout=60).metrics is not None


def test_blocking_result_on_the_portal_thread_raises() -> None:
    pending: AwaitableConcurrentFuture[int] = AwaitableConcurrentFuture()

    async def block() -> int:
        return pending.result()

    with pytest.raises(RuntimeError, match="deadlock"):
        _portal.run(block, twin="block")


# --------------------------------------------------------------------------- async code


@pytest.mark.anyio
async def test_async_code_and_sync_calls_inside_a_running_loop(
    null_server: LocalServer, anyio_backend: str
) -> None:
    service = tinker.ServiceClient(base_url=null_server.url)
    training = await service.create_lora_training_client_async(MODEL, rank=8)
    # sync submit methods inside the loop: they return futures at once
    fb = training.forward_backward([datum()], "cross_entropy")
    opt = training.optim_step(tinker.AdamParams(learning_rate=1e-3))
    assert (await opt).metrics is not None
    assert (await fb).loss_fn_outputs
    # *_async on a TrainingClient returns the future: await twice
    future = await training.forward_backward_async([datum()], "cross_entropy")
    assert isinstance(future, tinker.APIFuture)
    assert (await future.result_async(timeout=60)).loss_fn_outputs
    assert (await (await training.optim_step_async(tinker.AdamParams()))).metrics is not None

    sampler = await training.save_weights_and_get_sampling_client_async()
    params = tinker.SamplingParams(max_tokens=3, temperature=1.0)
    results: list[tinker.SampleResponse] = []

    async def one() -> None:
        results.append(await sampler.sample_async(PROMPT, 1, params))

    async with anyio.create_task_group() as group:
        for _ in range(40):
            group.start_soon(one)
    assert len(results) == 40
    assert all(len(r.sequences[0].tokens) == 3 for r in results)

    futures = [sampler.sample(PROMPT, 1, params) for _ in range(20)]
    for future_response in futures:
        assert len((await future_response).sequences) == 1
    assert len(await sampler.compute_logprobs_async(PROMPT)) == PROMPT.length
    assert await sampler.get_base_model_async() == MODEL
    caps = await service.get_server_capabilities_async()
    assert MODEL in [m.model_name for m in caps.supported_models]
    await service.close()


@pytest.mark.anyio
async def test_asyncio_idioms(null_server: LocalServer, anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio.gather / wrap_future are asyncio's")
    service = tinker.ServiceClient(base_url=null_server.url)
    training = await service.create_lora_training_client_async(MODEL, rank=8)
    sampler = await training.save_weights_and_get_sampling_client_async()
    params = tinker.SamplingParams(max_tokens=2)
    futures = [sampler.sample(PROMPT, 1, params) for _ in range(10)]
    gathered = await asyncio.gather(*(f.coroutine() for f in futures))
    assert len(gathered) == 10
    wrapped = await asyncio.wrap_future(sampler.sample(PROMPT, 1, params).future())
    assert wrapped.sequences
    assert (await asyncio.wait_for(sampler.sample(PROMPT, 1, params), 60)).sequences
    await service.close()


@pytest.mark.anyio
async def test_abandoned_sample_is_cancelled(slow_sampler: LocalServer, anyio_backend: str) -> None:
    service = tinker.ServiceClient(base_url=slow_sampler.url)
    sampler = await service.create_sampling_client_async(base_model=MODEL)
    future = sampler.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2))
    with anyio.move_on_after(0.3):
        await future
    assert future.cancelled()
    with pytest.raises(TimeoutError):
        await sampler.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2)).result_async(0.2)
    await service.close()


# --------------------------------------------------------------------------- rest client


def test_rest_client(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(
        MODEL, rank=8, user_metadata={"renderer_name": "role_colon"}
    )
    state = training.save_state("one").result(timeout=60)
    training.save_weights_for_sampler("two").result(timeout=60)
    rest = service.create_rest_client()
    listed = rest.list_checkpoints(training.model_id).result(timeout=60)
    assert {c.checkpoint_id for c in listed.checkpoints} == {"weights/one", "sampler_weights/two"}
    assert {c.checkpoint_type for c in listed.checkpoints} == {"training", "sampler"}
    run = rest.get_training_run_by_tinker_path(state.path).result(timeout=60)
    assert run.training_run_id == training.model_id
    assert run.base_model == MODEL
    assert run.lora_rank == 8
    assert run.user_metadata == {"renderer_name": "role_colon"}
    assert run.last_checkpoint is not None
    assert run.last_checkpoint.tinker_path == state.path
    info = rest.get_weights_info_by_tinker_path(state.path).result(timeout=60)
    assert (info.base_model, info.lora_rank) == (MODEL, 8)

    rest.delete_checkpoint_from_tinker_path(state.path).result(timeout=60)
    rest.delete_checkpoint(training.model_id, "sampler_weights/two").result(timeout=60)
    assert rest.list_checkpoints(training.model_id).result(timeout=60).checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint(training.model_id, "weights/one").result(timeout=60)
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run("run-that-never-was").result(timeout=60)


def test_standalone_rest_client(null_server: LocalServer) -> None:
    rest = tinker.RestClient(base_url=null_server.url)
    caps = rest.get_server_capabilities().result(timeout=60)
    assert MODEL in [m.model_name for m in caps.supported_models]
    rest.close()


# --------------------------------------------------------------------------- misc


def test_sampling_client_pickles(service: tinker.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=MODEL)
    clone = pickle.loads(pickle.dumps(sampler))
    assert isinstance(clone, tinker.SamplingClient)
    assert clone.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2)).result(60).sequences
    clone.loops_client.close()  # an unpickled client has connections of its own


def test_configuration_from_environment(
    null_server: LocalServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", null_server.url + "/")
    monkeypatch.setenv("TINKER_API_KEY", "tml-a-thinking-machines-key")
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG, logger="loops_async.tinker")
    with tinker.ServiceClient(project_id="p", unknown_option=1, sample_timeout=30.0) as service:
        ignored = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
        assert ignored == ["loops_async.tinker.ServiceClient ignores project_id, unknown_option"]
        assert service.loops_client.base_url == null_server.url
        assert "api_key" not in repr(service.loops_client)  # the tml- key is never sent
        caps = service.get_server_capabilities().result(timeout=60)
        assert caps.supported_models


def test_snapshots_keep_their_weights_and_inflight_follows(torch_server: LocalServer) -> None:
    """tinker's ``save_weights_and_get_sampling_client()`` is a snapshot: an earlier client
    keeps sampling the weights it was made from (a KL reference, off-policy rollouts);
    ``kind="inflight"`` follows the live adapter."""
    prompt = tinker.ModelInput.from_ints([5, 72, 101, 108, 108, 111, 32, 119])
    with tinker.ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=0)
        first = training.save_weights_and_get_sampling_client()
        inflight = training.save_weights_and_get_sampling_client(kind="inflight")
        before = first.compute_logprobs(prompt).result(timeout=600)
        assert inflight.compute_logprobs(prompt).result(timeout=600) == pytest.approx(before)
        sft = [datum(6, offset=40), datum(6, offset=60)]
        for _ in range(3):
            training.forward_backward(sft, "cross_entropy")
            training.optim_step(tinker.AdamParams(learning_rate=3e-3))
        second = training.save_weights_and_get_sampling_client()
        after = second.compute_logprobs(prompt).result(timeout=600)
        assert first.compute_logprobs(prompt).result(timeout=600) == pytest.approx(before)
        assert inflight.compute_logprobs(prompt).result(timeout=600) == pytest.approx(after)
        assert max(abs(a - b) for a, b in zip(after[1:], before[1:], strict=True)) > 1e-3


def test_custom_loss_keeps_call_order(torch_server: LocalServer) -> None:
    """``forward_backward_custom`` is a forward, a loss on the client and a replayed backward:
    an ``optim_step`` queued right after it must apply that backward's gradient."""
    torch = pytest.importorskip("torch")
    data = [datum(6, offset=40)]

    def loss_fn(
        batch: list[tinker.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = -torch.stack([lp.sum() for lp in logprobs]).sum()
        return loss, {"custom": float(loss.detach())}

    with tinker.ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=0)
        before = training.forward(data, "cross_entropy").result(timeout=600)
        custom = training.forward_backward_custom(data, loss_fn)
        step = training.optim_step(tinker.AdamParams(learning_rate=1e-2))
        after = training.forward(data, "cross_entropy")
        assert custom.result(timeout=600).metrics["custom"] > 0
        assert step.result(timeout=600).metrics["step"] == 1.0
        old = before.loss_fn_outputs[0]["logprobs"].to_numpy()
        new = after.result(timeout=600).loss_fn_outputs[0]["logprobs"].to_numpy()
        assert new.sum() > old.sum()  # the step applied the custom loss's gradient


def test_a_closed_service_refuses_new_calls(service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=8).result(timeout=60)
    service.close().result(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        training.forward_backward([datum()], "cross_entropy")
    with pytest.raises(RuntimeError, match="closed"):
        service.create_sampling_client(base_model=MODEL)
