"""``loops-async demo``: supervised fine-tuning, then RL, through the client, on a laptop CPU.

Starts an embedded local server (unless ``--server URL`` names one) and teaches the built-in
``loops-local/tiny-chat`` model two-digit addition on a fixed set of problems:

1. **SFT**: cross-entropy on the answers, ``forward_backward`` and ``optim_step`` queued back
   to back each step;
2. **RL** (GRPO-style, ``ppo``): every step publishes the weights, samples a group of answers
   per problem concurrently (hundreds of ``sample_async`` in flight), scores them with a
   verifiable reward (exact answer = 1), centres the rewards per group into advantages, and
   queues ``forward_backward`` + ``optim_step`` before awaiting them.

It prints progress, a before/after table with accuracy, writes a PNG plot of loss and reward
per step (with the ``[demo]`` extra's matplotlib), and saves a checkpoint. Everything runs on
the async API (asyncio), the way an RL actor would use it.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import numpy as np

from .sampling import SamplingClient
from .service import ServiceClient
from .training import TrainingClient
from .types import AdamParams, Datum, ModelInput, SamplingParams, TensorData

__all__ = ["DemoResult", "Problem", "add_arguments", "main", "make_problems", "run_demo"]

MODEL = "loops-local/tiny-chat"
GROUP = 8
"""Samples per problem per RL step."""


@dataclass(frozen=True)
class Problem:
    """One addition problem."""

    a: int
    b: int

    @property
    def question(self) -> str:
        """The user's message."""
        return f"What is {self.a}+{self.b}?"

    @property
    def answer(self) -> str:
        """The expected completion."""
        return str(self.a + self.b)


def make_problems(seed: int, count: int = 32) -> list[Problem]:
    """``count`` distinct problems with two-digit operands and a two-digit sum."""
    rng = random.Random(seed)
    seen: dict[tuple[int, int], Problem] = {}
    while len(seen) < count:
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        seen.setdefault((a, b), Problem(a, b))
    return list(seen.values())


@dataclass
class DemoResult:
    """What the demo measured."""

    sft_losses: list[float] = field(default_factory=list)
    rl_rewards: list[float] = field(default_factory=list)
    rl_losses: list[float] = field(default_factory=list)
    before_rl: dict[str, float] = field(default_factory=dict)
    after_rl: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    plot: Path | None = None


class _Progress:
    """A one-line progress bar on a terminal; a line every few steps otherwise."""

    def __init__(self, out: TextIO, label: str, total: int) -> None:
        self._out, self._label, self._total = out, label, total
        self._tty = out.isatty()
        self._start = time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        width = 24
        filled = round(width * step / self._total)
        shown = "  ".join(f"{k} {v:.3f}" for k, v in values.items())
        elapsed = time.perf_counter() - self._start
        line = (
            f"{self._label:>4} [{'#' * filled}{'.' * (width - filled)}] "
            f"{step:3d}/{self._total}  {shown}  {elapsed:5.1f}s"
        )
        if self._tty:
            self._out.write("\r" + line + ("\n" if step == self._total else ""))
            self._out.flush()
        elif step == self._total or step % 5 == 0 or step == 1:
            print(line, file=self._out)


class _Task:
    """Tokenisation of the problems with the model's chat template."""

    def __init__(self, training: TrainingClient, problems: list[Problem]) -> None:
        self.tokenizer = training.get_tokenizer()
        self.problems = problems
        self.prompts = [self._prompt(p) for p in problems]

    def _prompt(self, problem: Problem) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}],
            tokenize=True,
            add_generation_prompt=True,
        )
        return [int(t) for t in encoded["input_ids"]]

    def sft_datum(self, index: int) -> Datum:
        """Cross-entropy on the answer tokens (and EOS) only."""
        prompt = self.prompts[index]
        answer = [
            *self.tokenizer.encode(self.problems[index].answer, add_special_tokens=False),
            self.tokenizer.eos_token_id,
        ]
        tokens = prompt + answer
        weights = np.zeros(len(tokens) - 1, dtype=np.float32)
        weights[len(prompt) - 1 :] = 1.0
        return Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
                "weights": TensorData.from_numpy(weights),
            },
        )

    def rl_datum(
        self, index: int, completion: list[int], logprobs: list[float], advantage: float
    ) -> Datum:
        """Policy-gradient inputs for one sampled completion."""
        prompt = self.prompts[index]
        tokens = prompt + completion
        n = len(tokens) - 1
        q = np.zeros(n, dtype=np.float32)
        adv = np.zeros(n, dtype=np.float32)
        start = len(prompt) - 1
        q[start:] = logprobs
        adv[start:] = advantage
        return Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
                "logprobs": TensorData.from_numpy(q),
                "advantages": TensorData.from_numpy(adv),
            },
        )

    def reward(self, index: int, text: str | None) -> float:
        """1 for the exact answer, else 0: a verifiable reward."""
        return 1.0 if (text or "").strip() == self.problems[index].answer else 0.0


