"""The samplers of the local server (PROTOCOL.md §6-7): their records and the registry the HTTP
layer uses.

- A :class:`Sampler` is one ``POST /samplers`` record: *paired* with a run (it serves the run's
  live published adapter; version 0, nothing published, is the base model) or *standalone* (a
  base model, or the adapter of a ``model_path`` checkpoint). :meth:`Sampler.route` applies the
  routing headers (``X-Min-Policy-Version``, ``X-Checkpoint-Path``) and picks the adapter that
  serves a request, or raises :class:`~loops_async.server.sampler_batcher.SamplerError` 408
  while the live adapter is behind the floor.
- :class:`SamplerService` is the registry (``ServerState.samplers``): every sampler, and one
  :class:`~loops_async.server.sampler_batcher.EngineWorker` per base model, built with the
  engine :func:`engine_factory` picks for the server's backend.
- A *shared* (serverless) sampler (``shared=True``: ``model_id`` and ``deployment_id`` null)
  speaks the operation protocol and caches adapters by name; see
  :mod:`~loops_async.server.shared_sampler`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.abc

from .backend import InvalidRequest
from .hosted import SamplerColdStart
from .models import ModelSpec
from .null_sampler import NullSamplerEngine
from .sampler_batcher import EngineWorker, SamplerError
from .sampler_engine import MAX_BATCH_ROWS, AdapterRef, EngineFactory, SamplerEngine
from .storage import CheckpointRef, Storage, parse_checkpoint_uri

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from .runs import Run
    from .settings import ServerSettings
    from .shared_sampler import AdapterNameCache, SampleOperations

__all__ = ["Sampler", "SamplerService", "engine_factory"]

logger = logging.getLogger("loops_async.server")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def engine_factory(settings: ServerSettings) -> tuple[EngineFactory, bool]:
    """The engine builder for ``settings.backend`` and whether building blocks (then it runs on
    a worker thread). The torch engine is imported only here, only when chosen."""
    if settings.backend == "null":
        return NullSamplerEngine, False

    def build_torch(spec: ModelSpec) -> SamplerEngine:
        from .torch_sampler import TorchSamplerEngine

        return TorchSamplerEngine(spec)

    return build_torch, True


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
