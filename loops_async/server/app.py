"""The local server's HTTP layer: a Starlette app speaking the Loops protocol (PROTOCOL.md).

Routes (``{team}`` = ``/v1/loops`` or ``/v1/teams/<team_id>/loops``)::

    GET  /                                        server info
    GET  /v1/teams                                the single local team
    POST {team}/sessions                          {"session": {"id"}}
    POST {team}/trainers                          {"run": {"id", "base_model", "base_url", ...}}
    POST {team}/debug/trainers                    the same (debug_version, scope: ignored)
    GET  /v1/loops/deployments/<deployment_id>    {"deployment": {"status": {"name"}}}
    GET  /v1/loops/checkpoints?run_id=|checkpoint_path=   {"checkpoints": [...]}
    GET  /v1/loops/capabilities                   {"supported_models": [...]}
    POST /runs/<run_id>/<op>                      202 {"operation_id", "schema_version": 1}
    GET  /runs/<run_id>/operations/<id>           200 done|error, 408, 404, 503 (long-poll)
    POST /runs/<run_id>/operations/<id>/cancel    200 cancelled, 409, 404
    GET  /runs/<run_id>/health?base_model=        200 ready, 503 loading or failed
    GET  /runs/<run_id>/policy_version            {"policy_version": n}

plus the sampler and checkpoint-file routes of :mod:`~loops_async.server.sampler_routes`
(``POST {team}/samplers``, ``/samplers/<sampler_id>/...``, ``/v1/models/<model_id>/deployments/
<dep_id>``, ``/v1/loops/checkpoints/<id>/source|files``, ``/v1/loops/checkpoints/validate`` and
``GET /files/<token>``).

Every rejection has a JSON body with ``detail``; every invalid request is a 422 with
``"error_class": "ValidationError"`` whose ``detail`` names the field. An optional API key guards
every route; request bodies are capped (413).

The hosted profile (``ServerSettings.profile``) adds the hosted service's cold starts
(:mod:`~loops_async.server.hosted`: a new run's first health checks answer 503 and its first
submits 404, without ``error_class``), sampler routes under ``/sync`` and presigned storage on a
second port (:mod:`~loops_async.server.storage_app`, :func:`get_storage_app`).
"""

from __future__ import annotations

import functools
import hmac
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._codec import encode as _encode
from .._version import __version__
from .._wire import (
    OPERATION_SCHEMA_VERSION,
    CheckpointList,
    CreateTrainerRequestIn,
    ForwardBackwardRequest,
    InitTrainerServerRequest,
    LoadStateRequest,
    OptimStepRequest,
    SaveStateRequest,
    SaveWeightsForSamplerRequest,
)
from .backend import InvalidRequest
from .hosted import retry_after_header
from .models import BUILTIN_MODELS, ModelSpec, UnknownModelError, resolve_model
from .operations import Operation, SubmitRejected
from .runs import OP_REQUEST_TYPES, Run, ServerState, Session, new_id
from .settings import ServerSettings
from .storage import CheckpointRef, validate_name
from .validation import validate_adam_params, validate_forward_request, validate_lora_rank

if TYPE_CHECKING:
    from .sampler_routes import SamplingHandlers

__all__ = ["HTTPError", "cold_start_error", "create_app", "get_state", "get_storage_app"]

logger = logging.getLogger("loops_async.server")

_LARGE_BODY = 1 << 20
"""Bodies above this many bytes are decoded and validated on a worker thread."""

T = TypeVar("T")


# --------------------------------------------------------------------------- responses


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        _encode(obj), status_code=status, headers=headers, media_type="application/json"
    )


