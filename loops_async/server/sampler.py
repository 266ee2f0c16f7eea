"""Samplers of the local server (PROTOCOL.md §6-7): request validation, adapter routing, and the
batching queue in front of a generation engine. Nothing here imports torch.

Pieces:

- :func:`validate_sample` turns a ``POST {sampler}/sample`` body into a
  :class:`GenerationRequest` or raises :class:`~loops_async.server.backend.InvalidRequest` naming
  the field (a 422).
- A :class:`Sampler` is one ``POST /samplers`` record: *paired* with a run (it serves the run's
  live published adapter; version 0, nothing published, is the base model) or *standalone* (a
  base model, or the adapter of a ``model_path`` checkpoint). :meth:`Sampler.route` applies the
  routing headers (``X-Min-Policy-Version``, ``X-Checkpoint-Path``) and picks the adapter that
  serves a request, or raises :class:`SamplerError` 408 while the live adapter is behind the
  floor.
- An :class:`EngineWorker` owns one generation engine (one per base model, shared by all its
  samplers) and one batcher task: requests wait in an anyio memory-object stream; the batcher
  takes the oldest pending request and every other pending request with the same adapter (up to
  :data:`MAX_BATCH_ROWS` sequences) and runs them as one batch on a worker thread (the torch
  engine) or inline (the ``null`` engine). Requests with different adapters never share a batch.
- :class:`SamplerService` is the registry the HTTP layer uses (``ServerState.samplers``).
- A *shared* (serverless) sampler (``shared=True``: ``model_id`` and ``deployment_id`` null)
  speaks the operation protocol and caches adapters by name; see
  :mod:`~loops_async.server.shared_sampler`.

Defaults chosen for the local server (**local** in PROTOCOL.md terms): ``max_tokens`` absent =
``min(DEFAULT_MAX_TOKENS, context - len(prompt))``; ``n`` at most :data:`MAX_N`;
``logprobs`` / ``prompt_logprobs`` at most :data:`MAX_LOGPROBS`; temperatures below
:data:`GREEDY_EPSILON` are greedy; loaded adapters are kept in an LRU of
:data:`ADAPTER_CACHE_SIZE` per engine.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from .._wire import ChoiceLogprobs, PromptLogprob, SampleChoice
from .backend import InvalidRequest
from .hosted import SamplerColdStart
from .models import ModelSpec
from .storage import CheckpointRef, Storage, parse_checkpoint_uri

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from .runs import Run
    from .settings import ServerSettings
    from .shared_sampler import AdapterNameCache, SampleOperations

__all__ = [
    "ADAPTER_CACHE_SIZE",
    "DEFAULT_MAX_TOKENS",
    "GREEDY_EPSILON",
    "MAX_BATCH_ROWS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_QUEUED_REQUESTS",
    "AdapterRef",
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

logger = logging.getLogger("loops_async.server")

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
GREEDY_EPSILON = 1e-5
"""Temperatures below this are greedy (argmax), as in vLLM."""
MAX_BATCH_ROWS = 256
"""The most sequences (sum of ``n``) one batch holds (an engine may split a batch further to
bound its memory)."""
ADAPTER_CACHE_SIZE = 16
"""Adapters an engine keeps loaded (least recently used first out)."""
MAX_QUEUED_REQUESTS = 65536
"""Requests one engine queues before it answers 503 (``Retry-After``)."""

SamplerStatus = Literal["DEPLOYING", "ACTIVE", "DEPLOY_FAILED"]
"""What ``GET /v1/models/<model_id>/deployments/<deployment_id>`` reports."""

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class SamplerError(Exception):
    """A sampler answer other than 200 or 422: ``status`` with ``{"detail": ...}``."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        error_class: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.error_class = error_class
        """Set when the answer is final (shutdown, failed load): clients then stop retrying."""


# --------------------------------------------------------------------------- request


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


