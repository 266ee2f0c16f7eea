"""``ServiceClient``: the entry point. Provisions trainers on a Loops control plane."""

from __future__ import annotations

import enum
import logging
import os
import weakref
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import httpx

from . import _portal, _validate, errors
from ._background import BackgroundTasks
from ._chunking import MAX_REQUEST_BYTES
from ._control import Control, Settings
from ._http import Transport
from ._loop import in_event_loop
from ._wire import CreateSamplerRequest, CreateTrainerRequest
from .sampling import SamplingClient
from .tracking import start_wandb
from .training import TrainingClient
from .types import (
    AvailabilityModel,
    Checkpoint,
    CheckpointDownload,
    CheckpointFilesResponse,
    CheckpointTarget,
    SamplerScope,
    ServerCapabilities,
    TrainerScope,
    WandbConfig,
)

__all__ = ["DEFAULT_BASE_URL", "ServiceClient"]

log = logging.getLogger("loops_async")
E = TypeVar("E", bound=enum.Enum)

DEFAULT_BASE_URL = "https://api.baseten.co"
"""The hosted Loops service, used when neither ``base_url`` nor ``$LOOPS_BASE_URL`` is set."""


def _scope(value: object, default: str | None, kind: type[E], field: str) -> str | None:
    """A scope value checked against ``kind`` (``None`` or ``"default"``: no scope)."""
    chosen = value if value is not None else default
    if chosen is None:
        return None
    text = str(chosen.value if isinstance(chosen, enum.Enum) else chosen)
    allowed = [str(member.value) for member in kind]
    if text not in allowed:
        if value is None:  # from $BASETEN_LOOPS_SCOPE
            log.warning("ignoring BASETEN_LOOPS_SCOPE=%r for %s", text, kind.__name__)
            return None
        raise errors.ValidationError(f"{field}: expected one of {allowed}, got {text!r}")
    return None if text == "default" else text


