"""Client-side validation: bad input raises :class:`ValidationError` naming the field, before a
sequence number is reserved or a byte is sent. Checks that need the model (vocabulary size,
context length) are the server's, which answers 422."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ValidationError
from .types import (
    FLOAT_DTYPES,
    INT_DTYPES,
    AdamParams,
    Datum,
    EncodedTextChunk,
    ImageChunk,
    ModelInput,
    TensorData,
)

__all__ = [
    "adam_params_problem",
    "check_adam_params",
    "check_api_key",
    "check_checkpoint_name",
    "check_checkpoint_path",
    "check_data",
    "check_loss_fn",
    "check_positive_int",
]

_KNOWN_DTYPES = FLOAT_DTYPES | INT_DTYPES | {"bool"}
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_TOP_K_LOGPROBS = 20


def check_positive_int(value: object, field: str, *, maximum: int | None = None) -> int:
    """``value`` as an int ≥ 1 (and ≤ ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{field}: expected a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValidationError(f"{field}: {value} exceeds the maximum {maximum}")
    return value


def check_tensor(tensor: TensorData, field: str, length: int | None) -> None:
    """A tensor's dtype, shape/data agreement and (when given) first dimension."""
    if tensor.dtype not in _KNOWN_DTYPES:
        raise ValidationError(
            f"{field}: unknown dtype {tensor.dtype!r}; expected one of {sorted(_KNOWN_DTYPES)}"
        )
    shape = tensor.shape if tensor.shape is not None else [len(tensor.data)]
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValidationError(f"{field}: shape must be non-negative integers, got {shape}")
    size = math.prod(shape)
    if size != len(tensor.data):
        raise ValidationError(
            f"{field}: shape {shape} has {size} elements but data has {len(tensor.data)}"
        )
    if length is not None and (not shape or shape[0] != length):
        raise ValidationError(
            f"{field}: first dimension must equal the model input length {length}, "
            f"got shape {shape}"
        )


def _check_model_input(model_input: object, field: str) -> int:
    if not isinstance(model_input, ModelInput):
        raise ValidationError(f"{field}: expected ModelInput, got {type(model_input).__name__}")
    if not model_input.chunks:
        raise ValidationError(f"{field}: empty model input")
    for j, chunk in enumerate(model_input.chunks):
        where = f"{field}.chunks[{j}]"
        if isinstance(chunk, EncodedTextChunk):
            tokens = chunk.tokens
            if not tokens:
                raise ValidationError(f"{where}.tokens: empty token list")
            # min() runs in C; the type check catches floats and strings.
            try:
                smallest = min(tokens)
            except TypeError:
                raise ValidationError(f"{where}.tokens: token ids must be integers") from None
            if not isinstance(smallest, int) or smallest < 0:
                raise ValidationError(
                    f"{where}.tokens: token ids must be non-negative integers, got {smallest!r}"
                )
        elif isinstance(chunk, ImageChunk):
            if chunk.expected_tokens < 1:
                raise ValidationError(f"{where}.expected_tokens: must be positive")
        else:
            raise ValidationError(f"{where}: unknown chunk type {type(chunk).__name__}")
    return model_input.length


def check_data(data: object, loss_fn: str, field: str = "data") -> list[Datum]:
    """A non-empty list of well-formed datums."""
    if isinstance(data, Datum) or not isinstance(data, Sequence) or isinstance(data, str):
        raise ValidationError(f"{field}: expected a list of Datum, got {type(data).__name__}")
    if not data:
        raise ValidationError(f"{field}: empty data list")
    out: list[Datum] = []
    for i, datum in enumerate(data):
        where = f"{field}[{i}]"
        if not isinstance(datum, Datum):
            raise ValidationError(f"{where}: expected Datum, got {type(datum).__name__}")
        length = _check_model_input(datum.model_input, f"{where}.model_input")
        if not isinstance(datum.loss_fn_inputs, dict):
            raise ValidationError(f"{where}.loss_fn_inputs: expected a dict of TensorData")
        for name, tensor in datum.loss_fn_inputs.items():
            key = f"{where}.loss_fn_inputs[{name!r}]"
            if not isinstance(tensor, TensorData):
                raise ValidationError(f"{key}: expected TensorData, got {type(tensor).__name__}")
            check_tensor(tensor, key, length)
        out.append(datum)
    if loss_fn == "dpo" and len(out) % 2:
        raise ValidationError(
            f"{field}: dpo needs chosen/rejected pairs, got an odd number of datums ({len(out)})"
        )
    return out


def check_loss_fn(
    loss_fn: object, loss_fn_config: object, top_k_logprobs: object
) -> tuple[str, dict[str, Any] | None, int]:
    """The loss function name, its config and ``top_k_logprobs`` (0-20)."""
    if not isinstance(loss_fn, str) or not loss_fn:
        raise ValidationError(f"loss_fn: expected a loss function name, got {loss_fn!r}")
    if loss_fn_config is not None:
        if not isinstance(loss_fn_config, dict) or not all(
            isinstance(k, str) for k in loss_fn_config
        ):
            raise ValidationError("loss_fn_config: expected a dict with string keys or None")
        for key, value in loss_fn_config.items():
            if not isinstance(value, bool | int | float):  # flags are booleans
                raise ValidationError(
                    f"loss_fn_config[{key!r}]: expected a number or a boolean, got {value!r}"
                )
    if (
        isinstance(top_k_logprobs, bool)
        or not isinstance(top_k_logprobs, int)
        or not 0 <= top_k_logprobs <= MAX_TOP_K_LOGPROBS
    ):
        raise ValidationError(
            f"top_k_logprobs: expected an integer in 0..{MAX_TOP_K_LOGPROBS}, "
            f"got {top_k_logprobs!r}"
        )
    return loss_fn, loss_fn_config, top_k_logprobs


def adam_params_problem(params: AdamParams) -> str | None:
    """What is wrong with optimizer settings Adam cannot use, naming the field; or None.

    Shared by the client (``ValidationError``) and the local server (422)."""
    rules: list[tuple[str, Callable[[float], bool], str]] = [
        ("learning_rate", lambda v: v >= 0, ">= 0"),
        ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("eps", lambda v: v > 0, "> 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("grad_clip_norm", lambda v: v >= 0, ">= 0"),
    ]
    for name, ok, rule in rules:
        value = getattr(params, name)
        # Types first: comparing a str (or a huge int in isfinite) would raise.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"adam_params.{name}: expected a number, got {value!r}"
        if abs(value) > sys.float_info.max or not math.isfinite(value) or not ok(value):
            return f"adam_params.{name}: must be {rule} and finite, got {value!r}"
    return None


def check_adam_params(params: object) -> AdamParams:
    """Finite, in-range optimizer settings."""
    if not isinstance(params, AdamParams):
        raise ValidationError(f"adam_params: expected AdamParams, got {type(params).__name__}")
    problem = adam_params_problem(params)
    if problem is not None:
        raise ValidationError(problem)
    return params


def check_api_key(api_key: object) -> str:
    """The API key without surrounding whitespace (a key read from a file keeps its newline);
    it must be printable ASCII, like any HTTP header value. Errors never show the key."""
    key = api_key.strip() if isinstance(api_key, str) else None
    if not key or not key.isascii() or not key.isprintable():
        raise ValidationError(
            "api_key: must be a non-empty string of printable ASCII characters (not shown here)"
        )
    return key


def check_checkpoint_name(name: object, field: str = "name") -> str:
    """1-128 characters of ``[A-Za-z0-9._-]``, not starting with ``.``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise ValidationError(
            f"{field}: checkpoint names are 1-128 characters of [A-Za-z0-9._-] "
            f"not starting with '.', got {name!r}"
        )
    return name


def check_checkpoint_path(path: object, field: str = "path") -> str:
    """A ``bt://`` checkpoint URI."""
    if not isinstance(path, str) or not path.startswith("bt://") or len(path) > 1024:
        raise ValidationError(
            f"{field}: expected a checkpoint URI like "
            f"'bt://loops:<run_id>/weights/<name>', got {path!r}"
        )
    return path


def check_load_path(path: object, field: str = "path") -> str:
    """Where ``load_state*`` may load from: a ``bt://`` URI, a ``file://`` URL, an ``s3://``
    URI or a local directory path (sent as given; the server decides what it can read). A
    relative local path is made absolute, since the server does not share our working
    directory."""
    if not isinstance(path, str) or not path.strip() or len(path) > 1024 or "\x00" in path:
        raise ValidationError(
            f"{field}: expected 'bt://loops:<run_id>/weights/<name>', a file:// URL, an "
            f"s3:// URI or a local directory path, got {path!r}"
        )
    if "://" in path:
        scheme = path.split("://", 1)[0]
        if scheme not in ("bt", "file", "s3"):
            raise ValidationError(f"{field}: unsupported scheme {scheme!r} in {path!r}")
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_replicas(value: object, field: str) -> int:
    """A replica count (>= 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{field} must be >= 1, got {value!r}")
    return value


def check_seconds(value: object, field: str, *, allow_none: bool = True) -> float | None:
    """A positive finite number of seconds (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(f"{field}: expected a positive number of seconds, got {value!r}")
    return float(value)


def check_ttl(ttl_seconds: object) -> int | None:
    """``None`` or a positive number of seconds."""
    if ttl_seconds is None:
        return None
    return check_positive_int(ttl_seconds, "ttl_seconds")
