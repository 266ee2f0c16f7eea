"""The loss functions of PROTOCOL.md §5, in torch.

Every function takes the trainer's logprobs of the target tokens ``lp`` (shape ``(B, T, K)``: a
batch of ``B`` datums padded to ``T`` positions, ``K`` targets per position — 1 except for
multi-target cross-entropy), a boolean ``valid`` of the same shape (the position has a target: not
``-100``, not padding), the request's float inputs padded to the same shape, and the loss config
with its defaults filled in (:func:`loops_async.server.validation.resolve_loss_config`).

It returns the **summed** per-token loss (the trainer normalises by the number of active tokens
at ``optim_step``), the number of active units (tokens; pairs for ``dpo``) and metric sums over
those units (the trainer reports ``sum / units``).

With ``r = exp(lp - q)`` (``q`` = the sampler's ``logprobs``) and ``A`` = ``advantages``:

==================== ===================================================================
cross_entropy        ``-w * lp``; active where ``w != 0`` (``w`` defaults to 1)
importance_sampling  ``-r * A``
ppo                  ``-min(r * A, clip(r, low, high) * A)``
cispo                ``-stopgrad(clip(r, low, high)) * lp * A``
dro                  ``-(lp * A - beta / 2 * (lp - q)^2)``
dppo                 ``-keep * adv_tau * r * A + kl_tau * (lp - q)^2``, ``keep`` drops tokens
                     with ``A > 0`` and ``exp(lp) - exp(q) > mask_high`` or ``A < 0`` and
                     ``exp(lp) - exp(q) < -mask_low``
dpo                  per (chosen, rejected) pair: ``delta = sum w (lp - ref) | chosen -
                     sum w (lp - ref) | rejected``;
                     ``-(1 - ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta)``
==================== ===================================================================

RL losses count a token as active where ``A != 0``; inputs at inactive positions are never used
(they may be NaN there). The log-ratio ``lp - q`` is clamped to ``[-20, 20]`` before ``exp`` so a
stale or bogus sampler logprob cannot overflow the ratio to ``inf`` (no gradient flows through the
clamp at such extremes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .validation import ConfigValue

__all__ = ["LOSS_FUNCTIONS", "MAX_LOG_RATIO", "LossFn", "LossResult", "compute_loss"]

MAX_LOG_RATIO = 20.0
"""Bound on ``|lp - q|`` inside ``r = exp(lp - q)``."""


@dataclass
class LossResult:
    """What a loss function returns for one batch."""

    loss_sum: torch.Tensor
    """Scalar: the summed loss (differentiable w.r.t. ``lp``)."""
    active: float
    """Number of active units (tokens, or pairs for ``dpo``)."""
    metric_sums: dict[str, float] = field(default_factory=dict)
    """Extra metrics as sums over active units (reported as ``sum / active``)."""


LossFn = Callable[
    [torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, ConfigValue]],
    LossResult,
]
"""``(lp, valid, inputs, config) -> LossResult``."""


def _masked_sum(per_token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return torch.where(active, per_token, torch.zeros_like(per_token)).sum()


def _clean(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``values`` with inactive positions set to 0 (so NaN there cannot leak into gradients)."""
    return torch.where(active, values, torch.zeros_like(values))


