"""The batching queue in front of a generation engine (PROTOCOL.md §6-7).

An :class:`EngineWorker` owns one generation engine (one per base model, shared by all its
samplers) and one batcher task: requests wait in an anyio memory-object stream; the batcher takes
the oldest pending request and every other pending request with the same adapter (up to
``max_rows`` sequences, :data:`~loops_async.server.sampler_engine.MAX_BATCH_ROWS` for the
server's workers) and runs them as one batch on a worker thread (the torch engine) or inline (the
``null`` engine). Requests with different adapters never share a batch. A worker queues at most
:data:`MAX_QUEUED_REQUESTS` requests before it answers 503.

:class:`SamplerError` is a sampler answer other than 200 or 422 (a shutdown, a failed load, a full
queue, a routing 408, ...), raised here and by :mod:`~loops_async.server.sampler_registry`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.to_thread

from .._wire import SampleChoice
from .backend import InvalidRequest
from .models import ModelSpec
from .sampler_engine import AdapterRef, EngineFactory, GenerationRequest, SamplerEngine

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "MAX_QUEUED_REQUESTS",
    "EngineWorker",
    "SamplerError",
    "SamplerStatus",
]

logger = logging.getLogger("loops_async.server")

MAX_QUEUED_REQUESTS = 65536
"""Requests one engine queues before it answers 503 (``Retry-After``)."""

SamplerStatus = Literal["DEPLOYING", "ACTIVE", "DEPLOY_FAILED"]
"""What ``GET /v1/models/<model_id>/deployments/<deployment_id>`` reports."""


class SamplerError(Exception):
    """A sampler answer other than 200 or 422: ``status`` with ``{"detail": ...}``."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        error_class: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.error_class = error_class
        """Set when the answer is final (shutdown, failed load): clients then stop retrying."""


@dataclass(eq=False)
class _Job:
    adapter: AdapterRef | None
    request: GenerationRequest
    done: anyio.Event = field(default_factory=anyio.Event)
    result: list[SampleChoice] | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def finish(self, result: list[SampleChoice] | None, error: BaseException | None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


def _adapter_key(adapter: AdapterRef | None) -> str | None:
    return None if adapter is None else adapter.key


class EngineWorker:
    """One engine and its batcher task (see the module docstring). Build it with
    :meth:`~loops_async.server.sampler_registry.SamplerService.worker_for`; :meth:`serve` is its
    task."""

    def __init__(
        self,
        spec: ModelSpec,
        factory: EngineFactory,
        blocking_build: bool,
        *,
        max_rows: int,
        delay: float = 0.0,
    ) -> None:
        self.spec = spec
        self.delay = delay
        """Seconds each batch waits before it runs (the null backend's test knob)."""
        self.status: SamplerStatus = "DEPLOYING"
        self.load_error: str | None = None
        self.engine: SamplerEngine | None = None
        self.max_rows = max_rows
        self.batches = 0
        """Batches run so far (for tests and diagnostics)."""
        self.largest_batch = 0
        """The most requests one batch held so far."""
        self._factory = factory
        self._blocking_build = blocking_build
        self._queued = 0
        self._closed = False
        send, receive = anyio.create_memory_object_stream[_Job](math.inf)
        self._send: MemoryObjectSendStream[_Job] = send
        self._receive: MemoryObjectReceiveStream[_Job] = receive

    def __repr__(self) -> str:
        return f"<EngineWorker {self.spec.name} {self.status} queued={self._queued}>"

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the batch that runs)."""
        return self._queued

    async def submit(
        self, adapter: AdapterRef | None, request: GenerationRequest
    ) -> list[SampleChoice]:
        """Queue a request and wait for its choices. Raises :class:`SamplerError` (503) when the
        engine failed to load, is shutting down or is full; :class:`InvalidRequest` when the
        adapter cannot be loaded."""
        if self.status == "DEPLOY_FAILED":
            raise SamplerError(
                503,
                f"the sampler's model failed to load: {self.load_error}",
                error_class="SamplerLoadError",
            )
        if self._closed:
            raise SamplerError(
                503, "the server is shutting down", error_class="ServerShutdownError"
            )
        if self._queued >= MAX_QUEUED_REQUESTS:
            raise SamplerError(
                503,
                f"the sampler has {self._queued} requests queued; retry later",
                {"Retry-After": "1"},
            )
        job = _Job(adapter=adapter, request=request)
        try:
            self._send.send_nowait(job)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise SamplerError(
                503, "the sampler stopped (server shutting down)", error_class="ServerShutdownError"
            ) from None
        self._queued += 1
        try:
            await job.done.wait()
        finally:
            job.abandoned = True
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Accept no new requests; queued ones still run until the task is cancelled."""
        self._closed = True

    async def serve(self) -> None:
        """Build the engine, then run batches until cancelled; every request left waiting when
        it ends gets a 503."""
        pending: deque[_Job] = deque()
        try:
            await self._build()
            while True:
                if not pending:
                    pending.append(await self._receive.receive())
                while True:
                    try:
                        pending.append(self._receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                batch = self._take_batch(pending)
                self._queued -= len(batch)
                batch = [job for job in batch if not job.abandoned]
                if batch:
                    await self._run(batch)
        finally:
            self._closed = True
            error = SamplerError(
                503, "the sampler stopped (server shutting down)", error_class="ServerShutdownError"
            )
            if self.status == "DEPLOY_FAILED":
                error = SamplerError(
                    503,
                    f"the sampler's model failed to load: {self.load_error}",
                    error_class="SamplerLoadError",
                )
            for job in pending:
                job.finish(None, error)
            while True:
                try:
                    self._receive.receive_nowait().finish(None, error)
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
            self._send.close()
            self._receive.close()

    async def _build(self) -> None:
        try:
            if self._blocking_build:
                engine = await anyio.to_thread.run_sync(
                    self._factory, self.spec, abandon_on_cancel=True
                )
            else:
                engine = self._factory(self.spec)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = "DEPLOY_FAILED"
            logger.exception("sampler engine for %s failed to load", self.spec.name)
            raise SamplerError(503, self.load_error, error_class="SamplerLoadError") from exc
        self.engine = engine
        self.status = "ACTIVE"
        logger.info("sampler engine for %s ready", self.spec.name)

    def _take_batch(self, pending: deque[_Job]) -> list[_Job]:
        """The oldest pending job plus every later one with the same adapter, up to
        ``max_rows`` sequences; the rest stay pending in order."""
        first = pending.popleft()
        key = _adapter_key(first.adapter)
        batch, rows, rest = [first], first.request.n, deque[_Job]()
        while pending:
            job = pending.popleft()
            if _adapter_key(job.adapter) == key and rows + job.request.n <= self.max_rows:
                batch.append(job)
                rows += job.request.n
            else:
                rest.append(job)
        pending.extend(rest)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        engine = self.engine
        assert engine is not None
        call = functools.partial(engine.generate, batch[0].adapter, [j.request for j in batch])
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        if self.delay > 0:
            await anyio.sleep(self.delay)
        try:
            if engine.blocking:
                results = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
            else:
                results = call()
        except InvalidRequest as exc:
            for job in batch:
                job.finish(None, InvalidRequest(str(exc)))
            return
        except Exception as exc:
            logger.exception("sampler batch of %d requests failed", len(batch))
            error = SamplerError(500, f"sampling failed: {type(exc).__name__}: {exc}")
            for job in batch:
                job.finish(None, error)
            return
        for job, choices in zip(batch, results, strict=True):
            job.finish(choices, None)