async def _sample_all(
    sampler: SamplingClient, task: _Task, params: SamplingParams, n: int
) -> list[list[tuple[list[int], list[float], str]]]:
    """``n`` completions per problem, every request in flight at once."""
    results: list[list[tuple[list[int], list[float], str]]] = [[] for _ in task.prompts]

    async def one(index: int) -> None:
        out = await sampler.sample_async(
            ModelInput.from_ints(task.prompts[index]), num_samples=n, sampling_params=params
        )
        results[index] = [(s.tokens, s.logprobs or [], s.text or "") for s in out.sequences]

    async with anyio.create_task_group() as group:
        for index in range(len(task.prompts)):
            group.start_soon(one, index)
    return results


async def _evaluate(
    sampler: SamplingClient, task: _Task, seed: int
) -> tuple[dict[str, float], list[str]]:
    greedy = await _sample_all(sampler, task, SamplingParams(max_tokens=4, temperature=0.0), 1)
    sampled = await _sample_all(
        sampler, task, SamplingParams(max_tokens=4, temperature=1.0, seed=seed), GROUP
    )
    texts = [group[0][2].strip() for group in greedy]
    accuracy = float(np.mean([task.reward(i, t) for i, t in enumerate(texts)]))
    reward = float(
        np.mean([task.reward(i, s[2]) for i, group in enumerate(sampled) for s in group])
    )
    return {"greedy accuracy": accuracy, "sampled reward": reward}, texts


async def run_demo_async(
    *,
    sft_steps: int = 10,
    rl_steps: int = 40,
    seed: int = 0,
    server: str | None = None,
    base_model: str = MODEL,
    output: Path = Path("demo-output"),
    out: TextIO | None = None,
) -> DemoResult:
    """The demo on the current event loop; returns what it measured."""
    out = sys.stdout if out is None else out
    result = DemoResult()
    await anyio.Path(output).mkdir(parents=True, exist_ok=True)
    async with ServiceClient(base_url=server) as service:
        started = time.perf_counter()
        training = await service.create_lora_training_client_async(base_model, 16, seed=seed)
        print(f"run {training.run_id}: {base_model}, LoRA rank 16", file=out)
        task = _Task(training, make_problems(seed))
        sft_data = [task.sft_datum(i) for i in range(len(task.problems))]

        # 1. SFT -------------------------------------------------------------------------------
        progress = _Progress(out, "SFT", sft_steps)
        sft_adam = AdamParams(learning_rate=3e-3)
        for step in range(1, sft_steps + 1):
            fb = await training.forward_backward_async(sft_data)
            await training.optim_step_async(sft_adam)  # queued behind it, before we wait
            result.sft_losses.append((await fb).loss)
            progress.update(step, loss=result.sft_losses[-1])

        sampler = await (await training.save_weights_and_get_sampling_client_async("sft"))
        result.before_rl, before_texts = await _evaluate(sampler, task, seed)

        # 2. RL (GRPO-style, ppo) ---------------------------------------------------------------
        progress = _Progress(out, "RL", rl_steps)
        rl_adam = AdamParams(learning_rate=2e-3)
        for step in range(1, rl_steps + 1):
            groups = await _sample_all(
                sampler,
                task,
                SamplingParams(max_tokens=4, temperature=1.0, seed=seed * 10_000 + step),
                GROUP,
            )
            data: list[Datum] = []
            rewards: list[float] = []
            for index, group in enumerate(groups):
                scores = np.array([task.reward(index, text) for _, _, text in group])
                rewards.extend(scores.tolist())
                for (tokens, logprobs, _), advantage in zip(
                    group, scores - scores.mean(), strict=True
                ):
                    if advantage != 0 and tokens:
                        data.append(task.rl_datum(index, tokens, logprobs, float(advantage)))
            result.rl_rewards.append(float(np.mean(rewards)))
            loss = 0.0
            if data:
                fb = await training.forward_backward_async(data, "ppo")
                await training.optim_step_async(rl_adam)  # queued before awaiting fb
                loss = (await fb).loss
            result.rl_losses.append(loss)
            sampler = await (
                await training.save_weights_and_get_sampling_client_async(f"rl-{step}")
            )
            progress.update(step, reward=result.rl_rewards[-1], loss=loss)

        result.after_rl, after_texts = await _evaluate(sampler, task, seed)
        saved = await (await training.save_state_async(f"demo-final-{seed}"))
        result.checkpoint = saved.path
        elapsed = time.perf_counter() - started

    _print_table(out, task, before_texts, after_texts, result)
    result.plot = _plot(result, output / "loops-demo.png", out)
    print(f"\ncheckpoint saved: {result.checkpoint}", file=out)
    print(f"finished in {elapsed:.0f} s", file=out)
    return result


