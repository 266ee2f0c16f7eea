"""End to end: train, publish, sample, download and resume against the real local server."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    SamplingClient,
    SamplingParams,
    ServiceClient,
    TensorData,
    TrainingClient,
    UnprocessableEntityError,
    ValidationError,
)
from loops_async.server import LocalServer

from ._data import EXAMPLES, MODEL, chat_tokens, sft_batch

FAST = AdamParams(learning_rate=3e-3)


def prompt_of(question: str) -> ModelInput:
    tokens, n_prompt = chat_tokens(question, "")
    return ModelInput.from_ints(tokens[:n_prompt])


def trainer_logprobs(
    training: TrainingClient, prompt: list[int], completion: list[int]
) -> np.ndarray:
    """The trainer's logprobs of ``completion`` after ``prompt`` (one forward pass)."""
    full = prompt + completion
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": TensorData(data=full[1:], dtype="int64")},
    )
    out = training.forward([datum]).result(timeout=600)
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1 :]


def assert_consistent(training: TrainingClient, sampler: SamplingClient) -> None:
    prompt = prompt_of("What is 12+7?")
    response = sampler.sample(
        prompt, num_samples=3, sampling_params=SamplingParams(max_tokens=8, seed=5)
    )
    for seq in response.sequences:
        assert seq.tokens
        expected = trainer_logprobs(training, prompt.to_ints(), seq.tokens)
        np.testing.assert_allclose(np.array(seq.logprobs), expected, atol=1e-4)


def test_sampler_logprobs_match_the_trainer_before_and_after_training(
    torch_server: LocalServer,
) -> None:
    batch = list(sft_batch(4))
    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=11)
        base = training.save_weights_and_get_sampling_client("v0").result(timeout=600)
        assert base.min_policy_version is None, "version 0 is the base model: no floor"
        assert_consistent(training, base)

        for _ in range(20):
            training.forward_backward(batch)
            training.optim_step(FAST)
        trained = training.save_weights_and_get_sampling_client("v20").result(timeout=600)
        assert trained.min_policy_version == 20
        assert_consistent(training, trained)

        # Greedy output is now the trained answer, served by the published version.
        for question, answer in EXAMPLES[:4]:
            out = trained.sample(
                prompt_of(question), sampling_params=SamplingParams(max_tokens=8, temperature=0)
            )
            assert out.policy_version == 20
            assert out.sequences[0].text == answer
            assert out.sequences[0].stop_reason == "stop"
        assert training.get_tokenizer().decode(out.sequences[0].tokens[:-1]) == answer


def test_pinned_clients_keep_their_weights(torch_server: LocalServer) -> None:
    """``pin=True`` clients (tinker's snapshots) sample the weights they were made from, after
    later training and publishes; an unpinned one follows the live adapter."""
    prompt = prompt_of("What is 3+4?")
    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=0)
        pinned = training.save_weights_and_get_sampling_client("snap", pin=True).result(600)
        assert pinned.checkpoint_name is not None
        assert pinned.checkpoint_name.startswith("snap-")
        live = training.save_weights_and_get_sampling_client("live").result(600)
        saved = training.save_weights_for_sampler("fixed").result(600)
        by_path = training.create_sampling_client(saved.path, pin=True)
        before = pinned.compute_logprobs(prompt)
        before_live = live.compute_logprobs(prompt)
        for _ in range(3):
            training.forward_backward(list(sft_batch()), "cross_entropy")
            training.optim_step(FAST)
        later = training.save_weights_and_get_sampling_client("snap", pin=True).result(600)
        np.testing.assert_allclose(pinned.compute_logprobs(prompt)[1:], before[1:], atol=1e-5)
        np.testing.assert_allclose(by_path.compute_logprobs(prompt)[1:], before[1:], atol=1e-5)
        moved = np.abs(np.array(later.compute_logprobs(prompt)[1:]) - np.array(before[1:]))
        assert moved.max() > 1e-3
        followed = np.array(live.compute_logprobs(prompt)[1:]) - np.array(before_live[1:])
        assert np.abs(followed).max() > 1e-3  # the unpinned client serves the live adapter


def test_seeds(torch_server: LocalServer) -> None:
    with ServiceClient(base_url=torch_server.url) as service:
        sampler = service.create_sampling_client(base_model=MODEL)
        prompt = prompt_of("Say hello.")

        def draw(seed: int) -> list[int]:
            params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed)
            return sampler.sample(prompt, sampling_params=params).sequences[0].tokens

        assert draw(1) == draw(1)
        assert draw(1) != draw(2)
        assert sampler.get_base_model() == MODEL


@pytest.mark.anyio
async def test_a_thousand_concurrent_samples(anyio_backend: str, torch_server: LocalServer) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        sampler = await service.create_sampling_client_async(base_model=MODEL)
        prompts = [prompt_of(q) for q, _ in EXAMPLES]
        results: list[int] = []

        async def one(i: int) -> None:
            out = await sampler.sample_async(
                prompts[i % len(prompts)], sampling_params=SamplingParams(max_tokens=4, seed=i)
            )
            results.append(len(out.sequences[0].tokens))

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(one, i)
        assert len(results) == 1000
        assert all(1 <= n <= 4 for n in results)
    assert service.statistics()["http_loops"] == 0, "every connection closed"