def cross_entropy(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-w * lp`` summed; active where the weight is non-zero."""
    weights = inputs.get("weights")
    w = valid.to(lp.dtype) if weights is None else _clean(weights.to(lp.dtype), valid)
    active = w != 0
    loss_sum = -(w * lp).sum()
    return LossResult(loss_sum=loss_sum, active=float(active.sum().item()))


def _rl_inputs(
    lp: torch.Tensor, valid: torch.Tensor, inputs: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(active, advantages, sampler logprobs, ratio)`` with inactive positions zeroed."""
    adv_raw = _clean(inputs["advantages"].to(lp.dtype), valid)
    active = valid & (adv_raw != 0)
    adv = _clean(adv_raw, active)
    q = _clean(inputs["logprobs"].to(lp.dtype), active)
    log_ratio = torch.clamp(_clean(lp - q, active), -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    return active, adv, q, ratio


def importance_sampling(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-r * A``."""
    active, adv, _q, ratio = _rl_inputs(lp, valid, inputs)
    n = float(active.sum().item())
    return LossResult(
        loss_sum=_masked_sum(-ratio * adv, active),
        active=n,
        metric_sums={"ratio_mean": float(_masked_sum(ratio.detach(), active).item())},
    )


def ppo(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-min(r * A, clip(r, low, high) * A)``."""
    low, high = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
    active, adv, _q, ratio = _rl_inputs(lp, valid, inputs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, low, high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    was_clipped = active & (clipped.detach() < unclipped.detach())
    return _clipped_result(per_token, active, ratio, was_clipped)


def _clipped_result(
    per_token: torch.Tensor, active: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor
) -> LossResult:
    """The result of a clipped policy-gradient loss, with its clip and ratio metrics."""
    return LossResult(
        loss_sum=_masked_sum(per_token, active),
        active=float(active.sum().item()),
        metric_sums={
            "clip_fraction": float(clipped.sum().item()),
            "ratio_mean": float(_masked_sum(ratio.detach(), active).item()),
        },
    )


def cispo(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-stopgrad(clip(r, low, high)) * lp * A``."""
    low, high = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
    active, adv, _q, ratio = _rl_inputs(lp, valid, inputs)
    weight = torch.clamp(ratio.detach(), low, high)
    clipped = active & ((ratio.detach() < low) | (ratio.detach() > high))
    return _clipped_result(-weight * lp * adv, active, ratio, clipped)


def dro(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-(lp * A - beta / 2 * (lp - q)^2)``."""
    beta = float(config["beta"])
    active, adv, q, _ratio = _rl_inputs(lp, valid, inputs)
    per_token = -(lp * adv - 0.5 * beta * (lp - q) ** 2)
    return LossResult(loss_sum=_masked_sum(per_token, active), active=float(active.sum().item()))


def dppo(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """``-keep * adv_tau * r * A + kl_tau * (lp - q)^2`` (see the module docstring)."""
    mask_high, mask_low = float(config["dppo_mask_high"]), float(config["dppo_mask_low"])
    adv_tau, kl_tau = float(config["adv_tau"]), float(config["kl_tau"])
    active, adv, q, ratio = _rl_inputs(lp, valid, inputs)
    diff = torch.exp(lp.detach()) - torch.exp(q)
    dropped = ((adv > 0) & (diff > mask_high)) | ((adv < 0) & (diff < -mask_low))
    keep = (~dropped).to(lp.dtype)
    per_token = -keep * adv_tau * ratio * adv + kl_tau * (lp - q) ** 2
    return LossResult(
        loss_sum=_masked_sum(per_token, active),
        active=float(active.sum().item()),
        metric_sums={"masked_fraction": float((dropped & active).sum().item())},
    )


def dpo(
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """Per (chosen, rejected) pair of rows: ``-(1-ls) log sigmoid(beta delta) -
    ls log sigmoid(-beta delta)``; one active unit per pair."""
    beta, smoothing = float(config["beta"]), float(config["label_smoothing"])
    weights = inputs.get("weights")
    w = valid.to(lp.dtype) if weights is None else _clean(weights.to(lp.dtype), valid)
    used = w != 0
    ref = _clean(inputs["ref_logprobs"].to(lp.dtype), used)
    seq = (w * _clean(lp - ref, used)).flatten(1).sum(dim=1)  # (B,)
    delta = seq[0::2] - seq[1::2]
    logits = beta * delta
    per_pair = -(1.0 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
    return LossResult(
        loss_sum=per_pair.sum(),
        active=float(delta.shape[0]),
        metric_sums={
            "reward_accuracy": float((delta.detach() > 0).sum().item()),
            "reward_margin": float(logits.detach().sum().item()),
        },
    )


LOSS_FUNCTIONS: Mapping[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "dpo": dpo,
    "dppo": dppo,
}
"""Loss name -> function; the names match :data:`loops_async.server.validation.LOSS_SPECS`."""


def compute_loss(
    name: str,
    lp: torch.Tensor,
    valid: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, ConfigValue],
) -> LossResult:
    """Run the loss ``name`` (see the module docstring for the arguments)."""
    return LOSS_FUNCTIONS[name](lp, valid, inputs, config)
