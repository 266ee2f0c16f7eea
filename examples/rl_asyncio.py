"""Async RL on asyncio: hundreds of ``sample_async`` in flight, GRPO-style advantages.

    python examples/rl_asyncio.py [--steps 15] [--group 16] [--server URL]

The task: answer "What is a+b?" for a fixed set of problems; the reward is 1 for the exact
sum. A few SFT steps teach the format, then each RL step publishes the weights, samples a group
of answers per problem with every request in flight at once, centres the rewards per group
into advantages and queues ``forward_backward`` (ppo) + ``optim_step`` before awaiting them.
``rl_trio.py`` runs the same coroutine on trio.
"""

from __future__ import annotations

import argparse
import random

import anyio
import numpy as np

from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    SamplingClient,
    SamplingParams,
    ServiceClient,
    TensorData,
)
from loops_async.server import embedded

MODEL = "loops-local/tiny-chat"


def problems(n: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = {(rng.randint(10, 49), rng.randint(10, 49)) for _ in range(4 * n)}
    return [(f"What is {a}+{b}?", str(a + b)) for a, b in sorted(pairs)[:n]]


def datum(tokens: list[int], start: int, **per_position: np.ndarray) -> Datum:
    """Inputs ``tokens[:-1]``, targets ``tokens[1:]``; tensors cover positions from ``start``."""
    n = len(tokens) - 1
    inputs = {"target_tokens": TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64))}
    for name, values in per_position.items():
        full = np.zeros(n, dtype=np.float32)
        full[start:] = values
        inputs[name] = TensorData.from_numpy(full)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


async def sample_groups(
    sampler: SamplingClient, prompts: list[list[int]], group: int, seed: int
) -> list[list[tuple[list[int], list[float], str]]]:
    """``group`` completions per prompt: one ``sample_async`` each, all in flight at once."""
    out: list[list[tuple[list[int], list[float], str]]] = [[] for _ in prompts]

    async def one(i: int, j: int) -> None:
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=seed + 1000 * i + j)
        response = await sampler.sample_async(ModelInput.from_ints(prompts[i]), 1, params)
        seq = response.sequences[0]
        out[i].append((seq.tokens, seq.logprobs or [], seq.text or ""))

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            for j in range(group):
                tg.start_soon(one, i, j)
    return out


async def train(url: str, steps: int, group: int, sft_steps: int = 6) -> list[float]:
    """SFT warm-up, then ``steps`` RL steps; returns the mean reward per RL step."""
    async with ServiceClient(base_url=url) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=16, seed=0)
        tok = training.get_tokenizer()
        tasks = problems()
        prompts = [
            list(
                tok.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True
                )["input_ids"]
            )
            for q, _ in tasks
        ]

        sft = []
        for prompt, (_, answer) in zip(prompts, tasks, strict=True):
            answer_ids = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
            sft.append(
                datum(prompt + answer_ids, len(prompt) - 1, weights=np.ones(len(answer_ids)))
            )
        for _ in range(sft_steps):
            fb = await training.forward_backward_async(sft)
            await training.optim_step_async(AdamParams(learning_rate=3e-3))
            await fb

        rewards_per_step = []
        adam = AdamParams(learning_rate=2e-3)
        for step in range(steps):
            sampler = await (await training.save_weights_and_get_sampling_client_async(f"s{step}"))
            groups = await sample_groups(sampler, prompts, group, seed=step * 100_000)
            data, rewards = [], []
            for prompt, (_, answer), completions in zip(prompts, tasks, groups, strict=True):
                scores = np.array([float(text.strip() == answer) for _, _, text in completions])
                rewards.extend(scores)
                for (tokens, logprobs, _), adv in zip(
                    completions, scores - scores.mean(), strict=True
                ):
                    if adv != 0 and tokens:
                        advantages = np.full(len(tokens), adv)
                        data.append(
                            datum(
                                prompt + tokens,
                                len(prompt) - 1,
                                logprobs=np.array(logprobs),
                                advantages=advantages,
                            )
                        )
            if data:
                fb = await training.forward_backward_async(data, "ppo")
                await training.optim_step_async(adam)  # queued before we wait for fb
                await fb
            rewards_per_step.append(float(np.mean(rewards)))
            print(
                f"step {step + 1:3d}  samples {len(rewards):4d}  reward {rewards_per_step[-1]:.3f}"
            )
        return rewards_per_step


def main(argv: list[str] | None = None, backend: str = "asyncio") -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--server", default=None)
    args = parser.parse_args(argv)
    with embedded(args.server) as url:
        return anyio.run(train, url, args.steps, args.group, backend=backend)


if __name__ == "__main__":
    main()
