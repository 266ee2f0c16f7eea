"""The torch trainer: a ``transformers`` causal LM with hand-written LoRA adapters, the Loops
losses, gradient accumulation with deferred normalisation, and Adam.

Semantics (PROTOCOL.md §3 and §5):

- ``forward_backward`` adds the gradient of the **summed** per-token loss to the adapter's
  gradient buffer; ``optim_step`` divides it by the number of active tokens accumulated since the
  last step (so a batch split over several calls gives the same update as one call), except for
  contributions made with ``skip_token_normalization`` (used as they are). Mixing the two kinds in
  one step is an :class:`~loops_async.server.backend.InvalidRequest`.
- ``loss`` / ``metrics["loss"]`` are the mean per active unit of that call (tokens; pairs for
  ``dpo``), plus the loss's own metrics (``clip_fraction`` and ``ratio_mean`` for ``ppo`` /
  ``cispo``, ``ratio_mean`` for ``importance_sampling``, ``masked_fraction`` for ``dppo``,
  ``reward_accuracy`` / ``reward_margin`` for ``dpo``) and ``skip_token_normalization: 1.0`` when
  that flag was set. They are always JSON numbers: a call whose loss or a metric is not finite
  (inputs too large for float32, or an adapter with non-finite weights) fails with
  :class:`~loops_async.server.backend.InvalidRequest` before its gradient is accumulated.
- ``loss_fn_outputs``: per datum ``logprobs`` (float32, shaped like ``target_tokens``, NaN where
  the target is ``-100``); with ``top_k_logprobs = k > 0`` also ``top_k_logprobs`` (float32,
  ``(N, k)``) and ``top_k_token_ids`` (int64, ``(N, k)``): the k likeliest next tokens at each
  position, best first. ``loss_fn_output_type`` is ``"ArrayRecord"``.
- ``forward`` computes the same under ``torch.no_grad``; the gradient buffer is untouched.
- ``pending_gradient()`` (a testing and debugging aid, not an op) returns the gradient the next
  ``optim_step`` would apply: normalised, before clipping, by PEFT adapter key.
- Adam with decoupled weight decay, bias correction, global-norm clipping (``grad_clip_norm``,
  0 = off), the ``AdamParams`` fields read at every step. ``optim_step`` metrics: ``step``,
  ``learning_rate``, ``grad_norm`` (before clipping), ``active_tokens`` (the normaliser), and
  ``grad_clipped: 1.0`` when clipping applied (``update_skipped: 1.0`` with ``grad_norm: -1`` if
  the gradient was not finite and the update was skipped).
- Checkpoints: the PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``), a
  ``trainer_state.json`` and, with the optimizer, ``optimizer.safetensors`` (Adam moments under
  ``exp_avg.<PEFT key>`` / ``exp_avg_sq.<PEFT key>``).

Everything is float32; on CPU the same requests in the same order give bit-identical adapters.
The datums of one call are right-padded into micro-batches (no attention mask is needed: with
causal attention a real token never attends to the padding after it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._wire import ForwardBackwardRequest
from ..types import AdamParams, ForwardBackwardOutput, InitTrainerServerResponse, OptimStepResponse
from ..types import TensorData as _TensorData
from .backend import OPTIMIZER_FILE, TRAINER_STATE_FILE, InvalidRequest
from .lora import (
    AdapterFormatError,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_modules,
    lora_parameters,
    lora_rank_of,
    read_adapter,
    save_adapter,
)
from .losses import LOSS_FUNCTIONS
from .models import ModelSpec
from .torch_models import build_model
from .validation import (
    IGNORE_INDEX,
    LOSS_SPECS,
    PreparedDatum,
    PreparedRequest,
    prepare_forward_request,
    validate_adam_params,
    validate_forward_request,
    validate_lora_rank,
)

__all__ = ["OPTIMIZER_FILE", "TRAINER_STATE_FILE", "TorchTrainer"]

_STATE_FORMAT = 1
_OUTPUT_TYPE = "ArrayRecord"
# Defaults for optional float inputs that some datums of a call carry and others do not.
_INPUT_DEFAULTS = {"weights": 1.0}


class TorchTrainer:
    """One run's trainer on a ``transformers`` model (implements
    :class:`~loops_async.server.backend.TrainerBackend`).

    Args:
        spec: the base model (built-in, or a local Hugging Face directory).
        lora_rank: rank of the fresh adapter.
        seed: seed of the adapter initialisation (the same seed gives the same adapter).
        max_logits_per_batch: micro-batch budget in logit elements (batch x length x vocab); a
            call's datums are split into micro-batches under it (at least one datum, or one
            ``dpo`` pair, each).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        lora_rank: int,
        seed: int = 0,
        max_logits_per_batch: int = 1 << 25,
    ) -> None:
        validate_lora_rank(lora_rank)
        self.spec = spec
        self.seed = seed
        self.max_logits_per_batch = max_logits_per_batch
        self.model = build_model(spec)
        self._vocab = spec.vocab_size
        pad = spec.config.get("pad_token_id")
        self._pad_id = pad if isinstance(pad, int) and 0 <= pad < spec.vocab_size else 0
        apply_lora(self.model, lora_rank, seed=seed)
        self._step = 0
        self._exp_avg: dict[str, torch.Tensor] = {}
        self._exp_avg_sq: dict[str, torch.Tensor] = {}
        self._pending_units = 0.0
        self._pending_mode: Literal["mean", "sum"] | None = None
        self._reset_optimizer()

    # ------------------------------------------------------------------ properties

    @property
    def step(self) -> int:
        """Number of ``optim_step`` calls applied since init / load."""
        return self._step

    @property
    def lora_rank(self) -> int:
        """The rank of the current adapter."""
        return lora_rank_of(self.model)

    @property
    def base_model_name(self) -> str:
        """What ``adapter_config.json`` records as ``base_model_name_or_path``."""
        return self.spec.name if self.spec.path is None else str(self.spec.path)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the current adapter under its PEFT keys (for a sampler to publish)."""
        return adapter_state_dict(self.model)

    # ------------------------------------------------------------------ TrainerBackend

    def validate_forward(self, req: ForwardBackwardRequest) -> None:
        """Raise :class:`InvalidRequest` for input that can never run (see
        :func:`~loops_async.server.validation.validate_forward_request`)."""
        validate_forward_request(req, self.spec)

    def init(self, lora_rank: int) -> InitTrainerServerResponse:
        """Start over with a fresh adapter of ``lora_rank`` (the same for the same seed), zero
        gradients, fresh Adam state and step 0."""
        validate_lora_rank(lora_rank)
        apply_lora(self.model, lora_rank, seed=self.seed)
        self._reset_optimizer()
        return InitTrainerServerResponse(lora_rank=lora_rank, step=0)

    def forward_backward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Compute the loss and add the gradient of its sum to the gradient buffer."""
        prepared = prepare_forward_request(req, self.spec)
        mode: Literal["mean", "sum"] = "sum" if prepared.skip_token_normalization else "mean"
        if self._pending_mode is not None and self._pending_mode != mode:
            raise InvalidRequest(
                "loss_fn_config['skip_token_normalization']: cannot mix contributions with and "
                "without skip_token_normalization in one optim_step (the gradient buffer holds "
                f"{'un' if self._pending_mode == 'sum' else ''}normalised contributions); call "
                "optim_step first"
            )
        out, units = self._run(prepared, backward=True)
        self._pending_mode = mode
        self._pending_units += units
        return out

    def forward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Compute the loss and logprobs without touching the gradient buffer."""
        prepared = prepare_forward_request(req, self.spec)
        out, _units = self._run(prepared, backward=False)
        return out

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """Apply one Adam step to the accumulated gradient (normalised per active token unless
        it was made with ``skip_token_normalization``) and clear it."""
        validate_adam_params(params)
        named = lora_parameters(self.model)
        grads = self._normalised_grads(named)
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        grad_norm = float(torch.linalg.vector_norm(norms).item())
        metrics: dict[str, float] = {
            "grad_norm": grad_norm,
            "learning_rate": float(params.learning_rate),
            "active_tokens": float(self._pending_units),
        }
        if not math.isfinite(grad_norm):
            # A non-finite gradient would destroy the adapter: skip the update. Metric values
            # must be JSON numbers, so the norm is reported as -1.
            metrics["update_skipped"] = 1.0
            metrics["grad_norm"] = -1.0
        else:
            if params.grad_clip_norm > 0:
                coef = params.grad_clip_norm / (grad_norm + 1e-6)
                if coef < 1.0:
                    grads = [g * coef for g in grads]
                    metrics["grad_clipped"] = 1.0
            self._adam_update(named, grads, params)
        self._step += 1
        metrics["step"] = float(self._step)
        self._clear_grads()
        return OptimStepResponse(metrics=metrics)

    def pending_gradient(self) -> dict[str, torch.Tensor]:
        """The gradient the next ``optim_step`` would apply, before clipping: the accumulated
        gradient divided by the number of active units (used as it is after
        ``skip_token_normalization`` contributions), zeros where nothing is pending; copies, by
        PEFT adapter key. A testing and debugging aid: it changes no state."""
        named = lora_parameters(self.model)
        grads = self._normalised_grads(named)
        return {key: grad.detach().clone() for (key, _p), grad in zip(named, grads, strict=True)}

    def save_state(self, directory: Path, *, with_optimizer: bool) -> None:
        """Write the PEFT adapter and ``trainer_state.json`` into ``directory``; with the
        optimizer also ``optimizer.safetensors`` (Adam moments) — the step is in the json."""
        from safetensors.torch import save_file

        directory = Path(directory)
        save_adapter(self.model, directory, base_model_name_or_path=self.base_model_name)
        first = next(iter(lora_modules(self.model).values()))
        state = {
            "format": _STATE_FORMAT,
            "step": self._step,
            "lora_rank": first.rank,
            "lora_alpha": first.alpha,
            "base_model": self.spec.name,
            "has_optimizer": with_optimizer,
        }
        if with_optimizer:
            tensors: dict[str, torch.Tensor] = {}
            for key, _p in lora_parameters(self.model):
                tensors[f"exp_avg.{key}"] = self._exp_avg[key].contiguous()
                tensors[f"exp_avg_sq.{key}"] = self._exp_avg_sq[key].contiguous()
            save_file(tensors, str(directory / OPTIMIZER_FILE), metadata={"format": "pt"})
        (directory / TRAINER_STATE_FILE).write_text(
            json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def load_state(self, directory: Path, *, with_optimizer: bool) -> int:
        """Load a checkpoint directory (adopting its LoRA rank). With ``with_optimizer`` the Adam
        moments and step come from it too; without, they reset to zero. The gradient buffer is
        cleared. Returns the step counter after loading."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise InvalidRequest(f"path: checkpoint directory {directory} does not exist")
        try:
            config, state = read_adapter(directory)
        except AdapterFormatError as exc:
            raise InvalidRequest(f"path: {exc}") from None
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        moments: dict[str, torch.Tensor] = {}
        step = 0
        if with_optimizer:
            opt_file = directory / OPTIMIZER_FILE
            state_file = directory / TRAINER_STATE_FILE
            if not opt_file.is_file() or not state_file.is_file():
                raise InvalidRequest(
                    f"path: checkpoint {directory.name!r} has no optimizer state (it was saved "
                    "without it); load it without the optimizer"
                )
            moments = load_file(str(opt_file))
            step = _read_step(state_file)
            for key, tensor in state.items():
                key = key.replace(".default.weight", ".weight")
                for kind in ("exp_avg", "exp_avg_sq"):
                    got = moments.get(f"{kind}.{key}")
                    if got is None or got.shape != tensor.shape:
                        raise InvalidRequest(
                            f"path: optimizer state of checkpoint {directory.name!r} does not "
                            f"match its adapter ({kind}.{key})"
                        )
        try:
            load_adapter_state_dict(self.model, state, rank=rank, alpha=alpha)
        except AdapterFormatError as exc:
            raise InvalidRequest(f"path: {exc}") from None
        self._reset_optimizer()
        if with_optimizer:
            for key, _p in lora_parameters(self.model):
                self._exp_avg[key] = moments[f"exp_avg.{key}"].to(torch.float32).clone()
                self._exp_avg_sq[key] = moments[f"exp_avg_sq.{key}"].to(torch.float32).clone()
            self._step = step
        return self._step

    # ------------------------------------------------------------------ internals

    def _reset_optimizer(self) -> None:
        self._step = 0
        self._exp_avg = {}
        self._exp_avg_sq = {}
        for key, param in lora_parameters(self.model):
            self._exp_avg[key] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            self._exp_avg_sq[key] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        self._clear_grads()

    def _clear_grads(self) -> None:
        for _key, param in lora_parameters(self.model):
            param.grad = None
        self._pending_units = 0.0
        self._pending_mode = None

    def _normalised_grads(
        self, named: Sequence[tuple[str, torch.nn.Parameter]]
    ) -> list[torch.Tensor]:
        """The pending gradient of each parameter of ``named``, normalised per active unit
        unless it was made with ``skip_token_normalization`` (new tensors; zeros where none)."""
        divisor = 1.0 if self._pending_mode != "mean" else max(self._pending_units, 1.0)
        return [p.grad / divisor if p.grad is not None else torch.zeros_like(p) for _k, p in named]

    def _adam_update(
        self,
        named: Sequence[tuple[str, torch.nn.Parameter]],
        grads: Sequence[torch.Tensor],
        params: AdamParams,
    ) -> None:
        """AdamW, as ``torch.optim.AdamW`` (single-tensor path) computes it."""
        t = self._step + 1
        lr, beta1, beta2 = params.learning_rate, params.beta1, params.beta2
        bias1 = 1.0 - beta1**t
        bias2_sqrt = math.sqrt(1.0 - beta2**t)
        with torch.no_grad():
            for (key, param), grad in zip(named, grads, strict=True):
                exp_avg, exp_avg_sq = self._exp_avg[key], self._exp_avg_sq[key]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if params.weight_decay:
                    param.mul_(1.0 - lr * params.weight_decay)
                denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(params.eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias1)

    def _non_finite(self, *, discard: bool) -> InvalidRequest:
        """The error for a loss or metric that is not finite. ``discard``: earlier micro-batches
        of the call are already in the gradient buffer, which is then cleared."""
        if discard:
            self._clear_grads()
        return InvalidRequest(
            "loss_fn_inputs / loss_fn_config: the loss or a metric is not finite (NaN or inf): "
            "values too large for float32, or an adapter with non-finite weights (load a "
            "checkpoint or call init_trainer_server)"
            + ("; the accumulated gradient was discarded" if discard else "")
        )

    def _micro_batches(self, prepared: PreparedRequest) -> list[tuple[int, int]]:
        """Contiguous ``[start, end)`` ranges of datums under the logits budget (``dpo`` pairs
        are never split)."""
        step = 2 if LOSS_SPECS[prepared.loss_fn].paired else 1
        lengths = [int(d.tokens.shape[0]) for d in prepared.data]
        ranges: list[tuple[int, int]] = []
        start = 0
        while start < len(lengths):
            end = start + step
            longest = max(lengths[start:end])
            while end < len(lengths):
                candidate = max(longest, *lengths[end : end + step])
                if (end + step - start) * candidate * self._vocab > self.max_logits_per_batch:
                    break
                longest = candidate
                end += step
            ranges.append((start, end))
            start = end
        return ranges

    def _collate(
        self, batch: Sequence[PreparedDatum]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Right-pad a micro-batch: ``(input ids (B, T), targets (B, T, K), inputs (B, T, K))``;
        padding has target ``-100``."""
        n_max = max(int(d.tokens.shape[0]) for d in batch)
        k_max = max(d.targets.shape[1] if d.targets.ndim == 2 else 1 for d in batch)
        ids = np.full((len(batch), n_max), self._pad_id, dtype=np.int64)
        targets = np.full((len(batch), n_max, k_max), IGNORE_INDEX, dtype=np.int64)
        names = sorted({name for d in batch for name in d.inputs})
        inputs = {name: np.zeros((len(batch), n_max, k_max), dtype=np.float32) for name in names}
        for row, datum in enumerate(batch):
            n = int(datum.tokens.shape[0])
            tgt = datum.targets.reshape(n, -1)
            k = tgt.shape[1]
            ids[row, :n] = datum.tokens
            targets[row, :n, :k] = tgt
            for name in names:
                value = datum.inputs.get(name)
                if value is None:
                    inputs[name][row, :n, :k] = _INPUT_DEFAULTS.get(name, 0.0)
                else:
                    inputs[name][row, :n, :k] = value.reshape(n, -1)
        return (
            torch.from_numpy(ids),
            torch.from_numpy(targets),
            {name: torch.from_numpy(arr) for name, arr in inputs.items()},
        )

    def _run(
        self, prepared: PreparedRequest, *, backward: bool
    ) -> tuple[ForwardBackwardOutput, float]:
        loss_fn = LOSS_FUNCTIONS[prepared.loss_fn]
        top_k = prepared.top_k_logprobs
        outputs: list[dict[str, _TensorData]] = []
        loss_total = 0.0
        units_total = 0.0
        metric_sums: dict[str, float] = {}
        for start, end in self._micro_batches(prepared):
            batch = prepared.data[start:end]
            ids, targets, inputs = self._collate(batch)
            valid = targets != IGNORE_INDEX
            grad_mode: AbstractContextManager[Any] = (
                torch.enable_grad() if backward else torch.no_grad()
            )
            with grad_mode:
                logits = self.model(input_ids=ids, use_cache=False).logits.float()
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                all_lp = torch.gather(logits, -1, targets.clamp(min=0)) - log_norm
                lp = torch.where(valid, all_lp, torch.zeros_like(all_lp))
                result = loss_fn(lp, valid, inputs, prepared.config)
                loss_sum = float(result.loss_sum.detach().item())
                if not all(map(math.isfinite, (loss_sum, *result.metric_sums.values()))):
                    raise self._non_finite(discard=backward and start > 0)
                if backward:
                    torch.autograd.backward(result.loss_sum)
            loss_total += loss_sum
            units_total += result.active
            for name, value in result.metric_sums.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
            with torch.no_grad():
                lp_out = torch.where(valid, all_lp.detach(), torch.full_like(all_lp, math.nan))
                lp_np = lp_out.numpy()
                if top_k:
                    top_vals, top_ids = torch.topk((logits - log_norm).detach(), top_k, dim=-1)
                    top_vals_np, top_ids_np = top_vals.numpy(), top_ids.numpy()
            for row, datum in enumerate(batch):
                n = int(datum.tokens.shape[0])
                k = datum.targets.shape[1] if datum.targets.ndim == 2 else 1
                record = {"logprobs": _tensor(lp_np[row, :n, :k], datum.target_shape, "float32")}
                if top_k:
                    record["top_k_logprobs"] = _tensor(top_vals_np[row, :n], (n, top_k), "float32")
                    record["top_k_token_ids"] = _tensor(top_ids_np[row, :n], (n, top_k), "int64")
                outputs.append(record)
        mean = loss_total / units_total if units_total > 0 else 0.0
        metrics = {"loss": mean}
        for name, value in metric_sums.items():
            metrics[name] = value / units_total if units_total > 0 else 0.0
        if prepared.skip_token_normalization:
            metrics["skip_token_normalization"] = 1.0
        out = ForwardBackwardOutput(
            loss=mean,
            loss_fn_output_type=_OUTPUT_TYPE,
            loss_fn_outputs=outputs,
            metrics=metrics,
        )
        return out, units_total


def _tensor(values: np.ndarray[Any, Any], shape: Sequence[int], dtype: str) -> _TensorData:
    arr = np.ascontiguousarray(values).reshape(tuple(shape))
    return _TensorData(data=arr.ravel().tolist(), dtype=dtype, shape=list(arr.shape))


def _read_step(state_file: Path) -> int:
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = state["step"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest(f"path: {state_file.name} is unreadable") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidRequest(f"path: {state_file.name} has an invalid step {step!r}")
    return step
