"""tinker's ``TrainingClient`` over :class:`loops_async.TrainingClient`.

Every method returns at once, even inside a running event loop: the call takes its turn in this
client's order in the caller's thread, and runs as a coroutine of the core on the portal. The
core reserves the operation's ``seq_id`` on the first step of that coroutine and tells this
layer (:data:`loops_async.training.ON_RESERVED`), which lets the next call go: submits are
pipelined (``forward_backward`` then ``optim_step`` reach the trainer back to back) and the
trainer runs them in call order. A call made while the trainer is still being provisioned
queues behind the provisioning.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import msgspec

from .. import errors
from .. import sampling as core_sampling
from .. import training as core_training
from .. import types as core_types
from ._futures import AwaitableConcurrentFuture, SelfFuture, spawn
from ._paths import LOCAL_RUN_ID, to_loops_path, to_tinker_path
from .types import (
    SUPPORTED_LOSS_FNS,
    AdamParams,
    to_core_data,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ._sampling import SamplingClient
    from ._service import ServiceClient

__all__ = ["TrainingClient"]

log = logging.getLogger("loops_async.tinker")

R = TypeVar("R")

_Mode = Literal["reserve", "start", "end"]
"""When a call lets the next one go: once it reserved its ``seq_id`` (operations), as soon as
it starts (calls that only need the earlier ones to be submitted), or when its submit returns
(``forward_backward_custom``, which runs a forward and then a backward)."""


class _Turn:
    """One call's place in a client's order. Lives on the portal's loop only."""

    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.done = False
        self.event: anyio.Event | None = None

    def set(self) -> None:
        if not self.done:
            self.done = True
            if self.event is not None:
                self.event.set()

    async def wait(self) -> None:
        if not self.done:
            if self.event is None:
                self.event = anyio.Event()
            await self.event.wait()


def check_loss_fn(loss_fn: object) -> str:
    """``loss_fn`` if the Loops trainer implements it, else a ``ValidationError`` naming the
    ones it does."""
    if loss_fn not in SUPPORTED_LOSS_FNS:
        raise errors.ValidationError(
            f"loss_fn: {loss_fn!r} is not supported by Loops; supported: "
            f"{', '.join(SUPPORTED_LOSS_FNS)} (and forward_backward_custom for a loss "
            "computed on the client)"
        )
    return str(loss_fn)


def _loss_config(config: object) -> dict[str, Any] | None:
    if config is None:
        return None
    items = getattr(config, "items", None)
    if not callable(items):
        raise errors.ValidationError(f"loss_fn_config: expected a mapping, got {config!r}")
    return dict(items())