class HTTPError(Exception):
    """Raised by a handler to answer ``status`` with ``{"detail": ...}``.

    ``proxy=True`` answers the way the hosted service's proxy does in front of a starting
    replica: ``{"detail"}`` without any ``error_class``, which tells clients the answer is not
    final (they retry it). Only the hosted profile's cold starts use it."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        error_class: str | None = None,
        headers: Mapping[str, str] | None = None,
        proxy: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error_class = error_class
        self.headers = dict(headers or {})
        self.proxy = proxy


def cold_start_error(status: int, detail: str, retry_after: float | None = None) -> HTTPError:
    """A hosted-profile cold-start answer (404, or 503 with ``Retry-After``): no
    ``error_class``, so clients retry it (PROTOCOL.md §8)."""
    headers = {} if retry_after is None else {"Retry-After": retry_after_header(retry_after)}
    return HTTPError(status, detail, headers=headers, proxy=True)


def _error_body(detail: str, error_class: str | None = None) -> dict[str, str]:
    body = {"detail": detail}
    if error_class is not None:
        body["error_class"] = error_class
    return body


_DEFAULT_ERROR_CLASS = {
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
}
"""Every final rejection of this server names its class: a client can tell a considered answer
from a proxy's or a starting replica's (the hosted service's cold-start 400/404/503 carry none
and are retried, PROTOCOL §8). A 503 names one only when it is final (shutdown, failed load);
"still loading" does not."""


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    error_class = None if exc.proxy else exc.error_class or _DEFAULT_ERROR_CLASS.get(exc.status)
    return _json(_error_body(exc.detail, error_class), exc.status, exc.headers)


async def _on_invalid(request: Request, exc: Exception) -> Response:
    return _json(_error_body(str(exc), "ValidationError"), 422)


async def _on_starlette_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    error_class = _DEFAULT_ERROR_CLASS.get(exc.status_code)
    return _json(_error_body(str(detail), error_class), exc.status_code, exc.headers)


async def _on_internal(request: Request, exc: Exception) -> Response:
    return _json(_error_body("internal server error", type(exc).__name__), 500)


# --------------------------------------------------------------------------- guard middleware


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """API-key check and request body cap, in front of every route.

    With ``api_key`` set, a request without ``Authorization: Api-Key <key>`` (``Bearer`` is also
    accepted) gets 401; the comparison takes constant time. A body over ``max_body_bytes`` gets
    413: at once when ``Content-Length`` says so (nothing is read), else as soon as the streamed
    body crosses the limit. ``GET /files/<token>`` download links carry their own signature (like
    presigned URLs) and need no key.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode()
        self._max = max_body_bytes

    def __repr__(self) -> str:
        return f"GuardMiddleware(api_key={'set' if self._key else None}, max={self._max})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if (
            self._key is not None
            and not str(scope.get("path", "")).startswith("/files/")
            and not self._authorized(headers.get(b"authorization"))
        ):
            await _send_json(
                send,
                401,
                _error_body("missing or invalid API key (Authorization: Api-Key <key>)"),
                extra=[(b"www-authenticate", b"Api-Key")],
            )
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self._max
            except ValueError:
                await _send_json(send, 400, _error_body("invalid Content-Length header"))
                return
            if too_large:
                await self._reject_size(send)
                return
        total = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self._max:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._reject_size(send)

    def _authorized(self, header: bytes | None) -> bool:
        assert self._key is not None
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() not in (b"api-key", b"bearer"):
            return False
        return hmac.compare_digest(token.strip(), self._key)

    async def _reject_size(self, send: Send) -> None:
        await _send_json(
            send,
            413,
            _error_body(f"request body exceeds the server's limit of {self._max} bytes"),
            extra=[(b"connection", b"close")],
        )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


