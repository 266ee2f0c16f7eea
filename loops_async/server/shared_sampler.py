"""Shared (serverless) samplers: the operation protocol and the adapter cache by name
(PROTOCOL.md §2, §6 "Shared (serverless) samplers", §8).

A shared sampler is a :class:`~loops_async.server.sampler.Sampler` with ``shared=True`` (its
control-plane record has ``model_id`` and ``deployment_id`` null). Its ``POST {sampler}/sample``
does not answer the choices: it admits a :class:`SampleOperation` (202 ``{"operation_id",
"schema_version": 1}``, idempotent by ``Idempotency-Key``) that runs at once on the base model's
engine worker; the client long-polls ``GET {sampler}/operations/<id>`` (408 after the hold; 200
``{"status": "done", "result": <the /sample answer>}`` with ``x-trainers-policy-version``, or
``{"status": "error", ...}``) and may ``POST {sampler}/operations/<id>/cancel``.

:class:`AdapterNameCache` reproduces a hosted behaviour clients must work around: a shared
sampler caches a loaded adapter by its checkpoint **name** (per run), so a checkpoint published
again under the same name keeps being served with the first weights. The cache holds a private
copy of the adapter files, so the stale weights outlive the replaced checkpoint on disk.
"""

from __future__ import annotations

import enum
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from .._codec import encode as _encode
from .._wire import SampleAnswer
from .backend import ADAPTER_FILES, InvalidRequest
from .operations import CANCELLED_ERROR_CLASS, SubmitRejected, operation_id_for_key
from .sampler_batcher import EngineWorker, SamplerError
from .sampler_engine import AdapterRef, GenerationRequest

__all__ = [
    "SHARED_CACHE_DIR",
    "AdapterNameCache",
    "SampleOperation",
    "SampleOperations",
    "SampleStatus",
    "run_sample",
]

SHARED_CACHE_DIR = ".shared-sampler-cache"
"""Where (under the data directory) shared samplers keep their copies of cached adapters;
emptied when the server starts and stops."""


class SampleStatus(enum.Enum):
    """Where a shared sampler's operation is in its life."""

    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class SampleOperation:
    """One ``/sample`` on a shared sampler."""

    id: str
    key: str | None
    version: int
    """The policy version of the adapter that serves it (0: the base model)."""
    fingerprint: str | None = None
    """The request body's fingerprint: its ``Idempotency-Key`` is bound to it."""
    status: SampleStatus = SampleStatus.RUNNING
    body: bytes | None = None
    """The encoded 200 answer of a retrieve, once finished."""
    finished_at: float | None = None
    scope: anyio.CancelScope | None = field(default=None, repr=False)
    _wake: anyio.Event = field(default_factory=anyio.Event, repr=False)

    @property
    def finished(self) -> bool:
        """Whether its answer is final (done, failed or cancelled)."""
        return self.status is not SampleStatus.RUNNING

    def finish(self, status: SampleStatus, body: bytes) -> None:
        """Record the final answer (the first one wins) and wake its long-polls."""
        if self.finished:
            return
        self.status = status
        self.body = body
        self.finished_at = anyio.current_time()
        self.scope = None
        self._wake.set()

    def fail(self, message: str, error_class: str) -> None:
        """Finish with ``{"status": "error", "error", "error_class"}``."""
        body = _encode({"status": "error", "error": message, "error_class": error_class})
        self.finish(SampleStatus.ERROR, body)