class ServiceClient:
    """Entry point of the Loops API: sessions, training runs, samplers and checkpoints.

    A drop-in for the official ``baseten-loops`` ``ServiceClient``: the same keywords, the same
    environment variables (``LOOPS_BASE_URL``, ``BASETEN_API_KEY``, ``LOOPS_TEAM``,
    ``LOOPS_AVAILABILITY_MODEL``, ``LOOPS_REUSE_FROM_RUN_ID``, ``LOOPS_REUSE_FROM_SESSION_ID``,
    ``BASETEN_LOOPS_SCOPE``, ``INTERNAL_LOOPS_BACKEND_VERSION``), the same defaults. The API key
    is sent as ``Authorization: Api-Key <key>`` and never shown in reprs or logs. Constructing
    the client does no I/O; the session is created on first use (reading :attr:`session_id`
    from sync code creates it).

    Sync code calls the plain methods; async code (asyncio or trio) awaits the ``*_async``
    twins. ``close()``/``aclose()`` or a ``with``/``async with`` block release every connection
    and background task; ``async with`` also keeps background work (heartbeats) on your loop.

    Args:
        base_url: the server: ``$LOOPS_BASE_URL``, else the hosted service
            (``https://api.baseten.co``); ``http://127.0.0.1:8700`` for ``loops-async serve``.
        api_key: the API key (``$BASETEN_API_KEY``), if the server needs one.
        team: a team name or id (``$LOOPS_TEAM``); sessions, trainers and samplers are then
            created under ``/v1/teams/<team_id>/loops``.
        reuse_from_run_id: provision new trainers on the deployment of this earlier run
            (``$LOOPS_REUSE_FROM_RUN_ID``), skipping a cold start.
        reuse_from_session_id: the same by session (``$LOOPS_REUSE_FROM_SESSION_ID``;
            deprecated upstream; ignored when ``reuse_from_run_id`` is set).
        availability_model: ``"dedicated"`` (default) or ``"spot"`` capacity for trainers
            (``$LOOPS_AVAILABILITY_MODEL``).
        internal_backend_version: a backend version to provision on
            (``$INTERNAL_LOOPS_BACKEND_VERSION``; uses the control plane's debug routes).
        timeout: the default HTTP timeout in seconds (long-polls use their own).
        ready_timeout: how long to wait for a trainer or sampler to become ready, and the bound
            on retrying requests that fail while one starts (3600 s, as the hosted service's
            cold starts can take minutes).
        heartbeat_interval: seconds between a training client's ``/health`` pings (0: off).
        sample_timeout: how long one sample request may take to answer (read timeout).
        max_connections: the cap on requests in flight, per event loop, of trainer and
            control-plane traffic (submits, long-polls, heartbeats); more concurrent requests
            queue in the client, first come first served.
        max_sampling_connections: the same for sampling traffic, a separate lane, so that
            thousands of samples in flight never delay a trainer submit (default:
            ``max_connections``). The connection pool holds both lanes at once.
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
        reuse_from_run_id: str | None = None,
        reuse_from_session_id: str | None = None,
        availability_model: str | AvailabilityModel | None = None,
        internal_backend_version: str | None = None,
        timeout: float = 60.0,
        ready_timeout: float = 3600.0,
        heartbeat_interval: float = 60.0,
        sample_timeout: float = 600.0,
        max_connections: int = 100,
        max_sampling_connections: int | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        http_transport: httpx.AsyncBaseTransport | None = None,
        _local: tuple[str, str] | None = None,
    ) -> None:
        url = base_url or os.environ.get("LOOPS_BASE_URL") or DEFAULT_BASE_URL
        if not url.startswith(("http://", "https://")):
            raise errors.ValidationError(f"base_url: expected an http(s) URL, got {url!r}")
        api_key = api_key or os.environ.get("BASETEN_API_KEY") or None
        if api_key is not None:
            api_key = _validate.check_api_key(api_key)
        availability = str(
            availability_model or os.environ.get("LOOPS_AVAILABILITY_MODEL") or "dedicated"
        )
        if availability not in AvailabilityModel.__members__.values():
            raise errors.ValidationError(
                f"availability_model: expected 'dedicated' or 'spot', got {availability!r}"
            )
        if availability == AvailabilityModel.spot:
            log.warning("spot capacity: a trainer can be preempted (its run then fails)")
        reuse_run = reuse_from_run_id or os.environ.get("LOOPS_REUSE_FROM_RUN_ID") or None
        reuse_session = (
            reuse_from_session_id or os.environ.get("LOOPS_REUSE_FROM_SESSION_ID") or None
        )
        if reuse_run is not None:
            reuse_session = None
        elif reuse_session is not None:
            log.warning("reuse_from_session_id is deprecated upstream; prefer reuse_from_run_id")
        self._base_url = url.rstrip("/")
        self._has_key = bool(api_key)
        self._transport = Transport(
            api_key=api_key,
            timeout=_validate.check_seconds(timeout, "timeout", allow_none=False) or 60.0,
            max_connections=_validate.check_positive_int(max_connections, "max_connections"),
            max_sampling_connections=_validate.check_positive_int(
                max_connections if max_sampling_connections is None else max_sampling_connections,
                "max_sampling_connections",
            ),
            transport=http_transport,
        )
        self._background = BackgroundTasks(f"ServiceClient {self._base_url}")
        self._control = Control(
            Settings(
                base_url=self._base_url,
                team=team or os.environ.get("LOOPS_TEAM") or None,
                ready_timeout=_validate.check_seconds(ready_timeout, "ready_timeout") or 3600.0,
                heartbeat_interval=float(heartbeat_interval),
                sample_timeout=_validate.check_seconds(sample_timeout, "sample_timeout") or 600.0,
                max_request_bytes=_validate.check_positive_int(
                    max_request_bytes, "max_request_bytes"
                ),
                availability_model=availability,
                reuse_from_run_id=reuse_run,
                reuse_from_session_id=reuse_session,
                backend_version=internal_backend_version
                or os.environ.get("INTERNAL_LOOPS_BACKEND_VERSION")
                or None,
                default_scope=os.environ.get("BASETEN_LOOPS_SCOPE") or None,
                local=_local,
            ),
            self._transport,
            self._background,
        )
        self._children: weakref.WeakSet[TrainingClient] = weakref.WeakSet()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False

    @classmethod
    def local(cls, *, trainer_url: str, sampler_url: str, **options: Any) -> ServiceClient:
        """A client for a trainer and a sampler you started yourself: nothing is provisioned
        (no session, trainer or sampler is created); ``create_lora_training_client`` talks to
        ``trainer_url`` and its sampling clients to ``sampler_url``. ``options`` are the other
        keywords of the constructor."""
        for name, value in (("trainer_url", trainer_url), ("sampler_url", sampler_url)):
            if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                raise errors.ValidationError(f"{name}: expected an http(s) URL, got {value!r}")
        return cls(
            base_url=trainer_url,
            _local=(trainer_url.rstrip("/"), sampler_url.rstrip("/")),
            **options,
        )

    def __repr__(self) -> str:
        key = " api_key=***" if self._has_key else ""
        return f"<ServiceClient {self._base_url}{key}{' closed' if self._closed else ''}>"

    @property
    def base_url(self) -> str:
        """The server's base URL."""
        return self._base_url

    @property
    def session_id(self) -> str | None:
        """The id of this client's session. Read from sync code before the first call, it
        creates the session (one request); inside an event loop it is ``None`` until then
        (``await service.ensure_session_async()`` creates it)."""
        current = self._control.session_id
        if current is None and not self._closed and not in_event_loop():
            return self.ensure_session()
        return current

    async def ensure_session_async(self) -> str:
        """Async twin of :meth:`ensure_session`."""
        self._check_open()
        return await self._control.ensure_session()

    def ensure_session(self) -> str:
        """Create this client's session now, if it was not yet (``POST /sessions``); returns
        its id."""
        return _portal.run(self.ensure_session_async, twin="ensure_session_async")

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClientClosedError(f"{self!r} is closed")

    # ------------------------------------------------------------------ training clients

    async def _create_training_client(
        self,
        base_model: str,
        rank: int,
        *,
        replicas: int = 1,
        seed: int | None = None,
        max_seq_len: int | None = None,
        timeout: float = 600.0,
        ready_timeout: float | None = None,
        sampler_timeout: float | None = None,
        wandb_config: WandbConfig | None = None,
        with_sampler: bool = False,
        name: str | None = None,
        sampler_num_replicas: int | None = None,
        scope: str | TrainerScope | None = None,
        base_checkpoint: str | None = None,
        path: str | None = None,
    ) -> TrainingClient:
        self._check_open()
        if not isinstance(base_model, str) or not base_model:
            raise errors.ValidationError(f"base_model: expected a model name, got {base_model!r}")
        rank = _validate.check_positive_int(rank, "rank")
        replicas = _validate.check_replicas(replicas, "replicas")
        if sampler_num_replicas is not None:
            _validate.check_replicas(sampler_num_replicas, "sampler_num_replicas")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise errors.ValidationError(f"seed: expected an integer, got {seed!r}")
        if max_seq_len is not None:
            _validate.check_positive_int(max_seq_len, "max_seq_len")
        if name is not None and (not isinstance(name, str) or not name):
            raise errors.ValidationError(f"name: expected a non-empty string, got {name!r}")
        if wandb_config is not None and not isinstance(wandb_config, WandbConfig):
            raise errors.ValidationError(
                f"wandb_config: expected WandbConfig, got {type(wandb_config).__name__}"
            )
        op_timeout = _validate.check_seconds(timeout, "timeout", allow_none=False) or 600.0
        ready = _validate.check_seconds(ready_timeout, "ready_timeout")
        sampler_read = _validate.check_seconds(sampler_timeout, "sampler_timeout")
        control = self._control
        settings = control.settings
        if base_checkpoint is not None and (
            settings.reuse_from_run_id or settings.reuse_from_session_id
        ):
            raise errors.ValidationError(
                "base_checkpoint cannot be combined with reuse_from_run_id / "
                "reuse_from_session_id (a reused trainer keeps its base)"
            )
        trainer_scope = _scope(scope, settings.default_scope, TrainerScope, "scope")
        session_id = await control.ensure_session()
        request = CreateTrainerRequest(
            session_id=session_id,
            base_model=base_model,
            lora_rank=rank,
            replicas=replicas,
            availability_model=settings.availability_model,
            seed=seed,
            max_seq_len=max_seq_len,
            name=name,
            path=path,
            base_checkpoint=base_checkpoint,
            reuse_from_run_id=settings.reuse_from_run_id,
            reuse_from_session_id=settings.reuse_from_session_id,
        )
        run = await control.create_trainer(request, scope=trainer_scope)
        ready = ready if ready is not None else settings.ready_timeout
        endpoint = control.trainer_endpoint(run, ready_timeout=ready, timeout=op_timeout)
        await control.wait_trainer_ready(endpoint, run, ready_timeout=ready)
        client = TrainingClient(
            control=control,
            endpoint=endpoint,
            run_id=run.id or None,
            base_model=run.base_model or base_model,
            lora_rank=rank,
            max_seq_len=max_seq_len,
            base_checkpoint=run.base_checkpoint or base_checkpoint,
            sampler_timeout=sampler_read,
            sampler_num_replicas=sampler_num_replicas,
        )
        init = await client.init_trainer_server_async(rank)
        await init.result_async()
        self._children.add(client)
        if with_sampler and client.run_id is not None:
            try:
                await control.paired_sampler(client.run_id, num_replicas=sampler_num_replicas)
            except errors.LoopsError:
                # As upstream: the trainer is usable; the sampler is created again on demand.
                log.warning("could not create the paired sampler of %s", run.id, exc_info=True)
        if wandb_config is not None:
            client.add_metrics_sink(
                await anyio.to_thread.run_sync(start_wandb, wandb_config, client)
            )
        client._start_heartbeat(settings.heartbeat_interval)
        return client

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        replicas: int = 1,
        seed: int | None = None,
        max_seq_len: int | None = None,
        timeout: float = 600.0,
        ready_timeout: float | None = None,
        sampler_timeout: float | None = None,
        wandb_config: WandbConfig | None = None,
        with_sampler: bool = False,
        name: str | None = None,
        sampler_num_replicas: int | None = None,
        scope: str | TrainerScope | None = None,
        base_checkpoint: str | None = None,
    ) -> TrainingClient:
        """Async twin of :meth:`create_lora_training_client`."""
        return await self._create_training_client(
            base_model,
            rank,
            replicas=replicas,
            seed=seed,
            max_seq_len=max_seq_len,
            timeout=timeout,
            ready_timeout=ready_timeout,
            sampler_timeout=sampler_timeout,
            wandb_config=wandb_config,
            with_sampler=with_sampler,
            name=name,
            sampler_num_replicas=sampler_num_replicas,
            scope=scope,
            base_checkpoint=base_checkpoint,
        )

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        replicas: int = 1,
        seed: int | None = None,
        max_seq_len: int | None = None,
        timeout: float = 600.0,
        ready_timeout: float | None = None,
        sampler_timeout: float | None = None,
        wandb_config: WandbConfig | None = None,
        with_sampler: bool = False,
        name: str | None = None,
        sampler_num_replicas: int | None = None,
        scope: str | TrainerScope | None = None,
        base_checkpoint: str | None = None,
    ) -> TrainingClient:
        """Provision a trainer for a fresh LoRA adapter of ``rank`` on ``base_model`` and
        return its client.

        Creates the session on first use, ``POST /trainers`` (always with ``replicas`` and
        ``availability_model``; 300 s read timeout, as provisioning may take minutes), waits
        until the trainer answers ``/health`` (bounded by ``ready_timeout``; ``None`` means the
        client's, 3600 s by default), then runs ``init_trainer_server`` (seq 1).

        ``timeout`` is the trainer's request timeout, ``sampler_timeout`` the read timeout of
        its sampling clients (``None``: the client's ``sample_timeout``). ``with_sampler``
        creates the paired sampler now (a failure is logged; it is retried on first use) with
        ``sampler_num_replicas``. ``seed``, ``max_seq_len``, ``name``, ``scope`` and
        ``base_checkpoint`` (start from a checkpoint's weights) are sent to the control plane.
        ``wandb_config`` starts a Weights & Biases run that logs every operation's metrics
        (needs ``pip install loops-async[wandb]``); ``close()`` finishes it.
        """
        return _portal.run(
            self.create_lora_training_client_async,
            base_model,
            rank,
            replicas,
            seed,
            max_seq_len,
            timeout,
            ready_timeout,
            sampler_timeout,
            wandb_config,
            with_sampler,
            name,
            sampler_num_replicas,
            scope,
            base_checkpoint,
            twin="create_lora_training_client_async",
        )

    async def _from_state(
        self, path: str, *, with_optimizer: bool, replicas: int
    ) -> TrainingClient:
        _validate.check_checkpoint_path(path)
        checkpoint = await self._control.checkpoint_at(path)
        if checkpoint.target not in (None, "trainer") and with_optimizer:
            raise errors.ValidationError(
                f"path: {path} is a sampler checkpoint (adapter only); resuming with the "
                "optimizer needs a save_state checkpoint"
            )
        rank = checkpoint.lora_adapter_config.r if checkpoint.lora_adapter_config else None
        if not isinstance(rank, int) or not checkpoint.base_model:
            raise errors.ProtocolError(f"checkpoint {path} does not say its base model and rank")
        client = await self._create_training_client(
            checkpoint.base_model, rank, replicas=replicas, path=path
        )
        future = await (
            client.load_state_with_optimizer_async(path)
            if with_optimizer
            else client.load_state_async(path)
        )
        await future.result_async()
        return client

    async def create_training_client_from_state_async(
        self, path: str, user_metadata: dict[str, Any] | None = None, replicas: int = 1
    ) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state`."""
        return await self._from_state(path, with_optimizer=False, replicas=replicas)

    def create_training_client_from_state(
        self, path: str, user_metadata: dict[str, Any] | None = None, replicas: int = 1
    ) -> TrainingClient:
        """A new training run that starts from the adapter weights of checkpoint ``path``
        (any run's ``save_state`` or sampler checkpoint); the optimizer starts fresh.
        ``user_metadata`` is accepted for compatibility and not sent (as upstream)."""
        return _portal.run(
            self.create_training_client_from_state_async,
            path,
            user_metadata,
            replicas,
            twin="create_training_client_from_state_async",
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, user_metadata: dict[str, Any] | None = None, replicas: int = 1
    ) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state_with_optimizer`."""
        return await self._from_state(path, with_optimizer=True, replicas=replicas)

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: dict[str, Any] | None = None, replicas: int = 1
    ) -> TrainingClient:
        """A new training run that resumes exactly from a ``save_state`` checkpoint: adapter
        weights, Adam moments and the step counter."""
        return _portal.run(
            self.create_training_client_from_state_with_optimizer_async,
            path,
            user_metadata,
            replicas,
            twin="create_training_client_from_state_with_optimizer_async",
        )

    # ------------------------------------------------------------------ sampling clients

    async def create_sampling_client_async(
        self,
        base_model: str | None = None,
        timeout: float | None = None,
        ready_timeout: float | None = None,
        model_path: str | None = None,
        max_seq_len: int | None = None,
        num_replicas: int | None = None,
        scope: str | SamplerScope | None = None,
    ) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client`."""
        self._check_open()
        if (base_model is None) == (model_path is None):
            raise errors.ValidationError("give exactly one of base_model= or model_path=")
        read = _validate.check_seconds(timeout, "timeout")
        ready = _validate.check_seconds(ready_timeout, "ready_timeout")
        if max_seq_len is not None:
            _validate.check_positive_int(max_seq_len, "max_seq_len")
        if num_replicas is not None:
            _validate.check_replicas(num_replicas, "num_replicas")
        control = self._control
        sampler_scope = _scope(scope, control.settings.default_scope, SamplerScope, "scope")
        if sampler_scope == "team":
            sampler_scope = None  # samplers have no team scope: the default
        session_id = await control.ensure_session()
        request = CreateSamplerRequest(
            session_id=session_id,
            availability_model="dedicated",
            max_seq_length=max_seq_len,
            num_replicas=num_replicas,
            reuse_from_session_id=control.settings.reuse_from_session_id,
        )
        if model_path is not None:
            _validate.check_checkpoint_path(model_path, "model_path")
            checkpoint = await control.checkpoint_at(model_path)
            request.model_path = model_path
            sampler = await control.create_sampler(request, scope=sampler_scope, ready=ready)
            headers = {"X-Checkpoint-Path": model_path}
            if sampler.model_id is None:  # shared: pinned by the body too, so name the sampler
                headers["X-Sampler-Id"] = sampler.id
            return control.sampling_client(
                sampler,
                checkpoint.base_model or "",
                headers,
                pin=model_path,
                sample_timeout=read,
                ready_timeout=ready,
            )
        assert base_model is not None
        if not isinstance(base_model, str) or not base_model:
            raise errors.ValidationError(f"base_model: expected a model name, got {base_model!r}")
        request.base_model = base_model
        sampler = await control.create_sampler(request, scope=sampler_scope, ready=ready)
        return control.sampling_client(
            sampler,
            base_model,
            {"X-Sampler-Id": sampler.id},
            sample_timeout=read,
            ready_timeout=ready,
        )

    def create_sampling_client(
        self,
        base_model: str | None = None,
        timeout: float | None = None,
        ready_timeout: float | None = None,
        model_path: str | None = None,
        max_seq_len: int | None = None,
        num_replicas: int | None = None,
        scope: str | SamplerScope | None = None,
    ) -> SamplingClient:
        """A sampler of its own for a base model (``base_model=``) or a saved checkpoint
        (``model_path="bt://loops:<run>/sampler_weights/<name>"``).

        ``timeout`` is the sample read timeout (``None``: the client's ``sample_timeout``),
        ``ready_timeout`` how long to wait for the sampler (``None``: the client's);
        ``max_seq_len`` (sent as ``max_seq_length``), ``num_replicas`` and ``scope``
        (``"serverless"``: shared capacity) go to the control plane.
        """
        return _portal.run(
            self.create_sampling_client_async,
            base_model,
            timeout,
            ready_timeout,
            model_path,
            max_seq_len,
            num_replicas,
            scope,
            twin="create_sampling_client_async",
        )

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints_async(self, run_id: str) -> list[Checkpoint]:
        """Async twin of :meth:`list_checkpoints`."""
        self._check_open()
        return await self._control.list_checkpoints(run_id)

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The checkpoints saved by run ``run_id`` (trainer and sampler ones)."""
        return _portal.run(self.list_checkpoints_async, run_id, twin="list_checkpoints_async")

    async def get_checkpoint_archive_url_async(
        self,
        checkpoint_id: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
        target: str | CheckpointTarget | None = None,
        page_size: int = 1000,
        page_token: int | str = 0,
    ) -> CheckpointFilesResponse:
        """Async twin of :meth:`get_checkpoint_archive_url`."""
        self._check_open()
        resolved = await self._control.resolve_checkpoint(checkpoint_id, name, run_id, target)
        return await self._control.checkpoint_files(
            resolved, page_size=page_size, page_token=page_token
        )

    def get_checkpoint_archive_url(
        self,
        checkpoint_id: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
        target: str | CheckpointTarget | None = None,
        page_size: int = 1000,
        page_token: int | str = 0,
    ) -> CheckpointFilesResponse:
        """One page of presigned download URLs of a checkpoint's files (Loops serves a
        checkpoint as files, not one archive). Name it by ``checkpoint_id`` (an id, or a
        ``bt://`` path) or by ``name`` and ``run_id`` (``target`` picks the trainer or sampler
        checkpoint when a run has both). Pass ``next_page_token`` back as ``page_token`` for
        the next page."""
        return _portal.run(
            self.get_checkpoint_archive_url_async,
            checkpoint_id,
            name,
            run_id,
            target,
            page_size,
            page_token,
            twin="get_checkpoint_archive_url_async",
        )

    async def download_checkpoint_async(
        self,
        checkpoint_id: str | None = None,
        *,
        dest_dir: str | Path,
        name: str | None = None,
        run_id: str | None = None,
        target: str | CheckpointTarget | None = None,
    ) -> CheckpointDownload:
        """Async twin of :meth:`download_checkpoint`."""
        self._check_open()
        resolved = await self._control.resolve_checkpoint(checkpoint_id, name, run_id, target)
        return await self._control.download_checkpoint(resolved, dest_dir)

    def download_checkpoint(
        self,
        checkpoint_id: str | None = None,
        *,
        dest_dir: str | Path,
        name: str | None = None,
        run_id: str | None = None,
        target: str | CheckpointTarget | None = None,
    ) -> CheckpointDownload:
        """Download every file of a checkpoint (named as in
        :meth:`get_checkpoint_archive_url`) into ``dest_dir``, which must be new or empty;
        files are written aside and renamed into place. Presigned links on another origin get
        no ``Authorization`` header. A trainer checkpoint holds the PEFT adapter
        (``adapter_model.safetensors``, ``adapter_config.json``) and optimizer state; a sampler
        checkpoint the adapter only."""
        return _portal.run(
            self.download_checkpoint_async,
            checkpoint_id,
            dest_dir=dest_dir,
            name=name,
            run_id=run_id,
            target=target,
            twin="download_checkpoint_async",
        )

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        """Async twin of :meth:`get_server_capabilities`."""
        self._check_open()
        return await self._control.capabilities()

    def get_server_capabilities(self) -> ServerCapabilities:
        """The base models the server supports and their context lengths."""
        return _portal.run(self.get_server_capabilities_async, twin="get_server_capabilities_async")

    # ------------------------------------------------------------------ lifetime

    def _close_children(self) -> None:
        self._closed = True
        for child in list(self._children):
            child._mark_closed()

    async def aclose(self) -> None:
        """Close every training client made by this client, stop its background tasks and
        close every HTTP connection (bounded in time, even when cancelled)."""
        self._close_children()
        with anyio.CancelScope(shield=True):
            await self._background.aclose()
            await self._transport.aclose()

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`."""
        _portal.ensure_sync_context("aclose")
        self._close_children()
        self._background.close()
        self._transport.close()

    def statistics(self) -> dict[str, int]:
        """Counters for debugging and tests: event loops with open HTTP clients, background
        tasks started, running and failed."""
        stats = self._background.statistics()
        return {
            "http_loops": self._transport.loop_count(),
            "background_started": stats.started,
            "background_running": stats.running,
            "background_failed": stats.failed,
        }

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ServiceClient:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group = group
        self._background.bind(group)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        group, self._task_group = self._task_group, None
        self._background.unbind()
        try:
            self._close_children()
            if group is not None:
                group.cancel_scope.cancel()
                if isinstance(exc_info[1], Exception):
                    # The group holds only guarded background tasks; let the body's own
                    # exception propagate as it is rather than wrapped in a group.
                    await group.__aexit__(None, None, None)
                    return None
                return await group.__aexit__(*exc_info)
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await self._background.aclose()
                await self._transport.aclose()
