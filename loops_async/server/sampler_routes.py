"""HTTP routes of samplers and checkpoint files (PROTOCOL.md §6-7), mounted by
:func:`~loops_async.server.app.create_app`::

    POST {team}/samplers  (and {team}/debug/samplers)     {"sampler": {"id", "base_url", ...}}
    GET  /v1/models/<model_id>/deployments/<dep_id>       {"status": "DEPLOYING"|"ACTIVE"|...}
    POST {sampler}/sample                                 {"choices": [...]} (+ policy header)
    GET  {sampler}/v1/models                              {"data": [{"id", "parent"}]}
    GET  {sampler}/trainers_policy_version                {"policy_version": n}
    GET  {sampler}/health                                 200 ready, 503 loading or failed
    GET  {sampler}/operations/<id>                        shared samplers: long-poll a sample
    POST {sampler}/operations/<id>/cancel                 shared samplers: give up on a sample
    POST /samplers/<sampler_id>/wake                      200 {"status"}
    GET  /v1/loops/checkpoints/<id>/source                {"source": {"kind": "s3"}}
    GET  /v1/loops/checkpoints/<id>/files                 {"presigned_urls": [...], ...}
    POST /v1/loops/checkpoints/validate                   {"valid": true, "checkpoint": {...}}
    GET  /files/<token>                                   the file's bytes

``{sampler}`` is a sampler's ``base_url``: ``/samplers/<sampler_id>``, or
``/samplers/<sampler_id>/sync`` in the hosted profile (where wake stays beside it, new dedicated
samplers answer a cold start first, the deployment-status route answers 404 "no status here"
and file URLs point at the separate presigned-storage listener).

A *shared* sampler (``"scope": "serverless"`` in the ``POST /samplers`` body, or every sampler
with ``shared_samplers``) has ``model_id`` and ``deployment_id`` null and answers ``/sample``
with 202 and an operation (:mod:`~loops_async.server.shared_sampler`).

Errors follow :mod:`~loops_async.server.http`: invalid input is a 422 ``ValidationError`` naming
the field (headers by their canonical name, e.g. ``X-Min-Policy-Version``); ``/sample`` answers
408 while the live adapter is behind ``X-Min-Policy-Version`` (the client retries) and 503 while
the server shuts down or when the model failed to load.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from .._codec import encode as _encode
from .._wire import (
    OPERATION_SCHEMA_VERSION,
    CheckpointFiles,
    CreateSamplerRequest,
    CreateSamplerResponse,
    ModelEntry,
    ModelList,
    SampleAnswer,
    SamplerInfo,
    ValidateCheckpointRequest,
)
from ..types import CheckpointFile
from .backend import ADAPTER_FILES, InvalidRequest
from .http import BodyGate, HandlerBase, HTTPError, _decode, _json, cold_start_error, drain
from .models import ModelSpec, UnknownModelError, resolve_model
from .operations import body_fingerprint
from .runs import ServerState
from .sampler_batcher import SamplerError
from .sampler_engine import AdapterRef, GenerationRequest
from .sampler_registry import Sampler
from .sampler_validation import SampleBody, validate_sample
from .shared_sampler import SampleOperation, run_sample
from .storage import CheckpointRecord, CheckpointRef, parse_checkpoint_uri, validate_name

__all__ = [
    "ADAPTER_FILES",
    "CreateSamplerRequestIn",
    "SamplingHandlers",
    "checkpoint_routes",
    "sampler_control_routes",
    "sampler_routes",
]

POLICY_VERSION_HEADER = "x-trainers-policy-version"
"""The response header that says which policy version served a ``/sample``."""
MAX_PAGE_SIZE = 1000
"""The largest ``page_size`` of ``/checkpoints/<id>/files``."""
SERVERLESS_SCOPE = "serverless"
"""The ``scope`` of a ``POST /samplers`` body that asks for a shared sampler."""


class CreateSamplerRequestIn(CreateSamplerRequest, kw_only=True, omit_defaults=True):
    """``POST /samplers`` as the local server reads it: also the hosted service's ``scope``
    (``"serverless"`` = a shared sampler) and ``debug_version`` (accepted, ignored)."""

    scope: str | None = None
    debug_version: str | None = None


def _raise(exc: SamplerError) -> HTTPError:
    return HTTPError(exc.status, exc.detail, headers=exc.headers, error_class=exc.error_class)


def _int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"{name}: must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidRequest(f"{name}: must be in {low}..{high}, got {number}")
    return number


def _min_version(headers: Mapping[str, str]) -> int | None:
    raw = headers.get("x-min-policy-version")
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidRequest(
            f"X-Min-Policy-Version: must be a non-negative integer, got {raw[:40]!r}"
        )
    return int(text)


def _parse_sample(
    raw: bytes, *, context: int, vocab_size: int, shared: bool = False
) -> tuple[SampleBody, GenerationRequest]:
    """Decode and validate a ``/sample`` body (pure: a large one runs on a worker thread)."""
    body = _decode(SampleBody, raw)
    return body, validate_sample(body, context=context, vocab_size=vocab_size, shared=shared)


class SamplingHandlers(HandlerBase):
    """The route handlers of samplers and checkpoint files, bound to one
    :class:`~loops_async.server.runs.ServerState` (bodies go through ``gate``, the app's
    :class:`~loops_async.server.http.BodyGate`)."""

    def __init__(self, state: ServerState, gate: BodyGate | None = None) -> None:
        super().__init__(state, gate)
        self.service = state.samplers
        self.links = state.links
        self.hosted = state.settings.profile == "hosted"
        """Hosted profile: routes under ``/sync``, cold starts, no deployment status."""

    # ----------------------------------------------------------------- helpers

    def _sampler(self, request: Request, *, cold: bool = True) -> Sampler:
        """The sampler a ``{sampler}/...`` route names, its routing headers checked. A new
        dedicated sampler of the hosted profile first answers its cold start (unless
        ``cold`` is False: the wake route, which is not behind the replica's proxy)."""
        sampler_id = request.path_params["sampler_id"]
        sampler = self.service.samplers.get(sampler_id)
        if sampler is None:
            raise HTTPError(404, f"unknown sampler {sampler_id!r}")
        if cold:
            refusal = sampler.cold_start.refuse()
            if refusal == 404:
                raise cold_start_error(404, f"sampler {sampler.id}: no replica is serving yet")
            if refusal == 503:
                raise cold_start_error(
                    503, f"sampler {sampler.id} is starting", self.settings.cold_start_retry_after
                )
        header = request.headers.get("x-sampler-id")
        if header is not None and header != sampler.id:
            raise InvalidRequest(
                f"X-Sampler-Id: header {header!r} does not match sampler {sampler.id!r}"
            )
        run_header = request.headers.get("x-run-id")
        if sampler.run is not None and run_header is not None and run_header != sampler.run.id:
            raise InvalidRequest(
                f"X-Run-Id: header {run_header!r} does not match the run {sampler.run.id!r} "
                f"of sampler {sampler.id!r}"
            )
        return sampler

    def _info(self, request: Request, sampler: Sampler) -> SamplerInfo:
        base = str(request.base_url).rstrip("/")
        sync = "/sync" if self.hosted else ""
        return SamplerInfo(
            id=sampler.id,
            base_url=f"{base}/samplers/{sampler.id}{sync}",
            base_model=sampler.base_model,
            model_id=sampler.model_id,
            deployment_id=sampler.deployment_id,
            created_at=sampler.created_at,
        )

    # ----------------------------------------------------------------- control plane

    async def create_sampler(self, request: Request) -> Response:
        """``POST {team}/samplers``: a paired sampler (``run_id``; the same one per run) or a
        standalone one (``base_model`` or a ``model_path`` checkpoint); shared when the body
        says ``"scope": "serverless"`` or the server runs with ``shared_samplers``."""
        self._team(request)
        self._not_shutting_down()
        req = await self.gate.parse(request, lambda raw: _decode(CreateSamplerRequestIn, raw))
        if req.session_id not in self.state.sessions:
            raise InvalidRequest(
                f"session_id: unknown session {req.session_id!r} (create one with POST /sessions)"
            )
        if req.num_replicas is not None and req.num_replicas < 1:
            raise InvalidRequest(f"num_replicas: must be >= 1, got {req.num_replicas}")
        try:
            if req.run_id is not None:
                sampler = self._create_paired(req)
            else:
                sampler = self._create_standalone(req)
        except SamplerError as exc:
            raise _raise(exc) from None
        return _json(CreateSamplerResponse(sampler=self._info(request, sampler)))

    def _shared(self, req: CreateSamplerRequestIn) -> bool:
        return self.settings.shared_samplers or req.scope == SERVERLESS_SCOPE

    def _create_paired(self, req: CreateSamplerRequestIn) -> Sampler:
        assert req.run_id is not None
        run = self.state.runs.get(req.run_id)
        if run is None:
            raise InvalidRequest(f"run_id: unknown run {req.run_id!r}")
        if req.model_path is not None:
            raise InvalidRequest(
                "model_path: a paired sampler (run_id) serves its run's published adapter; "
                "leave model_path out or create a standalone sampler"
            )
        if req.base_model is not None and req.base_model != run.base_model:
            raise InvalidRequest(
                f"base_model: {req.base_model!r} is not the base model {run.base_model!r} of "
                f"run {run.id!r}"
            )
        if req.max_seq_length is not None:
            self._context(run.spec, req.max_seq_length)
        return self.service.create_paired(run, req.session_id, shared=self._shared(req))

    def _create_standalone(self, req: CreateSamplerRequestIn) -> Sampler:
        checkpoint: CheckpointRef | None = None
        if req.model_path is not None:
            ref, _, record = self.state.storage.resolve(req.model_path, "model_path")
            name = record.base_model or ""
            if req.base_model is not None and req.base_model != name:
                raise InvalidRequest(
                    f"base_model: {req.base_model!r} is not the base model {name!r} of "
                    f"checkpoint {ref.uri}"
                )
            spec = self._spec(name, "model_path")
            checkpoint = ref
        elif req.base_model is not None:
            spec = self._spec(req.base_model, "base_model")
        else:
            raise InvalidRequest(
                "base_model: give base_model or model_path for a standalone sampler (or run_id "
                "for one paired with a run)"
            )
        context = self._context(spec, req.max_seq_length)
        return self.service.create_standalone(
            spec, req.session_id, context=context, checkpoint=checkpoint, shared=self._shared(req)
        )

    @staticmethod
    def _spec(name: str, field: str) -> ModelSpec:
        try:
            return resolve_model(name)
        except UnknownModelError as exc:
            raise InvalidRequest(f"{field}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            # RuntimeError: "~user/..." for an unknown user (Path.expanduser).
            raise InvalidRequest(
                f"{field}: cannot read the model directory {name!r}: {exc!r}"
            ) from None

    @staticmethod
    def _context(spec: ModelSpec, max_seq_length: int | None) -> int:
        if max_seq_length is None:
            return spec.max_seq_len
        if not 1 <= max_seq_length <= spec.max_seq_len:
            raise InvalidRequest(
                f"max_seq_length: must be in 1..{spec.max_seq_len} for {spec.name!r}, "
                f"got {max_seq_length}"
            )
        return max_seq_length

    async def deployment(self, request: Request) -> Response:
        """``GET /v1/models/<model_id>/deployments/<deployment_id>``: DEPLOYING, ACTIVE or
        DEPLOY_FAILED. (Hosted profile: 404 without ``error_class`` — "no status here", the
        readiness gate a client must skip.)"""
        if self.hosted:
            raise cold_start_error(404, "no deployment status is served here")
        model_id = request.path_params["model_id"]
        deployment_id = request.path_params["deployment_id"]
        sampler = self.service.by_model.get(model_id)
        if sampler is None or sampler.deployment_id != deployment_id:
            raise HTTPError(404, f"unknown deployment {deployment_id!r} of model {model_id!r}")
        body: dict[str, Any] = {
            "id": deployment_id,
            "model_id": model_id,
            "status": sampler.worker.status,
        }
        if sampler.worker.load_error is not None:
            body["detail"] = sampler.worker.load_error
        return _json(body)

    # ----------------------------------------------------------------- sampler

    async def sample(self, request: Request) -> Response:
        """``POST {sampler}/sample``: generate; 200 with the choices and the
        ``x-trainers-policy-version`` that served them (a shared sampler: 202 and an
        operation)."""
        sampler = self._sampler(request)
        self._not_shutting_down()
        if sampler.shared:
            return await self._sample_shared(request, sampler)
        parse = functools.partial(
            _parse_sample, context=sampler.context, vocab_size=sampler.vocab_size
        )
        _, req = await self.gate.parse(request, parse)
        min_version = _min_version(request.headers)
        pinned = request.headers.get("x-checkpoint-path")
        try:
            adapter = sampler.route(min_version, pinned)
        except SamplerError as exc:
            error = _raise(exc)
            error.headers.setdefault(POLICY_VERSION_HEADER, str(sampler.live_version()))
            raise error from None
        try:
            choices = await sampler.worker.submit(adapter, req)
        except SamplerError as exc:
            raise _raise(exc) from None
        version = 0 if adapter is None else adapter.version
        return Response(
            _encode(SampleAnswer(choices=choices)),
            media_type="application/json",
            headers={POLICY_VERSION_HEADER: str(version)},
        )

    # ----------------------------------------------------------------- shared samplers

    async def _sample_shared(self, request: Request, sampler: Sampler) -> Response:
        """A shared sampler's ``/sample``: 202 ``{"operation_id", "schema_version"}``; a retry
        with a known ``Idempotency-Key`` gets the same operation."""
        operations = sampler.operations
        assert operations is not None
        key = request.headers.get("idempotency-key")
        parse = functools.partial(
            _parse_sample, context=sampler.context, vocab_size=sampler.vocab_size, shared=True
        )
        async with self.gate.body(request) as body:
            fingerprint = None if key is None else await body.run(body_fingerprint)
            existing = operations.find_key(key, fingerprint)
            parsed = None if existing is not None else await body.run(parse)
        if parsed is not None:
            adapter = await self._shared_adapter(request, sampler, parsed[0])
            req = parsed[1]
            existing = operations.find_key(key, fingerprint)  # a copy may have arrived
            if existing is None:
                version = 0 if adapter is None else adapter.version
                op = operations.admit(key, version, fingerprint)
                try:
                    self.service.start_soon(
                        run_sample, sampler.worker, op, adapter, req, name=f"sample {op.id}"
                    )
                except SamplerError as exc:
                    op.fail(exc.detail, exc.error_class or "SamplerError")
                    raise _raise(exc) from None
                existing = op
        assert existing is not None
        return _json(
            {"operation_id": existing.id, "schema_version": OPERATION_SCHEMA_VERSION},
            202,
            {"Location": f"/operations/{existing.id}"},
        )

    async def _shared_adapter(
        self, request: Request, sampler: Sampler, body: SampleBody
    ) -> AdapterRef | None:
        """The adapter a shared-sampler request names (``lora``, else ``X-Checkpoint-Path``;
        neither: the base model, or a standalone sampler's ``model_path``), through the
        sampler's cache by checkpoint name: the first weights loaded under a name keep being
        served (the hosted behaviour, PROTOCOL.md §8)."""
        names = {sampler.base_model}
        if sampler.spec.path is not None:
            names.add(str(sampler.spec.path))
        if body.model is None:
            raise InvalidRequest(
                f"model: a shared sampler needs the base model in the body ({sampler.base_model!r})"
            )
        if body.model not in names:
            raise InvalidRequest(
                f"model: {body.model!r} is not the base model {sampler.base_model!r} of sampler "
                f"{sampler.id!r}"
            )
        header = request.headers.get("x-checkpoint-path")
        lora = body.lora
        if lora is not None and not isinstance(lora, str):
            raise InvalidRequest(f"lora: expected a bt:// checkpoint path or null, got {lora!r}")
        uri, field = (lora, "lora") if lora is not None else (header, "X-Checkpoint-Path")
        if lora is not None and header is not None and header.strip() != lora.strip():
            raise InvalidRequest(
                f"lora: {lora!r} differs from the X-Checkpoint-Path header {header!r}"
            )
        if uri is None:
            if sampler.checkpoint is None:
                return None
            uri, field = sampler.checkpoint.uri, "model_path"
        cache = sampler.adapters
        assert cache is not None
        ref = parse_checkpoint_uri(uri.strip(), field)
        hit = cache.get(ref.run_id, ref.name)
        if hit is not None:
            return hit
        return await cache.load(ref.run_id, ref.name, sampler.pinned_adapter(uri, field))

    def _shared_op(self, request: Request) -> tuple[Sampler, SampleOperation]:
        sampler = self._sampler(request)
        op_id = request.path_params["op_id"]
        op = None if sampler.operations is None else sampler.operations.get(op_id)
        if op is None:
            raise HTTPError(
                404,
                f"unknown operation id {op_id!r} for sampler {sampler.id} (never submitted, "
                "or its result expired)",
            )
        return sampler, op

    async def retrieve(self, request: Request) -> Response:
        """``GET {sampler}/operations/<id>`` (shared samplers): held up to ``poll_hold``; 200
        ``{"status": "done", "result": {"choices": [...]}}`` (with
        ``x-trainers-policy-version``) or ``{"status": "error", ...}``; 408 not yet; 404
        unknown or expired; 503 shutting down."""
        sampler, op = self._shared_op(request)
        operations = sampler.operations
        assert operations is not None
        if not op.finished and not self.state.shutting_down:
            await operations.wait(op, self.settings.poll_hold)
        if op.finished:
            assert op.body is not None
            return Response(
                op.body,
                media_type="application/json",
                headers={POLICY_VERSION_HEADER: str(op.version)},
            )
        self._not_shutting_down()
        raise HTTPError(408, f"operation {op.id} is still running; poll again")

    async def cancel(self, request: Request) -> Response:
        """``POST {sampler}/operations/<id>/cancel`` (shared samplers): 200 cancelled (the
        sample is abandoned), 409 already finished, 404 unknown."""
        sampler, op = self._shared_op(request)
        await drain(request)
        assert sampler.operations is not None
        if sampler.operations.cancel(op.id) == "cancelled":
            return _json({"operation_id": op.id, "status": "cancelled"})
        raise HTTPError(409, f"operation {op.id} is finished; it can no longer be cancelled")

    # ----------------------------------------------------------------- sampler routes

    async def models(self, request: Request) -> Response:
        """``GET /samplers/<id>/v1/models``: the base model (``parent: null``) and the adapters
        the sampler serves (live adapter first, then the run's other sampler checkpoints)."""
        sampler = self._sampler(request)
        entries = [ModelEntry(id=sampler.base_model, parent=None)]
        seen = {sampler.base_model}
        uris: list[str] = []
        live = sampler.live_uri()
        if live is not None:
            uris.append(live)
        if sampler.run is not None:
            records = self.state.storage.list_run(sampler.run.id)
            uris.extend(r.path for r in records if r.target == "sampler")
        for uri in uris:
            if uri not in seen:
                seen.add(uri)
                entries.append(ModelEntry(id=uri, parent=sampler.base_model))
        return _json(ModelList(data=entries))

    async def policy_version(self, request: Request) -> Response:
        """``GET /samplers/<id>/trainers_policy_version``: the version served without headers."""
        sampler = self._sampler(request)
        return _json({"policy_version": sampler.live_version()})

    async def health(self, request: Request) -> Response:
        """``GET /samplers/<id>/health``: 200 once the model is loaded."""
        sampler = self._sampler(request)
        self._not_shutting_down()
        worker = sampler.worker
        if worker.status == "DEPLOY_FAILED":
            raise HTTPError(
                503,
                f"the sampler's model failed to load: {worker.load_error}",
                error_class="SamplerLoadError",
            )
        if worker.status != "ACTIVE":
            raise HTTPError(
                503,
                f"the sampler for {sampler.base_model!r} is still loading",
                headers={"Retry-After": "1"},
            )
        return _json(
            {
                "status": "ok",
                "sampler_id": sampler.id,
                "base_model": sampler.base_model,
                "policy_version": sampler.live_version(),
            }
        )

    async def wake(self, request: Request) -> Response:
        """``POST /samplers/<id>/wake`` (beside ``{sampler}``, never under ``/sync``): local
        samplers never scale to zero; 200 with the deployment status."""
        sampler = self._sampler(request, cold=False)
        await drain(request)
        return _json({"status": sampler.worker.status})

    # ----------------------------------------------------------------- checkpoints

    async def _checkpoint(self, request: Request) -> tuple[CheckpointRef, Path, CheckpointRecord]:
        checkpoint_id = request.path_params["checkpoint_id"]
        # A scan of the data directory: off the event loop.
        found = await anyio.to_thread.run_sync(self.state.storage.find_by_id, checkpoint_id)
        if found is None:
            raise HTTPError(404, f"unknown checkpoint {checkpoint_id!r} (or it expired)")
        return found

    async def checkpoint_source(self, request: Request) -> Response:
        """``GET /v1/loops/checkpoints/<id>/source``: local files are served like S3 objects."""
        await self._checkpoint(request)
        return _json({"source": {"kind": "s3"}})

    async def checkpoint_files(self, request: Request) -> Response:
        """``GET /v1/loops/checkpoints/<id>/files?page_size=&page_token=``: signed download
        URLs of the checkpoint's files (sorted by name), one page at a time."""
        ref, directory, _record = await self._checkpoint(request)
        params = request.query_params
        size = _int_param(params.get("page_size"), "page_size", MAX_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        start = _int_param(params.get("page_token"), "page_token", 0, 0, 2**31)
        files = self.state.storage.checkpoint_files(directory)
        # Hosted profile: presigned storage on another origin; else this server's own port.
        base = self.state.storage_url or str(request.base_url).rstrip("/")
        page: list[CheckpointFile] = []
        for rel, path in files[start : start + size]:
            try:
                stat = path.stat()
            except OSError:  # deleted (or replaced) since the lookup: it is gone
                raise HTTPError(404, f"checkpoint {ref.uri} was deleted") from None
            page.append(
                CheckpointFile(
                    url=f"{base}/files/{self.links.token(ref, directory, rel)}",
                    relative_file_name=rel,
                    node_rank=0,
                    size_bytes=stat.st_size,
                    last_modified=_iso(stat.st_mtime),
                )
            )
        end = start + len(page)
        return _json(
            CheckpointFiles(
                presigned_urls=page,
                next_page_token=str(end) if end < len(files) else None,
                total_count=len(files),
            )
        )

    async def validate_checkpoint(self, request: Request) -> Response:
        """``POST /v1/loops/checkpoints/validate``: 200 ``{"valid": true, ...}`` when the
        checkpoint exists and holds a loadable adapter (and fits ``run_id``'s base model when
        that is another run); 422 naming the field otherwise."""
        req = await self.gate.parse(request, lambda raw: _decode(ValidateCheckpointRequest, raw))
        ref, directory, record = self.state.storage.resolve(req.checkpoint_path, "checkpoint_path")
        for name in ADAPTER_FILES:
            if not (directory / name).is_file():
                raise InvalidRequest(f"checkpoint_path: {ref.uri} has no {name}")
        if req.run_id is not None and req.run_id != ref.run_id:
            validate_name(req.run_id, "run_id")
            run = self.state.runs.get(req.run_id)
            if run is None:
                raise InvalidRequest(f"run_id: unknown run {req.run_id!r}")
            if run.base_model != record.base_model:
                raise InvalidRequest(
                    f"checkpoint_path: {ref.uri} was trained on base model "
                    f"{record.base_model!r}, not {run.base_model!r} of run {run.id!r}"
                )
        return _json({"valid": True, "checkpoint_path": ref.uri, "checkpoint": record.public()})

    async def download(self, request: Request) -> Response:
        """``GET /files/<token>``: the bytes of one checkpoint file (404 for any invalid,
        altered or expired token)."""
        return file_response(self.state, request.path_params["token"])


def file_response(state: ServerState, token: str) -> Response:
    """The bytes of the checkpoint file a signed ``/files/<token>`` link names;
    :class:`HTTPError` 404 for any invalid, altered or expired token."""
    path = state.links.resolve(token)
    if path is None:
        raise HTTPError(404, "no such file (unknown, altered or expired link)")
    try:
        # An open file stays readable when the checkpoint is deleted or replaced meanwhile.
        handle = path.open("rb")
    except OSError:
        raise HTTPError(404, "no such file (deleted since the link was made)") from None
    size = os.fstat(handle.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while data := await anyio.to_thread.run_sync(handle.read, 1 << 20):
                yield data
        finally:
            handle.close()

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{path.name}"',
        },
    )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


# --------------------------------------------------------------------------- route tables


def sampler_control_routes(h: SamplingHandlers, prefix: str) -> list[BaseRoute]:
    """``POST {prefix}/samplers`` and ``{prefix}/debug/samplers`` (``prefix`` =
    ``/v1/loops`` or the team form)."""
    return [
        Route(f"{prefix}/samplers", h.create_sampler, methods=["POST"]),
        Route(f"{prefix}/debug/samplers", h.create_sampler, methods=["POST"]),
    ]


def checkpoint_routes(h: SamplingHandlers) -> list[BaseRoute]:
    """The checkpoint-file routes under ``/v1/loops/checkpoints`` and the sampler deployment
    status route."""
    return [
        Route("/v1/loops/checkpoints/validate", h.validate_checkpoint, methods=["POST"]),
        Route("/v1/loops/checkpoints/{checkpoint_id}/source", h.checkpoint_source, methods=["GET"]),
        Route("/v1/loops/checkpoints/{checkpoint_id}/files", h.checkpoint_files, methods=["GET"]),
        Route("/v1/models/{model_id}/deployments/{deployment_id}", h.deployment, methods=["GET"]),
    ]


def sampler_routes(h: SamplingHandlers) -> list[BaseRoute]:
    """The routes under ``/samplers/<sampler_id>`` (``.../sync`` in the hosted profile; wake
    beside it) and ``/files/<token>``."""
    home = "/samplers/{sampler_id}"
    base = f"{home}/sync" if h.hosted else home
    return [
        Route(f"{base}/sample", h.sample, methods=["POST"]),
        Route(f"{base}/v1/models", h.models, methods=["GET"]),
        Route(f"{base}/trainers_policy_version", h.policy_version, methods=["GET"]),
        Route(f"{base}/health", h.health, methods=["GET"]),
        Route(f"{base}/operations/{{op_id}}/cancel", h.cancel, methods=["POST"]),
        Route(f"{base}/operations/{{op_id}}", h.retrieve, methods=["GET"]),
        Route(f"{home}/wake", h.wake, methods=["POST"]),
        Route("/files/{token}", h.download, methods=["GET"]),
    ]
