"""Real tinker-cookbook 0.6.1 components, run unchanged through ``loops_async.tinker``.

``loops_async.tinker.install(shadow=True)`` makes ``import tinker`` resolve to the layer before
any cookbook module that imports it is loaded (shadowing a real ``tinker``, if pip installed one
as the cookbook's dependency); the cookbook's token and message completers, RL rollouts, RL data
processing, ``rl.train.train_step``, the RL KL metrics, the supervised datum helpers, the NLL
evaluators and the checkpoint helpers then talk to the embedded local server. The tokenizer is
the local model's (``training_client.get_tokenizer()``), offline.

Skipped when tinker-cookbook is not installed (it is not part of ``make test``). To run it::

    pip install --no-deps tinker-cookbook==0.6.1
    pip install chz blobfile pillow datasets termcolor

(a plain ``pip install tinker-cookbook==0.6.1`` needs ``tml-renderers>=0.4.1``, which no package
index reachable here serves; none of the modules used here imports it). The cookbook is
asyncio-only (``asyncio.gather``, ``asyncio.timeout``, ``asyncio.shield``), so the async tests
run on asyncio only.
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

pytest.importorskip(
    "tinker_cookbook",
    reason="tinker-cookbook is not installed (`make test-cookbook` installs it: "
    "pip install --no-deps tinker-cookbook==0.6.1 chz blobfile pillow datasets termcolor); "
    "these tests drive its components through loops_async.tinker",
)
torch = pytest.importorskip("torch")

import loops_async.tinker as layer  # noqa: E402
from loops_async.server import LocalServer  # noqa: E402

MODEL = "loops-local/tiny-chat"
RENDERER = "role_colon"

# What the tests use, by the attribute of the `cookbook` fixture it is bound to.
_COOKBOOK_MODULES = {
    "renderers": "tinker_cookbook.renderers",
    "completers": "tinker_cookbook.completers",
    "problem_env": "tinker_cookbook.rl.problem_env",
    "rollouts": "tinker_cookbook.rl.rollouts",
    "rollout_runner": "tinker_cookbook.rl.rollout_runner",
    "rollout_limits": "tinker_cookbook.rl.rollout_limits",
    "data_processing": "tinker_cookbook.rl.data_processing",
    "metrics": "tinker_cookbook.rl.metrics",
    "rl_train": "tinker_cookbook.rl.train",
    "supervised_common": "tinker_cookbook.supervised.common",
    "nll_evaluator": "tinker_cookbook.supervised.nll_evaluator",
    "checkpoint_utils": "tinker_cookbook.checkpoint_utils",
}


def _tinker_module(name: str | None) -> bool:
    return bool(name) and (name == "tinker" or str(name).startswith(("tinker.", "tinker_cookbook")))


@pytest.fixture(scope="module")
def cookbook() -> Iterator[SimpleNamespace]:
    """The cookbook modules, imported with ``import tinker`` bound to the layer; afterwards the
    alias is gone, a real tinker is back, and no cookbook module bound to the layer is left in
    ``sys.modules``."""
    before = set(sys.modules)
    real_tinker = sys.modules.get("tinker")
    layer.install(shadow=True)
    try:
        modules: dict[str, ModuleType] = {"tinker": importlib.import_module("tinker")}
        for attr, name in _COOKBOOK_MODULES.items():
            try:
                modules[attr] = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if _tinker_module(exc.name):
                    raise  # a tinker module the layer lacks, or a broken cookbook: a failure
                pytest.skip(
                    f"tinker-cookbook is installed without its dependency {exc.name!r} "
                    f"(needed by {name})"
                )
        yield SimpleNamespace(**modules)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("tinker_cookbook"):
                del sys.modules[name]
        layer.uninstall()
    assert not layer.is_installed()
    assert sys.modules.get("tinker") is real_tinker


@pytest.fixture
def anyio_backend() -> str:
    """tinker-cookbook is asyncio-only."""
    return "asyncio"


@pytest.fixture
def service(cookbook: SimpleNamespace, torch_server: LocalServer) -> Iterator[Any]:
    """``tinker.ServiceClient`` (the layer's) on the session's torch server."""
    with cookbook.tinker.ServiceClient(base_url=torch_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def slow_sampler() -> Iterator[LocalServer]:
    """A protocol-only server whose samples take 2 s (for the rollout timeout; closing it
    waits for the sample in flight)."""
    with LocalServer(backend="null", null_sample_delay=2.0) as server:
        yield server


def _finite_logprobs(values: Any) -> bool:
    return all(math.isfinite(v) and v <= 0.0 for v in values)


def _problem_env_class(cookbook: SimpleNamespace) -> type:
    """A one-turn ProblemEnv whose answer is right for every other env of a group (so the
    rewards of a group differ whatever the untrained model samples)."""

    class AlternatingEnv(cookbook.problem_env.ProblemEnv):  # type: ignore[name-defined]
        def __init__(self, renderer: Any, index: int) -> None:
            super().__init__(renderer)
            self.index = index
            self.responses: list[str] = []

        def get_question(self) -> str:
            return "What is two plus two?"

        def check_answer(self, sample_str: str) -> bool:
            self.responses.append(sample_str)
            return self.index % 2 == 0

        def check_format(self, sample_str: str) -> bool:
            return True

        def get_reference_answer(self) -> str:
            return "4"

    return AlternatingEnv


# ------------------------------------------------------------------------------ plumbing


def test_cookbook_modules_use_the_layer(cookbook: SimpleNamespace) -> None:
    assert cookbook.tinker is layer
    assert layer.is_installed()
    for attr in _COOKBOOK_MODULES:
        module = getattr(cookbook, attr)
        if "tinker" in vars(module):
            assert module.tinker is layer, attr
    assert cookbook.data_processing.TensorData is layer.TensorData
    assert sys.modules["tinker.types.tensor_data"].TensorData is layer.TensorData


# ----------------------------------------------------------------------------- completers


@pytest.mark.anyio
async def test_token_and_message_completers(cookbook: SimpleNamespace, service: Any) -> None:
    tinker = cookbook.tinker
    training = await service.create_lora_training_client(MODEL, rank=8)
    tokenizer = training.get_tokenizer()
    renderer = cookbook.renderers.get_renderer(RENDERER, tokenizer)
    sampler = await training.save_weights_and_get_sampling_client()
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Say hello."}])
    assert isinstance(prompt, tinker.ModelInput)

    completer = cookbook.completers.TinkerTokenCompleter(sampler, max_tokens=8)
    result = await completer(prompt, stop=renderer.get_stop_sequences())
    assert 1 <= len(result.tokens) <= 8
    assert all(0 <= t < tokenizer.vocab_size for t in result.tokens)
    assert isinstance(tokenizer.decode(result.tokens), str)
    assert len(result.logprobs) == len(result.tokens)
    assert _finite_logprobs(result.logprobs)
    assert result.stop_reason in ("length", "stop")
    if result.stop_reason == "length":
        assert len(result.tokens) == 8
    assert isinstance(result.sequence_id, str)
    assert result.sequence_id
    assert result.prompt_cache_hit_tokens >= 0

    # The sampled logprobs are the model's: scoring prompt + completion gives them back.
    scored = await sampler.compute_logprobs(
        prompt.append(tinker.EncodedTextChunk(tokens=result.tokens))
    )
    assert scored[0] is None
    assert scored[-len(result.tokens) :] == pytest.approx(result.logprobs, abs=1e-3)

    # A per-call max_tokens caps the completer's own; the context window caps both.
    short = await completer(prompt, stop=[], max_tokens=2)
    assert len(short.tokens) == 2
    assert short.stop_reason == "length"
    windowed = cookbook.completers.TinkerTokenCompleter(
        sampler, max_tokens=8, context_window=prompt.length + 3
    )
    assert len((await windowed(prompt, stop=[])).tokens) == 3

    # Stop token ids: every id stops, so the first sampled token ends the sequence.
    stopped = await completer(prompt, stop=list(range(tokenizer.vocab_size)))
    assert stopped.stop_reason == "stop"
    assert len(stopped.tokens) == 1

    messages = cookbook.completers.TinkerMessageCompleter(sampler, renderer, max_tokens=6)
    reply = await messages([{"role": "user", "content": "Say hello."}])
    assert reply["role"] == "assistant"
    assert isinstance(reply["content"], str)


# ------------------------------------------------------------------------------------ RL


@pytest.mark.anyio
async def test_rl_rollout_data_train_step_and_kl(cookbook: SimpleNamespace, service: Any) -> None:
    training = await service.create_lora_training_client(MODEL, rank=8)
    tokenizer = training.get_tokenizer()
    renderer = cookbook.renderers.get_renderer(RENDERER, tokenizer)
    sampler = await training.save_weights_and_get_sampling_client(record_stability_info=False)
    policy = cookbook.completers.TinkerTokenCompleter(sampler, max_tokens=6)

    env_class = _problem_env_class(cookbook)
    counter = itertools.count()
    envs: list[Any] = []

    def make_env() -> Any:
        envs.append(env_class(renderer, next(counter)))
        return envs[-1]

    builder = cookbook.problem_env.ProblemGroupBuilder(env_thunk=make_env, num_envs=4)
    group = await cookbook.rollouts.do_group_rollout(builder, policy)

    # Rollouts: one transition each, its action sampled through the layer.
    prompt = renderer.build_generation_prompt(
        [{"role": "user", "content": "What is two plus two?"}]
    )
    assert len(group.trajectories_G) == 4
    for env, trajectory in zip(envs, group.trajectories_G, strict=True):
        (transition,) = trajectory.transitions
        assert transition.ob.to_ints() == prompt.to_ints()
        action = transition.ac
        assert 1 <= len(action.tokens) <= 6
        assert len(action.logprobs) == len(action.tokens)
        assert _finite_logprobs(action.logprobs)
        assert action.sequence_id
        assert env.responses == [renderer.parse_response(action.tokens)[0]["content"]]
        assert transition.metrics["correct"] == float(env.index % 2 == 0)
    rewards = group.get_total_rewards()
    assert rewards[0] > rewards[1]  # right beats wrong, whatever the format reward
    assert len(set(rewards)) > 1

    # Data processing: one datum per trajectory, built with TensorData.from_torch and
    # with_provenance, its sampled logprobs and advantages where the action is.
    advantages = cookbook.data_processing.compute_advantages([group])
    assert float(advantages[0].sum()) == pytest.approx(0.0, abs=1e-6)
    data, metadata = cookbook.data_processing.assemble_training_data([group], advantages)
    assert len(data) == 4
    assert metadata == [{"group_idx": 0, "traj_idx": i} for i in range(4)]
    for datum, trajectory, advantage in zip(data, group.trajectories_G, advantages[0], strict=True):
        action = trajectory.transitions[0].ac
        n = prompt.length + len(action.tokens) - 1
        assert datum.model_input.length == n
        assert datum.model_input.to_ints() == (prompt.to_ints() + action.tokens)[:-1]
        inputs = {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
        assert set(inputs) == {"target_tokens", "logprobs", "advantages", "mask"}
        assert all(v.shape == (n,) for v in inputs.values())
        assert inputs["target_tokens"].tolist() == (prompt.to_ints() + action.tokens)[1:]
        mask = inputs["mask"] > 0
        assert int(mask.sum()) == len(action.tokens)
        assert inputs["logprobs"][mask].tolist() == pytest.approx(action.logprobs)
        assert inputs["advantages"][mask].tolist() == pytest.approx(
            [float(advantage)] * len(action.tokens)
        )
        assert datum.loss_fn_input_spans is not None  # provenance: every action has an id

    # rl.train.train_step: two forward_backward/optim_step pairs, pipelined.
    step_metrics: dict[str, Any] = {}
    training_logprobs = await cookbook.rl_train.train_step(
        data, training, 1e-2, 2, "importance_sampling", metrics=step_metrics
    )
    assert [t.shape for t in training_logprobs] == [(d.model_input.length,) for d in data]
    assert step_metrics["grad_norm"] > 0.0
    kl_first = cookbook.metrics.compute_kl_sample_train(data[:2], training_logprobs[:2])
    kl_second = cookbook.metrics.compute_kl_sample_train(data[2:], training_logprobs[2:])
    # The first sub-batch is trained on the weights it was sampled from; the second one's
    # forward_backward runs after the first optim_step, so its logprobs have moved.
    assert abs(kl_first["optim/kl_sample_train_v1"]) < 1e-3
    assert kl_first["optim/entropy"] > 0.0
    assert kl_second["optim/kl_sample_train_v2"] > 1e-6

    # KL against the updated weights (sample(...).coroutine() with prompt logprobs).
    updated = await training.save_weights_and_get_sampling_client(record_stability_info=False)
    post, usage = await cookbook.metrics.compute_post_kl(data, updated)
    assert post["kl_pre_post_v2"] > 1e-6
    assert usage.prefill_uncached + usage.prefill_cached == sum(
        d.model_input.length + 1 for d in data
    )
    # KL penalty against the base model, as rl/train.py makes its reference client: the data
    # was sampled from the untrained adapter, so the KL is ~0 and advantages barely move.
    reference = service.create_sampling_client(base_model=MODEL, model_path=None).result()
    before = [d.loss_fn_inputs["advantages"].to_torch().clone() for d in data]
    penalty, _ = await cookbook.metrics.incorporate_kl_penalty(data, reference, 0.5, 0.9)
    assert abs(penalty["kl_policy_base"]) < 1e-3
    for datum, old in zip(data, before, strict=True):
        new = datum.loss_fn_inputs["advantages"].to_torch()
        assert new.shape == old.shape
        assert torch.allclose(new, old, atol=1e-2)


@pytest.mark.anyio
async def test_earlier_sampling_client_keeps_its_weights(
    cookbook: SimpleNamespace, service: Any
) -> None:
    """rl/train.py's async mode samples (and compute_post_kl scores) with sampling clients made
    before later updates; in tinker such a client serves the weights it was made from."""
    tinker = cookbook.tinker
    training = await service.create_lora_training_client(MODEL, rank=8)
    tokens = list(range(5, 17))
    sequence = tinker.ModelInput.from_ints(tokens)
    first = await training.save_weights_and_get_sampling_client()
    (before,), _ = await cookbook.metrics.score_sequences(first, [sequence])

    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tinker.TensorData.from_torch(torch.tensor(tokens[1:]))},
    )
    for _ in range(3):
        fb = training.forward_backward([datum], loss_fn="cross_entropy")
        opt = training.optim_step(tinker.AdamParams(learning_rate=5e-2))
        await fb
        await opt
    second = await training.save_weights_and_get_sampling_client()
    (moved,), _ = await cookbook.metrics.score_sequences(second, [sequence])
    assert sum(moved[1:]) > sum(before[1:]) + 1.0  # trained on it: more likely now

    (again,), _ = await cookbook.metrics.score_sequences(first, [sequence])
    assert again[1:] == pytest.approx(before[1:], abs=1e-4)


@pytest.mark.anyio
async def test_rollout_sampling_timeout_cancels_the_request(
    cookbook: SimpleNamespace, slow_sampler: LocalServer
) -> None:
    """rl/rollout_runner.py bounds each sampling call with ``asyncio.timeout``: the await of
    ``sample(...)`` is cancelled, and so is the request behind it."""
    tinker = cookbook.tinker
    futures: list[Any] = []

    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def sample(self, **kwargs: Any) -> Any:
            futures.append(self.inner.sample(**kwargs))
            return futures[-1]

    with tinker.ServiceClient(base_url=slow_sampler.url) as service:
        sampler = await service.create_sampling_client(base_model=MODEL)
        renderer = cookbook.renderers.get_renderer(RENDERER, sampler.get_tokenizer())
        env = _problem_env_class(cookbook)(renderer, 0)
        policy = cookbook.completers.TinkerTokenCompleter(Recording(sampler), max_tokens=4)
        limits = cookbook.rollout_limits.RolloutLimits(sampling_turn_timeout_seconds=0.3)
        started = time.monotonic()
        with pytest.raises(cookbook.rollout_runner.SamplingTurnTimeoutError):
            await cookbook.rollout_runner.run_rollout(policy, env, limits=limits)
        assert time.monotonic() - started < 1.5
        assert len(futures) == 1
        assert futures[0].cancelled()


# ---------------------------------------------------------------------------- supervised


@pytest.mark.anyio
async def test_supervised_datum_nll_evaluators_and_training(
    cookbook: SimpleNamespace, service: Any
) -> None:
    tinker = cookbook.tinker
    training = await service.create_lora_training_client(MODEL, rank=8)
    tokenizer = training.get_tokenizer()
    renderer = cookbook.renderers.get_renderer(RENDERER, tokenizer)
    convo = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ]
    model_input, weights = renderer.build_supervised_example(convo)
    datum = cookbook.supervised_common.datum_from_model_input_weights(
        model_input, weights, max_length=64
    )
    n = model_input.length - 1
    assert datum.model_input.length == n
    assert datum.loss_fn_inputs["target_tokens"].to_torch().tolist() == model_input.to_ints()[1:]
    trained = datum.loss_fn_inputs["weights"].to_torch()
    assert trained.shape == (n,)
    assert 0 < float(trained.sum()) < n  # the assistant's tokens only

    evaluator = cookbook.nll_evaluator.SamplerNLLEvaluator([datum], tokenizer=tokenizer)
    before = await evaluator(await training.save_weights_and_get_sampling_client())
    assert before["test/nll"] > 0.0
    assert before["test/bpb"] > 0.0
    # The training client's forward pass agrees with the sampler's compute_logprobs.
    with pytest.warns(DeprecationWarning, match="NLLEvaluator"):
        forward = await cookbook.nll_evaluator.NLLEvaluator([datum], tokenizer=tokenizer)(training)
    assert forward["test/nll"] == pytest.approx(before["test/nll"], rel=1e-3)
    assert forward["test/bpb"] == pytest.approx(before["test/bpb"], rel=1e-3)

    adam = tinker.AdamParams(learning_rate=2e-2, beta1=0.9, beta2=0.95, eps=1e-8)
    for _ in range(6):
        fb = training.forward_backward([datum], loss_fn="cross_entropy")
        opt = training.optim_step(adam)
        out = await fb
        await opt
    logprobs = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert logprobs.shape == (n,)
    assert _finite_logprobs(logprobs.tolist())
    after = await evaluator(await training.save_weights_and_get_sampling_client())
    assert after["test/nll"] < 0.8 * before["test/nll"]


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.anyio
async def test_checkpoint_utils_save_and_resume(
    cookbook: SimpleNamespace, service: Any, tmp_path: Path
) -> None:
    checkpoint_utils = cookbook.checkpoint_utils
    user_metadata: dict[str, str] = {}
    checkpoint_utils.add_renderer_name_to_user_metadata(user_metadata, RENDERER)
    training = await service.create_lora_training_client(MODEL, rank=8, user_metadata=user_metadata)
    paths = await checkpoint_utils.save_checkpoint_async(
        training, "000001", str(tmp_path), {"batch": 1}, kind="both", ttl_seconds=3600
    )
    assert set(paths) == {"state_path", "sampler_path"}
    assert all(p.startswith("tinker://") for p in paths.values())
    record = checkpoint_utils.get_last_checkpoint(str(tmp_path))
    assert record is not None
    assert record.state_path == paths["state_path"]
    assert record.batch == 1

    name = await checkpoint_utils.get_renderer_name_from_checkpoint_async(
        service, paths["state_path"]
    )
    assert name == RENDERER

    resumed = await service.create_training_client_from_state_with_optimizer(
        paths["state_path"], user_metadata=user_metadata
    )
    assert resumed.model_id != training.model_id
    # rl/train.py: create_sampling_client(path, record_stability_info=...).result()
    sampler = training.create_sampling_client(
        paths["sampler_path"], record_stability_info=False
    ).result()
    response = await sampler.sample(
        prompt=cookbook.tinker.ModelInput.from_ints([5, 6, 7]),
        num_samples=1,
        sampling_params=cookbook.tinker.SamplingParams(max_tokens=3),
    )
    assert len(response.sequences[0].tokens) == 3
