"""``TrainingClient``: one LoRA training run on a Loops trainer."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.to_thread
import msgspec

from . import _portal, _validate, errors
from ._chunking import MergedForwardFuture, encode_datums, split
from ._codec import encode
from ._custom import REPLAY_CONFIG, CustomLossFn, custom_weights, replay_data
from ._custom import finish as finish_custom
from ._loop import ThreadSafeGate
from ._operation import APIFuture, ChainedFuture, Endpoint, OperationFuture
from ._wire import (
    ForwardBackwardRequest,
    InitTrainerServerRequest,
    LoadStateRequest,
    OpRequest,
    OptimStepRequest,
    SaveStateRequest,
    SaveWeightsForSamplerRequest,
)
from .types import (
    AdamParams,
    Checkpoint,
    CheckpointArchive,
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

__all__ = ["TrainingClient"]

T = TypeVar("T")
log = logging.getLogger("loops_async")


class TrainingClient:
    """A LoRA training run: submit-and-retrieve operations on its trainer.

    Made by :meth:`ServiceClient.create_lora_training_client` (or its ``_async`` twin). Every
    long-running method submits at call time and returns an :class:`OperationFuture`; its
    ``*_async`` twin takes the same arguments and, awaited, returns the same future. Calls get
    a ``seq_id`` in call order, and the trainer runs them strictly in that order, so any number
    may be in flight: queue ``forward_backward`` and ``optim_step`` back to back, then await.

    The client sends a ``/health`` heartbeat every ``heartbeat_interval`` seconds while open.
    ``close()`` / ``aclose()`` (or ``with`` / ``async with``) stop it.
    """

    def __init__(
        self,
        *,
        control: Control,
        endpoint: Endpoint,
        run_id: str,
        base_model: str,
        lora_rank: int,
    ) -> None:
        self._control = control
        self._max_request_bytes = control.settings.max_request_bytes
        self._endpoint = endpoint
        self._run_id = run_id
        self._base_model = base_model
        self._lora_rank = lora_rank
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
    def run_id(self) -> str:
        """The id of the training run (sent as ``X-Run-Id``)."""
        return self._run_id

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
            return seq, encode(build(seq))
        except BaseException:
            self._gate.release(seq)
            raise

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
            return _portal.run(
                self._submit, op, seq, body, result_type, transform, accepted, twin=twin
            )
        except BaseException:
            self._gate.release(seq)  # idempotent; covers a call that never started
            raise

    async def _call_async(
        self,
        op: str,
        build: Callable[[int], OpRequest],
        result_type: type[T],
        transform: Callable[[T], T] | None = None,
        accepted: Callable[[OperationFuture[T]], None] | None = None,
    ) -> OperationFuture[T]:
        seq, body = self._prepare(build)
        return await self._submit(op, seq, body, result_type, transform, accepted)

    def _prepare_plan(self, plan: _ForwardPlan) -> tuple[int, list[bytes]]:
        """Reserve one ``seq_id`` per chunk (contiguous, in the caller's thread) and encode."""
        self._check_open()
        first = self._gate.reserve(len(plan.chunks))
        try:
            return first, plan.bodies(first)
        except BaseException:
            self._release_range(first, len(plan.chunks))
            raise

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
                    operation_id, endpoint=self._endpoint, result_type=ForwardBackwardOutput
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
            return _portal.run(self._submit_plan, op, first, bodies, plan, twin=twin)
        except BaseException:
            self._release_range(first, len(bodies))
            raise

    async def _call_plan_async(
        self, op: str, plan: _ForwardPlan
    ) -> APIFuture[ForwardBackwardOutput]:
        first, bodies = self._prepare_plan(plan)
        return await self._submit_plan(op, first, bodies, plan)

    def _op_fields(self, seq: int) -> dict[str, Any]:
        return {"seq_id": seq, "run_id": self._run_id, "model": self._base_model}

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
        path = _validate.check_checkpoint_path(path)
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
        *,
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
        *,
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
        *,
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
        *,
        top_k_logprobs: int = 0,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward`."""
        return await self._call_plan_async(
            "forward", self._forward_plan(data, loss_fn, loss_fn_config, top_k_logprobs)
        )

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward_backward_custom`."""
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

        return ChainedFuture(replay, merge, what="forward_backward_custom")

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """Accumulate the gradient of a loss computed on the client with torch.

        ``loss_fn(data, logprobs) -> (loss, metrics)`` gets each datum's target-token logprobs
        (float32 tensors shaped like its ``target_tokens``) and returns a scalar loss tensor
        and a dict of floats. The trainer runs ``forward``; the loss and its gradient are
        evaluated here; a ``forward_backward`` with cross-entropy weights ``-dLoss/dlogprob``
        (and ``skip_token_normalization``, so the gradient is applied as is) replays it on the
        server. Returns once the replay is submitted; the future's result carries the custom
        loss and the user's metrics. Do not mix it with normalised losses before the next
        ``optim_step``. Needs torch.
        """
        return _portal.run(
            self.forward_backward_custom_async, data, loss_fn, twin="forward_backward_custom_async"
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

        The result's ``path`` (``bt://loops:<run>/weights/<name>``) can be passed to
        :meth:`load_state` / :meth:`load_state_with_optimizer`.
        """
        return self._call(
            "save_state_async",
            "save_state",
            self._save_builder(name, ttl_seconds),
            SaveWeightsResponse,
        )

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> OperationFuture[SaveWeightsResponse]:
        """Async twin of :meth:`save_state`."""
        return await self._call_async(
            "save_state", self._save_builder(name, ttl_seconds), SaveWeightsResponse
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
            self._after_publish if bump_version else None,
            self._accepted_publish if bump_version else None,
        )

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, *, bump_version: bool = False
    ) -> OperationFuture[SaveWeightsForSamplerResponse]:
        """Async twin of :meth:`save_weights_for_sampler`."""
        return await self._call_async(
            "save_weights_for_sampler",
            self._publish_builder(name, ttl_seconds, bump_version),
            SaveWeightsForSamplerResponse,
            self._after_publish if bump_version else None,
            self._accepted_publish if bump_version else None,
        )

    def load_state(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Load adapter weights from a ``save_state`` path; the optimizer state and step reset
        (``POST /load_state``)."""
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
        """Load adapter weights, Adam moments and the step counter from a ``save_state`` path
        (``POST /load_state_with_optimizer``), to resume training exactly."""
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

    # ------------------------------------------------------------------ sampling

    async def _sampler_at_version(self, published: SaveWeightsForSamplerResponse) -> SamplingClient:
        """Wait until the paired sampler serves ``published.version``; a client pinned there."""
        version = published.version or 0
        sampler = await self._control.paired_sampler(self._run_id)
        headers = {"X-Run-Id": self._run_id}
        if sampler.model_id is None:  # shared: pinned to the published path, nothing to wait for
            return self._control.sampling_client(
                sampler, self._base_model, headers, pin=published.path
            )
        if version > 0:
            await self._control.wait_policy_version(sampler, self._run_id, version)
            headers["X-Min-Policy-Version"] = str(version)
        return self._control.sampling_client(sampler, self._base_model, headers)

    def _publish_name(self, name: str | None) -> str:
        return f"policy-{uuid.uuid4().hex[:12]}" if name is None else name

    def save_weights_and_get_sampling_client(
        self, name: str | None = None
    ) -> APIFuture[SamplingClient]:
        """Publish the adapter for sampling and get a client that samples from exactly it.

        Submits ``save_weights_for_sampler`` with ``bump_version: true`` now; the returned
        future's ``.result(timeout)`` waits for it, then until the paired sampler serves the new
        policy version (bounded by ``ready_timeout`` and by ``timeout``), and gives a
        :class:`SamplingClient` that sends ``X-Min-Policy-Version: <version>`` on every sample
        (no floor for version 0, the base model). ``name`` defaults to a fresh unique name.
        """
        publish = self.save_weights_for_sampler(self._publish_name(name), bump_version=True)
        return ChainedFuture(publish, self._sampler_at_version, what="publish and sampler")

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None
    ) -> APIFuture[SamplingClient]:
        """Async twin of :meth:`save_weights_and_get_sampling_client`."""
        publish = await self.save_weights_for_sampler_async(
            self._publish_name(name), bump_version=True
        )
        return ChainedFuture(publish, self._sampler_at_version, what="publish and sampler")

    async def create_sampling_client_async(self, model_path: str) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client`."""
        self._check_open()
        path = _validate.check_checkpoint_path(model_path, "model_path")
        last = self._last_publish
        if last is not None and not last.done():
            # Its version is predicted at acceptance; the result is exact (e.g. after a
            # load_state_with_optimizer whose step only the checkpoint knows).
            await last.result_async()
        sampler = await self._control.paired_sampler(self._run_id)
        headers = {
            "X-Run-Id": self._run_id,
            "X-Checkpoint-Path": path,
            "X-Min-Policy-Version": str(self._last_published_version + 1),
        }
        return self._control.sampling_client(sampler, self._base_model, headers, pin=path)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A client of this run's sampler that serves checkpoint ``model_path`` until the run
        publishes a newer policy, then the live adapter (``X-Checkpoint-Path`` plus
        ``X-Min-Policy-Version: <last published + 1>``)."""
        return _portal.run(
            self.create_sampling_client_async, model_path, twin="create_sampling_client_async"
        )

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints_async(self) -> list[Checkpoint]:
        """Async twin of :meth:`list_checkpoints`."""
        self._check_open()
        return await self._control.list_checkpoints(self._run_id)

    def list_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints this run has saved (``save_state`` and sampler ones)."""
        return _portal.run(self.list_checkpoints_async, twin="list_checkpoints_async")

    async def get_checkpoint_archive_url_async(self, path: str) -> CheckpointArchive:
        """Async twin of :meth:`get_checkpoint_archive_url`."""
        self._check_open()
        _validate.check_checkpoint_path(path)
        return await self._control.checkpoint_archive(path)

    def get_checkpoint_archive_url(self, path: str) -> CheckpointArchive:
        """The download URLs of every file of checkpoint ``path``."""
        return _portal.run(
            self.get_checkpoint_archive_url_async, path, twin="get_checkpoint_archive_url_async"
        )

    async def download_checkpoint_async(self, path: str, destination: str | Path) -> Path:
        """Async twin of :meth:`download_checkpoint`."""
        self._check_open()
        _validate.check_checkpoint_path(path)
        return await self._control.download_checkpoint(path, destination)

    def download_checkpoint(self, path: str, destination: str | Path) -> Path:
        """Download checkpoint ``path`` into the new directory ``destination``; returns it."""
        return _portal.run(
            self.download_checkpoint_async, path, destination, twin="download_checkpoint_async"
        )

    # ------------------------------------------------------------------ plain calls

    async def health_async(self) -> bool:
        """Whether the trainer answers ``GET /health`` with 200."""
        self._check_open()
        try:
            response = await self._endpoint.probe(
                "health", params={"base_model": self._base_model}, timeout=30.0
            )
        except errors.TransportError:
            return False
        return bool(response.status_code == 200)

    def health(self) -> bool:
        """Whether the trainer answers ``GET /health`` with 200 (blocking)."""
        return _portal.run(self.health_async, twin="health_async")

    def get_info(self) -> GetInfoResponse:
        """What this client knows about its run (no I/O)."""
        return GetInfoResponse(
            model_id=self._run_id,
            model_name=self._base_model,
            lora_rank=self._lora_rank,
            model_data=ModelData(model_name=self._base_model, tokenizer_id=self._base_model),
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
            if not self._closed and not await self.health_async():
                log.warning("trainer %s did not answer its heartbeat", self._run_id)

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
        """Stop the heartbeat; later calls raise :class:`~loops_async.errors.ClientClosedError`.

        The HTTP connections belong to the :class:`ServiceClient` and stay open for it.
        """
        self._mark_closed()

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`."""
        self._mark_closed()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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
