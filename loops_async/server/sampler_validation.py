"""Validation of ``POST {sampler}/sample`` bodies (PROTOCOL.md §6-7): :func:`validate_sample`
turns a decoded :class:`SampleBody` into a
:class:`~loops_async.server.sampler_engine.GenerationRequest` or raises
:class:`~loops_async.server.backend.InvalidRequest` naming the field (a 422).

Defaults chosen for the local server (**local** in PROTOCOL.md terms): ``max_tokens`` absent =
``min(DEFAULT_MAX_TOKENS, context - len(prompt))``; ``n`` at most :data:`MAX_N`;
``logprobs`` / ``prompt_logprobs`` at most :data:`MAX_LOGPROBS`; temperatures below
:data:`~loops_async.server.sampler_engine.GREEDY_EPSILON` are greedy.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from .backend import InvalidRequest
from .sampler_engine import GREEDY_EPSILON, GenerationRequest

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "SampleBody",
    "validate_sample",
]

DEFAULT_MAX_TOKENS = 256
"""Tokens generated when a request gives no ``max_tokens`` (never beyond the context)."""
MAX_N = 128
"""The most completions one request may ask for (``n``)."""
MAX_LOGPROBS = 20
"""The largest ``logprobs`` / ``prompt_logprobs`` (top-k candidates per position)."""
MAX_STOP_STRINGS = 64
"""The most ``stop`` strings one request may give."""
MAX_STOP_STRING_CHARS = 1024
"""The longest ``stop`` string."""
MAX_STOP_TOKEN_IDS = 1024
"""The most ``stop_token_ids`` one request may give."""

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class SampleBody(msgspec.Struct, kw_only=True):
    """What the server decodes from a ``/sample`` body: :class:`~loops_async._wire.SampleRequest`
    with OpenAI-style defaults, plus the optional fields it recognises in order to reject them
    (``structured_outputs``, ``include_routed_experts``, ``model_input_chunks``, ...). Other
    unknown fields are ignored."""

    prompt: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    max_tokens: int | None = None
    seed: int | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    model: str | None = None
    structured_outputs: Any = None
    include_routed_experts: Any = None
    model_input_chunks: Any = None
    stream: Any = None
    echo: Any = None
    lora: Any = None


def _unsupported(body: SampleBody, shared: bool) -> None:
    if body.model_input_chunks not in (None, []):
        raise InvalidRequest(
            "model_input_chunks: image (multi-modal) prompts are not supported by the local "
            "sampler; send token ids in prompt"
        )
    if body.structured_outputs is not None:
        raise InvalidRequest("structured_outputs: not supported by the local sampler")
    if body.include_routed_experts not in (None, False):
        raise InvalidRequest(
            "include_routed_experts: not supported by the local sampler (no mixture-of-experts "
            "routing is recorded)"
        )
    if body.stream not in (None, False):
        raise InvalidRequest("stream: streaming responses are not supported by the local sampler")
    if body.echo not in (None, False):
        raise InvalidRequest("echo: not supported; use prompt_logprobs for the prompt's logprobs")
    if body.lora is not None and not shared:
        raise InvalidRequest(
            "lora: a shared-sampler field; dedicated local samplers take X-Checkpoint-Path"
        )


def validate_sample(
    body: SampleBody, *, context: int, vocab_size: int, shared: bool = False
) -> GenerationRequest:
    """Check a decoded ``/sample`` body against a model with ``context`` positions and
    ``vocab_size`` tokens; raise :class:`InvalidRequest` naming the field. ``lora`` is a field
    of shared samplers only (their caller checks it)."""
    _unsupported(body, shared)
    prompt = body.prompt
    if not prompt:
        raise InvalidRequest("prompt: must hold at least one token id")
    for i, tok in enumerate(prompt):
        if not 0 <= tok < vocab_size:
            raise InvalidRequest(
                f"prompt[{i}]: token id {tok} is outside the vocabulary (0..{vocab_size - 1})"
            )
    if len(prompt) >= context:
        raise InvalidRequest(
            f"prompt: {len(prompt)} tokens leave no room to generate within the model's "
            f"context of {context} tokens"
        )
    if not 1 <= body.n <= MAX_N:
        raise InvalidRequest(f"n: must be in 1..{MAX_N}, got {body.n}")
    temperature = body.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"temperature: must be a finite number >= 0, got {temperature!r}")
    if not (math.isfinite(body.top_p) and 0.0 < body.top_p <= 1.0):
        raise InvalidRequest(f"top_p: must be in (0, 1], got {body.top_p!r}")
    if body.top_k is not None and body.top_k <= 0:
        raise InvalidRequest(
            f"top_k: must be > 0 when given (omit it for no top-k filter), got {body.top_k}"
        )
    room = context - len(prompt)
    if body.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    else:
        if body.max_tokens < 1:
            raise InvalidRequest(f"max_tokens: must be >= 1, got {body.max_tokens}")
        if body.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens: {len(prompt)} prompt tokens + max_tokens {body.max_tokens} exceed "
                f"the model's context of {context} tokens (at most {room})"
            )
        max_tokens = body.max_tokens
    if body.seed is not None and not _SEED_MIN <= body.seed <= _SEED_MAX:
        raise InvalidRequest(f"seed: must be in {_SEED_MIN}..{_SEED_MAX}, got {body.seed}")
    stop: tuple[str, ...]
    if body.stop is None:
        stop = ()
    elif isinstance(body.stop, str):
        stop = (body.stop,)
    else:
        stop = tuple(body.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest(
                f"stop[{i}]: stop strings must have 1..{MAX_STOP_STRING_CHARS} characters"
            )
    stop_ids = body.stop_token_ids or []
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids")
    for i, tok in enumerate(stop_ids):
        if not 0 <= tok < vocab_size:
            raise InvalidRequest(
                f"stop_token_ids[{i}]: token id {tok} is outside the vocabulary "
                f"(0..{vocab_size - 1})"
            )
    logprobs = 0 if body.logprobs is None else body.logprobs
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs: must be in 0..{MAX_LOGPROBS}, got {logprobs}")
    if body.prompt_logprobs is not None and not 0 <= body.prompt_logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(
            f"prompt_logprobs: must be in 0..{MAX_LOGPROBS}, got {body.prompt_logprobs}"
        )
    return GenerationRequest(
        prompt=tuple(prompt),
        n=body.n,
        temperature=0.0 if temperature < GREEDY_EPSILON else float(temperature),
        top_p=float(body.top_p),
        top_k=body.top_k if body.top_k is not None and body.top_k < vocab_size else None,
        max_tokens=max_tokens,
        seed=None if body.seed is None else body.seed % 2**64,
        stop=stop,
        stop_token_ids=frozenset(stop_ids),
        logprobs=logprobs,
        prompt_logprobs=body.prompt_logprobs,
        tokens_as_ids=body.return_tokens_as_token_ids,
        return_token_ids=body.return_token_ids,
    )
