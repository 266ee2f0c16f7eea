"""HTTP routes of a run's trainer (PROTOCOL.md §2-3), mounted by
:func:`~loops_async.server.app.create_app`::

    POST /runs/<run_id>/<op>                      202 {"operation_id", "schema_version": 1}
    GET  /runs/<run_id>/operations/<id>           200 done|error, 408, 404, 503 (long-poll)
    POST /runs/<run_id>/operations/<id>/cancel    200 cancelled, 409, 404
    GET  /runs/<run_id>/health?base_model=        200 ready, 503 loading or failed
    GET  /runs/<run_id>/policy_version            {"policy_version": n}

A submit's body is decoded and validated through the app's
:class:`~loops_async.server.http.BodyGate` (large bodies a few at a time, on worker threads).
Hosted profile: a new run's first health checks answer 503 and its first submits 404, without
``error_class`` (:mod:`~loops_async.server.hosted`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .._wire import (
    OPERATION_SCHEMA_VERSION,
    ForwardBackwardRequest,
    InitTrainerServerRequest,
    LoadStateRequest,
    OptimStepRequest,
    SaveStateRequest,
    SaveWeightsForSamplerRequest,
)
from .backend import InvalidRequest
from .decode import decode_request
from .http import HandlerBase, HTTPError, _json, cold_start_error, drain
from .models import ModelSpec
from .operations import Operation, QueueFull, SubmitRejected, body_fingerprint
from .runs import OP_REQUEST_TYPES, Run
from .storage import validate_name
from .validation import validate_adam_params, validate_forward_request, validate_lora_rank

__all__ = ["TrainerHandlers", "trainer_routes"]

_MAX_TTL_SECONDS = 2**53
"""The largest ``ttl_seconds`` (beyond it, adding it to the clock loses precision or
overflows)."""


def _check_ttl(ttl: object) -> None:
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= _MAX_TTL_SECONDS
    ):
        shown = repr(ttl) if len(repr(ttl)) <= 40 else "(too large)"
        raise InvalidRequest(f"ttl_seconds: must be an integer in 1..2**53 or null, got {shown}")


def _model_names(spec: ModelSpec) -> set[str]:
    """The names a checkpoint may record for ``spec``'s base model (its name, or its local
    directory as ``adapter_config.json`` records it)."""
    return {spec.name} if spec.path is None else {spec.name, str(spec.path)}


class _RejectedOp(Exception):
    """Internal: a decoded operation failed validation (the cause says why)."""

    def __init__(self, seq_id: int) -> None:
        super().__init__(seq_id)
        self.seq_id = seq_id


@dataclass(frozen=True, slots=True)
class _ReadOp:
    """A submit's body, fingerprinted and (if it could be) decoded and validated."""

    fingerprint: str
    """:func:`~loops_async.server.operations.body_fingerprint` of the body."""
    request: Any
    """The decoded request (None when ``error`` is set)."""
    error: InvalidRequest | _RejectedOp | None
    """Why the body cannot be admitted, if it cannot."""


