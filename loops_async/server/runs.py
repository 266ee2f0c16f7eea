"""Live state of the local server: sessions, training runs and how a run executes operations.

A :class:`Run` owns its backend (built in the background when the run is created), its
:class:`~loops_async.server.operations.OperationLog` and an executor task that feeds the log's
operations to the backend in ``seq_id`` order. A blocking backend (torch) runs on a worker
thread, one operation at a time per run; a non-blocking one (``blocking = False``, the null
backend) runs inline on the event loop.

Everything here lives on the server's event loop; tests may read it from another thread
(``LocalServer.state``) but must not mutate it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import anyio
import anyio.abc
import anyio.to_thread

from .._wire import (
    ForwardBackwardRequest,
    InitTrainerServerRequest,
    LoadStateRequest,
    OptimStepRequest,
    SaveStateRequest,
    SaveWeightsForSamplerRequest,
)
from ..types import (
    InitTrainerServerResponse,
    LoadWeightsResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)
from .backend import InvalidRequest, TrainerBackend
from .file_links import FileLinks
from .hosted import TrainerColdStart
from .models import ModelSpec
from .operations import Operation, OperationLog
from .sampler_registry import SamplerService
from .settings import ServerSettings
from .storage import CheckpointRef, Storage

__all__ = [
    "OP_REQUEST_TYPES",
    "DeploymentStatusName",
    "Run",
    "ServerState",
    "Session",
    "TrainerLoadError",
    "new_id",
]

logger = logging.getLogger("loops_async.server")

T = TypeVar("T")

DeploymentStatusName = Literal["DEPLOYING", "ACTIVE", "FAILED"]
"""The deployment states a local run goes through."""

OP_REQUEST_TYPES: dict[str, type[Any]] = {
    "init_trainer_server": InitTrainerServerRequest,
    "forward_backward": ForwardBackwardRequest,
    "forward": ForwardBackwardRequest,
    "optim_step": OptimStepRequest,
    "save_state": SaveStateRequest,
    "save_weights_for_sampler": SaveWeightsForSamplerRequest,
    "load_state": LoadStateRequest,
    "load_state_with_optimizer": LoadStateRequest,
}
"""The trainer operations (``POST /runs/<run_id>/<op>``) and their request bodies."""


class TrainerLoadError(RuntimeError):
    """The run's backend could not be built; every operation of the run fails with this."""


