"""tinker's ``ServiceClient`` over :class:`loops_async.ServiceClient`.

Configuration, in tinker's order and with the Loops names as fallbacks:

- base URL: ``base_url=``, ``$TINKER_BASE_URL``, ``$LOOPS_BASE_URL``, else the hosted Loops
  service (empty values count as unset; a trailing ``/`` is dropped);
- API key: ``api_key=``, ``$TINKER_API_KEY`` (unless it is a Thinking Machines key, ``tml-...``,
  which is never sent to another service), ``$BASETEN_API_KEY``. ``~/.tinker/credentials.json``
  is not read, for the same reason.

Keywords of :class:`loops_async.ServiceClient` (``timeout``, ``sample_timeout``,
``max_connections``, ``team``, ...) pass through; any other extra keyword is ignored, with one
debug log line. Nothing is sent until the first call.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import errors
from .. import service as core_service
from .._loop import running_loop
from ._futures import AwaitableConcurrentFuture, spawn
from ._paths import to_loops_path
from ._sampling import SamplingClient
from ._training import TrainingClient
from .types import (
    AdamOptimizerConfig,
    GetServerCapabilitiesResponse,
    SupportedModel,
)

if TYPE_CHECKING:
    from ._rest import RestClient

__all__ = ["ServiceClient", "resolve_api_key", "resolve_base_url", "server_capabilities"]

log = logging.getLogger("loops_async.tinker")

_CORE_OPTIONS = frozenset(
    name
    for name in inspect.signature(core_service.ServiceClient.__init__).parameters
    if name not in ("self", "base_url", "api_key") and not name.startswith("_")
)


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_base_url(base_url: str | None) -> str | None:
    """The server URL: ``base_url``, ``$TINKER_BASE_URL``, ``$LOOPS_BASE_URL``, or ``None``
    (the core's default, the hosted service)."""
    url = (base_url or "").strip() or _env("TINKER_BASE_URL") or _env("LOOPS_BASE_URL")
    return url.rstrip("/") if url else None


def resolve_api_key(api_key: str | None) -> str | None:
    """The API key: ``api_key``, ``$TINKER_API_KEY`` (not a ``tml-`` key), ``$BASETEN_API_KEY``."""
    if api_key:
        return api_key
    tinker_key = _env("TINKER_API_KEY")
    if tinker_key is not None and tinker_key.startswith("tml-"):
        log.debug("TINKER_API_KEY holds a Thinking Machines key (tml-...); not sending it")
        tinker_key = None
    return tinker_key or _env("BASETEN_API_KEY")


class _RunRecord:
    """What this process knows about a run it created (tinker's run metadata)."""

    __slots__ = ("created", "user_metadata")

    def __init__(self, user_metadata: dict[str, str] | None) -> None:
        self.user_metadata = user_metadata
        self.created = time.time()


_runs: dict[str, _RunRecord] = {}
_runs_lock = threading.Lock()


def known_run(run_id: str) -> _RunRecord | None:
    """The record of a run created by this process, if any."""
    with _runs_lock:
        return _runs.get(run_id)


async def server_capabilities(core: core_service.ServiceClient) -> GetServerCapabilitiesResponse:
    """The base models ``core``'s server supports, as tinker describes them."""
    found = await core.get_server_capabilities_async()
    return GetServerCapabilitiesResponse(
        supported_models=[
            SupportedModel(
                model_name=m.model_name,
                max_context_length=m.max_context_length,
                trainable=True,
                sampleable=True,
            )
            for m in found.supported_models
        ]
    )


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, AdamOptimizerConfig):
        raise errors.ValidationError(
            f"optimizer: Loops trains with Adam only (AdamOptimizerConfig), got "
            f"{type(optimizer).__name__}"
        )


