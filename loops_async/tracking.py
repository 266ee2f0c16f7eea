"""Experiment tracking: a small metrics-sink interface, and Weights & Biases behind it.

A :class:`TrainingClient` with a sink logs every operation's metrics when its result arrives:
the loss (and the loss function's metrics) of each ``forward_backward`` and the optimizer
metrics of each ``optim_step``, each with the optimizer step it belongs to. ``close()`` /
``aclose()`` retrieve results nobody read yet (briefly), log them, and close the sink.

``create_lora_training_client(wandb_config=WandbConfig(project=..., name=...))`` uses
:class:`WandbSink` (``pip install 'loops-async[wandb]'``; set ``WANDB_MODE=offline`` to work
without an account). Any object with ``log(metrics, *, step)`` and ``close()`` can be a sink:
pass it to :meth:`TrainingClient.add_metrics_sink`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import errors
from .types import Datum, ForwardBackwardOutput, TensorData, WandbConfig

if TYPE_CHECKING:
    from .training import TrainingClient

__all__ = ["MetricsSink", "WandbSink", "loops_log_kl_sample_train", "start_wandb"]

log = logging.getLogger("loops_async")


@runtime_checkable
class MetricsSink(Protocol):
    """Where a training client's metrics go."""

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Record ``metrics`` at optimizer step ``step`` (called from any thread)."""

    def close(self) -> None:
        """Flush and release the sink (called once, from ``close()``/``aclose()``)."""


class WandbSink:
    """A :class:`MetricsSink` that logs to a Weights & Biases run (thread-safe).

    Steps only move forward in W&B: metrics for an older step than the last one logged (a
    result read out of order) are logged at the current step, with their own step recorded
    as ``step_of_metrics``.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        """The ``wandb`` run object."""
        self._lock = threading.Lock()
        self._last_step = -1

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        """``run.log(metrics, step=step)``."""
        with self._lock:
            payload = dict(metrics)
            if step < self._last_step:
                payload["step_of_metrics"] = step
                step = self._last_step
            self._last_step = step
            self.run.log(payload, step=step)

    def close(self) -> None:
        """``run.finish()``."""
        with self._lock:
            self.run.finish()


def start_wandb(config: WandbConfig, client: TrainingClient) -> WandbSink:
    """Start a W&B run for ``client`` (blocking: call it from a worker thread)."""
    try:
        import wandb
    except ImportError as exc:
        raise errors.ValidationError(
            "wandb_config: Weights & Biases is not installed (pip install 'loops-async[wandb]')"
        ) from exc
    run = wandb.init(
        project=config.project,
        name=config.name,
        config={
            "base_model": client.base_model,
            "lora_rank": client.lora_rank,
            "run_id": client.run_id,
        },
        reinit="create_new",
    )
    return WandbSink(run)


def _values(tensor: TensorData | None) -> list[float]:
    if tensor is None:
        return []
    return [float(v) for v in tensor.to_numpy().ravel().tolist()]


def loops_log_kl_sample_train(
    wandb_run: Any,
    step: int,
    data: Sequence[Datum],
    forward_backward_output: ForwardBackwardOutput | None = None,
    *,
    training_logprobs: Sequence[Sequence[float]] | None = None,
    prefix: str = "optim/train-sample-div/",
    log_histogram: bool = True,
    max_histogram_tokens: int = 50000,
    log_worst_tokens: bool = True,
    top_n: int = 20,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Log how far the sampler's logprobs (``loss_fn_inputs["logprobs"]`` of each datum) are
    from the trainer's (``training_logprobs``, or the ``logprobs`` outputs of
    ``forward_backward_output``) over the tokens that train (``weights``/``mask`` > 0, or
    ``advantages`` != 0, else all): the mean difference, the KL estimates ``k1``
    (E[log p_s - log p_t]) and ``k3`` (E[r - 1 - log r], r = p_t/p_s), the largest absolute
    difference, and optionally a histogram and the ``top_n`` most divergent tokens. Logs with
    ``wandb_run.log(metrics, step=step)`` (any object with that method) and returns the
    scalar metrics."""
    if training_logprobs is None:
        if forward_backward_output is None:
            raise errors.ValidationError(
                "give forward_backward_output= or training_logprobs= (the trainer's logprobs)"
            )
        training_logprobs = [
            _values(out.get("logprobs")) for out in forward_backward_output.loss_fn_outputs
        ]
    if len(training_logprobs) != len(data):
        raise errors.ValidationError(
            f"training logprobs for {len(training_logprobs)} sequences, data has {len(data)}"
        )
    diffs: list[float] = []
    worst: list[tuple[float, int, int, int]] = []
    for index, (datum, trained) in enumerate(zip(data, training_logprobs, strict=True)):
        inputs = datum.loss_fn_inputs
        sampled = _values(inputs.get("logprobs"))
        if not sampled:
            continue
        mask = _values(inputs.get("weights") or inputs.get("mask"))
        if not mask and "advantages" in inputs:
            mask = [1.0 if a != 0 else 0.0 for a in _values(inputs["advantages"])]
        targets = _values(inputs.get("target_tokens"))
        for position, (s, t) in enumerate(zip(sampled, trained, strict=False)):
            if mask and (position >= len(mask) or mask[position] <= 0):
                continue
            if not (math.isfinite(s) and math.isfinite(t)):
                continue
            diff = s - t
            diffs.append(diff)
            token = int(targets[position]) if position < len(targets) else -1
            worst.append((abs(diff), index, position, token))
    metrics: dict[str, float] = {}
    if diffs:
        count = len(diffs)
        metrics[f"{prefix}mean_diff"] = sum(diffs) / count
        metrics[f"{prefix}k1"] = sum(diffs) / count
        metrics[f"{prefix}k3"] = sum(math.expm1(-d) + d for d in diffs) / count
        metrics[f"{prefix}max_abs_diff"] = max(abs(d) for d in diffs)
        metrics[f"{prefix}tokens"] = float(count)
    payload: dict[str, Any] = dict(metrics)
    if diffs and log_histogram:
        try:
            import wandb

            payload[f"{prefix}diff_histogram"] = wandb.Histogram(diffs[:max_histogram_tokens])
        except ImportError:
            pass
    if diffs and log_worst_tokens:
        worst.sort(reverse=True)
        rows = []
        for size, index, position, token in worst[:top_n]:
            text = tokenizer.decode([token]) if tokenizer is not None and token >= 0 else ""
            rows.append([index, position, token, text, size])
        try:
            import wandb

            payload[f"{prefix}worst_tokens"] = wandb.Table(
                columns=["sequence", "position", "token", "text", "abs_diff"], data=rows
            )
        except ImportError:
            pass
    wandb_run.log(payload, step=step)
    return metrics