def token_label(token_id: int, piece: str, as_id: bool) -> str:
    """How a token appears in ``logprobs.tokens``: ``"token_id:<n>"`` or its text."""
    return f"token_id:{token_id}" if as_id else piece


# --------------------------------------------------------------------------- engines


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
    """Generation for one base model. The :class:`EngineWorker` calls ``generate`` for one batch
    at a time (from a worker thread when ``blocking``), so an engine needs no locking."""

    blocking: bool
    """Whether ``generate`` does heavy work (then it runs on a worker thread)."""

    def generate(
        self, adapter: AdapterRef | None, requests: Sequence[GenerationRequest]
    ) -> list[list[SampleChoice]]:
        """The choices of every request (``n`` each), all under ``adapter`` (None = base).
        Raises :class:`InvalidRequest` when the adapter cannot be loaded."""
        ...


EngineFactory = Callable[[ModelSpec], SamplerEngine]


def engine_factory(settings: ServerSettings) -> tuple[EngineFactory, bool]:
    """The engine builder for ``settings.backend`` and whether building blocks (then it runs on
    a worker thread). The torch engine is imported only here, only when chosen."""
    if settings.backend == "null":
        return NullSamplerEngine, False

    def build_torch(spec: ModelSpec) -> SamplerEngine:
        from .torch_sampler import TorchSamplerEngine

        return TorchSamplerEngine(spec)

    return build_torch, True


class NullSamplerEngine:
    """Instant, right-shaped answers without a model (the ``null`` backend, for benchmarks).

    Every completion is ``max_tokens`` copies of :attr:`token_id` with logprob 0.0 and
    ``finish_reason`` ``"length"`` (``"stop"`` after one token when that id is in
    ``stop_token_ids``); ``text`` is empty and ``logprobs.tokens`` are always
    ``"token_id:<n>"`` (there is no tokenizer); prompt logprobs are 0.0 with rank 1.
    """

    blocking = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.token_id = min(10, spec.vocab_size - 1)
        """The id every completion repeats."""

    def generate(
        self, adapter: AdapterRef | None, requests: Sequence[GenerationRequest]
    ) -> list[list[SampleChoice]]:
        """Synthetic choices for every request."""
        out: list[list[SampleChoice]] = []
        tok = self.token_id
        for req in requests:
            stops = tok in req.stop_token_ids
            count = 1 if stops else req.max_tokens
            label = token_label(tok, "", as_id=True)  # no tokenizer: ids even when not asked
            prompt_lps: list[dict[str, PromptLogprob] | None] | None = None
            if req.prompt_logprobs is not None:
                prompt_lps = [None] + [
                    {str(t): PromptLogprob(logprob=0.0, rank=1, decoded_token="")}
                    for t in req.prompt[1:]
                ]
            choices = []
            for _ in range(req.n):
                top = [{label: 0.0}] * count if req.logprobs else None
                choices.append(
                    SampleChoice(
                        logprobs=ChoiceLogprobs(
                            tokens=[label] * count,
                            token_logprobs=[0.0] * count,
                            top_logprobs=top,
                        ),
                        text="",
                        finish_reason="stop" if stops else "length",
                        stop_reason=tok if stops else None,
                        token_ids=[tok] * count,
                        prompt_token_ids=list(req.prompt) if req.return_token_ids else None,
                        prompt_logprobs=prompt_lps,
                    )
                )
            out.append(choices)
        return out


# --------------------------------------------------------------------------- batching