async def _send_json(
    send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = _encode(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- body parsing


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decode(typ: type[T], body: bytes) -> T:
    """Decode a JSON body into ``typ``; :class:`InvalidRequest` naming the field if it does
    not fit."""
    decoder = _decoders.get(typ)
    if decoder is None:
        decoder = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return cast(T, decoder.decode(body))
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None


async def _offload(size: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` inline for small bodies, on a worker thread for large ones."""
    if size > _LARGE_BODY:
        return await anyio.to_thread.run_sync(fn)
    return fn()


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


# --------------------------------------------------------------------------- handlers


class _RejectedOp(Exception):
    """Internal: a decoded operation failed validation (the cause says why)."""

    def __init__(self, seq_id: int) -> None:
        super().__init__(seq_id)
        self.seq_id = seq_id


class _Handlers:
    """The route handlers, bound to one :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.settings = state.settings

    # ----------------------------------------------------------------- helpers

    def _team(self, request: Request) -> None:
        team = request.path_params.get("team_id")
        if team is not None and team != ServerState.TEAM_ID:
            raise HTTPError(
                404,
                f"unknown team {team!r}; the local server has one team, {ServerState.TEAM_ID!r}",
            )

    def _run(self, request: Request) -> Run:
        run_id = request.path_params["run_id"]
        run = self.state.runs.get(run_id)
        if run is None:
            raise HTTPError(404, f"unknown run {run_id!r}")
        header = request.headers.get("x-run-id")
        if header is not None and header != run.id:
            raise InvalidRequest(f"X-Run-Id: header {header!r} does not match run {run.id!r}")
        return run

    def _not_shutting_down(self) -> None:
        if self.state.shutting_down:
            raise HTTPError(503, "the server is shutting down", error_class="ServerShutdownError")

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

    # ----------------------------------------------------------------- control plane

    async def create_session(self, request: Request) -> Response:
        """``POST {team}/sessions``: a new session (the body, if any, is ignored)."""
        self._team(request)
        self._not_shutting_down()
        await request.body()
        session = Session(id=new_id("session"), team_id=ServerState.TEAM_ID)
        self.state.sessions[session.id] = session
        return _json({"session": {"id": session.id}})

    async def create_trainer(self, request: Request) -> Response:
        """``POST {team}/trainers``: create a run; its backend is built in the background."""
        self._team(request)
        self._not_shutting_down()
        req = _decode(CreateTrainerRequestIn, await request.body())
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

    # ----------------------------------------------------------------- trainer

    async def submit(self, request: Request) -> Response:
        """``POST /runs/<run_id>/<op>``: admit an operation; 202 with its id. (Hosted profile:
        a new run's first submits answer a proxy's 404 and are not recorded.)"""
        run = self._run(request)
        if run.cold_start.refuse_submit():
            await request.body()
            raise cold_start_error(404, f"trainer {run.id} is starting; no replica is serving yet")
        kind = request.path_params["op"]
        typ = OP_REQUEST_TYPES.get(kind)
        if typ is None:
            raise HTTPError(
                404, f"unknown operation {kind!r}; known: {', '.join(OP_REQUEST_TYPES)}"
            )
        self._not_shutting_down()
        key = request.headers.get("idempotency-key")
        existing = run.ops.find_key(key)
        if existing is not None:
            return self._accepted(existing)
        body = await request.body()
        try:
            req = await _offload(len(body), functools.partial(self._parse_op, run, kind, typ, body))
        except SubmitRejected:
            # A copy of this submit (same key) may have been admitted while this one's body
            # was arriving: its seq_id is taken now, by the very operation it asks for.
            existing = run.ops.find_key(key)
            if existing is None:
                raise
            return self._accepted(existing)
        except _RejectedOp as exc:
            # A well-formed op that fails validation is never resent with this seq_id: let
            # the executor pass over it now rather than after seq_gap_timeout.
            cause = exc.__cause__
            assert isinstance(cause, InvalidRequest)
            run.ops.pass_over(exc.seq_id)
            raise cause from None
        existing = run.ops.find_key(key)
        if existing is not None:
            return self._accepted(existing)
        self._not_shutting_down()
        if run.ops.closed:
            raise HTTPError(
                503,
                f"run {run.id} accepts no more operations: {run.load_error}",
                error_class="TrainerLoadError",
            )
        op = run.ops.admit(kind, req.seq_id, req, key)
        return self._accepted(op)

    def _accepted(self, op: Operation) -> Response:
        return _json(
            {"operation_id": op.id, "schema_version": OPERATION_SCHEMA_VERSION},
            202,
            {"Location": f"/operations/{op.id}"},
        )

    def _parse_op(self, run: Run, kind: str, typ: type[Any], body: bytes) -> Any:
        """Decode and validate an op body (pure: may run on a worker thread). A decoded op
        that fails validation raises :class:`_RejectedOp` carrying its ``seq_id``."""
        req = _decode(typ, body)
        try:
            self._validate_op(run, kind, req)
        except SubmitRejected:
            raise
        except InvalidRequest as exc:
            raise _RejectedOp(req.seq_id) from exc
        return req

    def _validate_op(self, run: Run, kind: str, req: Any) -> None:
        if req.run_id is not None and req.run_id != run.id:
            raise InvalidRequest(f"run_id: {req.run_id!r} does not match run {run.id!r}")
        if req.model != run.base_model:
            raise InvalidRequest(
                f"model: {req.model!r} is not this run's base model {run.base_model!r}"
            )
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
        if self.state.shutting_down:
            raise HTTPError(503, "the server is shutting down", error_class="ServerShutdownError")
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


# --------------------------------------------------------------------------- app factory


def _control_plane_routes(h: _Handlers, sampling: SamplingHandlers) -> list[BaseRoute]:
    from .sampler_routes import checkpoint_routes, sampler_control_routes

    routes: list[BaseRoute] = [Route("/v1/teams", h.teams, methods=["GET"])]
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
        Route("/v1/loops/capabilities", h.capabilities, methods=["GET"]),
    ]
    return routes


def _trainer_routes(h: _Handlers) -> list[BaseRoute]:
    base = "/runs/{run_id}"
    return [
        Route(f"{base}/operations/{{op_id}}/cancel", h.cancel, methods=["POST"]),
        Route(f"{base}/operations/{{op_id}}", h.retrieve, methods=["GET"]),
        Route(f"{base}/health", h.health, methods=["GET"]),
        Route(f"{base}/policy_version", h.policy_version, methods=["GET"]),
        Route(f"{base}/{{op}}", h.submit, methods=["POST"]),
    ]


def create_app(settings: ServerSettings) -> Starlette:
    """Build the ASGI app for ``settings``.

    The app's lifespan owns an anyio task group in which every run builds its backend and
    executes its operations; leaving the lifespan wakes pending long-polls (503) and cancels
    them. The live :class:`~loops_async.server.runs.ServerState` is ``get_state(app)``.
    """
    # Imported here: sampler_routes uses this module's HTTPError and body helpers.
    from .sampler_routes import SamplingHandlers, sampler_routes

    state = ServerState(settings)
    handlers = _Handlers(state)
    sampling = SamplingHandlers(state)
    routes: list[BaseRoute] = [
        Route("/", handlers.root, methods=["GET"]),
        *_control_plane_routes(handlers, sampling),
        *_trainer_routes(handlers),
        *sampler_routes(sampling),
    ]

    shared_cache = state.samplers.shared_cache_root

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        removed = await anyio.to_thread.run_sync(state.storage.sweep)
        if removed:
            logger.info("removed %d stale checkpoint directories", removed)
        await anyio.to_thread.run_sync(shutil.rmtree, shared_cache, True)
        try:
            async with anyio.create_task_group() as tg:
                state.attach(tg)
                tg.start_soon(state.sweep_forever, min(60.0, settings.result_ttl / 2))
                try:
                    yield
                finally:
                    state.begin_shutdown()
                    state.attach(None)
                    tg.cancel_scope.cancel()
        finally:
            shutil.rmtree(shared_cache, ignore_errors=True)  # shared samplers' adapter copies

    handlers_map: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPError: _on_http_error,
        InvalidRequest: _on_invalid,
        HTTPException: _on_starlette_http,
        Exception: _on_internal,
    }
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                GuardMiddleware,
                api_key=settings.api_key,
                max_body_bytes=settings.max_body_bytes,
            )
        ],
        exception_handlers=cast(Any, handlers_map),
        lifespan=lifespan,
    )
    app.state.loops = state
    storage_app: Starlette | None = None
    if settings.profile == "hosted":
        from .storage_app import create_storage_app

        storage_app = create_storage_app(state)
    app.state.loops_storage = storage_app
    return app


def get_state(app: Starlette) -> ServerState:
    """The live state of an app made by :func:`create_app`."""
    return cast(ServerState, app.state.loops)


def get_storage_app(app: Starlette) -> Starlette | None:
    """The hosted profile's presigned-storage app that goes with an app made by
    :func:`create_app` (None in the local profile). Whoever serves it on its own port sets
    ``get_state(app).storage_url`` so that file links point there."""
    return cast("Starlette | None", app.state.loops_storage)