class ServiceClient:
    """The entry point, as tinker's ``ServiceClient``: makes training and sampling clients.

    ``with ServiceClient() as service:`` closes it on exit. Every ``create_*`` method returns
    the client at once; it is also a future of itself (``.result()`` or ``await`` wait until it
    is provisioned), and its methods may be called right away (they queue behind it).
    """

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        default_headers_overrides: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        options = {k: v for k, v in kwargs.items() if k in _CORE_OPTIONS}
        ignored = sorted(
            [k for k in kwargs if k not in _CORE_OPTIONS]
            + [
                name
                for name, value in (
                    ("project_id", project_id),
                    ("display_name", display_name),
                    ("default_headers_overrides", default_headers_overrides),
                )
                if value is not None
            ]
        )
        if ignored:
            log.debug("loops_async.tinker.ServiceClient ignores %s", ", ".join(ignored))
        self.user_metadata = dict(user_metadata) if user_metadata else None
        """The ``user_metadata`` given (kept on the client; Loops sessions have none)."""
        self.project_id = project_id or _env("TINKER_PROJECT_ID")
        """The tinker project id, if any (Loops has no projects: informational)."""
        self._core = core_service.ServiceClient(
            base_url=resolve_base_url(base_url), api_key=resolve_api_key(api_key), **options
        )
        self._closed = False
        self._rest: RestClient | None = None

    @classmethod
    def from_loops(cls, client: core_service.ServiceClient) -> ServiceClient:
        """A tinker-style client over an existing :class:`loops_async.ServiceClient` (e.g.
        ``loops_async.ServiceClient.local(...)``); closing it closes ``client``."""
        self = cls.__new__(cls)
        self.user_metadata = None
        self.project_id = None
        self._core = client
        self._closed = False
        self._rest = None
        return self

    def __repr__(self) -> str:
        return f"<tinker ServiceClient {self._core.base_url}{' closed' if self._closed else ''}>"

    @property
    def loops_client(self) -> core_service.ServiceClient:
        """The underlying :class:`loops_async.ServiceClient`."""
        return self._core

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ServiceClient is closed")

    def _remember_run(self, run_id: str | None, user_metadata: dict[str, str] | None) -> None:
        if run_id:
            with _runs_lock:
                _runs[run_id] = _RunRecord(user_metadata or self.user_metadata)

    def _training(
        self, make: Callable[[], Any], user_metadata: dict[str, str] | None
    ) -> TrainingClient:
        return TrainingClient(self, spawn(make), user_metadata=user_metadata)

    # ------------------------------------------------------------------ training

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> TrainingClient:
        """A new LoRA training run of ``rank`` on ``base_model``, returned at once (provisioned
        in the background; see the class docstring). Loops applies LoRA to the layers its
        trainer chooses: ``train_mlp``/``train_attn``/``train_unembed`` set to ``False`` are
        logged and ignored."""
        self._check_open()
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("At least one of train_mlp, train_attn, train_unembed must be True")
        if not (train_mlp and train_attn and train_unembed):
            log.warning(
                "Loops applies LoRA to every layer its trainer adapts; train_mlp=%s "
                "train_attn=%s train_unembed=%s is ignored",
                train_mlp,
                train_attn,
                train_unembed,
            )
        _check_optimizer(optimizer)
        core = self._core
        return self._training(
            lambda: core.create_lora_training_client_async(base_model, rank, seed=seed),
            user_metadata,
        )

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> TrainingClient:
        """Like :meth:`create_lora_training_client`, and waits until it is provisioned."""
        return await self.create_lora_training_client(
            base_model,
            rank,
            seed,
            train_mlp,
            train_attn,
            train_unembed,
            user_metadata,
            optimizer,
        )

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: Any = None,
    ) -> TrainingClient:
        """A new training run starting from the adapter weights of checkpoint ``path``
        (``tinker://`` or ``bt://``); the optimizer starts fresh. The base model is the
        checkpoint's (``base_model`` is accepted for compatibility)."""
        self._check_open()
        _check_optimizer(optimizer)
        loops_path = to_loops_path(path)
        core = self._core
        return self._training(
            lambda: core.create_training_client_from_state_async(loops_path), user_metadata
        )

    async def create_training_client_from_state_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: Any = None,
    ) -> TrainingClient:
        """Like :meth:`create_training_client_from_state`, and waits until it is ready."""
        return await self.create_training_client_from_state(
            path, base_model, user_metadata, weights_access_token, optimizer
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> TrainingClient:
        """A new training run resuming checkpoint ``path`` (a ``save_state`` one): adapter
        weights and optimizer state."""
        self._check_open()
        loops_path = to_loops_path(path)
        core = self._core
        return self._training(
            lambda: core.create_training_client_from_state_with_optimizer_async(loops_path),
            user_metadata,
        )

    async def create_training_client_from_state_with_optimizer_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> TrainingClient:
        """Like :meth:`create_training_client_from_state_with_optimizer`, and waits."""
        return await self.create_training_client_from_state_with_optimizer(
            path, base_model, user_metadata, weights_access_token
        )

    # ------------------------------------------------------------------ sampling

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A sampling client of a saved checkpoint (``model_path``, ``tinker://`` or
        ``bt://``, which wins when both are given) or of a base model, returned at once."""
        self._check_open()
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        core = self._core
        if model_path is not None:
            loops_path = to_loops_path(model_path, "model_path")
            ready = spawn(lambda: core.create_sampling_client_async(model_path=loops_path))
        else:
            ready = spawn(lambda: core.create_sampling_client_async(base_model=base_model))
        return SamplingClient(ready, service=self)

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """Like :meth:`create_sampling_client`, and waits until it is ready."""
        return await self.create_sampling_client(
            model_path, base_model, retry_config, record_stability_info
        )

    # ------------------------------------------------------------------ service

    def get_server_capabilities(self) -> AwaitableConcurrentFuture[GetServerCapabilitiesResponse]:
        """The base models the server supports."""
        self._check_open()
        return spawn(server_capabilities, self._core)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        """The base models the server supports, awaited."""
        return await self.get_server_capabilities()

    def create_rest_client(self) -> RestClient:
        """A :class:`RestClient` on this client's connection (checkpoints, runs)."""
        from ._rest import RestClient

        self._check_open()
        if self._rest is None:
            self._rest = RestClient(self)
        return self._rest

    def close(
        self, status: str = "success", detail: str | None = None
    ) -> AwaitableConcurrentFuture[None]:
        """Close the client (idempotent): its trainers' heartbeats stop and its connections
        close. ``status`` and ``detail`` are accepted for compatibility. Returns a future."""
        if self._closed:
            future: AwaitableConcurrentFuture[None] = AwaitableConcurrentFuture()
            future.set_result(None)
            return future
        self._closed = True
        return spawn(self._core.aclose)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type: object, exc_value: object, traceback: object) -> None:
        status = "success" if exc_type is None else "errored"
        closing = self.close(status)
        if running_loop() is None:  # inside an event loop: let it finish in the background
            closing.result()