def _print_table(
    out: TextIO, task: _Task, before: list[str], after: list[str], result: DemoResult
) -> None:
    print("\n  problem        answer  after SFT  after RL (greedy)", file=out)
    for i, problem in enumerate(task.problems[:8]):
        marks = ["ok" if task.reward(i, t) else "  " for t in (before[i], after[i])]
        print(
            f"  {problem.question:<14} {problem.answer:>6}  {before[i]:>6} {marks[0]}  "
            f"{after[i]:>6} {marks[1]}",
            file=out,
        )
    print(f"  ... ({len(task.problems)} problems)\n", file=out)
    print(f"  {'':<18}{'after SFT':>10}{'after RL':>10}", file=out)
    for name in result.before_rl:
        print(
            f"  {name:<18}{result.before_rl[name]:>10.2f}{result.after_rl[name]:>10.2f}",
            file=out,
        )


def _plot(result: DemoResult, path: Path, out: TextIO) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(install matplotlib, or the [demo] extra, for the plot)", file=out)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(result.sft_losses) + 1), result.sft_losses, marker="o")
    left.set(title="SFT", xlabel="step", ylabel="cross-entropy loss per answer token")
    right.plot(range(1, len(result.rl_rewards) + 1), result.rl_rewards, marker="o", color="C2")
    right.set(title="RL (ppo)", xlabel="step", ylabel="mean reward (exact answers)", ylim=(0, 1))
    fig.suptitle("loops_async demo: tiny-chat learns two-digit addition")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written: {path}", file=out)
    return path


def run_demo(
    *,
    server: str | None = None,
    seed: int = 0,
    output: Path = Path("demo-output"),
    out: TextIO | None = None,
    **options: Any,
) -> DemoResult:
    """Run the demo on asyncio, starting an embedded local server unless ``server`` is given.

    ``options``: ``sft_steps``, ``rl_steps``, ``base_model`` (see :func:`run_demo_async`).
    """
    out = sys.stdout if out is None else out
    if server is None:
        from .server import LocalServer

        print("starting the embedded local server (torch backend) ...", file=out)
        with LocalServer(backend="torch", seed=seed, data_dir=output / "data") as local:
            print(f"server {local.url}, data in {local.data_dir}", file=out)
            return run_demo(server=local.url, seed=seed, output=output, out=out, **options)
    run = functools.partial(
        run_demo_async, server=server, seed=seed, output=output, out=out, **options
    )
    return anyio.run(run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags."""
    parser.add_argument("--steps", type=int, default=40, help="RL steps (default 40)")
    parser.add_argument("--sft-steps", type=int, default=10, help="SFT steps (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of problems and run")
    parser.add_argument(
        "--server", default=None, help="URL of a running Loops server (default: embedded)"
    )
    parser.add_argument("--base-model", default=MODEL, help=f"base model (default {MODEL})")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo-output"),
        help="where the plot and the embedded server's data go (default ./demo-output)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; the exit status (1 if RL did not help)."""
    if args.steps < 1 or args.sft_steps < 1:
        print("--steps and --sft-steps must be at least 1", file=sys.stderr)
        return 2
    result = run_demo(
        sft_steps=args.sft_steps,
        rl_steps=args.steps,
        seed=args.seed,
        server=args.server,
        base_model=args.base_model,
        output=args.output,
    )
    improved = result.after_rl["sampled reward"] > result.before_rl["sampled reward"]
    return 0 if improved else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``loops-async demo``."""
    parser = argparse.ArgumentParser(prog="loops-async demo", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
