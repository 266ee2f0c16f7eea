"""Tokenizers for base models: the built-in ones ship as package data, others come from
``transformers``.

The built-in model ``loops-local/tiny-chat`` has a byte-level BPE tokenizer (1024 tokens, digits
split one per token) in ``loops_async/assets/tiny-chat``, built by
``scripts/build_tiny_chat_tokenizer.py``. Its chat format is::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

with ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|end|>`` = 2 (the EOS token), ``<|user|>`` = 3,
``<|assistant|>`` = 4, ``<|system|>`` = 5. Plain ``encode`` adds no special tokens; the chat
template adds ``<|bos|>``.

``transformers`` is imported lazily (inside :func:`load_tokenizer`) so ``import loops_async``
stays fast; loading a built-in tokenizer does not import torch.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BUILTIN_TOKENIZERS", "builtin_tokenizer_dir", "load_tokenizer"]

BUILTIN_TOKENIZERS: dict[str, str] = {"loops-local/tiny-chat": "tiny-chat"}
"""Built-in base model name -> directory under ``loops_async/assets``."""


def builtin_tokenizer_dir(base_model: str) -> Path:
    """The directory holding the tokenizer files of the built-in model ``base_model``.

    Raises ``KeyError`` for a name that is not built in.
    """
    asset = BUILTIN_TOKENIZERS[base_model]
    return _asset_dir(asset)


@functools.cache
def _asset_dir(asset: str) -> Path:
    root = resources.files("loops_async").joinpath("assets").joinpath(asset)
    if isinstance(root, Path):
        return root
    # Package imported from a zip file or similar: copy the few files to a real directory,
    # which is what ``from_pretrained`` needs. Kept for the life of the process.
    target = Path(tempfile.mkdtemp(prefix=f"loops-async-{asset}-"))
    for entry in root.iterdir():
        if entry.is_file():
            with entry.open("rb") as src, (target / entry.name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


@functools.lru_cache(maxsize=16)
def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    """Return the ``transformers`` tokenizer of ``base_model`` (cached per name).

    A built-in name (see :data:`BUILTIN_TOKENIZERS`) loads from package data, offline. Any other
    name is passed to ``transformers.AutoTokenizer.from_pretrained``: a local model directory, or
    a Hugging Face hub id (from the local cache, or downloaded when the hub is reachable).

    Raises ``ValueError`` naming the model when the tokenizer cannot be loaded.
    """
    if base_model in BUILTIN_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        tok: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(
            str(builtin_tokenizer_dir(base_model))
        )
        return tok

    from transformers import AutoTokenizer

    directory = Path(base_model).expanduser()
    source = str(directory) if directory.is_dir() else base_model
    try:
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        where = (
            "local directory"
            if directory.is_dir()
            else "Hugging Face hub id (not a local directory; not in the local cache and the hub "
            "could not be reached?)"
        )
        raise ValueError(
            f"cannot load a tokenizer for base model {base_model!r} as a {where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return loaded