class TrainerHandlers(HandlerBase):
    """The trainer route handlers, bound to one :class:`~loops_async.server.runs.ServerState`."""

    def _run(self, request: Request) -> Run:
        run_id = request.path_params["run_id"]
        run = self.state.runs.get(run_id)
        if run is None:
            raise HTTPError(404, f"unknown run {run_id!r}")
        header = request.headers.get("x-run-id")
        if header is not None and header != run.id:
            raise InvalidRequest(f"X-Run-Id: header {header!r} does not match run {run.id!r}")
        return run

    async def submit(self, request: Request) -> Response:
        """``POST /runs/<run_id>/<op>``: admit an operation; 202 with its id. (Hosted profile:
        a new run's first submits answer a proxy's 404 and are not recorded.)"""
        run = self._run(request)
        if run.cold_start.refuse_submit():
            await drain(request)
            raise cold_start_error(404, f"trainer {run.id} is starting; no replica is serving yet")
        kind = request.path_params["op"]
        typ = OP_REQUEST_TYPES.get(kind)
        if typ is None:
            raise HTTPError(
                404, f"unknown operation {kind!r}; known: {', '.join(OP_REQUEST_TYPES)}"
            )
        self._not_shutting_down()
        key = request.headers.get("idempotency-key")
        run.ops.find_key(key, kind)  # a key used for another op kind: 422 before any reading
        read = await self.gate.parse(request, functools.partial(self._read_op, run, kind, typ))
        # A known key with the same body is a retry (even one whose seq_id is taken by now,
        # or that no longer validates): its operation. With another body: 422.
        existing = run.ops.find_key(key, kind, read.fingerprint)
        if existing is not None:
            return self._accepted(existing)
        error = read.error
        if isinstance(error, _RejectedOp):
            # A well-formed op that fails validation is never resent with this seq_id: let
            # the executor pass over it now rather than after seq_gap_timeout.
            cause = error.__cause__
            assert isinstance(cause, InvalidRequest)
            run.ops.pass_over(error.seq_id)
            raise cause from None
        if error is not None:
            raise error
        req = read.request
        self._not_shutting_down()
        if run.ops.closed:
            if self.state.runs.get(run.id) is not run:
                raise HTTPError(404, f"unknown run {run.id!r} (deleted)")
            raise HTTPError(
                503,
                f"run {run.id} accepts no more operations: {run.load_error}",
                error_class="TrainerLoadError",
            )
        try:
            op = run.ops.admit(kind, req.seq_id, req, key, fingerprint=read.fingerprint)
        except QueueFull as exc:
            raise HTTPError(
                429, str(exc), error_class="LimitExceededError", headers={"Retry-After": "1"}
            ) from None
        return self._accepted(op)

    def _accepted(self, op: Operation) -> Response:
        return _json(
            {"operation_id": op.id, "schema_version": OPERATION_SCHEMA_VERSION},
            202,
            {"Location": f"/operations/{op.id}"},
        )

    def _read_op(self, run: Run, kind: str, typ: type[Any], body: bytes) -> _ReadOp:
        """Fingerprint, decode and validate an op body (pure: may run on a worker thread);
        a rejection is returned, not raised, so that a retry is recognised first."""
        fingerprint = body_fingerprint(body)
        try:
            return _ReadOp(fingerprint, self._parse_op(run, kind, typ, body), None)
        except (InvalidRequest, _RejectedOp) as exc:
            return _ReadOp(fingerprint, None, exc)

    def _parse_op(self, run: Run, kind: str, typ: type[Any], body: bytes) -> Any:
        """Decode and validate an op body (pure: may run on a worker thread). A decoded op
        that fails validation raises :class:`_RejectedOp` carrying its ``seq_id``. Tensors
        and token lists of ``forward`` / ``forward_backward`` come out numpy-backed
        (:mod:`~loops_async.server.decode`)."""
        req = decode_request(typ, body)
        # Sent to the wrong run (or model): its seq_id belongs to another sequence, so this
        # run must not pass over it.
        if req.run_id is not None and req.run_id != run.id:
            raise InvalidRequest(f"run_id: {req.run_id!r} does not match run {run.id!r}")
        if req.model != run.base_model:
            raise InvalidRequest(
                f"model: {req.model!r} is not this run's base model {run.base_model!r}"
            )
        try:
            self._validate_op(run, kind, req)
        except SubmitRejected:
            raise
        except InvalidRequest as exc:
            raise _RejectedOp(req.seq_id) from exc
        return req

    def _validate_op(self, run: Run, kind: str, req: Any) -> None:
        run.ops.check_seq(kind, req.seq_id)
        if isinstance(req, InitTrainerServerRequest):
            validate_lora_rank(req.lora_rank)
            if req.base_model != run.base_model:
                raise InvalidRequest(
                    f"base_model: {req.base_model!r} is not this run's base model "
                    f"{run.base_model!r}"
                )
            if run.initial_rank is not None and req.lora_rank != run.initial_rank:
                raise InvalidRequest(
                    f"lora_rank: this run starts from a checkpoint of rank {run.initial_rank}, "
                    f"got {req.lora_rank}"
                )
        elif isinstance(req, ForwardBackwardRequest):
            validate_forward_request(req, run.spec)
        elif isinstance(req, OptimStepRequest):
            validate_adam_params(req.adam_params)
        elif isinstance(req, SaveStateRequest | SaveWeightsForSamplerRequest):
            validate_name(req.name, "name")
            _check_ttl(req.ttl_seconds)
        elif isinstance(req, LoadStateRequest):
            source = self.state.storage.load_source(req.path, "path")
            if source.base_model is not None and source.base_model not in _model_names(run.spec):
                raise InvalidRequest(
                    f"path: checkpoint {source.uri} was trained on base model "
                    f"{source.base_model!r}, not {run.base_model!r}"
                )
            if kind == "load_state_with_optimizer" and not source.with_optimizer:
                raise InvalidRequest(
                    f"path: {source.uri} holds no optimizer state (save it with save_state to "
                    "load it with the optimizer)"
                )

    async def retrieve(self, request: Request) -> Response:
        """``GET /runs/<run_id>/operations/<id>``: long-poll an operation's result."""
        run = self._run(request)
        op = self._op(run, request)
        if not op.finished and not self.state.shutting_down:
            await run.ops.wait(op, self.settings.poll_hold)
        if op.finished:
            assert op.body is not None
            return Response(op.body, media_type="application/json")
        self._not_shutting_down()
        raise HTTPError(408, f"operation {op.id} is still {op.status.value}; poll again")

    def _op(self, run: Run, request: Request) -> Operation:
        op_id = request.path_params["op_id"]
        op = run.ops.get(op_id)
        if op is None:
            raise HTTPError(
                404,
                f"unknown operation id {op_id!r} for run {run.id} (never submitted, or its "
                "result expired)",
            )
        return op

    async def cancel(self, request: Request) -> Response:
        """``POST /runs/<run_id>/operations/<id>/cancel``: cancel a queued operation."""
        run = self._run(request)
        op = self._op(run, request)
        await drain(request)
        outcome = run.ops.cancel(op.id)
        if outcome == "cancelled":
            return _json({"operation_id": op.id, "status": "cancelled"})
        raise HTTPError(
            409,
            f"operation {op.id} is {'running' if outcome == 'running' else 'finished'}; "
            "it can no longer be cancelled",
        )

    async def health(self, request: Request) -> Response:
        """``GET /runs/<run_id>/health?base_model=``: 200 once the trainer is loaded. (Hosted
        profile: a new run's first checks answer a proxy's 503 with ``Retry-After``.)"""
        run = self._run(request)
        if run.cold_start.refuse_health():
            raise cold_start_error(
                503, f"trainer {run.id} is starting", self.settings.cold_start_retry_after
            )
        base_model = request.query_params.get("base_model")
        if base_model and base_model != run.base_model:
            raise InvalidRequest(
                f"base_model: {base_model!r} is not this run's base model {run.base_model!r}"
            )
        self._not_shutting_down()
        if run.status == "FAILED":
            raise HTTPError(
                503, f"the trainer failed to load: {run.load_error}", error_class="TrainerLoadError"
            )
        if run.status != "ACTIVE":
            raise HTTPError(
                503,
                f"the trainer for {run.base_model!r} is still loading",
                headers={"Retry-After": "1"},
            )
        return _json(
            {
                "status": "ok",
                "run_id": run.id,
                "base_model": run.base_model,
                "policy_version": run.policy_version,
            }
        )

    async def policy_version(self, request: Request) -> Response:
        """``GET /runs/<run_id>/policy_version``: optim steps applied."""
        run = self._run(request)
        return _json({"policy_version": run.policy_version})


def trainer_routes(h: TrainerHandlers) -> list[BaseRoute]:
    """The routes under ``/runs/<run_id>``."""
    base = "/runs/{run_id}"
    return [
        Route(f"{base}/operations/{{op_id}}/cancel", h.cancel, methods=["POST"]),
        Route(f"{base}/operations/{{op_id}}", h.retrieve, methods=["GET"]),
        Route(f"{base}/health", h.health, methods=["GET"]),
        Route(f"{base}/policy_version", h.policy_version, methods=["GET"]),
        Route(f"{base}/{{op}}", h.submit, methods=["POST"]),
    ]
