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

from . import errors
from ._background import BackgroundTasks
from ._codec import decoder_for, encode
from ._http import CONTROL_READ, CONTROL_WRITE, PROBE, Backoff, Transport, error_for_response
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
    SamplerDeploymentStatus,
    SamplerInfo,
)
from .sampling import SamplingClient
from .types import Checkpoint, CheckpointArchive, CheckpointFile, ServerCapabilities

__all__ = ["Control", "Settings"]

T = TypeVar("T")
log = logging.getLogger("loops_async")

CONTROL_PLANE_RETRY_WINDOW = 20.0
"""Seconds the control plane's transient failures are retried before they are raised."""
_TERMINAL_DEPLOYMENT_STATES = frozenset({"FAILED", "STOPPED", "PREEMPTED"})
_TERMINAL_SAMPLER_STATES = frozenset(
    {
        "DEPLOY_FAILED",
        "UNHEALTHY",
        "BUILD_FAILED",
        "BUILD_STOPPED",
        "DEACTIVATING",
        "INACTIVE",
        "FAILED",
    }
)
_TEAMS_PATH = "/v1/teams"


@dataclass(frozen=True, slots=True)
class Settings:
    """The client-wide settings a :class:`Control` and its clients share."""

    base_url: str
    team: str | None
    ready_timeout: float
    heartbeat_interval: float
    sample_timeout: float
    max_request_bytes: int


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
        )

    async def request_typed(self, method: str, url: str, result_type: type[T], **kw: Any) -> T:
        """:meth:`request`, its body decoded as ``result_type``."""
        response = await self.request(method, url, **kw)
        result: T = decode_body(decoder_for(result_type), response, f"{method} {url}")
        return result

    # ------------------------------------------------------------------ sessions & trainers

    async def ensure_session(self) -> str:
        """The session id, creating the session on first use."""
        if self._session_id is None:
            root = await self._loops_root(team_scoped=True)
            created = await self.request_typed(
                "POST", f"{root}/sessions", CreateSessionResponse, body={}
            )
            with self._lock:
                if self._session_id is None:
                    self._session_id = created.session.id
        return self._session_id

    async def create_trainer(self, request: CreateTrainerRequest) -> RunInfo:
        """``POST /trainers``; returns the run (its trainer may still be starting)."""
        root = await self._loops_root(team_scoped=True)
        created = await self.request_typed(
            "POST", f"{root}/trainers", CreateTrainerResponse, body=request
        )
        return created.run

    def trainer_endpoint(self, run: RunInfo) -> Endpoint:
        """The endpoint of ``run``'s trainer (requests carry ``X-Run-Id``)."""
        return Endpoint(
            self.transport,
            run.base_url,
            headers={"X-Run-Id": run.id},
            ready_timeout=self.settings.ready_timeout,
        )

    async def wait_trainer_ready(self, endpoint: Endpoint, run: RunInfo) -> None:
        """Poll ``GET {base_url}/health`` until 200; stop early if the deployment failed."""
        backoff = Backoff(self.settings.ready_timeout, base=0.1, cap=2.0)
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
                if response.status_code in (401, 403, 422):
                    raise error_for_response(response)
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

    async def create_sampler(self, request: CreateSamplerRequest) -> SamplerInfo:
        """``POST /samplers``, then wait until the sampler is ready."""
        root = await self._loops_root(team_scoped=True)
        created = await self.request_typed(
            "POST", f"{root}/samplers", CreateSamplerResponse, body=request
        )
        sampler = created.sampler
        await self._wait_sampler_ready(sampler)
        return sampler

    async def _wait_sampler_ready(self, sampler: SamplerInfo) -> None:
        """Dedicated samplers: poll their deployment until ACTIVE (waking a scaled-to-zero
        one); a terminal status raises :class:`DeploymentError`."""
        if not sampler.model_id or not sampler.deployment_id:
            return  # shared capacity: nothing to wait for
        url = f"{self._base_url}/v1/models/{sampler.model_id}/deployments/{sampler.deployment_id}"
        backoff = Backoff(self.settings.ready_timeout, base=0.1, cap=2.0)
        while True:
            status = (await self.request_typed("GET", url, SamplerDeploymentStatus)).status
            status = status.upper()
            if status == "ACTIVE":
                return
            if status in _TERMINAL_SAMPLER_STATES:
                raise errors.DeploymentError(f"sampler {sampler.id} deployment is {status}")
            if status == "SCALED_TO_ZERO":
                await self.request("POST", f"{sampler.base_url.rstrip('/')}/wake", body={})
            if not await backoff.wait():
                raise errors.OperationTimeoutError(
                    f"sampler {sampler.id} not ready after "
                    f"{self.settings.ready_timeout:g} s ({status})"
                )

    async def paired_sampler(self, run_id: str) -> SamplerInfo:
        """The sampler paired with a run (created once; the route is idempotent per run)."""
        sampler = self._paired.get(run_id)
        if sampler is None:
            session_id = await self.ensure_session()
            sampler = await self.create_sampler(
                CreateSamplerRequest(session_id=session_id, run_id=run_id)
            )
            self._paired[run_id] = sampler
        return sampler

    async def wait_policy_version(self, sampler: SamplerInfo, run_id: str, version: int) -> None:
        """Poll ``GET {sampler}/trainers_policy_version`` until it reaches ``version``."""
        url = f"{sampler.base_url.rstrip('/')}/trainers_policy_version"
        backoff = Backoff(self.settings.ready_timeout, base=0.02, cap=1.0)
        decoder = decoder_for(PolicyVersion)
        while True:
            try:
                response = await self.transport.send(
                    "GET", url, PROBE, window=0.0, headers={"X-Run-Id": run_id}
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
    ) -> SamplingClient:
        """A client for ``sampler``. A shared sampler (``model_id`` null) speaks the operation
        protocol and is pinned to ``pin`` by the request's ``lora`` instead of by routing
        headers (PROTOCOL §6)."""
        shared = sampler.model_id is None
        if shared:
            headers = {
                k: v
                for k, v in headers.items()
                if k not in ("X-Min-Policy-Version", "X-Checkpoint-Path")
            }
        return SamplingClient(
            transport=self.transport,
            base_url=sampler.base_url,
            base_model=sampler.base_model or base_model,
            headers=headers,
            ready_timeout=self.settings.ready_timeout,
            sample_timeout=self.settings.sample_timeout,
            shared=shared,
            lora=pin if shared else None,
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

    async def checkpoint_archive(self, path: str) -> CheckpointArchive:
        """Every file URL of checkpoint ``path`` (all pages)."""
        checkpoint = await self.checkpoint_at(path)
        root = f"{self._base_url}/v1/loops/checkpoints/{quote(checkpoint.id, safe='')}"
        source = await self.request_typed("GET", f"{root}/source", CheckpointSource)
        log.debug("checkpoint %s source: %s", checkpoint.id, source.source.kind)
        files: list[CheckpointFile] = []
        token: str | int | None = 0
        while token is not None:
            page = await self.request_typed(
                "GET",
                f"{root}/files",
                CheckpointFiles,
                params={"page_size": "1000", "page_token": str(token)},
            )
            files.extend(page.presigned_urls)
            token = page.next_page_token if page.presigned_urls else None
            if token == "":
                token = None
        return CheckpointArchive(checkpoint=checkpoint, files=files)

    async def download_checkpoint(self, path: str, destination: str | Path) -> Path:
        """Download every file of checkpoint ``path`` into the new directory ``destination``
        (written aside, then renamed into place; the partial directory is removed on every
        failure, cancellation included)."""
        archive = await self.checkpoint_archive(path)
        target = await (await anyio.Path(destination).expanduser()).resolve()
        if await target.exists():
            raise errors.ValidationError(f"destination: {target} already exists")
        partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        await partial.mkdir(parents=True)
        try:
            for item in archive.files:
                relative = PurePosixPath(item.relative_file_name)
                if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    raise errors.ProtocolError(
                        f"refusing checkpoint file name {item.relative_file_name!r}"
                    )
                out = partial.joinpath(*relative.parts)
                await out.parent.mkdir(parents=True, exist_ok=True)
                await self.transport.download(item.url, Path(out))
            await partial.rename(target)
        finally:
            with anyio.CancelScope(shield=True):
                if await partial.exists():
                    await anyio.to_thread.run_sync(shutil.rmtree, partial, True)
        return Path(target)

    async def capabilities(self) -> ServerCapabilities:
        """``GET /v1/loops/capabilities``."""
        return await self.request_typed(
            "GET", f"{self._base_url}/v1/loops/capabilities", ServerCapabilities
        )
