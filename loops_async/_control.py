"""The control plane (PROTOCOL §7): sessions, trainers, samplers, readiness, policy-version
waits and checkpoints.

:class:`Control` is made by :class:`~loops_async.ServiceClient` and handed to every
:class:`~loops_async.TrainingClient` it creates; clients call it, never each other's private
methods. It also carries what they share: the transport, the background-task owner and the
settings.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
import msgspec

from . import _validate, errors
from ._background import BackgroundTasks
from ._codec import decoder_for, encode
from ._http import (
    CONTROL_READ,
    CONTROL_WRITE,
    PROBE,
    Backoff,
    Transport,
    error_for_response,
    is_permanent_rejection,
)
from ._operation import Endpoint, decode_body
from ._wire import (
    CheckpointFiles,
    CheckpointList,
    CheckpointSource,
    CreateSamplerRequest,
    CreateSamplerResponse,
    CreateSessionResponse,
    CreateTrainerRequest,
    CreateTrainerResponse,
    DeploymentResponse,
    PolicyVersion,
    RunInfo,
    SamplerInfo,
    ValidateCheckpointRequest,
)
from .sampling import SamplerDeployment, SamplingClient, wait_deployment_active
from .types import (
    Checkpoint,
    CheckpointDownload,
    CheckpointFile,
    CheckpointFilesResponse,
    ServerCapabilities,
)

__all__ = ["Control", "Settings"]

T = TypeVar("T")
log = logging.getLogger("loops_async")

CONTROL_PLANE_RETRY_WINDOW = 20.0
"""Seconds the control plane's transient failures are retried before they are raised."""
PROVISION_READ_TIMEOUT = 300.0
"""Read timeout of ``POST /trainers``: provisioning may take minutes (PROTOCOL §8)."""
_TERMINAL_DEPLOYMENT_STATES = frozenset({"FAILED", "STOPPED", "PREEMPTED"})
_TEAMS_PATH = "/v1/teams"


def _run_id_of(trainer_url: str) -> str:
    """The run id in a trainer URL of the form ``.../runs/<id>`` (the local server's), else
    ``""`` (no run id: ``X-Run-Id`` is not sent and ops carry ``run_id: null``)."""
    parts = trainer_url.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "runs" else ""


@dataclass(frozen=True, slots=True)
class Settings:
    """The client-wide settings a :class:`Control` and its clients share."""

    base_url: str
    team: str | None
    ready_timeout: float
    heartbeat_interval: float
    sample_timeout: float
    max_request_bytes: int
    availability_model: str = "dedicated"
    reuse_from_run_id: str | None = None
    reuse_from_session_id: str | None = None
    backend_version: str | None = None
    default_scope: str | None = None
    local: tuple[str, str] | None = None
    """``(trainer_url, sampler_url)`` of ``ServiceClient.local``: nothing is provisioned."""


