"""Validation of ``forward`` / ``forward_backward`` requests, and the loss-function registry.

Nothing here imports torch: the null backend and the HTTP layer use this module to turn bad input
into a 422 before anything runs, and the torch backend uses :func:`prepare_forward_request` to get
the same checks plus the request's tensors as numpy arrays.

Every error is an :class:`~loops_async.server.backend.InvalidRequest` whose message starts with
the offending field, e.g.
``data[3].loss_fn_inputs['target_tokens']: shape [5] has 5 elements but data has 4``.

The registry (:data:`LOSS_SPECS`) says, for each loss of PROTOCOL.md §5, which
``loss_fn_inputs`` it requires and accepts and which ``loss_fn_config`` keys it knows, with their
defaults. Local choices (PROTOCOL.md "**local**"):

- RL losses (``importance_sampling``, ``ppo``, ``cispo``, ``dro``, ``dppo``) may omit
  ``target_tokens``; it then defaults to the next input token (the last position has no target).
- ``logprobs`` / ``ref_logprobs`` may hold ``null`` (NaN) at inactive positions only; every other
  float input must be finite wherever the target is not ``-100``.
- ``cross_entropy`` accepts ``target_tokens`` of shape ``(N,)`` or ``(N, K)`` (``weights`` then has
  the same shape); every other loss takes ``(N,)`` tensors.
- Unknown ``loss_fn_inputs`` names are rejected (a typo such as ``weight`` would otherwise train on
  every token silently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .._validate import adam_params_problem
from .._wire import ForwardBackwardRequest
from ..types import AdamParams, ArrayData, EncodedTextChunk, ImageChunk
from .backend import InvalidRequest
from .models import ModelSpec

__all__ = [
    "IGNORE_INDEX",
    "KNOWN_DTYPES",
    "LOSS_SPECS",
    "MAX_LORA_RANK",
    "MAX_TOP_K_LOGPROBS",
    "ConfigValue",
    "LossSpec",
    "PreparedDatum",
    "PreparedRequest",
    "prepare_forward_request",
    "resolve_loss_config",
    "validate_adam_params",
    "validate_forward_request",
    "validate_lora_rank",
]

IGNORE_INDEX = -100
"""A ``target_tokens`` value that marks a position without a target."""

MAX_TOP_K_LOGPROBS = 20
"""The largest ``top_k_logprobs`` a request may ask for."""

MAX_LORA_RANK = 256
"""The largest LoRA rank the local trainer accepts."""

KNOWN_DTYPES: tuple[str, ...] = (
    "int64",
    "int32",
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "bool",
)
"""The wire dtypes of PROTOCOL.md §4."""

_INT_DTYPES = frozenset({"int64", "int32"})
_G = TypeVar("_G", bound=np.generic)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Config values and float inputs must fit the trainer's float32 arithmetic."""

ConfigValue = float | bool
"""A ``loss_fn_config`` value: a number, or a flag."""


