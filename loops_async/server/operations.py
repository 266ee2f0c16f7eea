"""The operations store of one run: idempotent submits, strict ``seq_id`` order, long-polls.

An :class:`OperationLog` belongs to one run and lives on the server's event loop (it is not
thread-safe; nothing in it blocks). Its rules:

- **Idempotency.** A submit carrying an ``Idempotency-Key`` the log has seen gets the operation
  that key created (same id; it never runs twice). The operation id is the key itself when the key
  is a sane string (1-128 characters of ``[A-Za-z0-9._:~-]``, not only dots: a URL path segment
  ``.`` or ``..`` cannot be polled), else a generated hex id. Keys are remembered as long as their
  operation is (see Retention below). A key is bound to what it was first used for: the op kind
  and a fingerprint of the request body (:func:`body_fingerprint`). The same key with another
  kind or another body is not a retry: :meth:`OperationLog.find_key` rejects it
  (:class:`SubmitRejected`, a 422 naming ``Idempotency-Key``) rather than answer with an
  operation that did something else.
- **Order.** Operations run one at a time, in increasing ``seq_id``. The executor
  (:meth:`OperationLog.run`) runs ``next_seq`` as soon as it is admitted. When ``next_seq`` is
  missing but a later one is queued, the executor waits up to ``seq_gap_timeout`` for it, then
  skips the gap and runs the lowest queued ``seq_id`` (a client may burn a seq when a caller is
  cancelled mid-submit).
- **Admission.** A new (non-duplicate) submit is rejected (:class:`SubmitRejected`, a 422) when
  its ``seq_id`` is below 1 or above ``2**63 - 1``, below ``next_seq`` (already run or skipped),
  more than ``max_seq_ahead`` beyond ``next_seq`` (one absurd ``seq_id`` would otherwise be run
  after ``seq_gap_timeout`` and leave every real one "behind" until the next init), or already
  queued under another key. Exception: ``init_trainer_server`` with ``seq_id`` 1
  starts a new sequence once the old one has begun: queued operations of the old sequence are
  cancelled and ``next_seq`` goes back to 1 (an operation that is running finishes first).
- **Retrieve.** :meth:`OperationLog.wait` holds a long-poll on an :class:`anyio.Event` (no thread)
  until the operation finishes, the hold runs out, or the server shuts down.
- **Retention.** A finished operation (and its key) is forgotten ``result_ttl`` seconds after it
  finished; a retrieve then gets 404, like an unknown id. Finished results are also capped per
  log: beyond ``max_results`` of them, or ``max_result_bytes`` of encoded answers in all, the
  oldest finished ones are forgotten first (the newest is always kept, even alone over the byte
  cap). Unfinished operations (queued or running) are never forgotten.
- **Cancel.** A queued operation can be cancelled (it never runs; its seq is passed over at once);
  a running or finished one cannot.
- **Errors.** :class:`~loops_async.server.backend.InvalidRequest` raised while running becomes
  ``{"status": "error", "error_class": "ValidationError"}``; any other exception its class name.
  The executor never dies of an operation's exception; should it die of a bug of its own,
  ``close(reason)`` fails every unfinished operation with ``reason``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import msgspec

from .._codec import encode as _encode
from .backend import InvalidRequest

__all__ = [
    "CANCELLED_ERROR_CLASS",
    "OpStatus",
    "Operation",
    "OperationLog",
    "SubmitRejected",
    "body_fingerprint",
    "operation_id_for_key",
]

logger = logging.getLogger("loops_async.server")

_SANE_KEY = re.compile(r"(?!\.+$)[A-Za-z0-9._:~-]{1,128}")
MAX_SEQ_ID = 2**63 - 1
"""The largest ``seq_id`` (an int64)."""

DEFAULT_MAX_SEQ_AHEAD = 1_000_000
"""How far beyond ``next_seq`` a ``seq_id`` may be, unless told otherwise."""
DEFAULT_MAX_QUEUED = 1000
"""How many operations a log holds queued (accepted, not started), unless told otherwise."""
DEFAULT_MAX_RESULTS = 10_000
"""How many finished operations a log keeps, unless told otherwise."""
DEFAULT_MAX_RESULT_BYTES = 256 * 1024 * 1024
"""How many bytes of finished operations' answers a log keeps, unless told otherwise."""
_MAX_REJECTED = 1000
"""How many passed-over ``seq_id`` values a log remembers."""
_JSON_WHITESPACE = (b" ", b"\n", b"\r", b"\t")
"""The bytes :func:`body_fingerprint` strips (JSON's insignificant whitespace)."""