class SampleOperations:
    """The operations of one shared sampler: idempotency by key, long-polls, cancel, TTL.
    Lives on the server's event loop."""

    def __init__(self, *, result_ttl: float) -> None:
        self.result_ttl = result_ttl
        self._ops: dict[str, SampleOperation] = {}
        self._by_key: dict[str, SampleOperation] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<SampleOperations ops={len(self._ops)}>"

    def __iter__(self) -> Iterator[SampleOperation]:
        return iter(list(self._ops.values()))

    def _expired(self, op: SampleOperation, now: float) -> bool:
        return op.finished_at is not None and now - op.finished_at >= self.result_ttl

    def _forget(self, op: SampleOperation) -> None:
        self._ops.pop(op.id, None)
        if op.key is not None and self._by_key.get(op.key) is op:
            del self._by_key[op.key]

    def get(self, op_id: str) -> SampleOperation | None:
        """The operation with this id, or None (unknown, or its result expired)."""
        op = self._ops.get(op_id)
        if op is not None and self._expired(op, anyio.current_time()):
            self._forget(op)
            return None
        return op

    def find_key(self, key: str | None, fingerprint: str | None = None) -> SampleOperation | None:
        """The operation an ``Idempotency-Key`` created, or None. A key reused for another
        request (another body ``fingerprint``) is a :class:`SubmitRejected` (422)."""
        op = None if key is None else self._by_key.get(key)
        if op is not None and self._expired(op, anyio.current_time()):
            self._forget(op)
            return None
        if (
            op is not None
            and fingerprint is not None
            and op.fingerprint is not None
            and op.fingerprint != fingerprint
        ):
            shown = (key or "")[:64]
            raise SubmitRejected(
                f"Idempotency-Key: {shown!r} was already used for another sample request "
                "(with a different body); use a new key for a new request"
            )
        return op

    def admit(
        self, key: str | None, version: int, fingerprint: str | None = None
    ) -> SampleOperation:
        """A new running operation (call :meth:`find_key` first for a retried submit)."""
        op_id = operation_id_for_key(key)
        if op_id is None or op_id in self._ops:
            op_id = uuid.uuid4().hex
        op = SampleOperation(id=op_id, key=key, version=version, fingerprint=fingerprint)
        self._ops[op_id] = op
        if key is not None:
            self._by_key[key] = op
        return op

    def cancel(self, op_id: str) -> Literal["cancelled", "done"] | None:
        """Cancel an unfinished operation (its sampling is abandoned). Returns
        ``"cancelled"`` (now or before), ``"done"`` (too late) or None for an unknown id."""
        op = self.get(op_id)
        if op is None:
            return None
        if op.status is SampleStatus.CANCELLED:
            return "cancelled"
        if op.finished:
            return "done"
        scope = op.scope
        op.finish(
            SampleStatus.CANCELLED,
            _encode(
                {
                    "status": "error",
                    "error": "cancelled by request",
                    "error_class": CANCELLED_ERROR_CLASS,
                }
            ),
        )
        if scope is not None:
            scope.cancel()
        return "cancelled"

    async def wait(self, op: SampleOperation, hold: float) -> bool:
        """Wait up to ``hold`` seconds for ``op`` to finish; returns whether it did."""
        if not op.finished and not self._closed:
            with anyio.move_on_after(hold):
                await op._wake.wait()
        return op.finished

    def sweep(self) -> int:
        """Forget every operation whose result expired; returns how many."""
        now = anyio.current_time()
        stale = [op for op in self._ops.values() if self._expired(op, now)]
        for op in stale:
            self._forget(op)
        return len(stale)

    def close(self) -> None:
        """Shut down: wake every long-poll (they answer 503)."""
        self._closed = True
        for op in self._ops.values():
            op._wake.set()


async def run_sample(
    worker: EngineWorker,
    op: SampleOperation,
    adapter: AdapterRef | None,
    request: GenerationRequest,
) -> None:
    """Run one shared-sampler operation to its end (a task of the sampler service): the
    choices, or an error; a :meth:`SampleOperations.cancel` abandons it."""
    with anyio.CancelScope() as scope:
        op.scope = scope
        try:
            choices = await worker.submit(adapter, request)
        except InvalidRequest as exc:
            op.fail(str(exc), "ValidationError")
        except SamplerError as exc:
            op.fail(exc.detail, exc.error_class or "SamplerError")
        else:
            op.finish(
                SampleStatus.DONE,
                _encode({"status": "done", "result": SampleAnswer(choices=choices)}),
            )


def _copy_adapter(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


class AdapterNameCache:
    """The adapters a shared sampler has loaded, by ``(run_id, checkpoint name)``: the first
    load of a name is copied under ``root`` and served from there for as long as the server
    runs, even after the checkpoint is saved again under that name (or deleted)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._entries: dict[tuple[str, str], AdapterRef] = {}
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<AdapterNameCache {len(self._entries)} adapters>"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, run_id: str, name: str) -> AdapterRef | None:
        """The cached adapter of that name, if it was loaded before."""
        return self._entries.get((run_id, name))

    async def load(self, run_id: str, name: str, fresh: AdapterRef) -> AdapterRef:
        """The cached adapter of ``(run_id, name)``; on a miss, ``fresh`` (just resolved) is
        copied into the cache and becomes the entry."""
        key = (run_id, name)
        async with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                return hit
            target = self.root / f"{run_id}.{name}.{uuid.uuid4().hex[:12]}"
            try:
                await anyio.to_thread.run_sync(_copy_adapter, fresh.directory, target)
            except OSError as exc:
                raise InvalidRequest(
                    f"{fresh.field}: cannot load the adapter of {fresh.uri} (it changed while "
                    f"loading; retry): {exc}"
                ) from None
            cached = AdapterRef(
                key=str(target),
                directory=target,
                uri=fresh.uri,
                version=fresh.version,
                field=fresh.field,
            )
            self._entries[key] = cached
            return cached
