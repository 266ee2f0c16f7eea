"""A tinker-cookbook-style GRPO loop, written against the ``tinker`` API, run on Loops.

    python -m loops_async.tinker --local examples/tinker_rl_loop.py [--steps 8] [--group 8]

``python -m loops_async.tinker`` makes ``import tinker`` resolve to ``loops_async.tinker``;
``--local`` starts the embedded local server (built-in model ``loops-local/tiny-chat``) and
points ``TINKER_BASE_URL`` at it. Nothing below is Loops-specific: it is the shape of the
cookbook's ``rl_loop`` recipe (a few supervised steps teach the answer format, then each RL
step samples a group of answers per problem, centres the rewards per group into advantages and
trains with ``importance_sampling``, ``forward_backward`` and ``optim_step`` queued back to back).

The task: answer "What is a+b?"; the reward is 1 for the exact sum.
"""

from __future__ import annotations

import argparse
import asyncio
import random

import tinker
import torch
from tinker import types
from tinker.types.tensor_data import TensorData

MODEL = "loops-local/tiny-chat"


def problems(n: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = {(rng.randint(10, 49), rng.randint(10, 49)) for _ in range(4 * n)}
    return [(f"What is {a}+{b}?", str(a + b)) for a, b in sorted(pairs)[:n]]


def sft_datum(prompt: list[int], answer: list[int]) -> types.Datum:
    """Supervised datum: predict ``answer`` after ``prompt`` (weights 0 on the prompt)."""
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def rl_datum(
    prompt: list[int], completion: list[int], logprobs: list[float], advantage: float
) -> types.Datum:
    """The cookbook's importance-sampling datum: per-token sampling logprobs and advantages
    on the completion, zeros on the prompt."""
    tokens = prompt + completion
    pad = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(tokens[1:])),
            "logprobs": TensorData.from_torch(torch.tensor([0.0] * pad + logprobs)),
            "advantages": TensorData.from_torch(
                torch.tensor([0.0] * pad + [advantage] * len(completion))
            ),
        },
    )


async def train(steps: int, group: int, sft_steps: int = 6) -> list[float]:
    """SFT warm-up, then ``steps`` GRPO steps; returns the mean reward of each RL step."""
    service_client = tinker.ServiceClient()
    training_client = await service_client.create_lora_training_client_async(
        base_model=MODEL, rank=16
    )
    tokenizer = training_client.get_tokenizer()
    tasks = problems()
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True
            )["input_ids"]
        )
        for question, _ in tasks
    ]
    answers = [
        [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        for _, answer in tasks
    ]

    sft_adam = types.AdamParams(learning_rate=3e-3)
    sft_data = [sft_datum(p, a) for p, a in zip(prompts, answers, strict=True)]
    for _ in range(sft_steps):
        fwd_bwd_future = await training_client.forward_backward_async(sft_data, "cross_entropy")
        optim_future = await training_client.optim_step_async(sft_adam)
        await fwd_bwd_future
        await optim_future

    adam = types.AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    sampling_params = types.SamplingParams(max_tokens=4, temperature=1.0)
    mean_rewards = []
    for step in range(steps):
        sampling_client = await training_client.save_weights_and_get_sampling_client_async()
        futures = [
            sampling_client.sample(
                prompt=types.ModelInput.from_ints(prompt),
                num_samples=group,
                sampling_params=sampling_params,
            )
            for prompt in prompts
        ]
        results = await asyncio.gather(*(future.coroutine() for future in futures))

        data, rewards = [], []
        for prompt, (_, answer), result in zip(prompts, tasks, results, strict=True):
            texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in result.sequences]
            scores = [float(text.strip() == answer) for text in texts]
            rewards.extend(scores)
            mean = sum(scores) / len(scores)
            for sequence, score in zip(result.sequences, scores, strict=True):
                if score != mean and sequence.tokens:
                    assert sequence.logprobs is not None
                    data.append(rl_datum(prompt, sequence.tokens, sequence.logprobs, score - mean))
        if data:
            fwd_bwd_future = await training_client.forward_backward_async(
                data, loss_fn="importance_sampling"
            )
            optim_future = await training_client.optim_step_async(adam)
            fwd_bwd_result = await fwd_bwd_future
            await optim_future
            assert len(fwd_bwd_result.loss_fn_outputs) == len(data)
        mean_rewards.append(sum(rewards) / len(rewards))
        print(f"step {step + 1:3d}  datums {len(data):4d}  reward {mean_rewards[-1]:.3f}")

    saved = await training_client.save_state_async("final")
    print(f"saved {(await saved).path}")
    await service_client.close()
    return mean_rewards


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    args = parser.parse_args(argv)
    return asyncio.run(train(args.steps, args.group))


if __name__ == "__main__":
    main()
