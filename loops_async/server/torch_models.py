"""Build the torch module of a base model (:class:`~loops_async.server.models.ModelSpec`).

Built-in models are ``transformers`` models made from their config with weights drawn from the
spec's seed by :func:`init_builtin_weights` — a procedure that does not depend on the
``transformers`` version's own initialisation, so anyone can rebuild the identical base model
with :func:`load_base_model`. A local Hugging Face model directory is loaded with
``AutoModelForCausalLM.from_pretrained`` in float32.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .models import ModelSpec, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "build_model",
    "init_builtin_weights",
    "load_base_model",
    "save_builtin_as_directory",
]


def init_builtin_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of ``model`` deterministically from ``seed``.

    One ``torch.Generator`` seeded once; parameters visited in sorted name order; matrices and
    embeddings (2-D or more) get ``normal(0, 1 / sqrt(shape[-1]))`` (``1 / sqrt(fan_in)`` for a
    linear layer), biases zeros, other vectors (norm scales) ones.

    Why not the usual ``normal(0, 0.02)``: with it, a 128-wide model's output logits can move by
    at most ~2.6 whatever the hidden state (``|w_t| * |h| = 0.02 * 128``), so LoRA on the
    attention and MLP layers cannot push the loss below ~4.3 nats. Fan-in scaling leaves logits
    of order one at initialisation and lets LoRA fine-tuning reach low loss.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.ndim >= 2:
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
                param.copy_(values)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence ``transformers``' per-file progress bars (noise in server logs and tests)."""
    from transformers.utils import logging

    hf_logging: Any = logging  # untyped module
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_model(spec: ModelSpec) -> PreTrainedModel:
    """The float32 causal LM of ``spec``: built from config and seed for a built-in model,
    ``AutoModelForCausalLM.from_pretrained(spec.path)`` for a local directory. In eval mode."""
    import transformers

    auto: Any = transformers  # the Auto* classes are not fully typed
    model: Any
    if spec.path is None:
        config_dict = dict(spec.config)
        model_type = config_dict.pop("model_type")
        config = auto.AutoConfig.for_model(model_type, **config_dict)
        model = auto.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        init_builtin_weights(model, spec.seed)
    else:
        with _no_progress_bars():
            model = auto.AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
    model.eval()
    built: PreTrainedModel = model
    return built


def load_base_model(name: str) -> PreTrainedModel:
    """The base model the local server trains for ``name`` (a built-in name or a local model
    directory), in eval mode — e.g. to load a saved PEFT adapter onto it::

        base = load_base_model("loops-local/tiny-chat")
        model = peft.PeftModel.from_pretrained(base, "path/to/adapter")
    """
    return build_model(resolve_model(name))


def save_builtin_as_directory(name: str, out_dir: Path) -> Path:
    """Write the built-in model ``name`` as a local Hugging Face model directory (``config.json``,
    ``model.safetensors`` and the tokenizer files) at ``out_dir`` and return it. Loading that
    directory gives the same weights as the built-in model."""
    from ..tokenizer import builtin_tokenizer_dir

    spec = resolve_model(name)
    if not spec.builtin:
        raise ValueError(f"{name!r} is not a built-in model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    with _no_progress_bars():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    for file in sorted(builtin_tokenizer_dir(name).iterdir()):
        if file.is_file():
            shutil.copyfile(file, out_dir / file.name)
    return out_dir
