"""Hardening of the operations store: idempotency keys bound to their request, bounded
retention of finished results, and ``seq_id`` values that cannot wedge a run.

Unit tests drive :class:`~loops_async.server.operations.OperationLog` directly; HTTP tests drive
a null-backend :class:`~loops_async.server.LocalServer`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from loops_async.server import LocalServer, ServerSettings
from loops_async.server.operations import (
    MAX_SEQ_ID,
    OperationLog,
    OpStatus,
    SubmitRejected,
    body_fingerprint,
)

from ._http import MODEL, Trainer, assert_422, datum

# --------------------------------------------------------------------------- helpers


async def _run_log(
    log: OperationLog, execute: Callable[[Any], Awaitable[Any]], body: Callable[[], Awaitable[None]]
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run, execute)
        await body()
        tg.cancel_scope.cancel()


async def _payload(op: Any) -> Any:
    """An executor whose result is ``op.request`` (a string of the size a test wants)."""
    return op.request


def _wait(trainer: Trainer, op_id: str, seconds: float = 5.0) -> httpx.Response:
    """Poll until the operation answers something other than 408 (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = trainer.poll(op_id)
        if r.status_code != 408:
            return r
    raise AssertionError(f"operation {op_id} never finished (408 for {seconds} s)")


def _checkpoints(client: httpx.Client, run_id: str) -> list[Any]:
    r = client.get("/v1/loops/checkpoints", params={"run_id": run_id})
    assert r.status_code == 200, r.text
    return list(r.json()["checkpoints"])


# --------------------------------------------------------------------------- fingerprints


def test_body_fingerprint_ignores_whitespace_only() -> None:
    body = {"seq_id": 3, "run_id": "r", "model": MODEL, "name": "ü", "data": [1, 2.5, None]}
    compact = json.dumps(body, separators=(",", ":")).encode()
    spaced = json.dumps(body, indent=2).encode()
    assert body_fingerprint(compact) == body_fingerprint(spaced)
    other = json.dumps({**body, "seq_id": 4}).encode()
    assert body_fingerprint(other) != body_fingerprint(compact)
    # Not JSON (or too deep to reformat): hashed as it is, never an exception.
    for raw in (b"", b"{", b"\xff\xfe", b"[" * 100_000, b"nul"):
        assert body_fingerprint(raw) == body_fingerprint(bytes(raw))
    assert body_fingerprint(b"{") != body_fingerprint(b"[")


# --------------------------------------------------------------------------- keys (unit)


@pytest.mark.anyio
async def test_key_is_bound_to_kind_and_body(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0)
    op = log.admit("forward", 1, None, "k", fingerprint="f1")
    assert log.find_key("k") is op  # no request to compare: the old lookup
    assert log.find_key("k", "forward", "f1") is op
    assert log.find_key("k", "forward") is op  # body unknown: only the kind is checked
    with pytest.raises(SubmitRejected, match=r"Idempotency-Key: 'k' was already used .*forward"):
        log.find_key("k", "save_state", "f1")
    with pytest.raises(SubmitRejected, match=r"Idempotency-Key.*different body"):
        log.find_key("k", "forward", "f2")
    assert log.find_key("other", "save_state", "f1") is None
    # An operation admitted without a fingerprint binds its kind only.
    loose = log.admit("optim_step", 2, None, "loose")
    assert log.find_key("loose", "optim_step", "anything") is loose
    with pytest.raises(SubmitRejected, match="Idempotency-Key"):
        log.find_key("loose", "forward", "anything")
    # A very long key is not echoed in full.
    long_key = "x" * 5000
    log.admit("forward", 3, None, long_key, fingerprint="f")
    with pytest.raises(SubmitRejected) as info:
        log.find_key(long_key, "optim_step", "f")
    assert len(str(info.value)) < 400


# --------------------------------------------------------------------------- retention (unit)


@pytest.mark.anyio
async def test_byte_cap_forgets_oldest_finished_first(anyio_backend: str) -> None:
    # Each answer is {"status":"done","result":"<n x's>"}: 29 bytes of envelope.
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0, max_result_bytes=1000)

    async def body() -> None:
        ops = [log.admit("forward", i, "x" * 269, f"k{i}") for i in range(1, 7)]  # 300 B each
        for op in ops:
            assert await log.wait(op, 2.0)
        assert log.kept_bytes <= 1000
        assert log.kept_results == 3
        assert log.evicted == 3
        for op in ops[:3]:
            assert log.get(op.id) is None
            assert log.find_key(op.key) is None
        for op in ops[3:]:
            assert log.get(op.id) is op
            assert log.find_key(op.key) is op
        assert log.kept_bytes == sum(len(op.body or b"") for op in ops[3:])
        # One answer larger than the whole cap is still kept (alone): its client can fetch it.
        big = log.admit("forward", 7, "x" * 5000, "big")
        assert await log.wait(big, 2.0)
        assert log.get(big.id) is big
        assert log.kept_results == 1
        assert [o.id for o in log] == ["big"]

    await _run_log(log, _payload, body)


