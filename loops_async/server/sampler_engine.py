"""The contract between the sampler machinery and a generation engine (PROTOCOL.md §6-7): what an
engine is given (:class:`GenerationRequest`, :class:`AdapterRef`), what it must implement
(:class:`SamplerEngine`) and the limits engines share. Nothing here imports torch, and nothing
here imports the rest of the sampler machinery: the engines
(:mod:`~loops_async.server.torch_sampler`, :mod:`~loops_async.server.null_sampler`) import only
this module, and :mod:`~loops_async.server.sampler_batcher` drives them through it.

Defaults chosen for the local server (**local** in PROTOCOL.md terms): temperatures below
:data:`GREEDY_EPSILON` are greedy; a batch holds at most :data:`MAX_BATCH_ROWS` sequences;
loaded adapters are kept in an LRU of :data:`ADAPTER_CACHE_SIZE` per engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .._wire import SampleChoice
from .models import ModelSpec

__all__ = [
    "ADAPTER_CACHE_SIZE",
    "GREEDY_EPSILON",
    "MAX_BATCH_ROWS",
    "AdapterRef",
    "EngineFactory",
    "GenerationRequest",
    "SamplerEngine",
    "token_label",
]

GREEDY_EPSILON = 1e-5
"""Temperatures below this are greedy (argmax), as in vLLM."""
MAX_BATCH_ROWS = 256
"""The most sequences (sum of ``n``) one batch holds (an engine may split a batch further to
bound its memory)."""
ADAPTER_CACHE_SIZE = 16
"""Adapters an engine keeps loaded (least recently used first out)."""

_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class GenerationRequest:
    """A validated ``/sample`` request, as an engine runs it."""

    prompt: tuple[int, ...]
    n: int
    temperature: float
    """0 means greedy (any value below :data:`GREEDY_EPSILON` was turned into 0)."""
    top_p: float
    top_k: int | None
    """None: no top-k filter."""
    max_tokens: int
    seed: int | None
    """None: a fresh random seed per request."""
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    logprobs: int
    """Top candidates reported per generated token (0: only the sampled token's logprob)."""
    prompt_logprobs: int | None
    """None: no prompt logprobs; k: the actual token plus the top k per position."""
    tokens_as_ids: bool
    """``logprobs.tokens`` as ``"token_id:<n>"`` (else the decoded token text)."""
    return_token_ids: bool
    """Echo ``prompt_token_ids`` in every choice."""

    @property
    def greedy(self) -> bool:
        """Whether every completion is the argmax continuation."""
        return self.temperature == 0.0

    def choice_seed(self, index: int, base: int) -> int:
        """The generator seed of completion ``index`` (``base`` = the request's seed, or a
        random one): a fixed mix, so completion ``i`` of a seeded request never depends on
        ``n``, on batching or on other requests."""
        return (base + index * _GOLDEN) % 2**64


def token_label(token_id: int, piece: str, as_id: bool) -> str:
    """How a token appears in ``logprobs.tokens``: ``"token_id:<n>"`` or its text."""
    return f"token_id:{token_id}" if as_id else piece


@dataclass(frozen=True)
class AdapterRef:
    """An adapter a request is served with (None stands for the base model)."""

    key: str
    """Identity of the adapter's files: the checkpoint's real directory, unique per save (a
    name saved again is a new key). Requests share a batch only with equal keys."""
    directory: Path
    uri: str
    version: int
    """The policy version it reports (``x-trainers-policy-version``)."""
    field: str
    """Where it came from, for error messages (``X-Checkpoint-Path``, ``model_path``, ...)."""


class SamplerEngine(Protocol):
    """Generation for one base model. The
    :class:`~loops_async.server.sampler_batcher.EngineWorker` calls ``generate`` for one batch
    at a time (from a worker thread when ``blocking``), so an engine needs no locking."""

    blocking: bool
    """Whether ``generate`` does heavy work (then it runs on a worker thread)."""

    def generate(
        self, adapter: AdapterRef | None, requests: Sequence[GenerationRequest]
    ) -> list[list[SampleChoice]]:
        """The choices of every request (``n`` each), all under ``adapter`` (None = base).
        Raises :class:`~loops_async.server.backend.InvalidRequest` when the adapter cannot be
        loaded."""
        ...


EngineFactory = Callable[[ModelSpec], SamplerEngine]
"""Builds the engine of a base model (may block; see
:func:`~loops_async.server.sampler_registry.engine_factory`)."""