class TrainingClient(SelfFuture["TrainingClient"]):
    """A LoRA training run, as tinker's ``TrainingClient`` (made by
    :meth:`ServiceClient.create_lora_training_client` and friends).

    Usable at once, and a future of itself: ``.result()`` / ``await`` wait until the trainer is
    provisioned. Every operation returns an :class:`~loops_async.tinker.APIFuture` without
    blocking; the trainer runs them in call order, so ``forward_backward`` and ``optim_step``
    may be queued back to back before waiting on either. ``*_async`` methods return the same
    future (await twice for the value), as in tinker.
    """

    _ready: AwaitableConcurrentFuture[core_training.TrainingClient]

    def __init__(
        self,
        service: ServiceClient,
        ready: AwaitableConcurrentFuture[core_training.TrainingClient],
        *,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self._service = service
        self._ready = ready
        self._core: core_training.TrainingClient | None = None
        self._last: _Turn | None = None
        self._order_lock = threading.Lock()
        self._user_metadata = dict(user_metadata) if user_metadata else None
        ready.add_done_callback(self._provisioned)

    def _provisioned(self, ready: concurrent.futures.Future[core_training.TrainingClient]) -> None:
        if not ready.cancelled() and ready.exception() is None:
            core = ready.result()
            self._core = core
            self._service._remember_run(core.run_id, self._user_metadata)

    def __repr__(self) -> str:
        if self._core is None:
            state = "failed" if self._ready.done() else "provisioning"
            return f"<tinker TrainingClient {state}>"
        return f"<tinker TrainingClient model_id={self.model_id!r}>"

    # ------------------------------------------------------------------ plumbing

    def _core_now(self) -> core_training.TrainingClient:
        """The core client, waiting (blocking) for provisioning if needed."""
        if self._core is None:
            return self._ready.result()
        return self._core

    async def _core_async(self) -> core_training.TrainingClient:
        if self._core is not None:
            return self._core
        return await self._ready.result_async()

    def _ordered(
        self,
        submit: Callable[[core_training.TrainingClient], Awaitable[Any]],
        convert: Callable[[Any], R] | None = None,
        *,
        mode: _Mode = "reserve",
        wait_result: bool = True,
    ) -> AwaitableConcurrentFuture[R]:
        """Take this call's turn now (caller's thread) and run ``submit(core)`` on the portal
        once the previous call let it go; the future gets ``convert(await result)``."""
        self._service._check_open()
        with self._order_lock:
            previous = self._last
            turn = self._last = _Turn()
        return spawn(self._run_ordered, previous, turn, submit, convert, mode, wait_result)

    async def _run_ordered(
        self,
        previous: _Turn | None,
        turn: _Turn,
        submit: Callable[[core_training.TrainingClient], Awaitable[Any]],
        convert: Callable[[Any], R] | None,
        mode: _Mode,
        wait_result: bool,
    ) -> R:
        try:
            if previous is not None:
                await previous.wait()
            core = await self._core_async()
            if mode == "start":
                turn.set()
            hook = core_training.ON_RESERVED.set(turn.set if mode == "reserve" else None)
            try:
                submitted = await submit(core)
            finally:
                core_training.ON_RESERVED.reset(hook)
        finally:
            turn.set()  # whatever happened, the next call may go
        result = await submitted.result_async() if wait_result else submitted
        return convert(result) if convert is not None else result

    # ------------------------------------------------------------------ identity

    @property
    def model_id(self) -> str:
        """The training run's id (tinker's model id; ``tinker://<model_id>/...`` paths);
        waits for provisioning."""
        return self._core_now().run_id or LOCAL_RUN_ID

    @property
    def holder(self) -> ServiceClient:
        """The :class:`ServiceClient` that made this client."""
        return self._service

    def get_info(self) -> core_types.GetInfoResponse:
        """The model's description (base model, LoRA rank, tokenizer); waits for
        provisioning, no request."""
        info = self._core_now().get_info()
        return msgspec.structs.replace(info, model_id=self.model_id, is_lora=True)

    async def get_info_async(self) -> core_types.GetInfoResponse:
        """:meth:`get_info`, waiting for provisioning without blocking the event loop."""
        await self._ready.result_async()
        return self.get_info()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (``transformers``); waits for provisioning."""
        return self._core_now().get_tokenizer()

    # ------------------------------------------------------------------ operations

    def forward(
        self,
        data: Sequence[Any],
        loss_fn: str,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """The loss and per-token logprobs of ``data`` without touching gradients."""
        datums, loss, config = self._check_forward(data, loss_fn, loss_fn_config)
        return self._ordered(lambda core: core.forward_async(datums, loss, config))

    async def forward_async(
        self,
        data: Sequence[Any],
        loss_fn: str,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """The same future as :meth:`forward` (await it too)."""
        return self.forward(data, loss_fn, loss_fn_config)

    def forward_backward(
        self,
        data: Sequence[Any],
        loss_fn: str,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """Compute the loss on ``data`` and accumulate its gradient (until
        :meth:`optim_step`)."""
        datums, loss, config = self._check_forward(data, loss_fn, loss_fn_config)
        return self._ordered(lambda core: core.forward_backward_async(datums, loss, config))

    async def forward_backward_async(
        self,
        data: Sequence[Any],
        loss_fn: str,
        loss_fn_config: dict[str, float | str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """The same future as :meth:`forward_backward` (await it too)."""
        return self.forward_backward(data, loss_fn, loss_fn_config)

    @staticmethod
    def _check_forward(
        data: Sequence[Any], loss_fn: object, loss_fn_config: object
    ) -> tuple[list[core_types.Datum], str, dict[str, Any] | None]:
        if not data:
            raise ValueError("No data provided")
        return to_core_data(data), check_loss_fn(loss_fn), _loss_config(loss_fn_config)

    def forward_backward_custom(
        self,
        data: Sequence[Any],
        loss_fn: Callable[..., Any],
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """Accumulate the gradient of a loss computed here with torch:
        ``loss_fn(data, logprobs_list) -> (loss, metrics)``. The trainer runs ``forward``,
        the loss's gradient is evaluated on the client and replayed with a
        ``forward_backward``; later calls wait until the replay is submitted. Server-side
        losses (``LossHandle``) do not exist on Loops."""
        if not callable(loss_fn):
            raise errors.ValidationError(
                f"loss_fn: expected a callable (server-side LossHandle losses are not "
                f"supported by Loops), got {type(loss_fn).__name__}"
            )
        if not data:
            raise ValueError("No data provided")
        datums = to_core_data(data)
        kind = loss_type_input or "logprobs"
        return self._ordered(
            lambda core: core.forward_backward_custom_async(datums, loss_fn, loss_type_input=kind),
            mode="end",
        )

    async def forward_backward_custom_async(
        self,
        data: Sequence[Any],
        loss_fn: Callable[..., Any],
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.ForwardBackwardOutput]:
        """The same future as :meth:`forward_backward_custom` (await it too)."""
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    def optim_step(
        self, optim_params: Any = None, *, adam_params: Any = None
    ) -> AwaitableConcurrentFuture[core_types.OptimStepResponse]:
        """Apply the accumulated gradient with Adam (``AdamParams``; tinker's defaults: no
        gradient clipping) and clear it."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("Specify optim_params or legacy adam_params, not both")
        params = optim_params if optim_params is not None else adam_params
        if isinstance(params, AdamParams):
            adam = params.to_core()
        elif isinstance(params, core_types.AdamParams):
            adam = params
        elif params is None:
            raise ValueError("optim_step needs optim_params (an AdamParams)")
        else:
            raise TypeError(
                f"Expected AdamParams, got {type(params).__name__} (Loops trains with Adam only)"
            )
        return self._ordered(lambda core: core.optim_step_async(adam))

    async def optim_step_async(
        self, optim_params: Any = None, *, adam_params: Any = None
    ) -> AwaitableConcurrentFuture[core_types.OptimStepResponse]:
        """The same future as :meth:`optim_step` (await it too)."""
        return self.optim_step(optim_params, adam_params=adam_params)

    # ------------------------------------------------------------------ checkpoints

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.SaveWeightsResponse]:
        """Save the adapter and optimizer state as ``name``; the result's ``path`` is
        ``tinker://<model_id>/weights/<name>``. (Loops replaces a checkpoint saved under the
        same name: ``overwrite`` is accepted and has no other effect.)"""
        return self._ordered(
            lambda core: core.save_state_async(name, ttl_seconds), _tinker_path_result
        )

    async def save_state_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.SaveWeightsResponse]:
        """The same future as :meth:`save_state` (await it too)."""
        return self.save_state(name, ttl_seconds, overwrite, user_metadata)

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.SaveWeightsForSamplerResponse]:
        """Save the adapter for sampling as ``name``; the result's ``path``
        (``tinker://<model_id>/sampler_weights/<name>``) can be given to
        ``create_sampling_client(model_path=...)``."""
        return self._ordered(
            lambda core: core.save_weights_for_sampler_async(name, ttl_seconds),
            _tinker_path_result,
        )

    async def save_weights_for_sampler_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[core_types.SaveWeightsForSamplerResponse]:
        """The same future as :meth:`save_weights_for_sampler` (await it too)."""
        return self.save_weights_for_sampler(name, ttl_seconds, user_metadata)

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[core_types.LoadWeightsResponse]:
        """Load adapter weights from checkpoint ``path`` (``tinker://`` or ``bt://``); the
        optimizer starts fresh."""
        loops_path = to_loops_path(path)
        return self._ordered(lambda core: core.load_state_async(loops_path), _tinker_path_result)

    async def load_state_async(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[core_types.LoadWeightsResponse]:
        """The same future as :meth:`load_state` (await it too)."""
        return self.load_state(path, weights_access_token)

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[core_types.LoadWeightsResponse]:
        """Load adapter weights and optimizer state from a ``save_state`` checkpoint."""
        loops_path = to_loops_path(path)
        return self._ordered(
            lambda core: core.load_state_with_optimizer_async(loops_path), _tinker_path_result
        )

    async def load_state_with_optimizer_async(
        self, path: str, weights_access_token: str | None = None
    ) -> AwaitableConcurrentFuture[core_types.LoadWeightsResponse]:
        """The same future as :meth:`load_state_with_optimizer` (await it too)."""
        return self.load_state_with_optimizer(path, weights_access_token)

    # ------------------------------------------------------------------ sampling

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> SamplingClient:
        """Publish the current weights to this run's sampler and return a sampling client:
        usable at once (its samples wait for the weights) and a future of itself.

        ``kind="snapshot"`` (tinker's default): the client samples exactly these weights for
        good, even after later publishes; each snapshot is a sampler checkpoint of its own
        (``<name or "sampler">-<unique suffix>``; delete old ones with the
        :class:`RestClient` if storage matters). ``kind="inflight"``: the client follows the
        run's live adapter (never older than these weights), Loops' native mode, which stores
        nothing new."""
        from ._sampling import SamplingClient

        if kind not in ("snapshot", "inflight"):
            raise errors.ValidationError(f"kind: expected 'snapshot' or 'inflight', got {kind!r}")
        prefix = name or "sampler"
        snapshot = kind == "snapshot"
        ready: AwaitableConcurrentFuture[core_sampling.SamplingClient] = self._ordered(
            lambda core: core.save_weights_and_get_sampling_client_async(prefix, pin=snapshot)
        )
        return SamplingClient(ready, service=self._service)

    async def save_weights_and_get_sampling_client_async(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> SamplingClient:
        """Like :meth:`save_weights_and_get_sampling_client`, and waits until the client is
        ready."""
        client = self.save_weights_and_get_sampling_client(
            name, retry_config, record_stability_info, kind
        )
        return await client

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SamplingClient:
        """A sampling client of this run's sampler serving checkpoint ``model_path``."""
        from ._sampling import SamplingClient

        loops_path = to_loops_path(model_path, "model_path")
        ready: AwaitableConcurrentFuture[core_sampling.SamplingClient] = self._ordered(
            lambda core: core.create_sampling_client_async(loops_path, pin=True),
            mode="start",
            wait_result=False,
        )
        return SamplingClient(ready, service=self._service)

    async def create_sampling_client_async(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SamplingClient:
        """Like :meth:`create_sampling_client`, and waits until the client is ready."""
        return await self.create_sampling_client(model_path, retry_config, record_stability_info)


def _tinker_path_result(result: Any) -> Any:
    path = getattr(result, "path", None)
    if isinstance(path, str) and path:
        return msgspec.structs.replace(result, path=to_tinker_path(path))
    return result
