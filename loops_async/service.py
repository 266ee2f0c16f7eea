"""``ServiceClient``: the entry point. Provisions trainers on a Loops control plane."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import httpx
import msgspec

from . import _portal, _validate, errors
from ._chunking import MAX_REQUEST_BYTES
from ._codec import decoder_for, encode
from ._http import Backoff, Transport, error_for_response
from ._loop import current_loop, wake_soon
from ._operation import Endpoint
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
from .training import TrainingClient
from .types import Checkpoint, CheckpointArchive, CheckpointFile, ServerCapabilities

__all__ = ["ServiceClient"]

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


class _BackgroundTask:
    """A task a client owns: hosted in the ServiceClient's task group (``async with``) or on
    the portal's loop. ``cancel()`` is thread-safe and never blocks."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.cancel = cancel


async def _run_in_scope(
    scope: anyio.CancelScope, func: Callable[..., Awaitable[Any]], *args: Any
) -> None:
    with scope:
        try:
            await func(*args)
        except errors.LoopsError:
            log.warning("background task %r stopped", func, exc_info=True)


class ServiceClient:
    """Entry point of the Loops API: sessions, training runs, samplers and checkpoints.

    ``base_url`` defaults to ``$LOOPS_BASE_URL`` and ``api_key`` to ``$BASETEN_API_KEY``
    (sent as ``Authorization: Api-Key <key>``; never shown in reprs or logs). Constructing the
    client does no I/O; the session is created on first use.

    Sync code calls the plain methods; async code (asyncio or trio) awaits the ``*_async``
    twins. ``close()``/``aclose()`` or a ``with``/``async with`` block release every connection
    and background task; ``async with`` also keeps background work (heartbeats) on your loop.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8700`` for ``loops-async serve``.
        api_key: the API key, if the server needs one.
        team: a team id or name; sessions, trainers and samplers are then created under
            ``/v1/teams/<team_id>/loops``.
        timeout: the default HTTP timeout in seconds (long-polls use their own).
        ready_timeout: how long to wait for a trainer to become ready, and the bound on
            retrying submits that fail transiently.
        heartbeat_interval: seconds between a training client's ``/health`` pings (0: off).
        sample_timeout: how long one sample request may take to answer (read timeout).
        max_connections: the HTTP connection pool size (and the cap on requests in flight)
            per event loop; more concurrent requests queue in the client, first come first
            served.
        max_request_bytes: the largest request body for one operation; bigger ``forward`` /
            ``forward_backward`` batches are split into several operations (24 MiB).
        http_transport: a custom ``httpx.AsyncBaseTransport`` (tests, proxies).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        team: str | None = None,
        timeout: float = 60.0,
        ready_timeout: float = 600.0,
        heartbeat_interval: float = 60.0,
        sample_timeout: float = 600.0,
        max_connections: int = 100,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = base_url or os.environ.get("LOOPS_BASE_URL")
        if not url:
            raise errors.ValidationError(
                "base_url: not given and LOOPS_BASE_URL is not set (for a local server run "
                "`loops-async serve` and use http://127.0.0.1:8700)"
            )
        if not url.startswith(("http://", "https://")):
            raise errors.ValidationError(f"base_url: expected an http(s) URL, got {url!r}")
        if api_key is None:
            api_key = os.environ.get("BASETEN_API_KEY") or None
        if api_key is not None:
            api_key = _validate.check_api_key(api_key)
        self._base_url = url.rstrip("/")
        self._has_key = bool(api_key)
        self._team = team
        self._team_id: str | None = None
        self._ready_timeout = float(ready_timeout)
        self._heartbeat_interval = float(heartbeat_interval)
        self._sample_timeout = float(sample_timeout)
        self._max_request_bytes = _validate.check_positive_int(
            max_request_bytes, "max_request_bytes"
        )
        self._paired: dict[str, SamplerInfo] = {}
        self._transport = Transport(
            api_key=api_key,
            timeout=timeout,
            max_connections=_validate.check_positive_int(max_connections, "max_connections"),
            transport=http_transport,
        )
        self._session_id: str | None = None
        self._lock = threading.Lock()
        self._children: weakref.WeakSet[TrainingClient] = weakref.WeakSet()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._task_group_loop: anyio.lowlevel.EventLoopToken | None = None
        self._closed = False

    def __repr__(self) -> str:
        key = " api_key=***" if self._has_key else ""
        return f"<ServiceClient {self._base_url}{key}{' closed' if self._closed else ''}>"

    @property
    def base_url(self) -> str:
        """The server's base URL."""
        return self._base_url

    # ------------------------------------------------------------------ control plane

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClientClosedError(f"{self!r} is closed")

    async def _loops_root(self, team_scoped: bool) -> str:
        if team_scoped and self._team is not None:
            team_id = await self._resolve_team()
            return f"{self._base_url}/v1/teams/{team_id}/loops"
        return f"{self._base_url}/v1/loops"

    async def _resolve_team(self) -> str:
        if self._team_id is None:
            body = await self._request_json("GET", f"{self._base_url}{_TEAMS_PATH}")
            teams = body.get("teams", []) if isinstance(body, dict) else []
            for team in teams:
                if isinstance(team, dict) and self._team in (team.get("id"), team.get("name")):
                    self._team_id = str(team["id"])
                    break
            else:
                raise errors.ValidationError(f"team: no team with id or name {self._team!r}")
        return self._team_id

    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: object = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """A control-plane request. GETs retry transport failures and 502/503/504; POSTs
        retry only connections that never reached the server. Retries stop after
        ``CONTROL_PLANE_RETRY_WINDOW`` seconds, so a wrong URL fails fast."""
        content = None if body is None else encode(body)
        backoff = Backoff(min(self._ready_timeout, CONTROL_PLANE_RETRY_WINDOW))
        while True:
            failure: errors.LoopsError
            try:
                response = await self._transport.request(
                    method, url, content=content, params=params
                )
            except errors.ConnectError as exc:
                failure = exc
            except errors.TransportError as exc:
                if method != "GET":
                    raise
                failure = exc
            else:
                if response.status_code < 400:
                    return response
                failure = error_for_response(response)
                if method != "GET" or response.status_code not in (502, 503, 504):
                    raise failure
            if not await backoff.wait():
                raise failure

    async def _request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self._request(method, url, **kwargs)
        try:
            return msgspec.json.decode(response.content)
        except msgspec.DecodeError as exc:
            raise errors.ProtocolError(f"{method} {url} answered invalid JSON") from exc

    async def _request_typed(self, method: str, url: str, result_type: type[T], **kw: Any) -> T:
        response = await self._request(method, url, **kw)
        try:
            result: T = decoder_for(result_type).decode(response.content)
        except msgspec.DecodeError as exc:
            raise errors.ProtocolError(
                f"{method} {url} answered an unexpected body: {exc}"
            ) from exc
        return result

    async def _ensure_session(self) -> str:
        if self._session_id is None:
            root = await self._loops_root(team_scoped=True)
            created = await self._request_typed(
                "POST", f"{root}/sessions", CreateSessionResponse, body={}
            )
            with self._lock:
                if self._session_id is None:
                    self._session_id = created.session.id
        return self._session_id

    async def _wait_trainer_ready(self, endpoint: Endpoint, run: RunInfo) -> None:
        """Poll ``GET {base_url}/health`` until 200; stop early if the deployment failed."""
        backoff = Backoff(self._ready_timeout, base=0.1, cap=2.0)
        polls = 0
        while True:
            try:
                response = await endpoint.get(
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
                    f"trainer for run {run.id} not ready after {self._ready_timeout:g} s"
                )

    async def _check_deployment(self, deployment_id: str) -> None:
        url = f"{self._base_url}/v1/loops/deployments/{deployment_id}"
        try:
            status = await self._request_typed("GET", url, DeploymentResponse)
        except (errors.APIStatusError, errors.ProtocolError, errors.TransportError):
            return  # not every server offers the route; /health decides
        name = status.deployment.status.name.upper()
        if name in _TERMINAL_DEPLOYMENT_STATES:
            raise errors.DeploymentError(f"deployment {deployment_id} is {name}")

    def _trainer_endpoint(self, run: RunInfo) -> Endpoint:
        return Endpoint(
            self._transport,
            run.base_url,
            headers={"X-Run-Id": run.id},
            ready_timeout=self._ready_timeout,
        )

    # ------------------------------------------------------------------ training clients

    async def _create_training_client(
        self,
        base_model: str,
        rank: int,
        *,
        seed: int | None = None,
        max_seq_len: int | None = None,
        name: str | None = None,
        path: str | None = None,
    ) -> TrainingClient:
        self._check_open()
        if not isinstance(base_model, str) or not base_model:
            raise errors.ValidationError(f"base_model: expected a model name, got {base_model!r}")
        rank = _validate.check_positive_int(rank, "rank")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise errors.ValidationError(f"seed: expected an integer, got {seed!r}")
        if max_seq_len is not None:
            _validate.check_positive_int(max_seq_len, "max_seq_len")
        session_id = await self._ensure_session()
        root = await self._loops_root(team_scoped=True)
        request = CreateTrainerRequest(
            session_id=session_id,
            base_model=base_model,
            lora_rank=rank,
            seed=seed,
            max_seq_len=max_seq_len,
            name=name,
            path=path,
        )
        created = await self._request_typed(
            "POST", f"{root}/trainers", CreateTrainerResponse, body=request
        )
        run = created.run
        endpoint = self._trainer_endpoint(run)
        await self._wait_trainer_ready(endpoint, run)
        client = TrainingClient(
            service=self,
            endpoint=endpoint,
            run_id=run.id,
            base_model=run.base_model or base_model,
            lora_rank=rank,
            max_request_bytes=self._max_request_bytes,
        )
        init = await client.init_trainer_server_async(rank)
        await init.result_async()
        self._children.add(client)
        client._start_heartbeat(self._heartbeat_interval)
        return client

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        *,
        seed: int | None = None,
        max_seq_len: int | None = None,
        name: str | None = None,
    ) -> TrainingClient:
        """Async twin of :meth:`create_lora_training_client`."""
        return await self._create_training_client(
            base_model, rank, seed=seed, max_seq_len=max_seq_len, name=name
        )

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        *,
        seed: int | None = None,
        max_seq_len: int | None = None,
        name: str | None = None,
    ) -> TrainingClient:
        """Provision a trainer for a fresh LoRA adapter and return its client.

        Creates the session on first use, ``POST /trainers``, waits until the trainer answers
        ``/health`` (bounded by ``ready_timeout``), then runs ``init_trainer_server`` (seq 1).
        """
        return _portal.run(
            self.create_lora_training_client_async,
            base_model,
            rank,
            seed=seed,
            max_seq_len=max_seq_len,
            name=name,
            twin="create_lora_training_client_async",
        )

    async def _from_state(self, path: str, *, with_optimizer: bool) -> TrainingClient:
        _validate.check_checkpoint_path(path)
        checkpoint = await self._checkpoint_at(path)
        if checkpoint.target not in (None, "trainer") and with_optimizer:
            raise errors.ValidationError(
                f"path: {path} is a sampler checkpoint (adapter only); resuming with the "
                "optimizer needs a save_state checkpoint"
            )
        rank = (checkpoint.lora_adapter_config or {}).get("r")
        if not isinstance(rank, int) or not checkpoint.base_model:
            raise errors.ProtocolError(f"checkpoint {path} does not say its base model and rank")
        client = await self._create_training_client(checkpoint.base_model, rank, path=path)
        future = await (
            client.load_state_with_optimizer_async(path)
            if with_optimizer
            else client.load_state_async(path)
        )
        await future.result_async()
        return client

    async def create_training_client_from_state_async(self, path: str) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state`."""
        return await self._from_state(path, with_optimizer=False)

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new training run that starts from the adapter weights of checkpoint ``path``
        (any run's ``save_state`` or sampler checkpoint); the optimizer starts fresh."""
        return _portal.run(
            self.create_training_client_from_state_async,
            path,
            twin="create_training_client_from_state_async",
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str
    ) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state_with_optimizer`."""
        return await self._from_state(path, with_optimizer=True)

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """A new training run that resumes exactly from a ``save_state`` checkpoint: adapter
        weights, Adam moments and the step counter."""
        return _portal.run(
            self.create_training_client_from_state_with_optimizer_async,
            path,
            twin="create_training_client_from_state_with_optimizer_async",
        )

    # ------------------------------------------------------------------ sampling clients

    async def _create_sampler(self, request: CreateSamplerRequest) -> SamplerInfo:
        root = await self._loops_root(team_scoped=True)
        created = await self._request_typed(
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
        backoff = Backoff(self._ready_timeout, base=0.1, cap=2.0)
        while True:
            status = (await self._request_typed("GET", url, SamplerDeploymentStatus)).status
            status = status.upper()
            if status == "ACTIVE":
                return
            if status in _TERMINAL_SAMPLER_STATES:
                raise errors.DeploymentError(f"sampler {sampler.id} deployment is {status}")
            if status == "SCALED_TO_ZERO":
                await self._request("POST", f"{sampler.base_url.rstrip('/')}/wake", body={})
            if not await backoff.wait():
                raise errors.OperationTimeoutError(
                    f"sampler {sampler.id} not ready after {self._ready_timeout:g} s ({status})"
                )

    async def _paired_sampler(self, run_id: str) -> SamplerInfo:
        """The sampler paired with a run (created once; the route is idempotent per run)."""
        sampler = self._paired.get(run_id)
        if sampler is None:
            session_id = await self._ensure_session()
            sampler = await self._create_sampler(
                CreateSamplerRequest(session_id=session_id, run_id=run_id)
            )
            self._paired[run_id] = sampler
        return sampler

    async def _wait_policy_version(self, sampler: SamplerInfo, run_id: str, version: int) -> None:
        """Poll ``GET {sampler}/trainers_policy_version`` until it reaches ``version``."""
        url = f"{sampler.base_url.rstrip('/')}/trainers_policy_version"
        backoff = Backoff(self._ready_timeout, base=0.02, cap=1.0)
        while True:
            response = await self._transport.request("GET", url, headers={"X-Run-Id": run_id})
            if response.status_code == 200:
                served = decoder_for(PolicyVersion).decode(response.content).policy_version
                if served >= version:
                    return
            elif response.status_code not in (404, 408, 502, 503, 504):
                raise error_for_response(response)
            if not await backoff.wait():
                raise errors.OperationTimeoutError(
                    f"sampler {sampler.id} did not reach policy version {version} "
                    f"within {self._ready_timeout:g} s"
                )

    def _sampling_client(
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
            transport=self._transport,
            base_url=sampler.base_url,
            base_model=sampler.base_model or base_model,
            headers=headers,
            ready_timeout=self._ready_timeout,
            sample_timeout=self._sample_timeout,
            shared=shared,
            lora=pin if shared else None,
        )

    async def create_sampling_client_async(
        self, base_model: str | None = None, *, model_path: str | None = None
    ) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client`."""
        self._check_open()
        if (base_model is None) == (model_path is None):
            raise errors.ValidationError("give exactly one of base_model= or model_path=")
        session_id = await self._ensure_session()
        if model_path is not None:
            _validate.check_checkpoint_path(model_path, "model_path")
            checkpoint = await self._checkpoint_at(model_path)
            request = CreateSamplerRequest(
                session_id=session_id, availability_model="dedicated", model_path=model_path
            )
            sampler = await self._create_sampler(request)
            headers = {"X-Checkpoint-Path": model_path}
            if sampler.model_id is None:  # shared: pinned by the body, so name the sampler
                headers = {"X-Sampler-Id": sampler.id}
            return self._sampling_client(
                sampler, checkpoint.base_model or "", headers, pin=model_path
            )
        assert base_model is not None
        if not isinstance(base_model, str) or not base_model:
            raise errors.ValidationError(f"base_model: expected a model name, got {base_model!r}")
        request = CreateSamplerRequest(
            session_id=session_id, availability_model="dedicated", base_model=base_model
        )
        sampler = await self._create_sampler(request)
        return self._sampling_client(sampler, base_model, {"X-Sampler-Id": sampler.id})

    def create_sampling_client(
        self, base_model: str | None = None, *, model_path: str | None = None
    ) -> SamplingClient:
        """A sampler for a base model (``base_model=``) or a saved checkpoint
        (``model_path="bt://loops:<run>/sampler_weights/<name>"``), on its own capacity."""
        return _portal.run(
            self.create_sampling_client_async,
            base_model,
            model_path=model_path,
            twin="create_sampling_client_async",
        )

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints_async(self, run_id: str) -> list[Checkpoint]:
        """Async twin of :meth:`list_checkpoints`."""
        self._check_open()
        if not isinstance(run_id, str) or not run_id:
            raise errors.ValidationError(f"run_id: expected a run id, got {run_id!r}")
        listed = await self._request_typed(
            "GET",
            f"{self._base_url}/v1/loops/checkpoints",
            CheckpointList,
            params={"run_id": run_id},
        )
        return listed.checkpoints

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The checkpoints saved by run ``run_id`` (trainer and sampler ones)."""
        return _portal.run(self.list_checkpoints_async, run_id, twin="list_checkpoints_async")

    async def _checkpoint_at(self, path: str) -> Checkpoint:
        listed = await self._request_typed(
            "GET",
            f"{self._base_url}/v1/loops/checkpoints",
            CheckpointList,
            params={"checkpoint_path": path},
        )
        for checkpoint in listed.checkpoints:
            if checkpoint.path == path or len(listed.checkpoints) == 1:
                return checkpoint
        raise errors.ValidationError(f"path: no checkpoint {path} on {self._base_url}")

    async def get_checkpoint_archive_url_async(self, path: str) -> CheckpointArchive:
        """Async twin of :meth:`get_checkpoint_archive_url`."""
        self._check_open()
        _validate.check_checkpoint_path(path)
        checkpoint = await self._checkpoint_at(path)
        root = f"{self._base_url}/v1/loops/checkpoints/{quote(checkpoint.id, safe='')}"
        source = await self._request_typed("GET", f"{root}/source", CheckpointSource)
        log.debug("checkpoint %s source: %s", checkpoint.id, source.source.kind)
        files: list[CheckpointFile] = []
        token: str | int | None = 0
        while token is not None:
            page = await self._request_typed(
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

    def get_checkpoint_archive_url(self, path: str) -> CheckpointArchive:
        """The download URLs of every file of checkpoint ``path`` (Loops serves a checkpoint
        as a set of presigned file URLs, not one archive)."""
        return _portal.run(
            self.get_checkpoint_archive_url_async, path, twin="get_checkpoint_archive_url_async"
        )

    async def download_checkpoint_async(self, path: str, destination: str | Path) -> Path:
        """Async twin of :meth:`download_checkpoint`."""
        archive = await self.get_checkpoint_archive_url_async(path)
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
                await self._transport.download(item.url, Path(out))
            await partial.rename(target)
        finally:
            if await partial.exists():
                await anyio.to_thread.run_sync(shutil.rmtree, partial, True)
        return Path(target)

    def download_checkpoint(self, path: str, destination: str | Path) -> Path:
        """Download every file of checkpoint ``path`` into the new directory ``destination``
        (written aside, then renamed into place); returns it. A trainer checkpoint holds the
        PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``) and optimizer
        state; a sampler checkpoint the adapter only."""
        return _portal.run(
            self.download_checkpoint_async, path, destination, twin="download_checkpoint_async"
        )

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        """Async twin of :meth:`get_server_capabilities`."""
        self._check_open()
        return await self._request_typed(
            "GET", f"{self._base_url}/v1/loops/capabilities", ServerCapabilities
        )

    def get_server_capabilities(self) -> ServerCapabilities:
        """The base models the server supports and their context lengths."""
        return _portal.run(self.get_server_capabilities_async, twin="get_server_capabilities_async")

    # ------------------------------------------------------------------ background tasks

    def _spawn_background(self, func: Callable[..., Awaitable[Any]], *args: Any) -> _BackgroundTask:
        """Run ``func(*args)`` until cancelled: in our task group when ``async with`` is active
        on the calling loop, else on the portal."""
        group, loop = self._task_group, self._task_group_loop
        if group is not None and loop is not None:
            try:
                here = current_loop().native_token
            except anyio.NoEventLoopError:
                here = None
            if here is loop.native_token:
                scope = anyio.CancelScope()
                group.start_soon(_run_in_scope, scope, func, *args)
                return _BackgroundTask(lambda: wake_soon(loop, scope.cancel))
        return _BackgroundTask(_portal.spawn(_run_in_scope, anyio.CancelScope(), func, *args))

    # ------------------------------------------------------------------ lifetime

    def _close_children(self) -> None:
        self._closed = True
        for child in list(self._children):
            child.close()

    async def aclose(self) -> None:
        """Close every training client made by this client and every HTTP connection."""
        self._close_children()
        await self._transport.aclose()

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`."""
        _portal.ensure_sync_context("aclose")
        self._close_children()
        self._transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ServiceClient:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group, self._task_group_loop = group, current_loop()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        group, self._task_group = self._task_group, None
        self._task_group_loop = None
        try:
            self._close_children()
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(*exc_info)
        finally:
            with anyio.CancelScope(shield=True):
                await self._transport.aclose()
