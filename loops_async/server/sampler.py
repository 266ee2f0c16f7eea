"""Samplers of the local server (PROTOCOL.md §6-7): a facade that re-exports the public names of
the sampler modules, so ``from loops_async.server.sampler import X`` keeps working. Nothing in
the package imports it; code inside the package imports the module that defines a name.

The layout, lowest layer first (each imports only the ones above it; nothing imports torch but
the torch engine):

- :mod:`~loops_async.server.sampler_engine`: the engine contract: :class:`GenerationRequest`,
  :class:`AdapterRef`, the :class:`SamplerEngine` protocol, :data:`EngineFactory`,
  :func:`token_label` and the limits engines share (:data:`GREEDY_EPSILON`,
  :data:`MAX_BATCH_ROWS`, :data:`ADAPTER_CACHE_SIZE`). The engines import only this module.
- :mod:`~loops_async.server.null_sampler`: :class:`NullSamplerEngine`, the ``null`` backend's
  engine; :mod:`~loops_async.server.torch_sampler`: the torch engine (imported only when chosen).
- :mod:`~loops_async.server.sampler_validation`: :class:`SampleBody` and :func:`validate_sample`
  (a ``/sample`` body to a :class:`GenerationRequest`, or a 422 naming the field) with the
  request limits (:data:`DEFAULT_MAX_TOKENS`, :data:`MAX_N`, :data:`MAX_LOGPROBS`, ...).
- :mod:`~loops_async.server.sampler_batcher`: :class:`EngineWorker` (one engine per base model
  and its batcher task), :class:`SamplerError`, :data:`SamplerStatus`,
  :data:`MAX_QUEUED_REQUESTS`.
- :mod:`~loops_async.server.sampler_registry`: :class:`Sampler` records (routing headers to an
  adapter), the :class:`SamplerService` registry (``ServerState.samplers``) and
  :func:`engine_factory`.
- :mod:`~loops_async.server.shared_sampler`: shared (serverless) samplers' operations and adapter
  cache; :mod:`~loops_async.server.sampler_routes`: the HTTP routes.
"""

from __future__ import annotations

from .null_sampler import NullSamplerEngine
from .sampler_batcher import MAX_QUEUED_REQUESTS, EngineWorker, SamplerError, SamplerStatus
from .sampler_engine import (
    ADAPTER_CACHE_SIZE,
    GREEDY_EPSILON,
    MAX_BATCH_ROWS,
    AdapterRef,
    EngineFactory,
    GenerationRequest,
    SamplerEngine,
    token_label,
)
from .sampler_registry import Sampler, SamplerService, engine_factory
from .sampler_validation import (
    DEFAULT_MAX_TOKENS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SampleBody,
    validate_sample,
)

__all__ = [
    "ADAPTER_CACHE_SIZE",
    "DEFAULT_MAX_TOKENS",
    "GREEDY_EPSILON",
    "MAX_BATCH_ROWS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_QUEUED_REQUESTS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "AdapterRef",
    "EngineFactory",
    "EngineWorker",
    "GenerationRequest",
    "NullSamplerEngine",
    "SampleBody",
    "Sampler",
    "SamplerEngine",
    "SamplerError",
    "SamplerService",
    "SamplerStatus",
    "engine_factory",
    "token_label",
    "validate_sample",
]