CANCELLED_ERROR_CLASS = "OperationCancelled"
"""``error_class`` of an operation that was cancelled before it ran."""


class QueueFull(Exception):
    """A run already holds ``max_queued`` operations that have not started: the submit may be
    retried later (a 429 with ``Retry-After``)."""


class SubmitRejected(InvalidRequest):
    """A submit the log refuses (its ``seq_id`` is behind, too far ahead or taken, or its
    ``Idempotency-Key`` was used for another request): a 422."""


class OpStatus(enum.Enum):
    """Where an operation is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


_FINISHED = frozenset({OpStatus.DONE, OpStatus.ERROR, OpStatus.CANCELLED})


@dataclass(eq=False)
class Operation:
    """One submitted operation."""

    id: str
    kind: str
    """The op name (``forward_backward``, ``optim_step``, ...)."""
    seq_id: int
    request: Any
    """The decoded request body."""
    key: str | None
    submitted_at: float
    fingerprint: str | None = None
    """:func:`body_fingerprint` of the request that created it (None: not checked)."""
    status: OpStatus = OpStatus.QUEUED
    body: bytes | None = None
    """The encoded 200 answer, once finished."""
    error: str | None = None
    error_class: str | None = None
    finished_at: float | None = None
    _wake: anyio.Event = field(default_factory=anyio.Event, repr=False)

    @property
    def finished(self) -> bool:
        """Whether the operation is done, failed or cancelled (its answer is final)."""
        return self.status in _FINISHED

    def _finish(self, status: OpStatus, body: bytes, now: float) -> None:
        self.status = status
        self.body = body
        self.finished_at = now
        self.request = None  # results are kept an hour; request bodies need not be
        self._wake.set()


def body_fingerprint(body: bytes) -> str:
    """A stable digest of a request body, to tell a retry (the same request again) from a new
    request reusing an ``Idempotency-Key``.

    Insignificant JSON whitespace does not count (two encoders of the same request agree);
    a body that is not JSON is hashed as it is. Pure and thread-safe: for a large body, call it
    on a worker thread."""
    if not any(space in body for space in _JSON_WHITESPACE):
        # Compact already (what clients send): formatting would only copy it, holding the
        # GIL for ~0.2 s on a 46 MiB body, into an equal second copy.
        canonical = body
    else:
        try:
            canonical = msgspec.json.format(body, indent=-1)
        except (msgspec.MsgspecError, RecursionError, ValueError):
            canonical = bytes(body)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def _shown_key(key: str) -> str:
    return repr(key) if len(key) <= 64 else repr(key[:61] + "...")


def operation_id_for_key(key: str | None) -> str | None:
    """The operation id a key maps to (the key itself when sane), or None to generate one."""
    if key is not None and _SANE_KEY.fullmatch(key) is not None:
        return key
    return None


Execute = Callable[[Operation], Awaitable[Any]]
"""Runs one operation and returns its result (a msgspec-encodable value)."""


class OperationLog:
    """The operations of one run (see the module docstring for the rules).

    Args:
        seq_gap_timeout: seconds to wait for a missing ``seq_id`` before skipping it.
        result_ttl: seconds a finished operation is kept.
        name: used in log messages (the run id).
        max_results: how many finished operations are kept at most (oldest forgotten first).
        max_result_bytes: how many bytes of finished operations' encoded answers are kept at
            most (oldest forgotten first; the newest is always kept).
        max_seq_ahead: how far beyond ``next_seq`` a new ``seq_id`` may be.
    """

    def __init__(
        self,
        *,
        seq_gap_timeout: float,
        result_ttl: float,
        name: str = "",
        max_results: int = DEFAULT_MAX_RESULTS,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        max_seq_ahead: int = DEFAULT_MAX_SEQ_AHEAD,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        for arg, value in (
            ("max_results", max_results),
            ("max_result_bytes", max_result_bytes),
            ("max_seq_ahead", max_seq_ahead),
            ("max_queued", max_queued),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        self.seq_gap_timeout = seq_gap_timeout
        self.result_ttl = result_ttl
        self.name = name
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        self.max_seq_ahead = max_seq_ahead
        self.max_queued = max_queued
        self.evicted = 0
        """How many finished operations were forgotten early, to stay within the caps."""
        self.executions: Counter[str] = Counter()
        """How many times each op kind was executed (run on the backend)."""
        self.history: deque[tuple[int, str, str]] = deque(maxlen=1000)
        """``(seq_id, kind, operation_id)`` of the latest executions, oldest first."""
        self.skipped_seqs: list[int] = []
        """``seq_id`` values the executor gave up waiting for (most recent last, bounded)."""
        self._ops: dict[str, Operation] = {}
        self._by_key: dict[str, Operation] = {}
        self._queued: dict[int, Operation] = {}
        self._kept: OrderedDict[str, Operation] = OrderedDict()
        """The finished operations still known, by id, oldest finish first."""
        self._kept_bytes = 0
        self._rejected: set[int] = set()
        """``seq_id`` values whose submit was rejected and not (yet) resubmitted."""
        self._next_seq = 1
        self._gap_since: float | None = None
        self._changed = anyio.Event()
        self._closed = False
        self.running: Operation | None = None
        """The operation being executed, if any."""

    def __repr__(self) -> str:
        return (
            f"<OperationLog {self.name} next_seq={self._next_seq} queued={sorted(self._queued)} "
            f"ops={len(self._ops)}>"
        )

    # ----------------------------------------------------------------------- inspection

    @property
    def next_seq(self) -> int:
        """The ``seq_id`` the executor runs next."""
        return self._next_seq

    @property
    def queued_seqs(self) -> list[int]:
        """The ``seq_id`` values admitted and waiting to run, in order."""
        return sorted(self._queued)

    @property
    def kept_results(self) -> int:
        """How many finished operations are kept."""
        return len(self._kept)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the encoded answers of the finished operations kept."""
        return self._kept_bytes

    def __iter__(self) -> Iterator[Operation]:
        return iter(list(self._ops.values()))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _expired(self, op: Operation, now: float) -> bool:
        return op.finished_at is not None and now - op.finished_at >= self.result_ttl

    def _forget(self, op: Operation) -> None:
        if self._ops.get(op.id) is op:
            del self._ops[op.id]
        if op.key is not None and self._by_key.get(op.key) is op:
            del self._by_key[op.key]
        if self._kept.get(op.id) is op:
            del self._kept[op.id]
            self._kept_bytes -= len(op.body or b"")

    def _keep(self, op: Operation) -> None:
        """Account for a just-finished operation; forget the oldest finished ones beyond the
        caps (never ``op`` itself, never an unfinished one: only finished ones are here)."""
        if self._ops.get(op.id) is not op or op.id in self._kept:
            return  # already forgotten (or counted)
        self._kept[op.id] = op
        self._kept_bytes += len(op.body or b"")
        while len(self._kept) > 1 and (
            len(self._kept) > self.max_results or self._kept_bytes > self.max_result_bytes
        ):
            oldest = next(iter(self._kept.values()))
            self._forget(oldest)
            self.evicted += 1

    def get(self, op_id: str) -> Operation | None:
        """The operation with this id, or None if unknown or its result expired."""
        op = self._ops.get(op_id)
        if op is not None and self._expired(op, anyio.current_time()):
            self._forget(op)
            return None
        return op

    def find_key(
        self, key: str | None, kind: str | None = None, fingerprint: str | None = None
    ) -> Operation | None:
        """The operation an ``Idempotency-Key`` created, or None (unseen, or forgotten).

        With ``kind`` and ``fingerprint`` (:func:`body_fingerprint` of the submit's body), the
        key must have been used for the same request: another op kind, or another body (when
        both fingerprints are known), raises :class:`SubmitRejected`."""
        if key is None:
            return None
        op = self._by_key.get(key)
        if op is not None and self._expired(op, anyio.current_time()):
            self._forget(op)
            return None
        if op is None:
            return None
        if kind is not None and kind != op.kind:
            raise SubmitRejected(
                f"Idempotency-Key: {_shown_key(key)} was already used for another request "
                f"(a {op.kind} operation, not {kind}); send a new request with a new key"
            )
        if fingerprint is not None and op.fingerprint is not None and fingerprint != op.fingerprint:
            raise SubmitRejected(
                f"Idempotency-Key: {_shown_key(key)} was already used for another request "
                f"(a {op.kind} operation with a different body); a retry must resend the same "
                "body, and a new request needs a new key"
            )
        return op

    def sweep(self) -> int:
        """Forget every operation whose result expired; returns how many."""
        now = anyio.current_time()
        stale = [op for op in self._kept.values() if self._expired(op, now)]
        for op in stale:
            self._forget(op)
        return len(stale)

    # ----------------------------------------------------------------------- submit

    def check_seq(self, kind: str, seq_id: int) -> None:
        """Raise :class:`SubmitRejected` if a new operation with ``seq_id`` cannot be admitted."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 1 <= seq_id <= MAX_SEQ_ID:
            shown = repr(seq_id) if len(repr(seq_id)) <= 40 else "(too large)"
            raise SubmitRejected(f"seq_id: must be an integer in 1..2**63-1, got {shown}")
        if kind == "init_trainer_server" and seq_id == 1 and self._restarts_sequence():
            return
        if seq_id < self._next_seq:
            raise SubmitRejected(
                f"seq_id: {seq_id} is behind this run's sequence: seq_ids up to "
                f"{self._next_seq - 1} were already executed or skipped (a new sequence starts "
                "with init_trainer_server and seq_id 1)"
            )
        if seq_id - self._next_seq > self.max_seq_ahead:
            raise SubmitRejected(
                f"seq_id: {seq_id} is too far ahead of this run's sequence: the next seq_id to "
                f"run is {self._next_seq}, and at most {self.max_seq_ahead} beyond it are "
                "admitted (seq_ids count up by one from init_trainer_server's 1)"
            )
        if seq_id in self._queued:
            raise SubmitRejected(
                f"seq_id: {seq_id} is already queued for this run under another Idempotency-Key"
            )

    def _restarts_sequence(self) -> bool:
        return self._next_seq > 1 or (self.running is not None)

    def admit(
        self,
        kind: str,
        seq_id: int,
        request: Any,
        key: str | None,
        fingerprint: str | None = None,
    ) -> Operation:
        """Queue a new operation (call :meth:`find_key` first for duplicates, and
        :meth:`check_seq`, which this repeats). ``fingerprint`` (:func:`body_fingerprint` of
        the body) binds ``key`` to this very request; without it only the op kind is bound.
        Returns the queued operation."""
        self.check_seq(kind, seq_id)
        if self._closed:
            raise RuntimeError("the operation log is closed")
        if len(self._queued) >= self.max_queued and seq_id != self._next_seq:
            # The next expected seq is always admitted: it is what lets the queue drain.
            raise QueueFull(
                f"run {self.name} already holds {len(self._queued)} queued operations "
                f"(max_queued_ops); retry when some have run"
            )
        now = anyio.current_time()
        if kind == "init_trainer_server" and seq_id == 1 and self._restarts_sequence():
            self._restart_sequence(now)
        op_id = operation_id_for_key(key)
        if op_id is None or op_id in self._ops:
            op_id = uuid.uuid4().hex
        op = Operation(
            id=op_id,
            kind=kind,
            seq_id=seq_id,
            request=request,
            key=key,
            submitted_at=now,
            fingerprint=fingerprint,
        )
        self._ops[op_id] = op
        if key is not None:
            self._by_key[key] = op
        self._queued[seq_id] = op
        self._rejected.discard(seq_id)
        self._notify()
        return op

    def _restart_sequence(self, now: float) -> None:
        stale = list(self._queued.values())
        self._queued.clear()
        for op in stale:
            self._cancel_op(
                op, "superseded: init_trainer_server with seq_id 1 started a new sequence", now
            )
        if stale:
            logger.info(
                "run %s: new sequence; cancelled queued seq_ids %s",
                self.name,
                [o.seq_id for o in stale],
            )
        self._next_seq = 1
        self._rejected.clear()
        self._gap_since = None

    def pass_over(self, seq_id: int) -> None:
        """A submit for ``seq_id`` was rejected (422). A client that burns the ``seq_id`` sends
        the next one instead: once later operations are queued, the executor passes over this
        one at once rather than after ``seq_gap_timeout``. A corrected resubmission of the same
        ``seq_id`` is still admitted while it has not been passed over."""
        if self._closed or not 0 <= seq_id - self._next_seq <= self.max_seq_ahead:
            return  # behind (nothing to pass over) or never admissible (nothing waits for it)
        self._rejected.add(seq_id)
        if len(self._rejected) > _MAX_REJECTED:
            # Forget the farthest ahead: the nearest are the ones the executor reaches first.
            self._rejected.discard(max(self._rejected))
        self._notify()

    # ----------------------------------------------------------------------- cancel

    def _complete(self, op: Operation, status: OpStatus, body: bytes, now: float) -> None:
        """Finish ``op`` (waking its long-polls) and keep its result within the caps."""
        op._finish(status, body, now)
        self._keep(op)

    def _cancel_op(self, op: Operation, reason: str, now: float) -> None:
        body = _encode({"status": "error", "error": reason, "error_class": CANCELLED_ERROR_CLASS})
        op.error = reason
        op.error_class = CANCELLED_ERROR_CLASS
        self._complete(op, OpStatus.CANCELLED, body, now)

    def cancel(self, op_id: str) -> Literal["cancelled", "running", "done"] | None:
        """Cancel a queued operation. Returns ``"cancelled"`` (now or before), ``"running"`` or
        ``"done"`` (too late: the operation ran or is running), or None for an unknown id."""
        op = self.get(op_id)
        if op is None:
            return None
        if op.status is OpStatus.CANCELLED:
            return "cancelled"
        if op.status is OpStatus.RUNNING:
            return "running"
        if op.finished:
            return "done"
        # Keep it queued (marked cancelled) so the executor passes over its seq at once
        # instead of waiting for a gap.
        self._cancel_op(op, "cancelled by request", anyio.current_time())
        self._notify()
        return "cancelled"

    # ----------------------------------------------------------------------- retrieve

    async def wait(self, op: Operation, hold: float) -> bool:
        """Wait up to ``hold`` seconds for ``op`` to finish (or the log to close); returns
        whether it finished. Costs no thread."""
        if not op.finished and not self._closed:
            with anyio.move_on_after(hold):
                await op._wake.wait()
        return op.finished

    def close(self, reason: str | None = None) -> None:
        """Shut down: wake every waiting long-poll (they answer 503); refuse new submits.

        With a ``reason`` (the executor died), every unfinished operation fails with it
        instead, so its long-polls get a final answer rather than 408 forever."""
        self._closed = True
        for op in list(self._ops.values()):  # failing one may forget an older one
            if reason is not None and not op.finished:
                self._fail(op, reason, "ExecutorError")
            op._wake.set()
        self._notify()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ----------------------------------------------------------------------- executor

    async def run(self, execute: Execute) -> None:
        """The executor: run queued operations in ``seq_id`` order, forever (until cancelled
        or closed). ``execute`` runs one operation and returns its result."""
        while not self._closed:
            op = self._queued.pop(self._next_seq, None)
            if op is not None:
                self._next_seq += 1
                self._gap_since = None
                if op.status is OpStatus.QUEUED:
                    await self._execute(op, execute)
                continue
            changed = self._changed
            if not self._queued:
                self._gap_since = None
                await changed.wait()
                continue
            if self._next_seq in self._rejected:
                self._rejected.discard(self._next_seq)  # burned by its client: no wait
                self.skipped_seqs.append(self._next_seq)
                del self.skipped_seqs[:-1000]
                self._next_seq += 1
                continue
            now = anyio.current_time()
            if self._gap_since is None:
                self._gap_since = now
            remaining = self._gap_since + self.seq_gap_timeout - now
            if remaining > 0:
                with anyio.move_on_after(remaining):
                    await changed.wait()
                continue
            lowest = min(self._queued)
            first, last = self._next_seq, lowest - 1  # the gap may be huge: never list it
            logger.warning(
                "run %s: seq_id %s never arrived within %.1f s; skipping to %d",
                self.name,
                first if first == last else f"{first}..{last}",
                self.seq_gap_timeout,
                lowest,
            )
            self.skipped_seqs.extend(range(max(first, last - 999), lowest))
            del self.skipped_seqs[:-1000]
            self._next_seq = lowest
            self._rejected = {seq for seq in self._rejected if seq >= lowest}
            self._gap_since = None

    async def _execute(self, op: Operation, execute: Execute) -> None:
        op.status = OpStatus.RUNNING
        self.running = op
        self.executions[op.kind] += 1
        self.history.append((op.seq_id, op.kind, op.id))
        try:
            result = await execute(op)
            body = _encode({"status": "done", "result": result})
        except InvalidRequest as exc:
            self._fail(op, str(exc) or type(exc).__name__, "ValidationError")
        except Exception as exc:
            logger.exception("run %s: operation %s (%s) failed", self.name, op.id, op.kind)
            self._fail(op, str(exc) or type(exc).__name__, type(exc).__name__)
        else:
            self._complete(op, OpStatus.DONE, body, anyio.current_time())
        finally:
            self.running = None

    def _fail(self, op: Operation, message: str, error_class: str) -> None:
        op.error = message
        op.error_class = error_class
        body = _encode({"status": "error", "error": message, "error_class": error_class})
        self._complete(op, OpStatus.ERROR, body, anyio.current_time())