def test_downloaded_checkpoint_loads_in_peft(torch_server: LocalServer, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from loops_async.server.torch_models import load_base_model

    batch = list(sft_batch(2))
    with ServiceClient(base_url=torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=4, seed=2)
        for _ in range(3):
            training.forward_backward(batch)
            training.optim_step(FAST)
        published = training.save_weights_for_sampler("for-peft").result(timeout=600)
        names = {c.checkpoint_id for c in training.list_checkpoints()}
        assert "for-peft" in names
        download = training.download_checkpoint(published.path, dest_dir=tmp_path / "adapter")
        assert download.file_count >= 2
        assert download.bytes_written > 0
        local = download.dest_dir
        assert (local / "adapter_model.safetensors").is_file()
        assert (local / "adapter_config.json").is_file()
        sampler = training.create_sampling_client(published.path)
        prompt = prompt_of("What is 8+5?").to_ints()
        served = sampler.compute_logprobs(ModelInput.from_ints(prompt))

    model = PeftModel.from_pretrained(load_base_model(MODEL), str(local)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])
    assert served[0] is None
    np.testing.assert_allclose(
        np.array(served[1:], dtype=np.float64), expected[:, 0].numpy(), atol=1e-4
    )


def test_resume_from_state_with_optimizer_matches_an_uninterrupted_run(
    torch_server: LocalServer,
) -> None:
    batch = list(sft_batch(4))
    probe = [sft_batch(8)[6]]

    def steps(training: TrainingClient, n: int) -> None:
        for _ in range(n):
            training.forward_backward(batch)
            training.optim_step(FAST)

    def probe_logprobs(training: TrainingClient) -> np.ndarray:
        out = training.forward(probe).result(timeout=600)
        return out.loss_fn_outputs[0]["logprobs"].to_numpy()

    with ServiceClient(base_url=torch_server.url) as service:
        straight = service.create_lora_training_client(MODEL, rank=8, seed=4)
        steps(straight, 3)
        saved = straight.save_state("mid").result(timeout=600)
        steps(straight, 3)
        expected = probe_logprobs(straight)

        resumed = service.create_training_client_from_state_with_optimizer(saved.path)
        assert resumed.run_id != straight.run_id
        assert resumed.policy_version == 3
        steps(resumed, 3)
        np.testing.assert_allclose(probe_logprobs(resumed), expected, atol=1e-5)

        fresh_optimizer = service.create_training_client_from_state(saved.path)
        assert fresh_optimizer.policy_version == 0
        assert fresh_optimizer.lora_rank == 8


@pytest.mark.anyio
async def test_bad_sampling_input(anyio_backend: str, torch_server: LocalServer) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        sampler = await service.create_sampling_client_async(base_model=MODEL)
        prompt = prompt_of("Say hello.")
        with pytest.raises(ValidationError, match="empty prompt"):
            await sampler.sample_async(ModelInput.empty())
        with pytest.raises(ValidationError, match="num_samples"):
            await sampler.sample_async(prompt, num_samples=0)
        with pytest.raises(ValidationError, match="temperature"):
            await sampler.sample_async(prompt, sampling_params=SamplingParams(temperature=-0.5))
        with pytest.raises(ValidationError, match="top_p"):
            await sampler.sample_async(prompt, sampling_params=SamplingParams(top_p=1.01))
        with pytest.raises(UnprocessableEntityError, match="max_tokens"):
            await sampler.sample_async(prompt, sampling_params=SamplingParams(max_tokens=100_000))
        with pytest.raises(ValidationError, match="no checkpoint"):
            await service.create_sampling_client_async(
                model_path="bt://loops:run-nope/sampler_weights/nothing"
            )
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        with pytest.raises(ValidationError, match="checkpoint names"):
            await training.save_weights_and_get_sampling_client_async("a/b")
        with pytest.raises(ValidationError, match="checkpoint names"):
            await training.save_weights_for_sampler_async("..")
        # the server keeps serving
        out = await sampler.sample_async(prompt, sampling_params=SamplingParams(max_tokens=2))
        assert out.sequences


@pytest.mark.anyio
async def test_async_publish_future_and_capabilities(
    anyio_backend: str, torch_server: LocalServer
) -> None:
    async with ServiceClient(base_url=torch_server.url) as service:
        caps = await service.get_server_capabilities_async()
        assert MODEL in {m.model_name for m in caps.supported_models}
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        await (await training.forward_backward_async(list(sft_batch(2))))
        await (await training.optim_step_async(FAST))
        future = await training.save_weights_and_get_sampling_client_async("async-pub")
        sampler = await future.result_async(timeout=600)
        assert sampler.min_policy_version == 1
        out = await sampler.sample_async(
            prompt_of("Name a color."), sampling_params=SamplingParams(max_tokens=3)
        )
        assert out.policy_version == 1


def test_a_pickled_sampling_client_works_in_another_process(
    torch_server: LocalServer, tmp_path: Path
) -> None:
    import pickle
    import subprocess
    import sys

    with ServiceClient(base_url=torch_server.url) as service:
        sampler = service.create_sampling_client(base_model=MODEL)
        prompt = prompt_of("Say hello.")
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        here = sampler.sample(prompt, sampling_params=greedy).sequences[0].tokens
        blob = tmp_path / "sampler.pkl"
        blob.write_bytes(pickle.dumps((sampler, prompt, greedy)))
        script = (
            "import pickle, sys\n"
            "sampler, prompt, params = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "print(sampler.sample(prompt, sampling_params=params).sequences[0].tokens)\n"
            "sampler.close()\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, str(blob)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(here)