def new_id(prefix: str) -> str:
    """A fresh opaque id such as ``run-3f2a9c0d1e4b``."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(eq=False)
class Session:
    """A client session (``POST /sessions``)."""

    id: str
    team_id: str
    created_at: str = field(default_factory=_now_iso)


BackendFactory = Callable[[ModelSpec, int, int], TrainerBackend]
"""Builds a backend: ``factory(spec, lora_rank, seed)`` (blocking; may run on a thread)."""


def backend_factory(settings: ServerSettings) -> tuple[BackendFactory, bool]:
    """The factory for ``settings.backend`` and whether building it blocks (so it goes to a
    worker thread). The torch backend is imported only here, only when chosen."""
    if settings.backend == "null":
        from .null_backend import NullTrainer

        delay = settings.null_delay

        def build_null(spec: ModelSpec, lora_rank: int, seed: int) -> TrainerBackend:
            return NullTrainer(spec, lora_rank=lora_rank, seed=seed, delay=delay)

        return build_null, False

    def build_torch(spec: ModelSpec, lora_rank: int, seed: int) -> TrainerBackend:
        module = importlib.import_module("loops_async.server.torch_backend")
        trainer_cls = cast(Callable[..., TrainerBackend], module.TorchTrainer)
        return trainer_cls(spec, lora_rank=lora_rank, seed=seed)

    return build_torch, True


class Run:
    """One training run: its model, backend, operations and checkpoints.

    ``status`` is ``DEPLOYING`` while the backend is built, then ``ACTIVE`` or ``FAILED``
    (``load_error`` says why). Operations submitted while deploying are queued and run once the
    backend is ready (or fail with :class:`TrainerLoadError`).
    """

    def __init__(
        self,
        *,
        run_id: str,
        spec: ModelSpec,
        lora_rank: int,
        seed: int,
        session_id: str,
        storage: Storage,
        settings: ServerSettings,
        name: str | None = None,
        initial_checkpoint: CheckpointRef | None = None,
    ) -> None:
        self.id = run_id
        self.spec = spec
        self.base_model = spec.name
        self.lora_rank = lora_rank
        self.seed = seed
        self.session_id = session_id
        self.name = name
        self.deployment_id = new_id("dep")
        self.created_at = _now_iso()
        self.initial_checkpoint = initial_checkpoint
        """Checkpoint the run starts from (``path`` of ``POST /trainers``); it is loaded (weights
        only) when the backend is built and again after every ``init_trainer_server``."""
        self.initial_rank = lora_rank if initial_checkpoint is not None else None
        """The adapter rank of ``initial_checkpoint`` (init must use it), if any."""
        self.status: DeploymentStatusName = "DEPLOYING"
        self.load_error: str | None = None
        self.backend: TrainerBackend | None = None
        self.policy_version = 0
        """Number of ``optim_step`` calls applied (reset by init, set by loads)."""
        self.published: tuple[int, str] | None = None
        """The last ``save_weights_for_sampler`` with ``bump_version``: (version, path)."""
        self.ops = OperationLog(
            seq_gap_timeout=settings.seq_gap_timeout,
            result_ttl=settings.result_ttl,
            name=run_id,
            max_results=settings.max_results_per_run,
            max_result_bytes=settings.max_result_bytes_per_run,
            max_seq_ahead=settings.max_seq_ahead,
            max_queued=settings.max_queued_ops,
        )
        self.cold_start = TrainerColdStart.for_settings(settings)
        """What the run still refuses while "starting" (hosted profile; nothing locally)."""
        self._omit_paths = settings.omit_result_paths
        self._storage = storage
        self._blocking = True
        self._delay = 0.0

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.base_model} rank={self.lora_rank} {self.status}>"

    @property
    def executions(self) -> Counter[str]:
        """How many times each op kind ran on the backend (for tests and diagnostics)."""
        return self.ops.executions

    @property
    def ready(self) -> bool:
        """Whether the backend is built (``ACTIVE``)."""
        return self.status == "ACTIVE"

    # ----------------------------------------------------------------------- lifecycle

    async def serve(self, factory: BackendFactory, blocking_build: bool) -> None:
        """Build the backend (unless :meth:`build_now` did), then execute operations until
        cancelled. This is the run's task."""
        if self.status == "DEPLOYING":
            if blocking_build:
                await anyio.to_thread.run_sync(self.build_now, factory, abandon_on_cancel=True)
            else:
                self.build_now(factory)
        await self.ops.run(self._execute)

    def build_now(self, factory: BackendFactory) -> None:
        """Build the backend here and now (blocking for torch; instant for null); the run ends
        ``ACTIVE`` or ``FAILED``. Never raises for a backend error."""
        try:
            backend = factory(self.spec, self.lora_rank, self.seed)
            if self.initial_checkpoint is not None:
                self._load_initial(backend)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = "FAILED"
            logger.exception("run %s: building the %s trainer failed", self.id, self.base_model)
            return
        self.backend = backend
        self._blocking = bool(getattr(backend, "blocking", True))
        delay = getattr(backend, "delay", 0.0)
        self._delay = float(delay) if isinstance(delay, int | float) else 0.0
        self.policy_version = backend.step
        self.status = "ACTIVE"
        logger.info("run %s: %s trainer ready", self.id, self.base_model)

    def _load_initial(self, backend: TrainerBackend) -> int:
        assert self.initial_checkpoint is not None
        found = self._storage.lookup(self.initial_checkpoint)
        if found is None:
            raise InvalidRequest(f"path: checkpoint {self.initial_checkpoint.uri} no longer exists")
        try:
            return backend.load_state(found[0], with_optimizer=False)
        except FileNotFoundError:
            raise InvalidRequest(
                f"path: checkpoint {self.initial_checkpoint.uri} vanished while it was being loaded"
            ) from None

    # ----------------------------------------------------------------------- execution

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a backend call: on a worker thread for a blocking backend, else inline."""
        call = functools.partial(fn, *args, **kwargs)
        if self._blocking:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        if self._delay > 0:
            await anyio.sleep(self._delay)
        return call()

    async def _execute(self, op: Operation) -> Any:
        backend = self.backend
        if backend is None:
            raise TrainerLoadError(
                f"the trainer for base model {self.base_model!r} failed to load: {self.load_error}"
            )
        kind, req = op.kind, op.request
        if kind == "init_trainer_server":
            assert isinstance(req, InitTrainerServerRequest)
            return await self._init(backend, req.lora_rank)
        if kind in ("forward_backward", "forward"):
            assert isinstance(req, ForwardBackwardRequest)
            fn = backend.forward_backward if kind == "forward_backward" else backend.forward
            return await self._call(fn, req)
        if kind == "optim_step":
            assert isinstance(req, OptimStepRequest)
            out = await self._call(backend.optim_step, req.adam_params)
            self.policy_version = backend.step
            return out
        if kind == "save_state":
            assert isinstance(req, SaveStateRequest)
            ref = CheckpointRef(run_id=self.id, kind="weights", name=req.name)
            await self._save(backend, ref, with_optimizer=True, ttl_seconds=req.ttl_seconds)
            if self._omit_paths:  # as older hosted trainers answer (PROTOCOL §8)
                return {"mode": "with_optimizer"}
            return SaveWeightsResponse(path=ref.uri, mode="with_optimizer")
        if kind == "save_weights_for_sampler":
            assert isinstance(req, SaveWeightsForSamplerRequest)
            ref = CheckpointRef(run_id=self.id, kind="sampler_weights", name=req.name)
            version = self.policy_version
            await self._save(backend, ref, with_optimizer=False, ttl_seconds=req.ttl_seconds)
            if req.bump_version:
                self.published = (version, ref.uri)
            if self._omit_paths:
                return {"version": version}
            return SaveWeightsForSamplerResponse(path=ref.uri, version=version)
        if kind in ("load_state", "load_state_with_optimizer"):
            assert isinstance(req, LoadStateRequest)
            with_optimizer = kind == "load_state_with_optimizer"
            source = self._storage.load_source(req.path, "path")
            try:
                step = await self._call(
                    backend.load_state, source.directory, with_optimizer=with_optimizer
                )
            except FileNotFoundError:  # deleted or replaced while it was being read
                raise InvalidRequest(
                    f"path: checkpoint {req.path} vanished while it was being loaded"
                ) from None
            self.policy_version = backend.step
            if source.lora_rank is not None:
                self.lora_rank = source.lora_rank
            return LoadWeightsResponse(step=step, path=req.path)
        raise InvalidRequest(f"unknown operation {kind!r}")  # unreachable: routes are fixed

    async def _init(self, backend: TrainerBackend, lora_rank: int) -> InitTrainerServerResponse:
        def init() -> InitTrainerServerResponse:
            out = backend.init(lora_rank)
            if self.initial_checkpoint is not None:
                step = self._load_initial(backend)
                out = InitTrainerServerResponse(lora_rank=out.lora_rank, step=step)
            return out

        out = await self._call(init)
        self.lora_rank = lora_rank
        self.policy_version = backend.step
        return out

    async def _save(
        self,
        backend: TrainerBackend,
        ref: CheckpointRef,
        *,
        with_optimizer: bool,
        ttl_seconds: int | None,
    ) -> None:
        write = functools.partial(backend.save_state, with_optimizer=with_optimizer)
        await self._call(
            self._storage.write_checkpoint,
            ref,
            write,
            base_model=self.base_model,
            lora_rank=self.lora_rank,
            step=self.policy_version,
            with_optimizer=with_optimizer,
            ttl_seconds=ttl_seconds,
        )


class ServerState:
    """Everything the server knows, shared by all requests. Created by
    :func:`~loops_async.server.app.create_app`; its task group exists while the app runs."""

    TEAM_ID = "local"
    """The id (and name) of the single team of the local server."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.storage = Storage(settings.data_dir)
        self.links = FileLinks(self.storage)
        """Signed download links of checkpoint files (``/files/<token>``), shared by the API
        app and, in the hosted profile, the presigned-storage app."""
        self.storage_url: str | None = None
        """Hosted profile: the origin of the presigned-storage listener (set by whoever serves
        the storage app); file links point there. None: links point at the API's own port."""
        self.samplers = SamplerService(settings, self.storage)
        """Samplers and their engines (``POST /samplers``)."""
        self.sessions: dict[str, Session] = {}
        self.runs: dict[str, Run] = {}
        """Runs by id."""
        self.deployments: dict[str, Run] = {}
        """Runs by deployment id."""
        self.started_at = time.time()
        self.shutting_down = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._factory, self._blocking_build = backend_factory(settings)

    def __repr__(self) -> str:
        return f"<ServerState backend={self.settings.backend} runs={len(self.runs)}>"

    def attach(self, task_group: anyio.abc.TaskGroup | None) -> None:
        """Give the state the app's task group (None when the app stops)."""
        self._task_group = task_group
        self.samplers.attach(task_group)

    def add_run(self, run: Run) -> None:
        """Register a run and start building its backend and its executor."""
        if self._task_group is None or self.shutting_down:
            raise RuntimeError("the server is not running")
        self.runs[run.id] = run
        self.deployments[run.deployment_id] = run
        if not self._blocking_build:
            run.build_now(self._factory)  # instant: the run answers health 200 at once
        self._task_group.start_soon(self._serve_run, run, name=f"run {run.id}")

    async def _serve_run(self, run: Run) -> None:
        # A bug in a run's executor must not take the whole server down with it.
        try:
            await run.serve(self._factory, self._blocking_build)
        except Exception as exc:
            logger.exception("run %s: executor crashed", run.id)
            run.status = "FAILED"
            run.load_error = f"executor crashed: {type(exc).__name__}: {exc}"
            run.ops.close(run.load_error)  # its pending operations fail, not 408 forever

    def begin_shutdown(self) -> None:
        """Stop accepting work and wake every long-poll so it answers 503 (idempotent)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.samplers.close()
        for run in self.runs.values():
            run.ops.close()

    async def sweep_forever(self, interval: float) -> None:
        """Forget expired operation results (runs' and shared samplers') every ``interval``
        seconds."""
        while True:
            await anyio.sleep(interval)
            for run in list(self.runs.values()):
                run.ops.sweep()
            self.samplers.sweep()
