"""HTTP routes of the control plane (PROTOCOL.md §7), mounted by
:func:`~loops_async.server.app.create_app` (``{team}`` = ``/v1/loops`` or
``/v1/teams/<team_id>/loops``)::

    GET    /                                        server info
    GET    /v1/teams                                the single local team
    POST   {team}/sessions                          {"session": {"id"}}
    POST   {team}/trainers                          {"run": {"id", "base_model", "base_url", ...}}
    POST   {team}/debug/trainers                    the same (debug_version, scope: ignored)
    GET    /v1/loops/deployments/<deployment_id>    {"deployment": {"status": {"name"}}}
    GET    /v1/loops/checkpoints?run_id=|checkpoint_path=   {"checkpoints": [...]}
    DELETE /v1/loops/checkpoints/<checkpoint_id>    {"deleted": true, ...}; 404 unknown
    DELETE /v1/loops/runs/<run_id>                  {"deleted": true, ...}; 404 unknown
    GET    /v1/loops/capabilities                   {"supported_models": [...]}

plus the sampler control routes and checkpoint-file routes of
:mod:`~loops_async.server.sampler_routes`.

Limits: at most ``max_runs`` live runs (a run deleted with ``DELETE /v1/loops/runs/<id>`` frees
its slot) and ``max_sessions`` sessions; beyond them ``POST /trainers`` and ``POST /sessions``
answer 429 ``LimitExceededError``. A session no live run uses and older than
:data:`IDLE_SESSION_SECONDS` is forgotten to make room for a new one.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._version import __version__
from .._wire import CheckpointList, CreateTrainerRequestIn
from .backend import InvalidRequest
from .http import BodyGate, HandlerBase, HTTPError, _decode, _json, drain
from .models import BUILTIN_MODELS, UnknownModelError, resolve_model
from .operations import OpStatus
from .runs import Run, ServerState, Session, new_id
from .sampler_routes import SamplingHandlers, checkpoint_routes, sampler_control_routes
from .storage import CheckpointRef, validate_name
from .validation import validate_lora_rank

__all__ = ["IDLE_SESSION_SECONDS", "RUN_DELETE_WAIT_SECONDS", "ControlHandlers", "control_routes"]

logger = logging.getLogger("loops_async.server")

IDLE_SESSION_SECONDS = 3600.0
"""When the session table is full, a session that no live run uses and that was created more
than this many seconds ago is forgotten to make room (its id then answers "unknown session")."""

RUN_DELETE_WAIT_SECONDS = 60.0
"""How long ``DELETE /v1/loops/runs/<id>`` waits for the run's running operation (it cannot be
interrupted on its worker thread) before removing the run's files anyway."""