@dataclass(eq=False)
class _Job:
    adapter: AdapterRef | None
    request: GenerationRequest
    done: anyio.Event = field(default_factory=anyio.Event)
    result: list[SampleChoice] | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def finish(self, result: list[SampleChoice] | None, error: BaseException | None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


def _adapter_key(adapter: AdapterRef | None) -> str | None:
    return None if adapter is None else adapter.key


class EngineWorker:
    """One engine and its batcher task (see the module docstring). Build it with
    :meth:`SamplerService.worker_for`; :meth:`serve` is its task."""

    def __init__(
        self,
        spec: ModelSpec,
        factory: EngineFactory,
        blocking_build: bool,
        *,
        max_rows: int,
        delay: float = 0.0,
    ) -> None:
        self.spec = spec
        self.delay = delay
        """Seconds each batch waits before it runs (the null backend's test knob)."""
        self.status: SamplerStatus = "DEPLOYING"
        self.load_error: str | None = None
        self.engine: SamplerEngine | None = None
        self.max_rows = max_rows
        self.batches = 0
        """Batches run so far (for tests and diagnostics)."""
        self.largest_batch = 0
        """The most requests one batch held so far."""
        self._factory = factory
        self._blocking_build = blocking_build
        self._queued = 0
        self._closed = False
        send, receive = anyio.create_memory_object_stream[_Job](math.inf)
        self._send: MemoryObjectSendStream[_Job] = send
        self._receive: MemoryObjectReceiveStream[_Job] = receive

    def __repr__(self) -> str:
        return f"<EngineWorker {self.spec.name} {self.status} queued={self._queued}>"

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the batch that runs)."""
        return self._queued

    async def submit(
        self, adapter: AdapterRef | None, request: GenerationRequest
    ) -> list[SampleChoice]:
        """Queue a request and wait for its choices. Raises :class:`SamplerError` (503) when the
        engine failed to load, is shutting down or is full; :class:`InvalidRequest` when the
        adapter cannot be loaded."""
        if self.status == "DEPLOY_FAILED":
            raise SamplerError(
                503,
                f"the sampler's model failed to load: {self.load_error}",
                error_class="SamplerLoadError",
            )
        if self._closed:
            raise SamplerError(
                503, "the server is shutting down", error_class="ServerShutdownError"
            )
        if self._queued >= MAX_QUEUED_REQUESTS:
            raise SamplerError(
                503,
                f"the sampler has {self._queued} requests queued; retry later",
                {"Retry-After": "1"},
            )
        job = _Job(adapter=adapter, request=request)
        try:
            self._send.send_nowait(job)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise SamplerError(
                503, "the sampler stopped (server shutting down)", error_class="ServerShutdownError"
            ) from None
        self._queued += 1
        try:
            await job.done.wait()
        finally:
            job.abandoned = True
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Accept no new requests; queued ones still run until the task is cancelled."""
        self._closed = True

    async def serve(self) -> None:
        """Build the engine, then run batches until cancelled; every request left waiting when
        it ends gets a 503."""
        pending: deque[_Job] = deque()
        try:
            await self._build()
            while True:
                if not pending:
                    pending.append(await self._receive.receive())
                while True:
                    try:
                        pending.append(self._receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                batch = self._take_batch(pending)
                self._queued -= len(batch)
                batch = [job for job in batch if not job.abandoned]
                if batch:
                    await self._run(batch)
        finally:
            self._closed = True
            error = SamplerError(
                503, "the sampler stopped (server shutting down)", error_class="ServerShutdownError"
            )
            if self.status == "DEPLOY_FAILED":
                error = SamplerError(
                    503,
                    f"the sampler's model failed to load: {self.load_error}",
                    error_class="SamplerLoadError",
                )
            for job in pending:
                job.finish(None, error)
            while True:
                try:
                    self._receive.receive_nowait().finish(None, error)
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
            self._send.close()
            self._receive.close()

    async def _build(self) -> None:
        try:
            if self._blocking_build:
                engine = await anyio.to_thread.run_sync(
                    self._factory, self.spec, abandon_on_cancel=True
                )
            else:
                engine = self._factory(self.spec)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = "DEPLOY_FAILED"
            logger.exception("sampler engine for %s failed to load", self.spec.name)
            raise SamplerError(503, self.load_error, error_class="SamplerLoadError") from exc
        self.engine = engine
        self.status = "ACTIVE"
        logger.info("sampler engine for %s ready", self.spec.name)

    def _take_batch(self, pending: deque[_Job]) -> list[_Job]:
        """The oldest pending job plus every later one with the same adapter, up to
        ``max_rows`` sequences; the rest stay pending in order."""
        first = pending.popleft()
        key = _adapter_key(first.adapter)
        batch, rows, rest = [first], first.request.n, deque[_Job]()
        while pending:
            job = pending.popleft()
            if _adapter_key(job.adapter) == key and rows + job.request.n <= self.max_rows:
                batch.append(job)
                rows += job.request.n
            else:
                rest.append(job)
        pending.extend(rest)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        engine = self.engine
        assert engine is not None
        call = functools.partial(engine.generate, batch[0].adapter, [j.request for j in batch])
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        if self.delay > 0:
            await anyio.sleep(self.delay)
        try:
            if engine.blocking:
                results = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
            else:
                results = call()
        except InvalidRequest as exc:
            for job in batch:
                job.finish(None, InvalidRequest(str(exc)))
            return
        except Exception as exc:
            logger.exception("sampler batch of %d requests failed", len(batch))
            error = SamplerError(500, f"sampling failed: {type(exc).__name__}: {exc}")
            for job in batch:
                job.finish(None, error)
            return
        for job, choices in zip(batch, results, strict=True):
            job.finish(choices, None)


# --------------------------------------------------------------------------- samplers


@dataclass(eq=False)
class Sampler:
    """One sampler (``POST /samplers``): paired with ``run``, or standalone on a base model or a
    ``model_path`` checkpoint."""

    id: str
    spec: ModelSpec
    context: int
    """Positions a prompt plus its completion may use."""
    session_id: str
    worker: EngineWorker
    storage: Storage
    run: Run | None = None
    checkpoint: CheckpointRef | None = None
    """The checkpoint a standalone sampler was created from (``model_path``)."""
    model_id: str | None = field(default_factory=lambda: _new_id("model"))
    """None for a shared sampler."""
    deployment_id: str | None = field(default_factory=lambda: _new_id("dep"))
    """None for a shared sampler."""
    created_at: str = field(default_factory=_now_iso)
    cold_start: SamplerColdStart = field(default_factory=SamplerColdStart)
    """What a new dedicated sampler still refuses (hosted profile; nothing locally)."""
    operations: SampleOperations | None = None
    """A shared sampler's operations (None: dedicated)."""
    adapters: AdapterNameCache | None = None
    """A shared sampler's adapters, cached by checkpoint name (None: dedicated)."""

    def __repr__(self) -> str:
        kind = f"run={self.run.id}" if self.run is not None else "standalone"
        shared = " shared" if self.shared else ""
        return f"<Sampler {self.id} {self.spec.name} {kind}{shared}>"

    @property
    def shared(self) -> bool:
        """Whether this is a shared (serverless) sampler: the operation protocol, adapters
        cached by name, ``model_id`` and ``deployment_id`` null."""
        return self.operations is not None

    @property
    def base_model(self) -> str:
        """The base model's name."""
        return self.spec.name

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this."""
        return self.spec.vocab_size

    def live_version(self) -> int:
        """The policy version the sampler serves without headers: the run's last published
        version (0 = nothing published, the base model), or a standalone sampler's
        checkpoint step."""
        if self.run is not None:
            published = self.run.published
            return 0 if published is None else published[0]
        if self.checkpoint is not None:
            found = self.storage.lookup(self.checkpoint)
            return 0 if found is None else found[1].step
        return 0

    def live_uri(self) -> str | None:
        """The ``bt://`` path of the live adapter (None: the base model)."""
        if self.run is not None:
            return None if self.run.published is None else self.run.published[1]
        return None if self.checkpoint is None else self.checkpoint.uri

    def live_adapter(self) -> tuple[int, AdapterRef | None]:
        """``(version, adapter)`` of the live adapter; :class:`SamplerError` 503 when its files
        are gone (deleted or expired)."""
        uri = self.live_uri()
        if uri is None:
            return 0, None
        found = self.storage.lookup(parse_checkpoint_uri(uri))
        if found is None:
            raise SamplerError(
                503, f"the sampler's live adapter {uri} no longer exists (expired or deleted)"
            )
        directory, record = found
        if self.run is not None and self.run.published is not None:
            version, source = self.run.published[0], "published adapter"
        else:
            version, source = record.step, "model_path"
        adapter = AdapterRef(
            key=str(directory), directory=directory, uri=uri, version=version, field=source
        )
        return version, adapter

    def pinned_adapter(self, uri: str, header: str = "X-Checkpoint-Path") -> AdapterRef:
        """The adapter an ``X-Checkpoint-Path`` header (or the field ``header``) names
        (weights or sampler_weights of any run on this server with the same base model);
        :class:`InvalidRequest` otherwise."""
        ref = parse_checkpoint_uri(uri.strip(), header)
        found = self.storage.lookup(ref)
        if found is None:
            raise InvalidRequest(
                f"{header}: checkpoint {ref.uri} does not exist on this server (unknown run or "
                "name, expired, or saved under another data directory)"
            )
        directory, record = found
        if record.base_model != self.base_model:
            raise InvalidRequest(
                f"{header}: checkpoint {ref.uri} was trained on base model "
                f"{record.base_model!r}, but this sampler serves {self.base_model!r}"
            )
        return AdapterRef(
            key=str(directory), directory=directory, uri=ref.uri, version=record.step, field=header
        )

    def route(self, min_version: int | None, pinned_uri: str | None) -> AdapterRef | None:
        """The adapter that serves a request with these routing headers (PROTOCOL.md §6).

        Checkpoint path alone: that checkpoint. Floor alone: the live adapter once its version
        reaches the floor, else :class:`SamplerError` 408 (the client retries). Both: the
        checkpoint until the live adapter reaches the floor, then the live adapter (never 408).
        Neither: the live adapter. Returns None for the base model."""
        pinned = None if pinned_uri is None else self.pinned_adapter(pinned_uri)
        if min_version is None:
            if pinned is not None:
                return pinned
            return self.live_adapter()[1]
        live_version = self.live_version()
        if live_version >= min_version:
            return self.live_adapter()[1]
        if pinned is not None:
            return pinned
        raise SamplerError(
            408,
            f"the sampler serves policy version {live_version}, behind X-Min-Policy-Version "
            f"{min_version}; retry",
        )


class SamplerService:
    """Every sampler of the server, their engine workers, and the task group that runs the
    workers (``ServerState.samplers``; lives on the server's event loop)."""

    def __init__(self, settings: ServerSettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.samplers: dict[str, Sampler] = {}
        """Samplers by id."""
        self.by_run: dict[str, Sampler] = {}
        """Paired dedicated samplers by run id (one per run)."""
        self.shared_by_run: dict[str, Sampler] = {}
        """Paired shared samplers by run id (one per run)."""
        self.by_model: dict[str, Sampler] = {}
        """Samplers by model id."""
        self.workers: dict[tuple[str, str], EngineWorker] = {}
        """Engine workers by base model (name, path)."""
        self._factory, self._blocking_build = engine_factory(settings)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<SamplerService samplers={len(self.samplers)} engines={len(self.workers)}>"

    def attach(self, task_group: anyio.abc.TaskGroup | None) -> None:
        """Give the service the app's task group (None when the app stops)."""
        self._task_group = task_group

    def close(self) -> None:
        """Stop accepting sample requests and wake shared samplers' long-polls (idempotent)."""
        self._closed = True
        for worker in self.workers.values():
            worker.close()
        for sampler in self.samplers.values():
            if sampler.operations is not None:
                sampler.operations.close()

    def sweep(self) -> int:
        """Forget shared samplers' expired operation results; returns how many."""
        return sum(
            s.operations.sweep() for s in list(self.samplers.values()) if s.operations is not None
        )

    @property
    def shared_cache_root(self) -> Path:
        """Where shared samplers keep their copies of cached adapters."""
        from .shared_sampler import SHARED_CACHE_DIR

        return self.storage.root / SHARED_CACHE_DIR

    def start_soon(
        self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any, name: str
    ) -> None:
        """Run ``fn(*args)`` as a task of the app (a shared sampler's operation);
        :class:`SamplerError` 503 when the server is not running."""
        if self._task_group is None or self._closed:
            raise SamplerError(503, "the server is not running", error_class="ServerShutdownError")
        self._task_group.start_soon(fn, *args, name=name)

    def worker_for(self, spec: ModelSpec) -> EngineWorker:
        """The engine worker of ``spec``'s base model, started on first use."""
        key = (spec.name, "" if spec.path is None else str(spec.path))
        worker = self.workers.get(key)
        if worker is not None and worker.status != "DEPLOY_FAILED":
            return worker
        if self._task_group is None or self._closed:
            raise SamplerError(503, "the server is not running", error_class="ServerShutdownError")
        delay = self.settings.null_sample_delay if self.settings.backend == "null" else 0.0
        worker = EngineWorker(
            spec, self._factory, self._blocking_build, max_rows=MAX_BATCH_ROWS, delay=delay
        )
        self.workers[key] = worker
        self._task_group.start_soon(self._serve_worker, worker, name=f"sampler {spec.name}")
        return worker

    async def _serve_worker(self, worker: EngineWorker) -> None:
        try:
            await worker.serve()
        except SamplerError:
            pass  # the engine failed to load: recorded on the worker (DEPLOY_FAILED)
        except Exception as exc:  # a batcher bug must not take the server down
            logger.exception("sampler worker for %s crashed", worker.spec.name)
            worker.status = "DEPLOY_FAILED"
            worker.load_error = f"worker crashed: {type(exc).__name__}: {exc}"

    def _add(self, sampler: Sampler) -> Sampler:
        self.samplers[sampler.id] = sampler
        if sampler.model_id is not None:
            self.by_model[sampler.model_id] = sampler
        return sampler

    def _new(
        self,
        spec: ModelSpec,
        session_id: str,
        *,
        context: int,
        shared: bool,
        run: Run | None = None,
        checkpoint: CheckpointRef | None = None,
    ) -> Sampler:
        sampler_id = _new_id("sampler")
        worker = self.worker_for(spec)
        common: dict[str, Any] = {
            "id": sampler_id,
            "spec": spec,
            "context": context,
            "session_id": session_id,
            "worker": worker,
            "storage": self.storage,
            "run": run,
            "checkpoint": checkpoint,
        }
        if not shared:
            return Sampler(**common, cold_start=SamplerColdStart.for_settings(self.settings))
        from .shared_sampler import AdapterNameCache, SampleOperations

        return Sampler(
            **common,
            model_id=None,
            deployment_id=None,
            operations=SampleOperations(result_ttl=self.settings.result_ttl),
            adapters=AdapterNameCache(self.shared_cache_root / sampler_id),
        )

    def create_paired(self, run: Run, session_id: str, *, shared: bool = False) -> Sampler:
        """The sampler paired with ``run`` (the same one on every call; a shared one and a
        dedicated one are separate)."""
        registry = self.shared_by_run if shared else self.by_run
        existing = registry.get(run.id)
        if existing is not None:
            if existing.worker.status == "DEPLOY_FAILED":
                existing.worker = self.worker_for(run.spec)
            return existing
        sampler = self._new(
            run.spec, session_id, context=run.spec.max_seq_len, shared=shared, run=run
        )
        registry[run.id] = sampler
        return self._add(sampler)

    def create_standalone(
        self,
        spec: ModelSpec,
        session_id: str,
        *,
        context: int,
        checkpoint: CheckpointRef | None = None,
        shared: bool = False,
    ) -> Sampler:
        """A new standalone sampler on ``spec`` (serving ``checkpoint``'s adapter if given)."""
        sampler = self._new(spec, session_id, context=context, shared=shared, checkpoint=checkpoint)
        return self._add(sampler)