@pytest.mark.anyio
async def test_unfinished_operations_are_never_forgotten(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=30.0, result_ttl=60.0, max_result_bytes=100, max_results=1)

    async def body() -> None:
        queued = [log.admit("forward", s, "q", f"q{s}") for s in (20, 21, 22)]  # behind a gap
        done = [log.admit("forward", s, "x" * 200, f"d{s}") for s in range(1, 6)]
        for op in done:
            assert await log.wait(op, 2.0)
        assert log.kept_results == 1
        assert log.get("d5") is done[-1]
        assert all(log.get(op.id) is op and op.status is OpStatus.QUEUED for op in queued)
        assert log.queued_seqs == [20, 21, 22]
        # Cancelling one finishes it (it may now be forgotten); the others are still queued.
        assert log.cancel("q21") == "cancelled"
        assert log.get("q20") is queued[0]
        assert log.get("q22") is queued[2]
        # A crash of the executor fails every unfinished operation, even over the caps, and
        # each of their long-polls gets its answer.
        log.close("boom")
        for op in queued:
            assert op.finished
            assert await log.wait(op, 0.1)
        assert json.loads(queued[0].body or b"")["error_class"] == "ExecutorError"
        assert log.kept_results == 1

    await _run_log(log, _payload, body)


@pytest.mark.anyio
async def test_count_cap(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0, max_results=3)

    async def body() -> None:
        ops = [log.admit("optim_step", i, i, f"k{i}") for i in range(1, 6)]
        for op in ops:
            assert await log.wait(op, 2.0)
        assert [op.id for op in log] == ["k3", "k4", "k5"]
        assert log.kept_results == 3
        assert log.evicted == 2

    await _run_log(log, _payload, body)


@pytest.mark.anyio
async def test_ttl_sweep_releases_kept_bytes(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=0.1)

    async def body() -> None:
        ops = [log.admit("forward", i, "x" * 50, f"k{i}") for i in (1, 2)]
        for op in ops:
            assert await log.wait(op, 2.0)
        assert log.kept_bytes > 0
        await anyio.sleep(0.15)
        assert log.sweep() == 2
        assert log.kept_bytes == 0
        assert log.kept_results == 0

    await _run_log(log, _payload, body)