class ControlHandlers(HandlerBase):
    """The control-plane route handlers, bound to one :class:`ServerState`."""

    def __init__(self, state: ServerState, gate: BodyGate | None = None) -> None:
        super().__init__(state, gate)
        self._session_born: dict[str, float] = {}
        """Monotonic creation time of each session (for the idle-session rule)."""

    # ----------------------------------------------------------------- misc

    async def root(self, request: Request) -> Response:
        """``GET /``: what this server is."""
        return _json(
            {
                "name": "loops-async local server",
                "version": __version__,
                "backend": self.settings.backend,
                "profile": self.settings.profile,
                "runs": len(self.state.runs),
            }
        )

    async def teams(self, request: Request) -> Response:
        """``GET /v1/teams``: the single local team."""
        return _json({"teams": [{"id": ServerState.TEAM_ID, "name": ServerState.TEAM_ID}]})

    async def capabilities(self, request: Request) -> Response:
        """``GET /v1/loops/capabilities``: the built-in models (local model directories work
        too, by path)."""
        models = [
            {"model_name": spec.name, "max_context_length": spec.max_seq_len}
            for spec in BUILTIN_MODELS.values()
        ]
        return _json({"supported_models": models})

    # ----------------------------------------------------------------- sessions and runs

    async def create_session(self, request: Request) -> Response:
        """``POST {team}/sessions``: a new session (the body, if any, is ignored); 429 when
        ``max_sessions`` sessions are in use."""
        self._team(request)
        self._not_shutting_down()
        await drain(request)
        self._make_room_for_session()
        session = Session(id=new_id("session"), team_id=ServerState.TEAM_ID)
        self.state.sessions[session.id] = session
        self._session_born[session.id] = time.monotonic()
        return _json({"session": {"id": session.id}})

    def _make_room_for_session(self) -> None:
        sessions = self.state.sessions
        limit = self.settings.max_sessions
        if len(sessions) < limit:
            return
        in_use = {run.session_id for run in self.state.runs.values()}
        cutoff = time.monotonic() - IDLE_SESSION_SECONDS
        for session_id in list(sessions):  # oldest first
            if len(sessions) < limit:
                return
            born = self._session_born.get(session_id, float("-inf"))
            if session_id not in in_use and born <= cutoff:
                del sessions[session_id]
                self._session_born.pop(session_id, None)
        if len(sessions) >= limit:
            raise HTTPError(
                429,
                f"too many sessions: this server keeps at most {limit} (max_sessions); reuse a "
                "session, delete runs with DELETE /v1/loops/runs/<run_id> (idle sessions are "
                f"forgotten after {IDLE_SESSION_SECONDS:g} s), or raise LOOPS_ASYNC_MAX_SESSIONS",
                error_class="LimitExceededError",
            )

    async def create_trainer(self, request: Request) -> Response:
        """``POST {team}/trainers``: create a run; its backend is built in the background. 429
        when ``max_runs`` runs are live."""
        self._team(request)
        self._not_shutting_down()
        req = await self.gate.parse(request, lambda raw: _decode(CreateTrainerRequestIn, raw))
        state = self.state
        if req.session_id not in state.sessions:
            raise InvalidRequest(
                f"session_id: unknown session {req.session_id!r} (create one with POST /sessions)"
            )
        try:
            spec = resolve_model(req.base_model)
        except UnknownModelError as exc:
            raise InvalidRequest(f"base_model: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            # RuntimeError: "~user/..." for an unknown user (Path.expanduser).
            raise InvalidRequest(
                f"base_model: cannot read the model directory {req.base_model!r}: {exc!r}"
            ) from None
        validate_lora_rank(req.lora_rank)
        rank = req.lora_rank
        if isinstance(req.replicas, bool) or req.replicas < 1:
            raise InvalidRequest(f"replicas: must be >= 1, got {req.replicas!r}")
        if req.base_checkpoint is not None:
            raise InvalidRequest("base_checkpoint: not supported by the local server")
        if req.max_seq_len is not None:
            if not 1 <= req.max_seq_len <= spec.max_seq_len:
                raise InvalidRequest(
                    f"max_seq_len: must be in 1..{spec.max_seq_len} for {spec.name!r}, "
                    f"got {req.max_seq_len}"
                )
            spec = replace(spec, max_seq_len=req.max_seq_len)
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise InvalidRequest(f"seed: must be in 0..2**63-1, got {req.seed}")
        if req.name is not None and len(req.name) > 256:
            raise InvalidRequest("name: longer than 256 characters")
        initial: CheckpointRef | None = None
        if req.path is not None:
            ref, _, record = state.storage.resolve(req.path, "path")
            if record.base_model != spec.name:
                raise InvalidRequest(
                    f"path: checkpoint {ref.uri} was trained on base model "
                    f"{record.base_model!r}, not {spec.name!r}"
                )
            ckpt_rank = record.lora_adapter_config.r if record.lora_adapter_config else None
            if isinstance(ckpt_rank, int) and ckpt_rank != rank:
                raise InvalidRequest(
                    f"lora_rank: checkpoint {ref.uri} has rank {ckpt_rank}, not {rank}"
                )
            initial = ref
        if req.reuse_from_run_id is not None:
            old = state.runs.get(req.reuse_from_run_id)
            if (
                old is not None
                and old.status != "FAILED"
                and old.base_model == spec.name
                and old.lora_rank == rank
                and initial is None
            ):
                return _json({"run": self._run_info(request, old)})
        if len(state.runs) >= self.settings.max_runs:
            raise HTTPError(
                429,
                f"too many runs: this server keeps at most {self.settings.max_runs} live runs "
                "(max_runs); delete finished ones with DELETE /v1/loops/runs/<run_id> or raise "
                "LOOPS_ASYNC_MAX_RUNS",
                error_class="LimitExceededError",
            )
        run_id = new_id("run")
        state.storage.create_run(run_id)
        run = Run(
            run_id=run_id,
            spec=spec,
            lora_rank=rank,
            seed=self.settings.seed if req.seed is None else req.seed,
            session_id=req.session_id,
            storage=state.storage,
            settings=self.settings,
            name=req.name,
            initial_checkpoint=initial,
        )
        state.add_run(run)
        logger.info("run %s created (%s, rank %d)", run.id, spec.name, rank)
        return _json({"run": self._run_info(request, run)})

    def _run_info(self, request: Request, run: Run) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        return {
            "id": run.id,
            "base_model": run.base_model,
            "base_url": f"{base}/runs/{run.id}",
            "deployment_id": run.deployment_id,
            "lora_rank": run.lora_rank,
            "name": run.name,
            "created_at": run.created_at,
        }

    async def delete_run(self, request: Request) -> Response:
        """``DELETE /v1/loops/runs/<run_id>``: forget a run and delete its files.

        Its queued operations are cancelled (polls answer ``OperationCancelled``), its executor
        stops once the running operation (if any) ends, its paired samplers are removed, and
        its checkpoints and directory are deleted. A run of an earlier server process that
        only exists on disk is deleted too. 200 ``{"run_id", "deleted": true,
        "checkpoints_removed"}``; 404 unknown."""
        await drain(request)
        run_id = request.path_params["run_id"]
        validate_name(run_id, "run_id")
        storage = self.state.storage
        run = self.state.runs.get(run_id)
        if run is None:
            path = storage.run_dir(run_id)
            on_disk = await anyio.to_thread.run_sync(lambda: path.is_symlink() or path.exists())
            if not on_disk:
                raise HTTPError(404, f"unknown run {run_id!r}")
        else:
            await self._retire(run)
        removed = await anyio.to_thread.run_sync(storage.delete_run, run_id)  # logs it
        return _json({"run_id": run_id, "deleted": True, "checkpoints_removed": removed})

    async def _retire(self, run: Run) -> None:
        """Take a live run out of service: unregister it, cancel its queued operations, stop
        its executor and its paired samplers, and wait (bounded) for its running operation."""
        state = self.state
        state.runs.pop(run.id, None)
        state.deployments.pop(run.deployment_id, None)
        for op in run.ops:
            if op.status is OpStatus.QUEUED:
                run.ops.cancel(op.id)
        run.ops.close()  # wakes long-polls; the executor returns after the running op
        caches = _forget_paired_samplers(state, run.id)
        for cache in caches:
            await anyio.to_thread.run_sync(shutil.rmtree, cache, True)
        with anyio.move_on_after(RUN_DELETE_WAIT_SECONDS) as scope:
            # The operation log offers no "idle" event (close() sets every op's wake event).
            while run.ops.running is not None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        if scope.cancelled_caught:
            logger.warning(
                "run %s: deleted while an operation still runs; its files are removed anyway",
                run.id,
            )

    # ----------------------------------------------------------------- deployments, checkpoints

    async def deployment(self, request: Request) -> Response:
        """``GET /v1/loops/deployments/<id>``: DEPLOYING, ACTIVE or FAILED."""
        dep_id = request.path_params["deployment_id"]
        run = self.state.deployments.get(dep_id)
        if run is None:
            raise HTTPError(404, f"unknown deployment {dep_id!r}")
        status: dict[str, Any] = {"name": run.status}
        if run.load_error is not None:
            status["detail"] = run.load_error
        return _json({"deployment": {"id": dep_id, "run_id": run.id, "status": status}})

    async def checkpoints(self, request: Request) -> Response:
        """``GET /v1/loops/checkpoints?run_id=`` or ``?checkpoint_path=``."""
        run_id = request.query_params.get("run_id")
        path = request.query_params.get("checkpoint_path")
        storage = self.state.storage
        if path is not None:
            records = storage.find(path, "checkpoint_path")
            if run_id is not None:
                records = [r for r in records if r.run_id == run_id]
        elif run_id is not None:
            validate_name(run_id, "run_id")
            records = storage.list_run(run_id)
        else:
            raise InvalidRequest("run_id: give run_id or checkpoint_path")
        return _json(CheckpointList(checkpoints=[r.public() for r in records]))

    async def delete_checkpoint(self, request: Request) -> Response:
        """``DELETE /v1/loops/checkpoints/<checkpoint_id>``: delete one checkpoint (its files
        and its name). 200 ``{"id", "path", "deleted": true}``; 404 unknown (or already
        gone)."""
        await drain(request)
        checkpoint_id = request.path_params["checkpoint_id"]
        storage = self.state.storage
        # A scan of the data directory, then file removal: off the event loop.
        found = await anyio.to_thread.run_sync(storage.find_by_id, checkpoint_id)
        if found is None:
            raise HTTPError(404, f"unknown checkpoint {checkpoint_id!r} (or it expired)")
        ref = found[0]
        if not await anyio.to_thread.run_sync(storage.delete_checkpoint, ref):
            raise HTTPError(404, f"unknown checkpoint {checkpoint_id!r} (already deleted)")
        logger.info("checkpoint %s (%s) deleted", checkpoint_id, ref.uri)
        return _json({"id": checkpoint_id, "path": ref.uri, "deleted": True})


def _forget_paired_samplers(state: ServerState, run_id: str) -> list[Path]:
    """Remove the samplers paired with ``run_id`` from the sampler registries (their ids then
    answer 404) and wake their shared-sampler long-polls; returns the directories of their
    adapter caches, to delete."""
    service = state.samplers
    caches: list[Path] = []
    for registry in (service.by_run, service.shared_by_run):
        sampler = registry.pop(run_id, None)
        if sampler is None:
            continue
        service.samplers.pop(sampler.id, None)
        if sampler.model_id is not None:
            service.by_model.pop(sampler.model_id, None)
        if sampler.operations is not None:
            sampler.operations.close()
        if sampler.adapters is not None:
            caches.append(sampler.adapters.root)
    return caches


def control_routes(h: ControlHandlers, sampling: SamplingHandlers) -> list[BaseRoute]:
    """Every control-plane route (with the sampler and checkpoint-file ones of
    ``sampling``)."""
    routes: list[BaseRoute] = [
        Route("/", h.root, methods=["GET"]),
        Route("/v1/teams", h.teams, methods=["GET"]),
    ]
    for prefix in ("/v1/loops", "/v1/teams/{team_id}/loops"):
        routes += [
            Route(f"{prefix}/sessions", h.create_session, methods=["POST"]),
            Route(f"{prefix}/trainers", h.create_trainer, methods=["POST"]),
            # The hosted service's debug deployments: the same handlers (a body's
            # ``debug_version`` and ``scope`` are accepted; ``scope`` matters for samplers).
            Route(f"{prefix}/debug/trainers", h.create_trainer, methods=["POST"]),
            *sampler_control_routes(sampling, prefix),
        ]
    routes += [
        Route("/v1/loops/deployments/{deployment_id}", h.deployment, methods=["GET"]),
        Route("/v1/loops/checkpoints", h.checkpoints, methods=["GET"]),
        *checkpoint_routes(sampling),
        Route("/v1/loops/checkpoints/{checkpoint_id}", h.delete_checkpoint, methods=["DELETE"]),
        Route("/v1/loops/runs/{run_id}", h.delete_run, methods=["DELETE"]),
        Route("/v1/loops/capabilities", h.capabilities, methods=["GET"]),
    ]
    return routes
