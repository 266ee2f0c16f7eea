"""``forward_backward_custom``: a differentiable loss evaluated on the client (PROTOCOL §5).

The trainer's ``forward`` gives each target token's logprob; the user's torch loss is evaluated
on them locally; ``forward_backward`` with cross-entropy weights ``-dLoss/dlogprob`` (and
``skip_token_normalization``) then replays exactly that gradient on the server. torch is only
needed here, and only imported when a custom loss is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from . import errors
from .types import Datum, ForwardBackwardOutput, TensorData

if TYPE_CHECKING:
    import torch

__all__ = ["CustomLossFn", "custom_weights", "replay_data"]

CustomLossFn: TypeAlias = Callable[
    [list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]
]
"""``loss_fn(data, logprobs) -> (loss, metrics)``: ``logprobs[i]`` is a float32 tensor shaped
like ``data[i]``'s ``target_tokens`` (NaN where the target is ignored); ``loss`` a scalar
tensor differentiable in them; ``metrics`` plain floats merged into the result."""

REPLAY_CONFIG = {"skip_token_normalization": True}


def custom_weights(
    data: Sequence[Datum], forward: ForwardBackwardOutput, loss_fn: CustomLossFn
) -> tuple[list[np.ndarray], float, dict[str, float]]:
    """Run ``loss_fn`` on the forward pass's logprobs; return ``-dLoss/dlogprob`` per datum,
    the loss value and the user's metrics. Blocking (torch work): call it off the event loop."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is in the [server] extra
        raise errors.ValidationError(
            "loss_fn: forward_backward_custom needs torch (pip install torch)"
        ) from exc
    if len(forward.loss_fn_outputs) != len(data):
        raise errors.ProtocolError(
            f"forward returned {len(forward.loss_fn_outputs)} outputs for {len(data)} datums"
        )
    logprobs = [
        torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
        for out in forward.loss_fn_outputs
    ]
    result = loss_fn(list(data), logprobs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise errors.ValidationError("loss_fn: must return (loss, metrics)")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise errors.ValidationError(
            "loss_fn: the loss must be a scalar tensor that depends on the logprobs"
        )
    loss.backward()  # type: ignore[no-untyped-call]
    weights = []
    for lp in logprobs:
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
        weights.append(np.nan_to_num((-grad).numpy().astype(np.float32), nan=0.0))
    value = float(loss.detach())
    if not math.isfinite(value):
        raise errors.ValidationError(f"loss_fn: the loss is not finite ({value})")
    clean: dict[str, float] = {}
    for name, metric in (metrics or {}).items():
        try:
            clean[str(name)] = float(metric)
        except (TypeError, ValueError):
            raise errors.ValidationError(
                f"loss_fn: metric {name!r} is not a number ({metric!r})"
            ) from None
    return weights, value, clean


def replay_data(data: Sequence[Datum], weights: Sequence[np.ndarray]) -> list[Datum]:
    """The datums of the replay ``forward_backward``: same inputs and targets, weights =
    ``-dLoss/dlogprob``."""
    return [
        Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_numpy(w, dtype="float32"),
            },
        )
        for datum, w in zip(data, weights, strict=True)
    ]


def finish(
    out: ForwardBackwardOutput, loss: float, metrics: dict[str, Any]
) -> ForwardBackwardOutput:
    """The replay's output with the custom loss value and the user's metrics merged in."""
    if out.metrics.get("skip_token_normalization") != 1.0:
        raise errors.ProtocolError(
            "the server did not honour skip_token_normalization: the custom loss's gradient "
            "would have been rescaled"
        )
    return ForwardBackwardOutput(
        loss=loss,
        loss_fn_output_type=out.loss_fn_output_type,
        loss_fn_outputs=out.loss_fn_outputs,
        metrics={**out.metrics, "loss": loss, **metrics},
    )
