"""tinker's ``RestClient``: the checkpoint and run queries tinker-cookbook uses.

Runs and checkpoints are described from the Loops checkpoint listing
(``GET /v1/loops/checkpoints``): a run's base model and LoRA rank are its checkpoints', and its
``user_metadata`` is known for runs this process created. Every method returns an
:class:`~loops_async.tinker.APIFuture` at once; ``*_async`` methods return the value.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from .. import errors
from .. import service as core_service
from .. import types as core_types
from ._futures import AwaitableConcurrentFuture, spawn
from ._paths import to_loops_path, to_tinker_path
from ._service import known_run, resolve_api_key, resolve_base_url, server_capabilities
from .types import (
    Checkpoint,
    CheckpointsListResponse,
    GetServerCapabilitiesResponse,
    ParsedCheckpointTinkerPath,
    TrainingRun,
    WeightsInfoResponse,
)

if TYPE_CHECKING:
    from ._service import ServiceClient

__all__ = ["RestClient"]

_KIND_OF_TARGET = {"trainer": "weights", "sampler": "sampler_weights"}
_TYPE_OF_KIND = {"weights": "training", "sampler_weights": "sampler"}
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


def _time(value: str | None) -> dt.datetime:
    if value:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return _EPOCH


def _when(checkpoint: Checkpoint) -> dt.datetime:
    return checkpoint.time or _EPOCH


def _kind(checkpoint: core_types.Checkpoint) -> str:
    return _KIND_OF_TARGET.get(checkpoint.target or "trainer", "weights")


def to_tinker_checkpoint(checkpoint: core_types.Checkpoint) -> Checkpoint:
    """The tinker description of a Loops checkpoint record."""
    kind = _kind(checkpoint)
    return Checkpoint(
        checkpoint_id=f"{kind}/{checkpoint.checkpoint_id}",
        checkpoint_type=_TYPE_OF_KIND[kind],  # type: ignore[arg-type]
        time=_time(checkpoint.created_at),
        tinker_path=to_tinker_path(checkpoint.path),
        size_bytes=checkpoint.size_bytes,
    )


class RestClient:
    """Checkpoint and run queries (tinker's ``RestClient``), on a :class:`ServiceClient`'s
    connection (``service.create_rest_client()``) or on its own (``RestClient(base_url=...,
    api_key=...)``, configured as :class:`ServiceClient` is)."""

    def __init__(
        self,
        _holder: ServiceClient | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        if _holder is not None:
            self._core = _holder.loops_client
            self._owned = False
        else:
            self._core = core_service.ServiceClient(
                base_url=resolve_base_url(base_url), api_key=resolve_api_key(api_key)
            )
            self._owned = True

    def __repr__(self) -> str:
        return f"<tinker RestClient {self._core.base_url}>"

    # ------------------------------------------------------------------ checkpoints

    async def _checkpoints(self, run_id: str) -> list[core_types.Checkpoint]:
        return await self._core.list_checkpoints_async(run_id)

    def list_checkpoints(
        self, training_run_id: str
    ) -> AwaitableConcurrentFuture[CheckpointsListResponse]:
        """The checkpoints of run ``training_run_id``, oldest first."""
        return spawn(self._list_checkpoints, training_run_id)

    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        """:meth:`list_checkpoints`, awaited."""
        return await self.list_checkpoints(training_run_id)

    async def _list_checkpoints(self, run_id: str) -> CheckpointsListResponse:
        found = await self._checkpoints(run_id)
        converted = sorted((to_tinker_checkpoint(c) for c in found), key=_when)
        return CheckpointsListResponse(checkpoints=converted)

    def delete_checkpoint(
        self, training_run_id: str, checkpoint_id: str
    ) -> AwaitableConcurrentFuture[None]:
        """Delete checkpoint ``checkpoint_id`` (``"weights/<name>"`` or
        ``"sampler_weights/<name>"``) of run ``training_run_id``."""
        return spawn(self._delete, training_run_id, checkpoint_id)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        """:meth:`delete_checkpoint`, awaited."""
        await self.delete_checkpoint(training_run_id, checkpoint_id)

    def delete_checkpoint_from_tinker_path(
        self, tinker_path: str
    ) -> AwaitableConcurrentFuture[None]:
        """Delete the checkpoint at ``tinker_path``."""
        parsed = _parse(tinker_path)
        return spawn(self._delete, parsed.training_run_id, parsed.checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """:meth:`delete_checkpoint_from_tinker_path`, awaited."""
        await self.delete_checkpoint_from_tinker_path(tinker_path)

    async def _delete(self, run_id: str, checkpoint_id: str) -> None:
        kind, _, name = checkpoint_id.partition("/")
        if kind not in _TYPE_OF_KIND or not name:
            raise errors.ValidationError(
                f"checkpoint_id: expected 'weights/<name>' or 'sampler_weights/<name>', got "
                f"{checkpoint_id!r}"
            )
        for checkpoint in await self._checkpoints(run_id):
            if checkpoint.checkpoint_id == name and _kind(checkpoint) == kind:
                await self._core._control.delete_checkpoint(checkpoint.id)
                return
        raise _not_found(f"no checkpoint {checkpoint_id!r} in run {run_id!r}")

    # ------------------------------------------------------------------ runs

    def get_training_run(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> AwaitableConcurrentFuture[TrainingRun]:
        """What is known of run ``training_run_id``: base model, LoRA rank, last checkpoints
        (and ``user_metadata`` for runs this process created)."""
        return spawn(self._training_run, training_run_id)

    async def get_training_run_async(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> TrainingRun:
        """:meth:`get_training_run`, awaited."""
        return await self.get_training_run(training_run_id, access_scope)

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> AwaitableConcurrentFuture[TrainingRun]:
        """:meth:`get_training_run` of the run that saved ``tinker_path``."""
        return spawn(self._training_run, _parse(tinker_path).training_run_id)

    async def get_training_run_by_tinker_path_async(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> TrainingRun:
        """:meth:`get_training_run_by_tinker_path`, awaited."""
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    async def _training_run(self, run_id: str) -> TrainingRun:
        found = await self._checkpoints(run_id)
        record = known_run(run_id)
        if not found and record is None:
            raise _not_found(f"unknown training run {run_id!r} (no checkpoints)")
        converted = sorted(
            ((c, to_tinker_checkpoint(c)) for c in found), key=lambda pair: _when(pair[1])
        )
        training = [t for c, t in converted if t.checkpoint_type == "training"]
        sampler = [t for c, t in converted if t.checkpoint_type == "sampler"]
        base_model = next((c.base_model for c, _ in converted if c.base_model), None)
        rank = next((c.lora_adapter_config.r for c, _ in converted if c.lora_adapter_config), None)
        times = [_when(t) for _, t in converted]
        if record is not None:
            times.append(dt.datetime.fromtimestamp(record.created, dt.UTC))
        return TrainingRun(
            training_run_id=run_id,
            base_model=base_model or "",
            model_owner="",
            is_lora=True,
            lora_rank=rank,
            last_request_time=max(times),
            last_checkpoint=training[-1] if training else None,
            last_sampler_checkpoint=sampler[-1] if sampler else None,
            user_metadata=record.user_metadata if record is not None else None,
        )

    def get_weights_info_by_tinker_path(
        self, tinker_path: str
    ) -> AwaitableConcurrentFuture[WeightsInfoResponse]:
        """The base model and LoRA rank of the checkpoint at ``tinker_path``."""
        loops_path = to_loops_path(tinker_path, "tinker_path")
        return spawn(self._weights_info, loops_path)

    async def _weights_info(self, loops_path: str) -> WeightsInfoResponse:
        checkpoint = await self._core._control.checkpoint_at(loops_path)
        rank = checkpoint.lora_adapter_config.r if checkpoint.lora_adapter_config else None
        return WeightsInfoResponse(
            base_model=checkpoint.base_model or "", is_lora=True, lora_rank=rank
        )

    def get_server_capabilities(self) -> AwaitableConcurrentFuture[GetServerCapabilitiesResponse]:
        """The base models the server supports."""
        return spawn(server_capabilities, self._core)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        """:meth:`get_server_capabilities`, awaited."""
        return await self.get_server_capabilities()

    def close(self) -> None:
        """Close the connection this client opened itself (none when it shares a
        :class:`ServiceClient`'s)."""
        if self._owned:
            spawn(self._core.aclose)


def _parse(tinker_path: str) -> Any:
    try:
        return ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    except ValueError as exc:
        raise errors.ValidationError(f"tinker_path: {exc}") from None


def _not_found(message: str) -> errors.NotFoundError:
    return errors.NotFoundError(message, status_code=404, method="GET", url="")
