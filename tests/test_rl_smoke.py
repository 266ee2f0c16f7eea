"""RL smoke run: GRPO-style policy gradient raises the reward of a toy task within 30 steps.

Toy task (a contextual bandit): after each prompt the policy writes one token; the reward is 1
when that token's id is even. The base model starts near 50 %. Each step samples a group per
prompt from the freshly published weights, centres the rewards per group into advantages, and
trains with ``importance_sampling`` or ``ppo`` on the sampler's own logprobs.
"""

from __future__ import annotations

import numpy as np
import pytest

from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    SamplingParams,
    ServiceClient,
    TensorData,
)
from loops_async.server import LocalServer

from ._data import EXAMPLES, MODEL, chat_tokens

GROUP = 8
STEPS = 30


def rl_datum(prompt: list[int], token: int, logprob: float, advantage: float) -> Datum:
    """Train on the one sampled token only: every other position has advantage 0."""
    n = len(prompt)
    targets = np.zeros(n, dtype=np.int64)
    q = np.zeros(n, dtype=np.float32)
    adv = np.zeros(n, dtype=np.float32)
    targets[-1], q[-1], adv[-1] = token, logprob, advantage
    return Datum(
        model_input=ModelInput.from_ints(prompt),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(targets),
            "logprobs": TensorData.from_numpy(q),
            "advantages": TensorData.from_numpy(adv),
        },
    )


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_policy_gradient_raises_the_reward(torch_server: LocalServer, loss_fn: str) -> None:
    prompts = [chat_tokens(q, "")[0][: chat_tokens(q, "")[1]] for q, _ in EXAMPLES[:4]]
    rewards: list[float] = []
    with ServiceClient(torch_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=5)
        adam = AdamParams(learning_rate=1e-2)
        sampler = training.save_weights_and_get_sampling_client("rl-0").result(timeout=600)
        for step in range(STEPS):
            data: list[Datum] = []
            step_rewards: list[float] = []
            for i, prompt in enumerate(prompts):
                out = sampler.sample(
                    ModelInput.from_ints(prompt),
                    num_samples=GROUP,
                    sampling_params=SamplingParams(max_tokens=1, seed=1000 * step + i),
                )
                tokens = [seq.tokens[0] for seq in out.sequences]
                lps = [seq.logprobs[0] for seq in out.sequences if seq.logprobs]
                r = np.array([1.0 if t % 2 == 0 else 0.0 for t in tokens])
                step_rewards.extend(r.tolist())
                adv = r - r.mean()
                data += [
                    rl_datum(prompt, t, lp, float(a))
                    for t, lp, a in zip(tokens, lps, adv, strict=True)
                    if a != 0
                ]
            rewards.append(float(np.mean(step_rewards)))
            if data:
                training.forward_backward(data, loss_fn)  # queued ...
                training.optim_step(adam)  # ... back to back
            sampler = training.save_weights_and_get_sampling_client(f"rl-{step + 1}").result(
                timeout=600
            )
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.2, (first, last, rewards)
    assert last > 0.75, rewards
