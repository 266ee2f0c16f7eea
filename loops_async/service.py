"""``ServiceClient``: the entry point. Provisions trainers on a Loops control plane."""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from . import _portal, _validate, errors
from ._background import BackgroundTasks
from ._chunking import MAX_REQUEST_BYTES
from ._control import Control, Settings
from ._http import Transport
from ._wire import CreateSamplerRequest, CreateTrainerRequest
from .sampling import SamplingClient
from .training import TrainingClient
from .types import Checkpoint, CheckpointArchive, ServerCapabilities

__all__ = ["ServiceClient"]

log = logging.getLogger("loops_async")


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
        timeout: float = 60.0,
        ready_timeout: float = 600.0,
        heartbeat_interval: float = 60.0,
        sample_timeout: float = 600.0,
        max_connections: int = 100,
        max_sampling_connections: int | None = None,
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
        self._transport = Transport(
            api_key=api_key,
            timeout=timeout,
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
                team=team,
                ready_timeout=float(ready_timeout),
                heartbeat_interval=float(heartbeat_interval),
                sample_timeout=float(sample_timeout),
                max_request_bytes=_validate.check_positive_int(
                    max_request_bytes, "max_request_bytes"
                ),
            ),
            self._transport,
            self._background,
        )
        self._children: weakref.WeakSet[TrainingClient] = weakref.WeakSet()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False

    def __repr__(self) -> str:
        key = " api_key=***" if self._has_key else ""
        return f"<ServiceClient {self._base_url}{key}{' closed' if self._closed else ''}>"

    @property
    def base_url(self) -> str:
        """The server's base URL."""
        return self._base_url

    @property
    def session_id(self) -> str | None:
        """The id of this client's session, once it was created (on first use)."""
        return self._control.session_id

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClientClosedError(f"{self!r} is closed")

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
        control = self._control
        session_id = await control.ensure_session()
        request = CreateTrainerRequest(
            session_id=session_id,
            base_model=base_model,
            lora_rank=rank,
            seed=seed,
            max_seq_len=max_seq_len,
            name=name,
            path=path,
        )
        run = await control.create_trainer(request)
        endpoint = control.trainer_endpoint(run)
        await control.wait_trainer_ready(endpoint, run)
        client = TrainingClient(
            control=control,
            endpoint=endpoint,
            run_id=run.id,
            base_model=run.base_model or base_model,
            lora_rank=rank,
        )
        init = await client.init_trainer_server_async(rank)
        await init.result_async()
        self._children.add(client)
        client._start_heartbeat(control.settings.heartbeat_interval)
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
        checkpoint = await self._control.checkpoint_at(path)
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

    async def create_sampling_client_async(
        self, base_model: str | None = None, *, model_path: str | None = None
    ) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client`."""
        self._check_open()
        if (base_model is None) == (model_path is None):
            raise errors.ValidationError("give exactly one of base_model= or model_path=")
        control = self._control
        session_id = await control.ensure_session()
        if model_path is not None:
            _validate.check_checkpoint_path(model_path, "model_path")
            checkpoint = await control.checkpoint_at(model_path)
            request = CreateSamplerRequest(
                session_id=session_id, availability_model="dedicated", model_path=model_path
            )
            sampler = await control.create_sampler(request)
            headers = {"X-Checkpoint-Path": model_path}
            if sampler.model_id is None:  # shared: pinned by the body, so name the sampler
                headers = {"X-Sampler-Id": sampler.id}
            return control.sampling_client(
                sampler, checkpoint.base_model or "", headers, pin=model_path
            )
        assert base_model is not None
        if not isinstance(base_model, str) or not base_model:
            raise errors.ValidationError(f"base_model: expected a model name, got {base_model!r}")
        request = CreateSamplerRequest(
            session_id=session_id, availability_model="dedicated", base_model=base_model
        )
        sampler = await control.create_sampler(request)
        return control.sampling_client(sampler, base_model, {"X-Sampler-Id": sampler.id})

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
        return await self._control.list_checkpoints(run_id)

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The checkpoints saved by run ``run_id`` (trainer and sampler ones)."""
        return _portal.run(self.list_checkpoints_async, run_id, twin="list_checkpoints_async")

    async def get_checkpoint_archive_url_async(self, path: str) -> CheckpointArchive:
        """Async twin of :meth:`get_checkpoint_archive_url`."""
        self._check_open()
        _validate.check_checkpoint_path(path)
        return await self._control.checkpoint_archive(path)

    def get_checkpoint_archive_url(self, path: str) -> CheckpointArchive:
        """The download URLs of every file of checkpoint ``path`` (Loops serves a checkpoint
        as a set of presigned file URLs, not one archive)."""
        return _portal.run(
            self.get_checkpoint_archive_url_async, path, twin="get_checkpoint_archive_url_async"
        )

    async def download_checkpoint_async(self, path: str, destination: str | Path) -> Path:
        """Async twin of :meth:`download_checkpoint`."""
        self._check_open()
        _validate.check_checkpoint_path(path)
        return await self._control.download_checkpoint(path, destination)

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
