"""``TrainingClient``: one LoRA training run on a Loops trainer."""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

import anyio
import anyio.to_thread
import msgspec

from . import _portal, _validate, errors
from ._chunking import MergedForwardFuture, encode_datums, split
from ._codec import encode
from ._custom import REPLAY_CONFIG, CustomLossFn, custom_weights, replay_data
from ._custom import finish as finish_custom
from ._http import error_for_response
from ._loop import ThreadSafeGate, in_event_loop
from ._operation import APIFuture, ChainedFuture, Endpoint, OperationFuture
from ._wire import (
    ForwardBackwardRequest,
    InitTrainerServerRequest,
    LoadStateRequest,
    OpRequest,
    OptimStepRequest,
    RunInfo,
    SaveStateRequest,
    SaveWeightsForSamplerRequest,
)
from .tracking import MetricsSink
from .types import (
    AdamParams,
    Checkpoint,
    CheckpointDownload,
    CheckpointFilesResponse,
    CheckpointTarget,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    InitTrainerServerResponse,
    LoadWeightsResponse,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ._background import TaskHandle
    from ._control import Control
    from .sampling import SamplingClient

__all__ = ["ForwardBackwardFuture", "TrainingClient"]

T = TypeVar("T")
F = TypeVar("F", bound=APIFuture[Any])
log = logging.getLogger("loops_async")

SAMPLER_VERSION_CEILING = 600.0
"""Longest wait for the paired sampler to report a published version (the seed page's
ceiling); a longer wait raises :class:`~loops_async.errors.OperationTimeoutError`."""
METRICS_FLUSH_TIMEOUT = 30.0
"""How long ``close()`` retrieves unread results so their metrics reach the sinks."""
_METRIC_PREFIXES = {
    "forward_backward": "train/",
    "forward": "eval/",
    "optim_step": "optim/",
}


@runtime_checkable
class ForwardBackwardFuture(Protocol):
    """What ``forward``, ``forward_backward`` and ``forward_backward_custom`` return: an
    :class:`~loops_async.APIFuture` of a :class:`~loops_async.ForwardBackwardOutput`, whether
    the batch went as one operation or was split into several."""

    @property
    def operation_id(self) -> str:
        """The server's id of the (first) operation."""

    def result(self, timeout: float | None = None) -> ForwardBackwardOutput:
        """Block until the result is here and return it."""

    async def result_async(self, timeout: float | None = None) -> ForwardBackwardOutput:
        """Wait for the result on the current event loop."""

    def done(self) -> bool:
        """Whether the result is already here (no I/O)."""

    def __await__(self) -> Generator[Any, None, ForwardBackwardOutput]:
        """``await future``: the result."""


ON_RESERVED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "loops_async_on_reserved", default=None
)
"""Called (in the caller's context) right after an operation reserved its ``seq_id``s: lets a
layer above (:mod:`loops_async.tinker`) start the next call in order without waiting for this
one's submit."""


def _notify_reserved() -> None:
    hook = ON_RESERVED.get()
    if hook is not None:
        hook()