@dataclass(frozen=True)
class LossSpec:
    """What one loss function takes: its inputs, its config keys (with defaults) and its rules."""

    name: str
    required_inputs: tuple[str, ...]
    """``loss_fn_inputs`` names that must be present."""
    optional_inputs: tuple[str, ...] = ()
    """``loss_fn_inputs`` names that may be present."""
    config_defaults: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Known ``loss_fn_config`` keys and their defaults (a bool default means a bool key)."""
    multi_target: bool = False
    """Whether ``target_tokens`` may be 2-D ``(N, K)`` (cross-entropy over K targets)."""
    paired: bool = False
    """Whether datums come in (chosen, rejected) pairs (``dpo``)."""
    summary: str = ""
    """The per-token loss, for documentation and error messages."""

    @property
    def known_inputs(self) -> tuple[str, ...]:
        """Every accepted ``loss_fn_inputs`` name."""
        return self.required_inputs + self.optional_inputs


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

LOSS_SPECS: Mapping[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            name="cross_entropy",
            required_inputs=("target_tokens",),
            optional_inputs=("weights",),
            config_defaults={"skip_token_normalization": False},
            multi_target=True,
            summary="-w * lp",
        ),
        LossSpec(
            name="importance_sampling",
            required_inputs=("logprobs", "advantages"),
            optional_inputs=("target_tokens",),
            summary="-r * A",
        ),
        LossSpec(
            name="ppo",
            required_inputs=("logprobs", "advantages"),
            optional_inputs=("target_tokens",),
            config_defaults=dict(_CLIP),
            summary="-min(r * A, clip(r, low, high) * A)",
        ),
        LossSpec(
            name="cispo",
            required_inputs=("logprobs", "advantages"),
            optional_inputs=("target_tokens",),
            config_defaults=dict(_CLIP),
            summary="-stopgrad(clip(r, low, high)) * lp * A",
        ),
        LossSpec(
            name="dro",
            required_inputs=("logprobs", "advantages"),
            optional_inputs=("target_tokens",),
            config_defaults={"beta": 0.05},
            summary="-(lp * A - beta / 2 * (lp - q)^2)",
        ),
        LossSpec(
            name="dpo",
            required_inputs=("target_tokens", "ref_logprobs"),
            optional_inputs=("weights",),
            config_defaults={"beta": 0.1, "label_smoothing": 0.0},
            paired=True,
            summary="per pair: -(1-ls) log sigmoid(beta * delta) - ls log sigmoid(-beta * delta)",
        ),
        LossSpec(
            name="dppo",
            required_inputs=("logprobs", "advantages"),
            optional_inputs=("target_tokens",),
            config_defaults={
                "dppo_mask_high": 0.2,
                "dppo_mask_low": 0.2,
                "adv_tau": 1.0,
                "kl_tau": 1e-3,
            },
            summary="-keep * adv_tau * r * A + kl_tau * (lp - q)^2",
        ),
    )
}
"""The loss functions of PROTOCOL.md §5, by name."""

# Inputs that may be null (NaN) at inactive positions.
_NAN_AT_INACTIVE = frozenset({"logprobs", "ref_logprobs"})


@dataclass(frozen=True)
class PreparedDatum:
    """One validated datum as numpy arrays."""

    tokens: npt.NDArray[np.int64]
    """The input token ids, shape ``(N,)``."""
    targets: npt.NDArray[np.int64]
    """Target ids, shape ``(N,)`` or ``(N, K)``; ``-100`` where there is no target."""
    inputs: dict[str, npt.NDArray[np.float32]]
    """The float ``loss_fn_inputs`` (``weights``, ``logprobs``, ``advantages``,
    ``ref_logprobs``), shaped like ``targets``."""
    target_shape: tuple[int, ...]
    """Shape of ``targets`` (what the ``logprobs`` output is shaped like)."""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated ``forward`` / ``forward_backward`` request."""

    loss_fn: str
    config: dict[str, ConfigValue]
    """The full ``loss_fn_config`` with defaults filled in."""
    data: list[PreparedDatum]
    top_k_logprobs: int

    @property
    def skip_token_normalization(self) -> bool:
        """Whether the loss is summed as it is instead of normalised per active token."""
        return bool(self.config.get("skip_token_normalization", False))


# --------------------------------------------------------------------------- entry points


def validate_forward_request(req: ForwardBackwardRequest, spec: ModelSpec) -> None:
    """Raise :class:`InvalidRequest` when ``req`` can never run on the model ``spec``.

    Checks the datum list, token ids and lengths, chunk types, ``loss_fn`` and its config keys,
    the presence, dtype, shape and values of ``loss_fn_inputs``, ``top_k_logprobs`` and the
    pairing rule of ``dpo``. Costs a numpy conversion of one datum at a time (never a second
    copy of the whole request), no model work.
    """
    loss, _config, _top_k = _check_request(req)
    for i, datum in enumerate(req.data):
        _prepare_datum(i, datum, loss, spec)


def prepare_forward_request(req: ForwardBackwardRequest, spec: ModelSpec) -> PreparedRequest:
    """Validate ``req`` like :func:`validate_forward_request` and return its arrays."""
    loss, config, top_k = _check_request(req)
    data = [_prepare_datum(i, datum, loss, spec) for i, datum in enumerate(req.data)]
    return PreparedRequest(loss_fn=req.loss_fn, config=config, data=data, top_k_logprobs=top_k)