class Control:
    """The control plane of one :class:`~loops_async.ServiceClient` (see module docstring)."""

    def __init__(
        self, settings: Settings, transport: Transport, background: BackgroundTasks
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.background = background
        self._base_url = settings.base_url
        self._team_id: str | None = None
        self._session_id: str | None = None
        self._paired: dict[str, SamplerInfo] = {}
        self._lock = threading.Lock()

    @property
    def session_id(self) -> str | None:
        """The session id, once a session was created."""
        return self._session_id

    # ------------------------------------------------------------------ requests

    async def _loops_root(self, team_scoped: bool) -> str:
        if team_scoped and self.settings.team is not None:
            team_id = await self._resolve_team()
            return f"{self._base_url}/v1/teams/{team_id}/loops"
        return f"{self._base_url}/v1/loops"

    async def _resolve_team(self) -> str:
        if self._team_id is None:
            response = await self.request("GET", f"{self._base_url}{_TEAMS_PATH}")
            body = decode_body(msgspec.json.Decoder(), response, "GET /v1/teams")
            teams = body.get("teams", []) if isinstance(body, dict) else []
            for team in teams:
                if isinstance(team, dict) and self.settings.team in (
                    team.get("id"),
                    team.get("name"),
                ):
                    self._team_id = str(team["id"])
                    break
            else:
                raise errors.ValidationError(
                    f"team: no team with id or name {self.settings.team!r}"
                )
        return self._team_id

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: object = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """A control-plane request: GETs retry transport failures and 502/503/504
        (:data:`~loops_async._http.CONTROL_READ`); POSTs retry only connections that never
        reached the server (:data:`~loops_async._http.CONTROL_WRITE`). Retries stop after
        ``CONTROL_PLANE_RETRY_WINDOW`` seconds, so a wrong URL fails fast."""
        return await self.transport.send(
            method,
            url,
            CONTROL_READ if method == "GET" else CONTROL_WRITE,
            window=min(self.settings.ready_timeout, CONTROL_PLANE_RETRY_WINDOW),
            content=None if body is None else encode(body),
            params=params,
            timeout=timeout,
        )

    async def request_typed(self, method: str, url: str, result_type: type[T], **kw: Any) -> T:
        """:meth:`request`, its body decoded as ``result_type``."""
        response = await self.request(method, url, **kw)
        result: T = decode_body(decoder_for(result_type), response, f"{method} {url}")
        return result

    # ------------------------------------------------------------------ sessions & trainers

    async def ensure_session(self) -> str:
        """The session id, creating the session on first use."""
        if self.settings.local is not None:
            self._session_id = "local"
        if self._session_id is None:
            root = await self._loops_root(team_scoped=True)
            created = await self.request_typed(
                "POST", f"{root}/sessions", CreateSessionResponse, body={}
            )
            with self._lock:
                if self._session_id is None:
                    self._session_id = created.session.id
        return self._session_id

    async def _create_route(self, kind: str, scope: str | None) -> tuple[str, dict[str, str]]:
        """``{root}/<kind>``, or the control plane's debug route (and the fields it reads)
        when a scope or a backend version is chosen."""
        root = await self._loops_root(team_scoped=True)
        extra: dict[str, str] = {}
        if scope is not None:
            extra["scope"] = scope
        if self.settings.backend_version is not None:
            extra["debug_version"] = self.settings.backend_version
        if extra:
            return f"{root}/debug/{kind}", extra
        return f"{root}/{kind}", extra

    async def create_trainer(
        self, request: CreateTrainerRequest, *, scope: str | None = None
    ) -> RunInfo:
        """``POST /trainers``; returns the run (its trainer may still be starting)."""
        if self.settings.local is not None:
            trainer_url = self.settings.local[0]
            return RunInfo(
                id=_run_id_of(trainer_url), base_model=request.base_model, base_url=trainer_url
            )
        url, extra = await self._create_route("trainers", scope)
        request = msgspec.structs.replace(request, **extra)
        created = await self.request_typed(
            "POST", url, CreateTrainerResponse, body=request, timeout=PROVISION_READ_TIMEOUT
        )
        return created.run

    def trainer_endpoint(
        self, run: RunInfo, *, ready_timeout: float | None = None, timeout: float | None = None
    ) -> Endpoint:
        """The endpoint of ``run``'s trainer (requests carry ``X-Run-Id`` when the run has an
        id)."""
        return Endpoint(
            self.transport,
            run.base_url,
            headers={"X-Run-Id": run.id} if run.id else {},
            ready_timeout=self.settings.ready_timeout if ready_timeout is None else ready_timeout,
            timeout=timeout,
        )

    async def wait_trainer_ready(
        self, endpoint: Endpoint, run: RunInfo, *, ready_timeout: float | None = None
    ) -> None:
        """Poll ``GET {base_url}/health`` until 200; stop early if the deployment failed or the
        trainer says it never will be ready."""
        window = self.settings.ready_timeout if ready_timeout is None else ready_timeout
        backoff = Backoff(window, base=0.1, cap=2.0)
        polls = 0
        while True:
            try:
                response = await endpoint.probe(
                    "health", params={"base_model": run.base_model}, timeout=30.0
                )
            except errors.TransportError:
                pass
            else:
                if response.status_code == 200:
                    return
                if is_permanent_rejection(response):
                    raise error_for_response(response)  # e.g. the trainer failed to load
            polls += 1
            if run.deployment_id and polls % 4 == 0:
                await self._check_deployment(run.deployment_id)
            if not await backoff.wait():
                raise errors.OperationTimeoutError(
                    f"trainer for run {run.id} not ready after {self.settings.ready_timeout:g} s"
                )

    async def _check_deployment(self, deployment_id: str) -> None:
        url = f"{self._base_url}/v1/loops/deployments/{deployment_id}"
        try:
            status = await self.request_typed("GET", url, DeploymentResponse)
        except (errors.APIStatusError, errors.ProtocolError, errors.TransportError):
            return  # not every server offers the route; /health decides
        name = status.deployment.status.name.upper()
        if name in _TERMINAL_DEPLOYMENT_STATES:
            raise errors.DeploymentError(f"deployment {deployment_id} is {name}")

    # ------------------------------------------------------------------ samplers

    async def create_sampler(
        self,
        request: CreateSamplerRequest,
        *,
        scope: str | None = None,
        ready: float | None = None,
    ) -> SamplerInfo:
        """``POST /samplers`` (300 s read timeout), then wait until the sampler is ready."""
        if self.settings.local is not None:
            return SamplerInfo(id="local", base_url=self.settings.local[1], model_id="local")
        url, extra = await self._create_route("samplers", scope)
        request = msgspec.structs.replace(request, **extra)
        created = await self.request_typed(
            "POST", url, CreateSamplerResponse, body=request, timeout=PROVISION_READ_TIMEOUT
        )
        sampler = created.sampler
        await self._wait_sampler_ready(sampler, ready)
        return sampler

    def _deployment(self, sampler: SamplerInfo) -> SamplerDeployment | None:
        if not sampler.model_id or not sampler.deployment_id:
            return None  # shared capacity (or ServiceClient.local): no deployment status
        return SamplerDeployment(
            api_base_url=self._base_url,
            model_id=sampler.model_id,
            deployment_id=sampler.deployment_id,
            base_url=sampler.base_url,
        )

    async def _wait_sampler_ready(self, sampler: SamplerInfo, ready: float | None) -> None:
        """Dedicated samplers: wait until their deployment is ACTIVE (see
        :func:`~loops_async.sampling.wait_deployment_active`)."""
        deployment = self._deployment(sampler)
        if deployment is not None:
            window = self.settings.ready_timeout if ready is None else ready
            await wait_deployment_active(self.transport, deployment, window)

    async def paired_sampler(
        self, run_id: str | None, *, num_replicas: int | None = None
    ) -> SamplerInfo:
        """The sampler paired with a run (created once; the route is idempotent per run)."""
        key = run_id or ""
        sampler = self._paired.get(key)
        if sampler is None:
            session_id = await self.ensure_session()
            sampler = await self.create_sampler(
                CreateSamplerRequest(
                    session_id=session_id, run_id=run_id, num_replicas=num_replicas
                )
            )
            self._paired[key] = sampler
        return sampler

    async def validate_checkpoint(self, path: str, run_id: str | None) -> None:
        """``POST /v1/loops/checkpoints/validate``: raises unless ``path`` is usable by
        ``run_id``'s sampler (skipped for ``ServiceClient.local``)."""
        if self.settings.local is not None:
            return
        await self.request(
            "POST",
            f"{self._base_url}/v1/loops/checkpoints/validate",
            body=ValidateCheckpointRequest(checkpoint_path=path, run_id=run_id),
        )

    async def wait_policy_version(
        self, sampler: SamplerInfo, run_id: str | None, version: int
    ) -> None:
        """Poll ``GET {sampler}/trainers_policy_version`` until it reaches ``version``."""
        url = f"{sampler.base_url.rstrip('/')}/trainers_policy_version"
        backoff = Backoff(self.settings.ready_timeout, base=0.02, cap=1.0)
        decoder = decoder_for(PolicyVersion)
        while True:
            try:
                response = await self.transport.send(
                    "GET", url, PROBE, window=0.0, headers={"X-Run-Id": run_id} if run_id else {}
                )
            except errors.TransportError:
                pass
            else:
                if response.status_code == 200:
                    served = decode_body(decoder, response, url).policy_version
                    if served >= version:
                        return
                elif response.status_code not in (404, 408, 502, 503, 504):
                    raise error_for_response(response)
            if not await backoff.wait():
                raise errors.OperationTimeoutError(
                    f"sampler {sampler.id} did not reach policy version {version} "
                    f"within {self.settings.ready_timeout:g} s"
                )

    def sampling_client(
        self,
        sampler: SamplerInfo,
        base_model: str,
        headers: dict[str, str],
        *,
        pin: str | None = None,
        sample_timeout: float | None = None,
        ready_timeout: float | None = None,
    ) -> SamplingClient:
        """A client for ``sampler``. A shared sampler (``model_id`` null) speaks the operation
        protocol and is pinned to ``pin`` by the request's ``lora`` instead of by routing
        headers (PROTOCOL §6)."""
        shared = sampler.model_id is None
        if shared:
            # Pinned by the body's ``lora`` and by X-Checkpoint-Path, which shared samplers
            # route on too (PROTOCOL §8); they have no policy-version gate.
            headers = {k: v for k, v in headers.items() if k != "X-Min-Policy-Version"}
            if pin is not None:
                headers["X-Checkpoint-Path"] = pin
        return SamplingClient(
            transport=self.transport,
            base_url=sampler.base_url,
            base_model=sampler.base_model or base_model,
            headers=headers,
            ready_timeout=self.settings.ready_timeout if ready_timeout is None else ready_timeout,
            sample_timeout=self.settings.sample_timeout
            if sample_timeout is None
            else sample_timeout,
            shared=shared,
            lora=pin if shared else None,
            deployment=self._deployment(sampler),
        )

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The checkpoints of run ``run_id``."""
        if not isinstance(run_id, str) or not run_id:
            raise errors.ValidationError(f"run_id: expected a run id, got {run_id!r}")
        listed = await self.request_typed(
            "GET",
            f"{self._base_url}/v1/loops/checkpoints",
            CheckpointList,
            params={"run_id": run_id},
        )
        return listed.checkpoints

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        """``DELETE /v1/loops/checkpoints/<checkpoint_id>`` (an id from a listing); a
        checkpoint that is already gone raises :class:`~loops_async.errors.NotFoundError`."""
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise errors.ValidationError(
                f"checkpoint_id: expected a checkpoint id, got {checkpoint_id!r}"
            )
        await self.request(
            "DELETE", f"{self._base_url}/v1/loops/checkpoints/{quote(checkpoint_id, safe='')}"
        )

    async def checkpoint_at(self, path: str) -> Checkpoint:
        """The checkpoint record of ``path`` (``ValidationError`` if there is none)."""
        listed = await self.request_typed(
            "GET",
            f"{self._base_url}/v1/loops/checkpoints",
            CheckpointList,
            params={"checkpoint_path": path},
        )
        for checkpoint in listed.checkpoints:
            if checkpoint.path == path or len(listed.checkpoints) == 1:
                return checkpoint
        raise errors.ValidationError(f"path: no checkpoint {path} on {self._base_url}")

    async def resolve_checkpoint(
        self,
        checkpoint_id: str | None,
        name: str | None,
        run_id: str | None,
        target: str | None,
    ) -> str:
        """The checkpoint id named by exactly one of ``checkpoint_id`` (an id, or a ``bt://``
        path) or ``name`` (a saved name of run ``run_id``, narrowed by ``target``)."""
        if checkpoint_id is not None and name is not None:
            raise errors.ValidationError("give checkpoint_id= or name=, not both")
        if checkpoint_id is not None:
            if target is not None:
                raise errors.ValidationError("target= narrows name=, not checkpoint_id=")
            if not isinstance(checkpoint_id, str) or not checkpoint_id:
                raise errors.ValidationError(
                    f"checkpoint_id: expected an id or a bt:// path, got {checkpoint_id!r}"
                )
            if checkpoint_id.startswith("bt://"):
                return (await self.checkpoint_at(checkpoint_id)).id
            return checkpoint_id
        if name is None:
            raise errors.ValidationError("give checkpoint_id= or name= (with run_id=)")
        if run_id is None:
            raise errors.ValidationError(f"name={name!r} needs run_id= (the run that saved it)")
        if target is not None and str(target) not in ("trainer", "sampler"):
            raise errors.ValidationError(f"target: expected 'trainer' or 'sampler', got {target!r}")
        matches = [
            c
            for c in await self.list_checkpoints(run_id)
            if c.checkpoint_id == name and (target is None or c.target == str(target))
        ]
        if len(matches) > 1:
            raise errors.ValidationError(
                f"name={name!r}: run {run_id} has a trainer and a sampler checkpoint of that "
                "name; pass target='trainer' or target='sampler'"
            )
        if not matches:
            raise errors.ValidationError(
                f"name={name!r}: run {run_id} has no such checkpoint (a name published by "
                f"save_weights_and_get_sampling_client on a shared sampler is '{name}-<32 hex>')"
            )
        return matches[0].id

    async def checkpoint_files(
        self, checkpoint_id: str, *, page_size: int = 1000, page_token: int | str = 0
    ) -> CheckpointFilesResponse:
        """One page of ``GET /v1/loops/checkpoints/<id>/files``."""
        page_size = _validate.check_positive_int(page_size, "page_size")
        root = f"{self._base_url}/v1/loops/checkpoints/{quote(checkpoint_id, safe='')}"
        page = await self.request_typed(
            "GET",
            f"{root}/files",
            CheckpointFiles,
            params={"page_size": str(page_size), "page_token": str(page_token)},
        )
        token = page.next_page_token
        if isinstance(token, str):
            token = int(token) if token.isdigit() else (token or None)
        return CheckpointFilesResponse(
            presigned_urls=page.presigned_urls,
            next_page_token=token,
            total_count=page.total_count if page.total_count is not None else 0,
        )

    async def download_checkpoint(
        self, checkpoint_id: str, dest_dir: str | Path
    ) -> CheckpointDownload:
        """Download every file of checkpoint ``checkpoint_id`` into ``dest_dir`` (new or
        empty); written aside, then renamed into place; the partial directory is removed on
        every failure, cancellation included. Returns the :class:`CheckpointDownload`."""
        root = f"{self._base_url}/v1/loops/checkpoints/{quote(checkpoint_id, safe='')}"
        source = (await self.request_typed("GET", f"{root}/source", CheckpointSource)).source
        if source.kind == "volume":
            raise errors.CheckpointSourceError(
                f"checkpoint {checkpoint_id} lives on volume {source.volume_ref!r} "
                f"(path {source.path!r}), not on presigned storage: fetch it with Baseten's "
                "volume tools (baseten-bdn)"
            )
        target = await (await anyio.Path(dest_dir).expanduser()).resolve()
        if await target.exists():
            if not await target.is_dir():
                raise errors.ValidationError(f"dest_dir: {target} exists and is not a directory")
            if [p async for p in target.iterdir()]:
                raise errors.ValidationError(f"dest_dir: {target} exists and is not empty")
        files: list[CheckpointFile] = []
        token: int | str | None = 0
        while token is not None:
            page = await self.checkpoint_files(checkpoint_id, page_token=token)
            files.extend(page.presigned_urls)
            token = page.next_page_token if page.presigned_urls else None
        if not files:
            raise errors.ProtocolError(f"checkpoint {checkpoint_id} has no files")
        partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        await partial.mkdir(parents=True)
        written = 0
        try:
            for item in files:
                relative = PurePosixPath(item.relative_file_name)
                if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    raise errors.ProtocolError(
                        f"refusing checkpoint file name {item.relative_file_name!r}"
                    )
                out = partial.joinpath(*relative.parts)
                await out.parent.mkdir(parents=True, exist_ok=True)
                written += await self.transport.download(
                    item.url, Path(out), trusted_origin=self._base_url
                )
            if await target.exists():
                await target.rmdir()  # empty, checked above
            await partial.rename(target)
        finally:
            with anyio.CancelScope(shield=True):
                if await partial.exists():
                    await anyio.to_thread.run_sync(shutil.rmtree, partial, True)
        return CheckpointDownload(
            dest_dir=Path(target), file_count=len(files), bytes_written=written
        )

    async def capabilities(self) -> ServerCapabilities:
        """``GET /v1/loops/capabilities``."""
        return await self.request_typed(
            "GET", f"{self._base_url}/v1/loops/capabilities", ServerCapabilities
        )