class TrainingClient:
    """A LoRA training run: submit-and-retrieve operations on its trainer.

    Made by :meth:`ServiceClient.create_lora_training_client` (or its ``_async`` twin). Every
    long-running method submits at call time and returns an :class:`OperationFuture`; its
    ``*_async`` twin takes the same arguments and, awaited, returns the same future. Calls get
    a ``seq_id`` in call order, and the trainer runs them strictly in that order, so any number
    may be in flight: queue ``forward_backward`` and ``optim_step`` back to back, then await.

    The client sends a ``/health`` heartbeat every ``heartbeat_interval`` seconds while open.
    ``close()`` / ``aclose()`` (or ``with`` / ``async with``) stop it, and finish its metrics
    sinks (Weights & Biases, :mod:`loops_async.tracking`).
    """

    def __init__(
        self,
        *,
        control: Control,
        endpoint: Endpoint,
        run_id: str | None,
        base_model: str,
        lora_rank: int,
        max_seq_len: int | None = None,
        base_checkpoint: str | None = None,
        sampler_timeout: float | None = None,
        sampler_num_replicas: int | None = None,
    ) -> None:
        self._control = control
        self._max_request_bytes = control.settings.max_request_bytes
        self._endpoint = endpoint
        self._run_id = run_id
        self._base_model = base_model
        self._lora_rank = lora_rank
        self._max_seq_len = max_seq_len
        self._base_checkpoint = base_checkpoint
        self._sampler_timeout = sampler_timeout
        self._sampler_num_replicas = sampler_num_replicas
        self._sinks: list[MetricsSink] = []
        self._unlogged: set[APIFuture[Any]] = set()
        """Tracked futures whose metrics were not logged yet (held until then, or close)."""
        self._gate = ThreadSafeGate(first=1)
        self._state_lock = threading.Lock()
        self._policy_version = 0
        self._last_published_version = 0
        self._last_publish: OperationFuture[SaveWeightsForSamplerResponse] | None = None
        self._steps_since_reset = 0
        self._resets = 0
        self._closed = False
        self._heartbeat: TaskHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<TrainingClient run_id={self._run_id!r} base_model={self._base_model!r} "
            f"lora_rank={self._lora_rank}{' closed' if self._closed else ''}>"
        )

    # ------------------------------------------------------------------ properties

    @property
    def run_id(self) -> str | None:
        """The id of the training run (sent as ``X-Run-Id``; ``None`` for a trainer of
        ``ServiceClient.local`` that has none)."""
        return self._run_id

    @property
    def base_checkpoint(self) -> str | None:
        """The checkpoint the run's base weights came from (``base_checkpoint=``), if any."""
        return self._base_checkpoint

    @property
    def base_model(self) -> str:
        """The base model being fine-tuned."""
        return self._base_model

    @property
    def lora_rank(self) -> int:
        """The LoRA rank of the adapter."""
        return self._lora_rank

    @property
    def policy_version(self) -> int:
        """The trainer's step (number of ``optim_step`` calls applied since init or load) once
        every operation submitted so far has run: it advances when an ``optim_step`` is
        accepted, not when its result is read (``load_state_with_optimizer`` sets it when its
        result is read, since only the checkpoint knows its step)."""
        return self._policy_version

    # ------------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClientClosedError(f"{self!r} is closed")

    def _prepare(self, build: Callable[[int], OpRequest]) -> tuple[int, bytes]:
        """Reserve the next ``seq_id`` (in the caller's thread) and encode the body."""
        self._check_open()
        seq = self._gate.reserve()
        try:
            body = encode(build(seq))
        except BaseException:
            self._gate.release(seq)
            raise
        _notify_reserved()
        return seq, body

    async def _submit(
        self,
        op: str,
        seq: int,
        body: bytes,
        result_type: type[T],
        transform: Callable[[T], T] | None,
        accepted: Callable[[OperationFuture[T]], None] | None = None,
    ) -> OperationFuture[T]:
        try:
            await self._gate.wait_turn(seq)
            operation_id = await self._endpoint.submit(op, body)
            future = OperationFuture(
                operation_id,
                endpoint=self._endpoint,
                result_type=result_type,
                transform=transform,
                operation=op,
            )
            if accepted is not None:
                accepted(future)  # in seq order: before the next seq may go
        finally:
            self._gate.release(seq)
        return future

    def _call(
        self,
        twin: str,
        op: str,
        build: Callable[[int], OpRequest],
        result_type: type[T],
        transform: Callable[[T], T] | None = None,
        accepted: Callable[[OperationFuture[T]], None] | None = None,
    ) -> OperationFuture[T]:
        _portal.ensure_sync_context(twin)
        seq, body = self._prepare(build)
        try:
            future = _portal.run(
                self._submit, op, seq, body, result_type, transform, accepted, twin=twin
            )
        except BaseException:
            self._gate.release(seq)  # idempotent; covers a call that never started
            raise
        return self._tracked(op, future)

    async def _call_async(
        self,
        op: str,
        build: Callable[[int], OpRequest],
        result_type: type[T],
        transform: Callable[[T], T] | None = None,
        accepted: Callable[[OperationFuture[T]], None] | None = None,
    ) -> OperationFuture[T]:
        seq, body = self._prepare(build)
        return self._tracked(
            op, await self._submit(op, seq, body, result_type, transform, accepted)
        )

    def _prepare_plan(self, plan: _ForwardPlan) -> tuple[int, list[bytes]]:
        """Reserve one ``seq_id`` per chunk (contiguous, in the caller's thread) and encode."""
        self._check_open()
        first = self._gate.reserve(len(plan.chunks))
        try:
            bodies = plan.bodies(first)
        except BaseException:
            self._release_range(first, len(plan.chunks))
            raise
        _notify_reserved()
        return first, bodies

    def _release_range(self, first: int, count: int) -> None:
        for seq in range(first, first + count):
            self._gate.release(seq)

    async def _submit_plan(
        self, op: str, first: int, bodies: list[bytes], plan: _ForwardPlan
    ) -> APIFuture[ForwardBackwardOutput]:
        if len(bodies) == 1:
            return await self._submit(op, first, bodies[0], ForwardBackwardOutput, None)
        futures: list[APIFuture[ForwardBackwardOutput] | None] = [None] * len(bodies)

        rejected = False

        async def submit_chunk(index: int) -> None:
            nonlocal rejected
            seq = first + index
            try:
                await self._gate.wait_turn(seq)
                if rejected:
                    return  # an earlier chunk was rejected: send none after it
                operation_id = await self._endpoint.submit(op, bodies[index])
                futures[index] = OperationFuture(
                    operation_id,
                    endpoint=self._endpoint,
                    result_type=ForwardBackwardOutput,
                    operation=op,
                )
            except Exception:
                rejected = True  # before the gate lets the next chunk go
                raise
            finally:
                self._gate.release(seq)

        try:
            async with anyio.create_task_group() as group:
                for index in range(len(bodies)):
                    group.start_soon(submit_chunk, index)
        except BaseExceptionGroup as group_failure:
            failure = _innermost(group_failure)
            if any(f is not None for f in futures) and isinstance(failure, Exception):
                raise _partial(failure, futures, plan.chunks) from failure
            raise failure from None
        finally:
            # Chunks that never started (the caller was cancelled, a sibling failed) must not
            # strand the ordering gate: release the whole reserved range.
            self._release_range(first, len(bodies))
        done = cast("list[APIFuture[ForwardBackwardOutput]]", futures)
        return MergedForwardFuture(done, plan.counts)

    def _call_plan(
        self, twin: str, op: str, plan: _ForwardPlan
    ) -> APIFuture[ForwardBackwardOutput]:
        _portal.ensure_sync_context(twin)
        first, bodies = self._prepare_plan(plan)
        try:
            future = _portal.run(self._submit_plan, op, first, bodies, plan, twin=twin)
        except BaseException:
            self._release_range(first, len(bodies))
            raise
        return self._tracked(op, future)

    async def _call_plan_async(
        self, op: str, plan: _ForwardPlan
    ) -> APIFuture[ForwardBackwardOutput]:
        first, bodies = self._prepare_plan(plan)
        return self._tracked(op, await self._submit_plan(op, first, bodies, plan))

    def _op_fields(self, seq: int) -> dict[str, Any]:
        return {"seq_id": seq, "run_id": self._run_id, "model": self._base_model}

    # ------------------------------------------------------------------ metrics

    def add_metrics_sink(self, sink: MetricsSink) -> None:
        """Log every later operation's metrics to ``sink`` (see :mod:`loops_async.tracking`):
        ``train/*`` for ``forward_backward``, ``eval/*`` for ``forward``, ``optim/*`` for
        ``optim_step``, each at the optimizer step it belongs to. ``close()`` closes it."""
        if not isinstance(sink, MetricsSink):
            raise errors.ValidationError(
                f"sink: expected an object with log(metrics, *, step) and close(), got {sink!r}"
            )
        self._sinks.append(sink)

    def _tracked(self, op: str, future: F) -> F:
        """Log ``future``'s metrics to the sinks when its result arrives."""
        prefix = _METRIC_PREFIXES.get(op)
        if not self._sinks or prefix is None:
            return future
        step = self._policy_version + (0 if op == "optim_step" else 1)
        self._unlogged.add(future)

        def record(result: Any) -> None:
            self._unlogged.discard(future)
            metrics: dict[str, float] = {}
            if isinstance(result, ForwardBackwardOutput):
                metrics[f"{prefix}loss"] = float(result.loss)
            values = getattr(result, "metrics", None) or {}
            for key, value in values.items():
                if isinstance(value, int | float):
                    metrics[f"{prefix}{key}"] = float(value)
            at = int(values.get("step", step)) if op == "optim_step" else step
            for sink in list(self._sinks):
                sink.log(metrics, step=at)

        future._observe(record)
        return future

    async def _flush_metrics(self, timeout: float = METRICS_FLUSH_TIMEOUT) -> None:
        """Retrieve (for at most ``timeout`` s) results nobody read, so their metrics are
        logged before the sinks close."""
        pending = [f for f in list(self._unlogged) if not f.done()]
        if not pending:
            return
        with anyio.move_on_after(timeout):
            for future in pending:
                try:
                    await future.result_async()
                except errors.LoopsError:
                    pass  # a failed op has no metrics; the caller sees its error

    def _close_sinks(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.warning("closing the metrics sink %r failed", sink, exc_info=True)

    # ------------------------------------------------------------------ state hooks
    # ``_accepted_*`` run when the server accepts an operation, in seq order (the trainer runs
    # them in that order too), so the client's view of the run advances with what was
    # submitted, whether or not anyone reads the results. ``_after_*`` reconcile it with what
    # a result reports.

    def _accepted_init(self, future: OperationFuture[InitTrainerServerResponse]) -> None:
        with self._state_lock:
            self._policy_version = self._steps_since_reset = 0
            self._resets += 1

    def _after_init(self, result: InitTrainerServerResponse) -> InitTrainerServerResponse:
        self._lora_rank = result.lora_rank
        return result

    def _accepted_optim(self, future: OperationFuture[OptimStepResponse]) -> None:
        with self._state_lock:
            self._policy_version += 1
            self._steps_since_reset += 1

    def _accepted_publish(self, future: OperationFuture[SaveWeightsForSamplerResponse]) -> None:
        # The trainer publishes at its step when the op runs: the version accepted so far.
        with self._state_lock:
            self._last_published_version = max(self._last_published_version, self._policy_version)
            self._last_publish = future

    def _after_publish(
        self, result: SaveWeightsForSamplerResponse
    ) -> SaveWeightsForSamplerResponse:
        if result.version is not None:
            with self._state_lock:
                self._last_published_version = max(self._last_published_version, result.version)
        return result

    def _load_hooks(
        self, path: str
    ) -> tuple[
        Callable[[LoadWeightsResponse], LoadWeightsResponse],
        Callable[[OperationFuture[LoadWeightsResponse]], None],
    ]:
        """A load resets the step (to 0, or to the checkpoint's step with the optimizer, which
        only its result tells): when it is read, the step is that plus the optim steps accepted
        after the load, if no later load or init came."""
        reset = 0

        def accepted(future: OperationFuture[LoadWeightsResponse]) -> None:
            nonlocal reset
            with self._state_lock:
                self._policy_version = self._steps_since_reset = 0
                self._resets += 1
                reset = self._resets

        def after(result: LoadWeightsResponse) -> LoadWeightsResponse:
            if result.step is not None:
                with self._state_lock:
                    if reset == self._resets:
                        self._policy_version = result.step + self._steps_since_reset
            return msgspec.structs.replace(result, path=result.path or path)

        return after, accepted

    # ------------------------------------------------------------------ request builders

    def _init_builder(self, lora_rank: int | None) -> Callable[[int], OpRequest]:
        rank = _validate.check_positive_int(
            self._lora_rank if lora_rank is None else lora_rank, "lora_rank"
        )
        return lambda seq: InitTrainerServerRequest(
            **self._op_fields(seq), lora_rank=rank, base_model=self._base_model
        )

    def _forward_plan(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        top_k_logprobs: int,
    ) -> _ForwardPlan:
        loss_fn, loss_fn_config, top_k = _validate.check_loss_fn(
            loss_fn, loss_fn_config, top_k_logprobs
        )
        datums = _validate.check_data(data, loss_fn)
        return _ForwardPlan(
            self, datums, loss_fn, loss_fn_config, top_k, limit=self._max_request_bytes
        )

    def _optim_builder(self, adam_params: AdamParams) -> Callable[[int], OpRequest]:
        params = _validate.check_adam_params(adam_params)
        return lambda seq: OptimStepRequest(**self._op_fields(seq), adam_params=params)

    def _save_builder(self, name: str, ttl_seconds: int | None) -> Callable[[int], OpRequest]:
        name = _validate.check_checkpoint_name(name)
        ttl = _validate.check_ttl(ttl_seconds)
        return lambda seq: SaveStateRequest(**self._op_fields(seq), name=name, ttl_seconds=ttl)

    def _publish_builder(
        self, name: str, ttl_seconds: int | None, bump_version: bool
    ) -> Callable[[int], OpRequest]:
        name = _validate.check_checkpoint_name(name)
        ttl = _validate.check_ttl(ttl_seconds)
        return lambda seq: SaveWeightsForSamplerRequest(
            **self._op_fields(seq), name=name, ttl_seconds=ttl, bump_version=bool(bump_version)
        )

    def _load_builder(self, path: str) -> Callable[[int], OpRequest]:
        path = _validate.check_load_path(path)
        return lambda seq: LoadStateRequest(**self._op_fields(seq), path=path)

    # ------------------------------------------------------------------ operations

    def init_trainer_server(
        self, lora_rank: int | None = None
    ) -> OperationFuture[InitTrainerServerResponse]:
        """Start the run over with a fresh adapter (``POST /init_trainer_server``).

        ``lora_rank`` defaults to the client's rank. The client calls this once (seq 1) when
        it is created; calling it again resets the adapter, optimizer and step.
        """
        return self._call(
            "init_trainer_server_async",
            "init_trainer_server",
            self._init_builder(lora_rank),
            InitTrainerServerResponse,
            self._after_init,
            self._accepted_init,
        )

    async def init_trainer_server_async(
        self, lora_rank: int | None = None
    ) -> OperationFuture[InitTrainerServerResponse]:
        """Async twin of :meth:`init_trainer_server`."""
        return await self._call_async(
            "init_trainer_server",
            self._init_builder(lora_rank),
            InitTrainerServerResponse,
            self._after_init,
            self._accepted_init,
        )

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
        top_k_logprobs: int = 0,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss on ``data`` and accumulate its gradient (``POST /forward_backward``).

        Gradients accumulate across calls until :meth:`optim_step`. The future's result has
        the mean loss per active token, per-datum ``logprobs`` and metrics.
        """
        return self._call_plan(
            "forward_backward_async",
            "forward_backward",
            self._forward_plan(data, loss_fn, loss_fn_config, top_k_logprobs),
        )

    async def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
        top_k_logprobs: int = 0,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward_backward`: returns once the server accepted it."""
        return await self._call_plan_async(
            "forward_backward", self._forward_plan(data, loss_fn, loss_fn_config, top_k_logprobs)
        )

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
        top_k_logprobs: int = 0,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and logprobs on ``data`` without touching gradients
        (``POST /forward``)."""
        return self._call_plan(
            "forward_async",
            "forward",
            self._forward_plan(data, loss_fn, loss_fn_config, top_k_logprobs),
        )

    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
        top_k_logprobs: int = 0,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward`."""
        return await self._call_plan_async(
            "forward", self._forward_plan(data, loss_fn, loss_fn_config, top_k_logprobs)
        )

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn, *, loss_type_input: str = "logprobs"
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward_backward_custom`."""
        if loss_type_input != "logprobs":
            raise errors.ValidationError(
                f"loss_type_input: only 'logprobs' is supported, got {loss_type_input!r}"
            )
        datums = _validate.check_data(data, "cross_entropy")
        if not callable(loss_fn):
            raise errors.ValidationError(f"loss_fn: expected a callable, got {loss_fn!r}")
        targets_only = []
        for i, datum in enumerate(datums):
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is None:
                raise errors.ValidationError(
                    f"data[{i}].loss_fn_inputs: forward_backward_custom needs 'target_tokens'"
                )
            targets_only.append(
                Datum(model_input=datum.model_input, loss_fn_inputs={"target_tokens": targets})
            )
        forward = await (await self.forward_async(targets_only, "cross_entropy", REPLAY_CONFIG))
        weights, loss, metrics = await anyio.to_thread.run_sync(
            custom_weights, datums, forward, loss_fn
        )
        replay = await self.forward_backward_async(
            replay_data(targets_only, weights), "cross_entropy", REPLAY_CONFIG
        )

        async def merge(out: ForwardBackwardOutput) -> ForwardBackwardOutput:
            return finish_custom(out, loss, metrics)

        return self._tracked(
            "forward_backward", ChainedFuture(replay, merge, what="forward_backward_custom")
        )

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn, *, loss_type_input: str = "logprobs"
    ) -> APIFuture[ForwardBackwardOutput]:
        """Accumulate the gradient of a loss computed on the client with torch.

        ``loss_fn(data, logprobs) -> (loss, metrics)`` gets each datum's target-token logprobs
        (float32 tensors shaped like its ``target_tokens``) and returns a scalar loss tensor
        and a dict of floats. The trainer runs ``forward``; the loss and its gradient are
        evaluated here; a ``forward_backward`` with cross-entropy weights ``-dLoss/dlogprob``
        (and ``skip_token_normalization``, so the gradient is applied as is) replays it on the
        server. Returns once the replay is submitted; the future's result carries the custom
        loss and the user's metrics. Do not mix it with normalised losses before the next
        ``optim_step``. Needs torch. ``loss_type_input`` says what ``loss_fn`` receives; only
        ``"logprobs"`` exists.
        """
        return _portal.run(
            self.forward_backward_custom_async,
            data,
            loss_fn,
            loss_type_input=loss_type_input,
            twin="forward_backward_custom_async",
        )

    def optim_step(self, adam_params: AdamParams) -> OperationFuture[OptimStepResponse]:
        """Apply the accumulated gradient with Adam and clear it (``POST /optim_step``).

        The result's metrics include ``step``, ``learning_rate`` and ``grad_norm``.
        """
        return self._call(
            "optim_step_async",
            "optim_step",
            self._optim_builder(adam_params),
            OptimStepResponse,
            None,
            self._accepted_optim,
        )

    async def optim_step_async(self, adam_params: AdamParams) -> OperationFuture[OptimStepResponse]:
        """Async twin of :meth:`optim_step`."""
        return await self._call_async(
            "optim_step",
            self._optim_builder(adam_params),
            OptimStepResponse,
            None,
            self._accepted_optim,
        )

    def save_state(
        self, name: str, ttl_seconds: int | None = None
    ) -> OperationFuture[SaveWeightsResponse]:
        """Save adapter and optimizer state as ``name`` (``POST /save_state``).

        The result's ``path`` (``bt://loops:<run>/weights/<name>``; derived by the client when
        an older trainer omits it) can be passed to :meth:`load_state` /
        :meth:`load_state_with_optimizer`.
        """
        return self._call(
            "save_state_async",
            "save_state",
            self._save_builder(name, ttl_seconds),
            SaveWeightsResponse,
            self._saved_path(name),
        )

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> OperationFuture[SaveWeightsResponse]:
        """Async twin of :meth:`save_state`."""
        return await self._call_async(
            "save_state",
            self._save_builder(name, ttl_seconds),
            SaveWeightsResponse,
            self._saved_path(name),
        )

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, *, bump_version: bool = False
    ) -> OperationFuture[SaveWeightsForSamplerResponse]:
        """Publish the adapter (no optimizer state) as ``name`` for sampling
        (``POST /save_weights_for_sampler``).

        With ``bump_version=True`` the paired sampler hot-swaps to it. The result has the
        ``.../sampler_weights/<name>`` path and the policy version at the time of the call.
        """
        return self._call(
            "save_weights_for_sampler_async",
            "save_weights_for_sampler",
            self._publish_builder(name, ttl_seconds, bump_version),
            SaveWeightsForSamplerResponse,
            self._published(name, bump_version),
            self._accepted_publish if bump_version else None,
        )

    async def save_weights_for_sampler_async(
        self,
        name: str = "default",
        ttl_seconds: int | None = None,
        *,
        bump_version: bool = False,
    ) -> OperationFuture[SaveWeightsForSamplerResponse]:
        """Async twin of :meth:`save_weights_for_sampler` (``name`` defaults to
        ``"default"``, as upstream)."""
        return await self._call_async(
            "save_weights_for_sampler",
            self._publish_builder(name, ttl_seconds, bump_version),
            SaveWeightsForSamplerResponse,
            self._published(name, bump_version),
            self._accepted_publish if bump_version else None,
        )

    def load_state(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Load adapter weights from a checkpoint; the optimizer state and step reset
        (``POST /load_state``). ``path`` is a ``bt://`` URI (any run's ``save_state`` or
        sampler checkpoint), a ``file://`` URL or a local directory (made absolute), or an
        ``s3://`` URI where the server can read one."""
        return self._call(
            "load_state_async",
            "load_state",
            self._load_builder(path),
            LoadWeightsResponse,
            *self._load_hooks(path),
        )

    async def load_state_async(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Async twin of :meth:`load_state`."""
        return await self._call_async(
            "load_state",
            self._load_builder(path),
            LoadWeightsResponse,
            *self._load_hooks(path),
        )

    def load_state_with_optimizer(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Load adapter weights, Adam moments and the step counter from a ``save_state``
        checkpoint (``POST /load_state_with_optimizer``; paths as in :meth:`load_state`), to
        resume training exactly."""
        return self._call(
            "load_state_with_optimizer_async",
            "load_state_with_optimizer",
            self._load_builder(path),
            LoadWeightsResponse,
            *self._load_hooks(path),
        )

    async def load_state_with_optimizer_async(
        self, path: str
    ) -> OperationFuture[LoadWeightsResponse]:
        """Async twin of :meth:`load_state_with_optimizer`."""
        return await self._call_async(
            "load_state_with_optimizer",
            self._load_builder(path),
            LoadWeightsResponse,
            *self._load_hooks(path),
        )

    # ------------------------------------------------------------------ derived paths

    def _derived(self, kind: str, name: str) -> str | None:
        return None if self._run_id is None else f"bt://loops:{self._run_id}/{kind}/{name}"

    def _saved_path(self, name: str) -> Callable[[SaveWeightsResponse], SaveWeightsResponse]:
        def hook(result: SaveWeightsResponse) -> SaveWeightsResponse:
            derived = self._derived("weights", name)
            if not result.path and derived is not None:
                return msgspec.structs.replace(result, path=derived)
            return result

        return hook

    def _published(
        self, name: str, bump_version: bool
    ) -> Callable[[SaveWeightsForSamplerResponse], SaveWeightsForSamplerResponse]:
        """Older trainers answer without ``path`` (PROTOCOL §8): derive it; record the
        published version of a ``bump_version`` publish."""

        def hook(result: SaveWeightsForSamplerResponse) -> SaveWeightsForSamplerResponse:
            derived = self._derived("sampler_weights", name)
            if derived is not None and not result.path.startswith(derived.rsplit("/", 1)[0]):
                result = msgspec.structs.replace(result, path=derived)
            return self._after_publish(result) if bump_version else result

        return hook

    # ------------------------------------------------------------------ sampling

    async def _sampler_at_version(
        self, client: SamplingClient, published: SaveWeightsForSamplerResponse
    ) -> SamplingClient:
        """Wait until the paired sampler serves ``published.version`` (shared samplers are
        pinned by path: nothing to wait for); returns ``client``."""
        version = published.version or 0
        client._pin_version(version, published.path)
        if version > 0 and not client._shared:
            sampler = await self._control.paired_sampler(self._run_id)
            with anyio.fail_after(SAMPLER_VERSION_CEILING):
                await self._control.wait_policy_version(sampler, self._run_id, version)
        return client

    def _unique_name(self, name: str, shared: bool) -> str:
        """Shared samplers cache adapters by name: publish each version under a new one."""
        name = _validate.check_checkpoint_name(name)
        return f"{name}-{uuid.uuid4().hex}" if shared else name

    async def save_weights_and_get_sampling_client_async(
        self, name: str = "default", *, pin: bool = False
    ) -> SamplingClient:
        """Async twin of :meth:`save_weights_and_get_sampling_client`."""
        self._check_open()
        sampler = await self._control.paired_sampler(
            self._run_id, num_replicas=self._sampler_num_replicas
        )
        shared = sampler.model_id is None
        pin = pin and self._run_id is not None  # a trainer without a run has no paths
        name = self._unique_name(name, shared or pin)
        publish = await self.save_weights_for_sampler_async(name, bump_version=True)
        predicted = self._last_published_version
        headers = {"X-Run-Id": self._run_id} if self._run_id else {}
        path = self._derived("sampler_weights", name)
        if pin and not shared:
            assert path is not None
            headers["X-Checkpoint-Path"] = path  # alone: exactly this adapter, for good
        elif not shared and predicted > 0:
            headers["X-Min-Policy-Version"] = str(predicted)
        client = self._control.sampling_client(
            sampler,
            self._base_model,
            headers,
            pin=path if shared else None,
            sample_timeout=self._sampler_timeout,
        )
        client._await_before_sampling(
            ChainedFuture(
                publish,
                functools.partial(self._sampler_at_version, client),
                what="publish and sampler",
            )
        )
        return client

    def save_weights_and_get_sampling_client(
        self, name: str = "default", *, pin: bool = False
    ) -> SamplingClient:
        """Publish the adapter for sampling and get a client that samples from exactly it.

        Submits ``save_weights_for_sampler(name, bump_version=True)`` now and returns a
        :class:`SamplingClient` at once (on a shared sampler the name gets a unique suffix,
        since shared samplers cache adapters by name). The client is usable immediately: its
        samples carry ``X-Min-Policy-Version`` (or, on a shared sampler, the published path)
        and so never see older weights. It is also a future of itself: ``.result(timeout)`` /
        ``await client`` waits until the publish finished and the paired sampler reports the
        new policy version (at most 600 s), then returns the same client.

        ``pin=True`` (tinker's snapshot semantics): the name gets a unique suffix and the
        client sends that checkpoint's path alone (``X-Checkpoint-Path``), so it keeps sampling
        these weights after later publishes (each pinned publish is a checkpoint of its own).
        """
        return _portal.run(
            self.save_weights_and_get_sampling_client_async,
            name,
            pin=pin,
            twin="save_weights_and_get_sampling_client_async",
        )

    async def create_sampling_client_async(
        self, model_path: str, *, pin: bool = False
    ) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client`."""
        self._check_open()
        path = _validate.check_checkpoint_path(model_path, "model_path")
        last = self._last_publish
        if not pin and last is not None and not last.done():
            # Its version is predicted at acceptance; the result is exact (e.g. after a
            # load_state_with_optimizer whose step only the checkpoint knows).
            await last.result_async()
        await self._control.validate_checkpoint(path, self._run_id)
        sampler = await self._control.paired_sampler(
            self._run_id, num_replicas=self._sampler_num_replicas
        )
        headers = {"X-Checkpoint-Path": path}
        if self._run_id:
            headers["X-Run-Id"] = self._run_id
        if not pin:
            headers["X-Min-Policy-Version"] = str(self._last_published_version + 1)
        return self._control.sampling_client(
            sampler, self._base_model, headers, pin=path, sample_timeout=self._sampler_timeout
        )

    def create_sampling_client(self, model_path: str, *, pin: bool = False) -> SamplingClient:
        """A client of this run's sampler that serves checkpoint ``model_path`` (validated
        with the control plane first) until the run publishes a newer policy, then the live
        adapter (``X-Checkpoint-Path`` plus ``X-Min-Policy-Version: <last published + 1>``).
        ``pin=True``: that checkpoint for good (``X-Checkpoint-Path`` alone)."""
        return _portal.run(
            self.create_sampling_client_async,
            model_path,
            pin=pin,
            twin="create_sampling_client_async",
        )

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints_async(self) -> list[Checkpoint]:
        """Async twin of :meth:`list_checkpoints`."""
        self._check_open()
        if self._run_id is None:
            raise errors.ValidationError("this trainer has no run id: it has no checkpoints")
        return await self._control.list_checkpoints(self._run_id)

    def list_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints this run has saved (``save_state`` and sampler ones)."""
        return _portal.run(self.list_checkpoints_async, twin="list_checkpoints_async")

    async def get_checkpoint_archive_url_async(
        self,
        checkpoint_id: str | None = None,
        name: str | None = None,
        target: str | CheckpointTarget | None = None,
        page_size: int = 1000,
        page_token: int | str = 0,
        run_id: str | None = None,
    ) -> CheckpointFilesResponse:
        """Async twin of :meth:`get_checkpoint_archive_url`."""
        self._check_open()
        resolved = await self._control.resolve_checkpoint(
            checkpoint_id, name, run_id or self._run_id, target
        )
        return await self._control.checkpoint_files(
            resolved, page_size=page_size, page_token=page_token
        )

    def get_checkpoint_archive_url(
        self,
        checkpoint_id: str | None = None,
        name: str | None = None,
        target: str | CheckpointTarget | None = None,
        page_size: int = 1000,
        page_token: int | str = 0,
        run_id: str | None = None,
    ) -> CheckpointFilesResponse:
        """One page of presigned download URLs of a checkpoint's files; ``name`` is looked up
        in this run unless ``run_id`` names another (see
        :meth:`ServiceClient.get_checkpoint_archive_url`)."""
        return _portal.run(
            self.get_checkpoint_archive_url_async,
            checkpoint_id,
            name,
            target,
            page_size,
            page_token,
            run_id,
            twin="get_checkpoint_archive_url_async",
        )

    async def download_checkpoint_async(
        self,
        checkpoint_id: str | None = None,
        *,
        dest_dir: str | Path,
        name: str | None = None,
        target: str | CheckpointTarget | None = None,
        run_id: str | None = None,
    ) -> CheckpointDownload:
        """Async twin of :meth:`download_checkpoint`."""
        self._check_open()
        resolved = await self._control.resolve_checkpoint(
            checkpoint_id, name, run_id or self._run_id, target
        )
        return await self._control.download_checkpoint(resolved, dest_dir)

    def download_checkpoint(
        self,
        checkpoint_id: str | None = None,
        *,
        dest_dir: str | Path,
        name: str | None = None,
        target: str | CheckpointTarget | None = None,
        run_id: str | None = None,
    ) -> CheckpointDownload:
        """Download a checkpoint's files into ``dest_dir`` (new or empty); ``name`` is looked
        up in this run unless ``run_id`` names another (see
        :meth:`ServiceClient.download_checkpoint`)."""
        return _portal.run(
            self.download_checkpoint_async,
            checkpoint_id,
            dest_dir=dest_dir,
            name=name,
            target=target,
            run_id=run_id,
            twin="download_checkpoint_async",
        )

    # ------------------------------------------------------------------ plain calls

    async def health_async(self) -> None:
        """Async twin of :meth:`health`."""
        self._check_open()
        response = await self._endpoint.probe(
            "health", params={"base_model": self._base_model}, timeout=30.0
        )
        if response.status_code >= 400:
            raise error_for_response(response)

    def health(self) -> None:
        """Check the trainer (``GET /health``): returns ``None`` when it is healthy; raises
        :class:`~loops_async.errors.APIStatusError` on an error status and
        :class:`~loops_async.errors.TransportError` when it cannot be reached."""
        return _portal.run(self.health_async, twin="health_async")

    async def ensure_ready_async(self, ready_timeout: float | None = None) -> None:
        """Async twin of :meth:`ensure_ready`."""
        self._check_open()
        window = _validate.check_seconds(ready_timeout, "ready_timeout")
        run = RunInfo(
            id=self._run_id or "", base_model=self._base_model, base_url=self._endpoint.base_url
        )
        await self._control.wait_trainer_ready(self._endpoint, run, ready_timeout=window)

    def ensure_ready(self, ready_timeout: float | None = None) -> None:
        """Wait until the trainer answers ``/health`` (a restarted or scaled trainer comes
        back), at most ``ready_timeout`` seconds (default: the client's ``ready_timeout``);
        raises :class:`~loops_async.errors.OperationTimeoutError` after that."""
        return _portal.run(self.ensure_ready_async, ready_timeout, twin="ensure_ready_async")

    def get_info(self) -> GetInfoResponse:
        """What this client knows about its run (no I/O): base model, LoRA rank,
        ``max_seq_len`` (``None``: the model's own), run id and trainer URL."""
        return GetInfoResponse(
            model_data=ModelData(model_name=self._base_model, tokenizer_id=self._base_model),
            model_name=self._base_model,
            is_lora=True,
            lora_rank=self._lora_rank,
            max_seq_len=self._max_seq_len,
            model_id=self._run_id,
            base_url=self._endpoint.base_url,
        )

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The ``transformers`` tokenizer of the base model (built-in models work offline)."""
        from .tokenizer import load_tokenizer

        tokenizer: PreTrainedTokenizerBase = load_tokenizer(self._base_model)
        return tokenizer

    # ------------------------------------------------------------------ heartbeat & lifetime

    async def _heartbeat_loop(self, interval: float) -> None:
        while not self._closed:
            await anyio.sleep(interval)
            if self._closed:
                return
            try:
                await self.health_async()
            except (errors.APIStatusError, errors.TransportError) as exc:
                log.warning("trainer %s did not answer its heartbeat: %s", self._run_id, exc)

    def _start_heartbeat(self, interval: float) -> None:
        if interval > 0:
            self._heartbeat = self._control.background.spawn(
                self._heartbeat_loop, interval, name=f"heartbeat of run {self._run_id}"
            )

    def _mark_closed(self) -> TaskHandle | None:
        self._closed = True
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
        return task

    async def aclose(self) -> None:
        """Stop the heartbeat, log the metrics of results nobody read (briefly) and close the
        metrics sinks; later calls raise :class:`~loops_async.errors.ClientClosedError`.

        The HTTP connections belong to the :class:`ServiceClient` and stay open for it.
        """
        self._mark_closed()
        if self._sinks:
            with anyio.CancelScope(shield=True):
                await self._flush_metrics()
                await anyio.to_thread.run_sync(self._close_sinks)

    def close(self) -> None:
        """Blocking twin of :meth:`aclose` (inside an event loop it skips the flush)."""
        self._mark_closed()
        if self._sinks:
            if not in_event_loop() and any(not f.done() for f in list(self._unlogged)):
                _portal.run(self._flush_metrics, twin="aclose")
            self._close_sinks()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, exc_type: object, exc_val: object, exc_tb: object) -> None:
        self.close()

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, exc_type: object, exc_val: object, exc_tb: object) -> None:
        await self.aclose()


def _partial(
    failure: Exception,
    futures: list[APIFuture[ForwardBackwardOutput] | None],
    chunks: list[tuple[int, int]],
) -> errors.PartialSubmitError:
    """The error for a split batch rejected after some chunks were accepted."""
    accepted = [(f, chunk) for f, chunk in zip(futures, chunks, strict=True) if f is not None]
    rejected = [chunk for f, chunk in zip(futures, chunks, strict=True) if f is None]
    ranges = ", ".join(f"{start}..{end - 1}" for start, end in rejected)
    return errors.PartialSubmitError(
        f"{len(accepted)} of {len(chunks)} chunks of this batch were accepted and will run; "
        f"datums {ranges} were not ({type(failure).__name__}: {failure}). "
        "Resubmit error.rejected_ranges, or discard the accumulated gradient by reloading a "
        "checkpoint, before the next optim_step",
        accepted=[f for f, _ in accepted],
        accepted_ranges=[chunk for _, chunk in accepted],
        rejected_ranges=rejected,
    )


def _innermost(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside (nested) single-exception groups, or the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class _ForwardPlan:
    """A ``forward`` / ``forward_backward`` batch: validated, each datum encoded once, and
    split into chunks of at most ``limit`` bytes (dpo pairs kept together)."""

    def __init__(
        self,
        client: TrainingClient,
        datums: list[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        top_k: int,
        *,
        limit: int,
    ) -> None:
        self._client = client
        self._pieces = encode_datums(datums)
        self._loss_fn = loss_fn
        self._config = loss_fn_config
        self._top_k = top_k
        self.chunks = split([len(p) for p in self._pieces], limit=limit, pairs=loss_fn == "dpo")
        self.counts = [end - start for start, end in self.chunks]

    def bodies(self, first_seq: int) -> list[bytes]:
        """One encoded request per chunk, numbered from ``first_seq``."""
        return [
            encode(
                ForwardBackwardRequest(
                    **self._client._op_fields(first_seq + index),
                    data=cast("list[Datum]", self._pieces[start:end]),
                    loss_fn=self._loss_fn,
                    loss_fn_config=self._config,
                    top_k_logprobs=self._top_k,
                )
            )
            for index, (start, end) in enumerate(self.chunks)
        ]