def _check_request(req: ForwardBackwardRequest) -> tuple[LossSpec, dict[str, ConfigValue], int]:
    """The request-level checks (before any datum's): the loss, its config, ``top_k_logprobs``
    and the datum count."""
    loss = LOSS_SPECS.get(req.loss_fn)
    if loss is None:
        raise InvalidRequest(
            f"loss_fn: unknown loss function {req.loss_fn!r}; known: {', '.join(LOSS_SPECS)}"
        )
    config = resolve_loss_config(req.loss_fn, req.loss_fn_config)
    top_k = req.top_k_logprobs
    if (
        isinstance(top_k, bool)
        or not isinstance(top_k, int)
        or not 0 <= top_k <= MAX_TOP_K_LOGPROBS
    ):
        raise InvalidRequest(
            f"top_k_logprobs: must be an integer in 0..{MAX_TOP_K_LOGPROBS}, got {top_k!r}"
        )
    if not req.data:
        raise InvalidRequest("data: empty list; send at least one datum")
    if loss.paired and len(req.data) % 2:
        raise InvalidRequest(
            f"data: loss_fn 'dpo' takes (chosen, rejected) pairs interleaved, so an even number "
            f"of datums; got {len(req.data)}"
        )
    return loss, config, top_k


def resolve_loss_config(loss_fn: str, config: Mapping[str, Any] | None) -> dict[str, ConfigValue]:
    """Return ``config`` merged over the defaults of ``loss_fn``; raise
    :class:`InvalidRequest` for an unknown loss, unknown keys or bad values."""
    loss = LOSS_SPECS.get(loss_fn)
    if loss is None:
        raise InvalidRequest(
            f"loss_fn: unknown loss function {loss_fn!r}; known: {', '.join(LOSS_SPECS)}"
        )
    out: dict[str, ConfigValue] = dict(loss.config_defaults)
    if config is None:
        return out
    if not isinstance(config, Mapping):
        raise InvalidRequest(f"loss_fn_config: expected an object or null, got {config!r}")
    for key, value in config.items():
        if key not in loss.config_defaults:
            known = ", ".join(sorted(loss.config_defaults)) or "none"
            raise InvalidRequest(
                f"loss_fn_config: unknown key {key!r} for loss_fn {loss_fn!r}; known keys: {known}"
            )
        default = loss.config_defaults[key]
        where = f"loss_fn_config[{key!r}]"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{where}: expected true or false, got {value!r}")
            out[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{where}: expected a number, got {value!r}")
        number = float(value) if abs(value) <= _FLOAT32_MAX else math.inf
        if not math.isfinite(number):
            shown = repr(value) if len(repr(value)) <= 40 else "(too large)"
            raise InvalidRequest(f"{where}: must be finite and fit a float32, got {shown}")
        if number < 0:
            raise InvalidRequest(f"{where}: must be >= 0, got {value!r}")
        out[key] = number
    _check_config_relations(loss_fn, out)
    return out


def _check_config_relations(loss_fn: str, config: Mapping[str, ConfigValue]) -> None:
    if "clip_low_threshold" in config:
        low, high = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
        if low > high:
            raise InvalidRequest(
                f"loss_fn_config: clip_low_threshold ({low}) must not exceed "
                f"clip_high_threshold ({high})"
            )
    if loss_fn == "dpo":
        if float(config["beta"]) <= 0:
            raise InvalidRequest("loss_fn_config['beta']: must be > 0 for dpo")
        if float(config["label_smoothing"]) > 0.5:
            raise InvalidRequest("loss_fn_config['label_smoothing']: must be in [0, 0.5]")


def validate_adam_params(params: AdamParams) -> None:
    """Raise :class:`InvalidRequest` for optimizer settings Adam cannot use (negative or
    non-finite learning rate, betas outside ``[0, 1)``, ``eps <= 0`` (0 / 0 on a parameter with
    no gradient yet), negative weight decay or clip norm)."""
    problem = adam_params_problem(params)
    if problem is not None:
        raise InvalidRequest(problem)


def validate_lora_rank(rank: int) -> None:
    """Raise :class:`InvalidRequest` unless ``rank`` is an integer in ``1..MAX_LORA_RANK``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidRequest(f"lora_rank: must be an integer in 1..{MAX_LORA_RANK}, got {rank!r}")


# --------------------------------------------------------------------------- per datum


def _prepare_datum(index: int, datum: Any, loss: LossSpec, spec: ModelSpec) -> PreparedDatum:
    where = f"data[{index}]"
    tokens = _prepare_tokens(where, datum.model_input, spec)
    n = int(tokens.shape[0])
    raw_inputs: Mapping[str, Any] = datum.loss_fn_inputs
    if not isinstance(raw_inputs, Mapping):
        raise InvalidRequest(f"{where}.loss_fn_inputs: expected an object of tensors")
    for name in raw_inputs:
        if name not in loss.known_inputs:
            raise InvalidRequest(
                f"{where}.loss_fn_inputs[{name!r}]: not an input of loss_fn {loss.name!r}; "
                f"it takes {', '.join(repr(k) for k in loss.known_inputs)}"
            )
    for name in loss.required_inputs:
        if name not in raw_inputs:
            raise InvalidRequest(
                f"{where}.loss_fn_inputs: missing {name!r}, required by loss_fn {loss.name!r} "
                f"(required: {', '.join(repr(k) for k in loss.required_inputs)})"
            )

    # Targets: given, or (RL losses) the next input token.
    if "target_tokens" in raw_inputs:
        tw = f"{where}.loss_fn_inputs['target_tokens']"
        targets = _as_int_array(tw, raw_inputs["target_tokens"])
        if targets.ndim == 0 or targets.ndim > (2 if loss.multi_target else 1):
            allowed = "(N,) or (N, K)" if loss.multi_target else "(N,)"
            raise InvalidRequest(
                f"{tw}: shape {list(targets.shape)} is not {allowed} for loss_fn {loss.name!r}"
            )
        _check_first_dim(tw, targets.shape, n)
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= spec.vocab_size))
        if bad.any():
            value = int(targets[bad].flat[0])
            raise InvalidRequest(
                f"{tw}: token id {value} is outside the vocabulary [0, {spec.vocab_size}) "
                f"(use {IGNORE_INDEX} to mark a position without a target)"
            )
    else:
        targets = np.full(n, IGNORE_INDEX, dtype=np.int64)
        targets[:-1] = tokens[1:]
    valid = targets != IGNORE_INDEX

    inputs: dict[str, npt.NDArray[np.float32]] = {}
    for name, value in raw_inputs.items():
        if name == "target_tokens":
            continue
        iw = f"{where}.loss_fn_inputs[{name!r}]"
        arr = _as_float_array(iw, value)
        if arr.shape != targets.shape:
            _check_first_dim(iw, arr.shape, n)
            raise InvalidRequest(
                f"{iw}: shape {list(arr.shape)} does not match target_tokens shape "
                f"{list(targets.shape)}"
            )
        if name not in _NAN_AT_INACTIVE:
            finite = np.isfinite(arr)
            if not finite[valid].all():
                pos = _first_position(valid & ~finite)
                raise InvalidRequest(
                    f"{iw}: non-finite value (null, NaN or inf) at position {pos}, which has a "
                    "target"
                )
        inputs[name] = arr

    # Reference logprobs may be null only where the position does not count.
    for name in _NAN_AT_INACTIVE:
        arr_opt = inputs.get(name)
        if arr_opt is None:
            continue
        if "advantages" in inputs:
            active = valid & (inputs["advantages"] != 0)
        elif "weights" in inputs:
            active = valid & (inputs["weights"] != 0)
        else:
            active = valid
        bad_mask = active & ~np.isfinite(arr_opt)
        if bad_mask.any():
            pos = _first_position(bad_mask)
            raise InvalidRequest(
                f"{where}.loss_fn_inputs[{name!r}]: non-finite value (null, NaN or inf) at "
                f"position {pos}, which is active"
            )
    return PreparedDatum(
        tokens=tokens, targets=targets, inputs=inputs, target_shape=tuple(targets.shape)
    )


def _prepare_tokens(where: str, model_input: Any, spec: ModelSpec) -> npt.NDArray[np.int64]:
    chunks = getattr(model_input, "chunks", None)
    if not chunks:
        raise InvalidRequest(f"{where}.model_input: empty (no chunks); a datum needs tokens")
    parts: list[Any] = []  # lists of ints, or ArrayData (server/decode.py)
    for j, chunk in enumerate(chunks):
        if isinstance(chunk, ImageChunk):
            raise InvalidRequest(
                f"{where}.model_input.chunks[{j}]: image chunks are not supported by base model "
                f"{spec.name!r} (the local trainer is text-only)"
            )
        if not isinstance(chunk, EncodedTextChunk):
            raise InvalidRequest(
                f"{where}.model_input.chunks[{j}]: unknown chunk {type(chunk).__name__}"
            )
        parts.append(chunk.tokens)
    total = sum(len(p) for p in parts)
    if total == 0:
        raise InvalidRequest(f"{where}.model_input: empty (0 tokens); a datum needs tokens")
    if total > spec.max_seq_len:
        raise InvalidRequest(
            f"{where}.model_input: {total} tokens exceed the context length "
            f"{spec.max_seq_len} of base model {spec.name!r}"
        )
    offset = 0
    out = np.empty(total, dtype=np.int64)
    for j, part in enumerate(parts):
        try:
            arr = (
                part.array.astype(np.int64, copy=False)
                if isinstance(part, ArrayData) and part.array.dtype.kind == "i"
                else np.asarray(part, dtype=np.int64)
            )
        except (OverflowError, TypeError, ValueError):
            raise InvalidRequest(
                f"{where}.model_input.chunks[{j}].tokens: token ids must be integers in "
                f"[0, {spec.vocab_size})"
            ) from None
        if arr.size and (arr.min() < 0 or arr.max() >= spec.vocab_size):
            bad = arr[(arr < 0) | (arr >= spec.vocab_size)]
            raise InvalidRequest(
                f"{where}.model_input.chunks[{j}].tokens: token id {int(bad[0])} is outside "
                f"the vocabulary [0, {spec.vocab_size}) of base model {spec.name!r}"
            )
        out[offset : offset + arr.size] = arr
        offset += arr.size
    return out


def _tensor_fields(where: str, value: Any) -> tuple[Any, str, list[int]]:
    """``(data, dtype, shape)`` of a tensor; ``data`` is a list (decoded JSON) or an
    :class:`~loops_async.types.ArrayData` (a caller in this process built it from numpy)."""
    data = getattr(value, "data", None)
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if not isinstance(data, list | ArrayData) or not isinstance(dtype, str):
        raise InvalidRequest(f"{where}: expected a tensor {{data, dtype, shape}}")
    if dtype not in KNOWN_DTYPES:
        raise InvalidRequest(
            f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(KNOWN_DTYPES)}"
        )
    if shape is None:
        shape = [len(data)]
    if not isinstance(shape, list) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
    ):
        raise InvalidRequest(f"{where}: shape {shape!r} must be a list of non-negative integers")
    size = math.prod(shape)
    if size != len(data):
        raise InvalidRequest(
            f"{where}: shape {list(shape)} has {size} elements but data has {len(data)}"
        )
    return data, dtype, shape


def _as_float64(where: str, data: Any) -> npt.NDArray[np.float64]:
    if isinstance(data, ArrayData):
        return data.array.astype(np.float64)
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{where}: data must be numbers (or null)") from None


def _as_int_array(where: str, value: Any) -> npt.NDArray[np.int64]:
    data, dtype, shape = _tensor_fields(where, value)
    if dtype not in _INT_DTYPES:
        raise InvalidRequest(f"{where}: dtype {dtype!r} is not an integer dtype (int64 or int32)")
    floats = _as_float64(where, data)
    ints = np.zeros(floats.shape, dtype=np.int64)
    fits = np.abs(floats) < 2.0**63  # False for NaN and inf; casting those would warn
    ints[fits] = floats[fits].astype(np.int64)
    if not fits.all() or (ints != floats).any():
        raise InvalidRequest(f"{where}: data must be integers (no null or fractional values)")
    return _reshape(where, ints, shape)


def _as_float_array(where: str, value: Any) -> npt.NDArray[np.float32]:
    data, _dtype, shape = _tensor_fields(where, value)
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, rejected where it counts
        floats = _as_float64(where, data).astype(np.float32)
    return _reshape(where, floats, shape)


def _reshape(where: str, arr: npt.NDArray[_G], shape: list[int]) -> npt.NDArray[_G]:
    try:
        return arr.reshape(shape)
    except ValueError:  # too many dimensions, or a product that overflows (with a 0 in it)
        raise InvalidRequest(f"{where}: shape {shape} is not a valid tensor shape") from None


def _check_first_dim(where: str, shape: tuple[int, ...], n: int) -> None:
    if not shape or shape[0] != n:
        first = shape[0] if shape else "none (a scalar)"
        raise InvalidRequest(
            f"{where}: first dimension {first} does not match model_input.length {n} "
            "(one entry per input position)"
        )


def _first_position(mask: npt.NDArray[np.bool_]) -> int | list[int]:
    idx = np.argwhere(mask)[0]
    return int(idx[0]) if idx.size == 1 else [int(i) for i in idx]