@pytest.mark.parametrize("arg", ["max_results", "max_result_bytes", "max_seq_ahead"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_log_caps_are_validated(arg: str, value: Any) -> None:
    with pytest.raises(ValueError, match=arg):
        OperationLog(seq_gap_timeout=1.0, result_ttl=1.0, **{arg: value})


# --------------------------------------------------------------------------- seq_id (unit)


@pytest.mark.anyio
async def test_seq_window(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0, max_seq_ahead=100)
    log.check_seq("forward", 1 + 100)
    for far in (1 + 101, 2**62, MAX_SEQ_ID):
        with pytest.raises(SubmitRejected, match=r"seq_id: \d+ is too far ahead .* next seq_id"):
            log.check_seq("forward", far)
        with pytest.raises(SubmitRejected, match="seq_id"):
            log.admit("forward", far, None, None)
    assert log.queued_seqs == []

    async def body() -> None:
        ops = [log.admit("optim_step", seq, None, None) for seq in range(1, 51)]
        assert await log.wait(ops[-1], 2.0)
        assert log.next_seq == 51
        log.check_seq("forward", 51 + 100)  # the window moves with the sequence
        with pytest.raises(SubmitRejected, match="too far ahead"):
            log.check_seq("forward", 51 + 101)
        init = log.admit("init_trainer_server", 1, None, None)  # a new sequence: from 1
        assert await log.wait(init, 2.0)
        assert log.next_seq == 2
        with pytest.raises(SubmitRejected, match="too far ahead"):
            log.check_seq("forward", 2 + 101)

    await _run_log(log, _payload, body)


@pytest.mark.anyio
async def test_passed_over_seqs_keep_the_nearest(anyio_backend: str) -> None:
    # Many rejected submits far ahead (or beyond the window) must not push out the one the
    # executor needs next: it is passed over at once, not after seq_gap_timeout.
    log = OperationLog(seq_gap_timeout=30.0, result_ttl=60.0, max_seq_ahead=5000)
    for seq in range(2000, 3200):
        log.pass_over(seq)
    log.pass_over(2**62)  # beyond the window: ignored
    log.pass_over(MAX_SEQ_ID)
    log.pass_over(1)

    async def body() -> None:
        op = log.admit("forward", 2, "ok", None)
        with anyio.fail_after(2):
            assert await log.wait(op, 2.0)
        assert op.status is OpStatus.DONE
        assert log.skipped_seqs == [1]

    await _run_log(log, _payload, body)


# --------------------------------------------------------------------------- settings


def test_new_settings() -> None:
    s = ServerSettings()
    assert s.max_seq_ahead == 1_000_000
    assert s.max_results_per_run == 10_000
    assert s.max_result_bytes_per_run == 256 * 1024 * 1024
    env = {
        "LOOPS_ASYNC_MAX_SEQ_AHEAD": "7",
        "LOOPS_ASYNC_MAX_RESULTS_PER_RUN": "8",
        "LOOPS_ASYNC_MAX_RESULT_BYTES_PER_RUN": "9",
    }
    s = ServerSettings.from_env(env)
    assert (s.max_seq_ahead, s.max_results_per_run, s.max_result_bytes_per_run) == (7, 8, 9)
    for name in ("max_seq_ahead", "max_results_per_run", "max_result_bytes_per_run"):
        for bad in (0, -3, True, 2.5):
            overrides: dict[str, Any] = {name: bad}
            with pytest.raises(ValueError, match=name):
                ServerSettings(**overrides)
        with pytest.raises(ValueError, match=name.upper()):
            ServerSettings.from_env({f"LOOPS_ASYNC_{name.upper()}": "lots"})


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(backend="null", poll_hold=1.0, seq_gap_timeout=0.5) as srv:
        yield srv


def test_key_reused_for_another_kind_is_422_and_runs_nothing(
    trainer: Trainer, server: LocalServer, client: httpx.Client
) -> None:
    run = server.state.runs[trainer.id]
    key = uuid.uuid4().hex
    fwd = trainer.submit("forward", key=key, data=[datum([1, 2, 3])])
    assert _wait(trainer, fwd).json()["status"] == "done"
    before = dict(run.executions)
    save = trainer.body(name="saved")
    r = trainer.post("save_state", save, key=key)
    assert_422(r, "Idempotency-Key", "already used", "forward")
    time.sleep(0.1)
    assert dict(run.executions) == before
    assert _checkpoints(client, trainer.id) == []
    # The forward's result is untouched, and the save goes through under a key of its own.
    assert trainer.poll(fwd).json()["status"] == "done"
    r = trainer.post("save_state", save, key=uuid.uuid4().hex)
    assert r.status_code == 202, r.text
    env = _wait(trainer, r.json()["operation_id"]).json()
    assert env["status"] == "done", env
    assert env["result"]["path"].endswith("/weights/saved")
    assert run.executions["save_state"] == before.get("save_state", 0) + 1


def test_same_key_same_body_is_the_same_operation(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    before = run.executions["forward_backward"]
    body = trainer.body(data=[datum([1, 2, 3])], loss_fn="cross_entropy")
    key = uuid.uuid4().hex
    first = trainer.post("forward_backward", body, key=key)
    assert first.status_code == 202, first.text
    op_id = first.json()["operation_id"]
    # A retry from another encoder (other whitespace) is the same request.
    again = trainer.client.post(
        trainer.url("forward_backward"),
        content=json.dumps(body, indent=1),
        headers={
            "X-Run-Id": trainer.id,
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        },
    )
    assert again.status_code == 202, again.text
    assert again.json()["operation_id"] == op_id
    assert _wait(trainer, op_id).json()["status"] == "done"
    late = trainer.post("forward_backward", body, key=key)  # its seq_id is behind now
    assert late.status_code == 202, late.text
    assert late.json()["operation_id"] == op_id
    assert run.executions["forward_backward"] == before + 1


def test_same_key_other_body_is_422(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    key = uuid.uuid4().hex
    body = trainer.body(data=[datum([1, 2, 3])])
    op_id = trainer.submit("forward", key=key, seq_id=body["seq_id"], data=body["data"])
    assert _wait(trainer, op_id).json()["status"] == "done"
    other = trainer.body(data=[datum([4, 5, 6])])  # the next seq_id, another request
    assert_422(trainer.post("forward", other, key=key), "Idempotency-Key", "different body")
    assert trainer.poll(op_id).json()["status"] == "done"
    resent = trainer.post("forward", other, key=uuid.uuid4().hex)  # a new key: admitted
    assert resent.status_code == 202, resent.text
    assert _wait(trainer, resent.json()["operation_id"]).json()["status"] == "done"
    # While an operation is still queued (behind a gap), a different body under its key is
    # refused just the same (not "seq_id already queued", not the queued operation's id).
    s = trainer.seq
    queued_key = uuid.uuid4().hex
    queued = trainer.post("optim_step", trainer.body(s + 2, adam_params={}), key=queued_key)
    assert queued.status_code == 202, queued.text
    changed = trainer.body(s + 2, adam_params={"learning_rate": 0.5})
    assert_422(trainer.post("optim_step", changed, key=queued_key), "Idempotency-Key")
    trainer.seq = s + 2  # s + 1 never comes: skipped after seq_gap_timeout
    assert _wait(trainer, queued.json()["operation_id"]).json()["status"] == "done"
    assert run.executions["forward"] == 2
    assert run.executions["optim_step"] == 1
    assert run.policy_version == 1
    assert trainer.run_op("forward", data=[datum([1, 2])])["loss"] == 0.0


def test_huge_seq_id_is_422_and_the_run_goes_on(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    nxt = run.ops.next_seq
    for far in (MAX_SEQ_ID, 2**62, nxt + 1_000_001):
        r = trainer.post("optim_step", trainer.body(far, adam_params={}))
        assert_422(r, "seq_id", "too far ahead")
    assert run.ops.next_seq == nxt
    assert run.ops.queued_seqs == []
    # The next normal seq runs (no seq was left to wait out or skip).
    trainer.run_op("optim_step", adam_params={})
    assert run.ops.skipped_seqs == []
    assert run.policy_version == 1


@pytest.fixture
def capped() -> Iterator[LocalServer]:
    """A null server keeping at most 5 kB of results per run, with a long gap timeout."""
    with LocalServer(
        backend="null",
        poll_hold=1.0,
        seq_gap_timeout=30.0,
        max_result_bytes_per_run=5000,
    ) as srv:
        yield srv


def test_byte_cap_over_http(capped: LocalServer) -> None:
    with httpx.Client(base_url=capped.url, timeout=30.0) as client:
        trainer = Trainer(client)
        trainer.init()
        run = capped.state.runs[trainer.id]
        s = trainer.seq
        # Queued behind a gap that is never filled during the test: must survive everything.
        pending = trainer.submit("optim_step", seq_id=s + 20, adam_params={})
        ids = [
            trainer.submit("forward", seq_id=s + i, data=[datum(list(range(1, 201)))])
            for i in range(1, 11)
        ]
        assert _wait(trainer, ids[-1]).json()["status"] == "done"
        assert trainer.poll(ids[0]).status_code == 404
        assert "unknown operation id" in trainer.poll(ids[0]).json()["detail"]
        assert trainer.poll(ids[-1]).status_code == 200
        assert 0 < run.ops.kept_bytes <= 5000
        assert run.ops.evicted >= 5
        r = trainer.poll(pending)
        assert r.status_code == 408, r.text  # still queued, still known
        # Cancelling it works (it was never forgotten) and the run goes on after it.
        assert client.post(trainer.url(f"operations/{pending}/cancel")).status_code == 200
        trainer.seq = s + 10
        assert trainer.run_op("optim_step", adam_params={})["metrics"]["step"] == 1.0


def test_count_cap_over_http() -> None:
    with (
        LocalServer(backend="null", poll_hold=1.0, max_results_per_run=3) as srv,
        httpx.Client(base_url=srv.url, timeout=30.0) as client,
    ):
        trainer = Trainer(client)
        trainer.init()
        ids = [trainer.submit("optim_step", adam_params={}) for _ in range(5)]
        assert _wait(trainer, ids[-1]).json()["status"] == "done"
        assert [trainer.poll(i).status_code for i in ids] == [404, 404, 200, 200, 200]
        assert srv.state.runs[trainer.id].ops.kept_results == 3


def test_a_body_for_another_run_does_not_use_up_a_seq_id(
    trainer: Trainer, server: LocalServer
) -> None:
    """A well-formed op sent to the wrong run (or model) is rejected without this run passing
    over its seq_id: the op the client really meant for that seq still runs, in order, even
    when a later seq arrives first."""
    run = server.state.runs[trainer.id]
    seq = run.ops.next_seq
    wrong_run = {**trainer.body(seq, adam_params={}), "run_id": "run-elsewhere"}
    assert_422(trainer.post("optim_step", wrong_run), "run_id")
    wrong_model = {**trainer.body(seq, adam_params={}), "model": "other/model"}
    assert_422(trainer.post("optim_step", wrong_model), "model")
    later = trainer.submit("save_state", seq_id=seq + 1, name="after-step")
    first = trainer.submit("optim_step", seq_id=seq, adam_params={})
    assert trainer.result(first)["result"]["metrics"]["step"] == 1
    assert trainer.result(later)["status"] == "done"
    assert run.ops.skipped_seqs == []


def test_a_full_queue_is_429_but_the_next_seq_always_gets_in() -> None:
    """At most ``max_queued_ops`` ops wait per run; more get 429 + Retry-After, except the
    seq the run waits for, which drains the queue."""
    server = LocalServer(backend="null", poll_hold=0.5, seq_gap_timeout=30.0, max_queued_ops=3)
    with server as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        trainer = Trainer(client)
        trainer.init()
        nxt = srv.state.runs[trainer.id].ops.next_seq
        ids = [trainer.submit("optim_step", seq_id=nxt + k, adam_params={}) for k in (1, 2, 3)]
        full = trainer.post("optim_step", trainer.body(nxt + 4, adam_params={}))
        assert full.status_code == 429, full.text
        assert full.json()["error_class"] == "LimitExceededError"
        assert full.headers["retry-after"] == "1"
        first = trainer.submit("optim_step", seq_id=nxt, adam_params={})
        steps = [trainer.result(i)["result"]["metrics"]["step"] for i in [first, *ids]]
        assert steps == [1, 2, 3, 4]
        trainer.submit("optim_step", seq_id=nxt + 4, adam_params={})  # room again
