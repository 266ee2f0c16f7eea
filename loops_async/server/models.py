"""Base models the local server knows: the built-in ``loops-local/tiny-chat`` and any local
Hugging Face model directory. Nothing here imports torch; building the torch module is the
torch backend's job."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODELS",
    "TINY_CHAT",
    "InvalidModelError",
    "ModelSpec",
    "UnknownModelError",
    "resolve_model",
]

TINY_CHAT = "loops-local/tiny-chat"

MAX_CONFIG_BYTES = 4 << 20
"""A local model's ``config.json`` larger than this is refused (real ones are a few KiB)."""
_MAX_SIZE = 2**31 - 1
"""Largest vocabulary size or context length accepted from a ``config.json``."""
_DEFAULT_CONTEXT = 2048
"""Context length of a local model whose ``config.json`` names none."""
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
"""``config.json`` keys that give the context length, in order of preference."""


class UnknownModelError(LookupError):
    """The name is not a base model the server can use: neither a built-in model nor a local
    directory with a usable ``config.json``. The HTTP layer answers 422 naming the field."""


class InvalidModelError(UnknownModelError):
    """A local model directory that exists but cannot be used: its ``config.json`` cannot be
    read, is not valid JSON, or does not give a valid vocabulary size and context length."""


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a base model before loading it."""

    name: str
    """The name clients use (``base_model``)."""
    vocab_size: int
    max_seq_len: int
    config: dict[str, Any] = field(default_factory=dict)
    """A Hugging Face ``config.json`` dict (for built-ins, the config the model is built from)."""
    path: Path | None = None
    """The local model directory, or None for a built-in model (built from a fixed seed)."""
    seed: int = 0
    """Seed of a built-in model's weights."""

    @property
    def builtin(self) -> bool:
        """Whether the model is built in (weights from ``seed``, tokenizer from package data)."""
        return self.path is None


# A small Llama-shaped decoder. The tokenizer (package data, loops_async/assets/tiny-chat) has
# at most ``vocab_size`` tokens.
_TINY_CHAT_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

BUILTIN_MODELS: dict[str, ModelSpec] = {
    TINY_CHAT: ModelSpec(
        name=TINY_CHAT,
        vocab_size=_TINY_CHAT_CONFIG["vocab_size"],
        max_seq_len=_TINY_CHAT_CONFIG["max_position_embeddings"],
        config=_TINY_CHAT_CONFIG,
        seed=20260101,
    ),
}


def resolve_model(name: str) -> ModelSpec:
    """The spec of a built-in model name, or of a local directory holding ``config.json``.

    Raises :class:`UnknownModelError` when ``name`` is neither, and its subclass
    :class:`InvalidModelError` when the directory's ``config.json`` cannot be used; never
    anything else, whatever the directory holds."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"unknown base_model {name!r}")
    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        return spec
    config_file = _config_file(name)
    config = _read_config(config_file)
    text_config: dict[str, Any] = config
    if "text_config" in config:
        nested = config["text_config"]
        if not isinstance(nested, dict):
            raise InvalidModelError(
                f"{config_file}: 'text_config' must be a JSON object, got {_shown(nested)}"
            )
        text_config = nested
    vocab_size = _size(config_file, text_config, config, ("vocab_size",), None)
    max_len = _size(config_file, text_config, config, _CONTEXT_KEYS, _DEFAULT_CONTEXT)
    try:
        path = config_file.parent.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        raise InvalidModelError(f"cannot resolve the model directory {name!r}: {exc}") from None
    return ModelSpec(
        name=name, vocab_size=vocab_size, max_seq_len=max_len, config=config, path=path
    )


def _unknown(name: str) -> UnknownModelError:
    known = ", ".join(sorted(BUILTIN_MODELS))
    shown = name if len(name) <= 300 else name[:300] + "..."
    return UnknownModelError(
        f"unknown base_model {shown!r}: not a built-in model ({known}) and not a local "
        "directory with a config.json"
    )


def _config_file(name: str) -> Path:
    """``<name>/config.json`` when it is a regular file (symlinks followed);
    :class:`UnknownModelError` when there is none, :class:`InvalidModelError` when it cannot
    be examined."""
    try:
        config_file = Path(name).expanduser() / "config.json"
        mode = os.stat(config_file).st_mode
    except RuntimeError:  # "~user/..." for an unknown user
        raise _unknown(name) from None
    except ValueError:  # a NUL in the name
        raise _unknown(name) from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            raise _unknown(name) from None
        raise InvalidModelError(
            f"cannot read the model directory {name!r}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISREG(mode):
        raise _unknown(name)
    return config_file


def _read_config(config_file: Path) -> dict[str, Any]:
    """The JSON object in ``config_file`` (at most :data:`MAX_CONFIG_BYTES`, never blocking on a
    FIFO swapped in); :class:`InvalidModelError` otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(config_file, flags)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise InvalidModelError(f"{config_file} is not a regular file")
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InvalidModelError(f"cannot read {config_file}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidModelError(f"{config_file} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise InvalidModelError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{config_file} must hold a JSON object, got {_shown(config)}")
    return config


def _size(
    config_file: Path,
    primary: dict[str, Any],
    fallback: dict[str, Any],
    keys: tuple[str, ...],
    default: int | None,
) -> int:
    """The first of ``keys`` set (not null) in ``primary``, then in ``fallback``, checked to be
    an integer in 1..2**31-1; ``default`` when none is set (:class:`InvalidModelError` when
    ``default`` is None: a required key)."""
    for source in (primary, fallback):
        for key in keys:
            value = source.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
                raise InvalidModelError(
                    f"{config_file}: {key!r} must be an integer in 1..{_MAX_SIZE}, got "
                    f"{_shown(value)}"
                )
            return value
    if default is None:
        raise InvalidModelError(f"{config_file}: no {' or '.join(map(repr, keys))} given")
    return default


def _shown(value: object) -> str:
    """A short description of a JSON value for a message."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = json.dumps(value) if isinstance(value, str | int | float | bool) else repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
