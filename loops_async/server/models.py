"""Base models the local server knows: the built-in ``loops-local/tiny-chat`` and any local
Hugging Face model directory. Nothing here imports torch; building the torch module is the
torch backend's job."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_MODELS", "TINY_CHAT", "ModelSpec", "UnknownModelError", "resolve_model"]

TINY_CHAT = "loops-local/tiny-chat"


class UnknownModelError(LookupError):
    """The name is neither a built-in model nor a local model directory."""


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
    """The spec of a built-in model name, or of a local directory holding ``config.json``."""
    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        return spec
    directory = Path(name).expanduser()
    config_file = directory / "config.json"
    if not config_file.is_file():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise UnknownModelError(
            f"unknown base_model {name!r}: not a built-in model ({known}) and not a local "
            "directory with a config.json"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    text_config = config.get("text_config", config)
    max_len = int(text_config.get("max_position_embeddings") or 2048)
    return ModelSpec(
        name=name,
        vocab_size=int(text_config["vocab_size"]),
        max_seq_len=max_len,
        config=config,
        path=directory.resolve(),
    )
