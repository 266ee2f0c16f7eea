"""``loops-async demo``: supervised fine-tuning of the built-in model through the client.

Starts an embedded local server (unless ``--server URL`` names one), teaches
``loops-local/tiny-chat`` a handful of chat answers with LoRA, printing the loss as it goes,
and saves a checkpoint. The training loop is the documented sync example, pipelined: each
``forward_backward`` and ``optim_step`` is submitted before the previous result is awaited.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from .service import ServiceClient
from .types import AdamParams, Datum, ModelInput, TensorData

__all__ = ["TASKS", "main", "run_demo"]

MODEL = "loops-local/tiny-chat"

TASKS: list[tuple[str, str]] = [
    ("What is 12+7?", "19"),
    ("What is 30+45?", "75"),
    ("What is 8+5?", "13"),
    ("What is 21+21?", "42"),
    ("Reverse the word cat.", "tac"),
    ("Reverse the word dog.", "god"),
    ("Reverse the word sun.", "nus"),
    ("Reverse the word map.", "pam"),
]
"""The (prompt, answer) pairs the demo teaches."""


def build_datums(tokenizer_model: str = MODEL) -> list[Datum]:
    """Chat-formatted SFT datums that train on the answer tokens only."""
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    data = []
    for prompt, answer in TASKS:
        encoded: Any = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )
        prompt_ids: list[int] = list(encoded["input_ids"])
        answer_ids = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
        tokens = prompt_ids + answer_ids
        weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids)
        data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": TensorData(data=tokens[1:], dtype="int64"),
                    "weights": TensorData(data=weights, dtype="float32"),
                },
            )
        )
    return data


def run_demo(
    *,
    steps: int = 30,
    seed: int = 0,
    server: str | None = None,
    data_dir: Path = Path("demo-output"),
    out: TextIO | None = None,
) -> list[float]:
    """Run the demo; returns the loss per step. An embedded server keeps its checkpoints in
    ``data_dir``."""
    out = sys.stdout if out is None else out
    server_dir: Path | None = None
    with ExitStack() as stack:
        if server is None:
            server_dir = data_dir
            from .server import LocalServer

            print("starting the embedded local server (torch backend) ...", file=out)
            local = stack.enter_context(LocalServer(backend="torch", seed=seed, data_dir=data_dir))
            server = local.url
        print(f"server: {server}", file=out)
        service = stack.enter_context(ServiceClient(base_url=server))
        started = time.perf_counter()
        training = service.create_lora_training_client(base_model=MODEL, rank=16, seed=seed)
        print(f"training run {training.run_id} on {MODEL} (LoRA rank 16)", file=out)
        data = build_datums(MODEL)
        adam = AdamParams(learning_rate=3e-3)

        losses: list[float] = []
        pending = training.forward_backward(data)
        training.optim_step(adam)
        for step in range(1, steps + 1):
            loss = pending.result(timeout=600.0).loss
            if step < steps:  # keep the trainer fed: queue the next step before printing
                pending = training.forward_backward(data)
                training.optim_step(adam)
            losses.append(loss)
            bar = "#" * max(1, round(30 * loss / losses[0]))
            print(f"step {step:3d}  loss {loss:7.4f}  {bar}", file=out)

        saved = training.save_state(name=f"demo-step-{steps}").result(timeout=600.0)
        elapsed = time.perf_counter() - started
        print(
            f"\nloss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps ({elapsed:.1f} s)",
            file=out,
        )
        print(f"checkpoint saved: {saved.path}", file=out)
        if server_dir is not None:
            print(f"  on disk under {server_dir.resolve()}", file=out)
        return losses


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``loops-async demo``."""
    parser = argparse.ArgumentParser(prog="loops-async demo", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags."""
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument(
        "--server", default=None, help="URL of a running Loops server (default: embedded)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("demo-output"),
        help="where the embedded server keeps checkpoints (default ./demo-output)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; the exit status."""
    if args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2
    losses = run_demo(steps=args.steps, seed=args.seed, server=args.server, data_dir=args.data_dir)
    return 0 if losses[-1] < losses[0] else 1
