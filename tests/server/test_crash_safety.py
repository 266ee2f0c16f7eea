"""Crash safety of checkpoints.

- A real server process is SIGKILLed while saves that reuse names are in flight; after a restart
  on the same data directory every acknowledged checkpoint loads, with a step at least as new as
  the last acknowledged save of its name.
- The start-up sweep never deletes a checkpoint it cannot read: it moves it to quarantine.
- Lookups racing an overwrite, an expiry or a deletion find the old or the new version, or
  "not found" (404), never an error (500).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loops_async import AdamParams, Datum, ModelInput, ServiceClient, TensorData
from loops_async.errors import LoopsError
from loops_async.server import LocalServer
from loops_async.server import storage as storage_mod
from loops_async.server.backend import NULL_STATE_FILE
from loops_async.server.storage import (
    CHECKPOINT_METADATA,
    QUARANTINE,
    CheckpointRecord,
    CheckpointRef,
    Storage,
)

from ._http import MODEL, Trainer

NAMES = ("ckpt-a", "ckpt-b", "ckpt-c")
KILLS = 4
SEED = 20260427

_TOKENS = [5, 6, 7, 8]
DATUM = Datum(
    model_input=ModelInput.from_ints(_TOKENS),
    loss_fn_inputs={
        "target_tokens": TensorData(data=[*_TOKENS[1:], 0], dtype="int64", shape=[len(_TOKENS)])
    },
)


# --------------------------------------------------------------------------- a real process


def _free_port(used: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in used:  # never reuse a port: old clients may still be retrying on it
            used.add(port)
            return port


class _ServerProcess:
    """``python -m loops_async serve --backend null`` on ``data_dir``, its log in a file."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPS_ASYNC_")}
        env["LOOPS_ASYNC_LOG_LEVEL"] = "warning"
        cmd = [
            sys.executable, "-m", "loops_async", "serve", "--backend", "null",
            "--port", str(port), "--data-dir", str(data_dir),
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited at start:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


class _Driver(threading.Thread):
    """Pipelined forward_backward + optim_step + save_state (names cycling over NAMES) with up
    to three saves in flight; every acknowledged save is recorded as ``path -> step``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.acked: dict[str, int] = {}
        self.submitted = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.acked)

    def run(self) -> None:
        try:
            # A short ready_timeout: once the server is killed, calls give up within seconds.
            with ServiceClient(base_url=self.url, ready_timeout=3.0, timeout=10.0) as service:
                training = service.create_lora_training_client(MODEL, 4)
                self._save_forever(training)
        except LoopsError:
            pass  # the server was killed under us: expected
        except BaseException as exc:
            self.error = exc

    def _save_forever(self, training: Any) -> None:
        pending: deque[tuple[int, Any]] = deque()
        step = 0
        while True:
            training.forward_backward(data=[DATUM], loss_fn="cross_entropy")
            training.optim_step(AdamParams(learning_rate=1e-3))
            step += 1
            self.submitted = step
            pending.append((step, training.save_state(NAMES[(step - 1) % len(NAMES)])))
            if len(pending) >= 3:
                saved_step, future = pending.popleft()
                path = future.result(timeout=30).path
                with self._lock:
                    self.acked[path] = max(saved_step, self.acked.get(path, 0))


def _check_loadable(url: str, acked: dict[str, int]) -> None:
    """Every acknowledged checkpoint loads (with its optimizer state) and holds a step at least
    as new as its last acknowledged save, saved under that very name."""
    with ServiceClient(base_url=url, ready_timeout=30.0) as service:
        training = service.create_lora_training_client(MODEL, 4)
        for path, step in sorted(acked.items()):
            loaded = training.load_state_with_optimizer(path).result(timeout=30)
            assert loaded.step is not None
            assert loaded.step >= step, (path, loaded.step, step)
            name = path.rsplit("/", 1)[1]
            assert (loaded.step - 1) % len(NAMES) == NAMES.index(name), (path, loaded.step)
        newest = max(acked, key=acked.__getitem__)
        resumed = service.create_training_client_from_state_with_optimizer(newest)
        assert resumed.optim_step(AdamParams()).result(timeout=30).metrics["step"] > acked[newest]


def _check_tidy(data_dir: Path) -> None:
    """After a restart's sweep: no partial writes, no unreferenced versions, nothing quarantined
    (a crash must never leave an unreadable checkpoint behind)."""
    assert not (data_dir / QUARANTINE).exists()
    assert not list((data_dir / ".trash").glob("*"))
    for run_dir in (data_dir / "runs").iterdir():
        assert not list((run_dir / ".tmp").glob("*")), run_dir
        targets = {
            os.readlink(link).rsplit("/", 1)[1]
            for kind in ("weights", "sampler_weights")
            for link in (run_dir / kind).glob("*")
        }
        assert set(os.listdir(run_dir / ".store")) == targets, run_dir


def test_sigkill_during_saves_keeps_every_acknowledged_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    used: set[int] = set()
    acked: dict[str, int] = {}
    drivers: list[_Driver] = []
    server = _ServerProcess(data_dir, _free_port(used), log)
    started = time.monotonic()
    try:
        for kill in range(KILLS):
            if kill >= 2 and time.monotonic() - started > 30:
                break  # a slow machine: two rounds are enough, stay well under a minute
            driver = _Driver(server.url)
            drivers.append(driver)
            driver.start()
            deadline = time.monotonic() + 20
            while len(driver.snapshot()) < len(NAMES) and driver.is_alive():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert driver.error is None, driver.error
            assert len(driver.snapshot()) == len(NAMES), "saves were not acknowledged"
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill()  # saves are in flight: two or three are always pending
            at_kill = driver.snapshot()
            assert max(at_kill.values()) < driver.submitted
            acked.update(at_kill)
            server = _ServerProcess(data_dir, _free_port(used), log)
            _check_tidy(data_dir)
            _check_loadable(server.url, acked)
        for driver in drivers:
            driver.join(15)
            assert not driver.is_alive()
            assert driver.error is None, driver.error
    finally:
        server.stop()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "unreadable metadata" not in text
    assert len(acked) >= 2 * len(NAMES)


def test_null_checkpoints_hold_the_step(tmp_path: Path) -> None:
    """What the kill test relies on: a null-backend ``save_state`` records the step."""
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()
        for _ in range(3):
            t.run_op("optim_step", adam_params={})
        t.run_op("save_state", name="s")
        found = srv.state.storage.lookup(CheckpointRef(run_id=t.id, kind="weights", name="s"))
    assert found is not None
    assert found[1].step == 3
    assert '"step": 3' in (found[0] / NULL_STATE_FILE).read_text()


# --------------------------------------------------------------------------- sweep and quarantine


def _write(
    storage: Storage, ref: CheckpointRef, payload: str = "w", step: int = 1, **kw: Any
) -> CheckpointRecord:
    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_text(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "optimizer.pt").write_text(payload * 2)

    return storage.write_checkpoint(
        ref, write, base_model="m", lora_rank=4, step=step, with_optimizer=True, **kw
    )


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Patch the storage module's clock; the returned list's single item is the offset."""
    offset = [0.0]
    real = time.time
    monkeypatch.setattr(storage_mod, "time", types.SimpleNamespace(time=lambda: real() + offset[0]))
    return offset


def test_sweep_quarantines_unreadable_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path)
    run = tmp_path / "runs" / "run-a"
    truncated = CheckpointRef(run_id="run-a", kind="weights", name="truncated")
    missing = CheckpointRef(run_id="run-a", kind="sampler_weights", name="missing")
    garbage = CheckpointRef(run_id="run-a", kind="weights", name="garbage")
    good = CheckpointRef(run_id="run-a", kind="weights", name="good")
    expiring = CheckpointRef(run_id="run-a", kind="weights", name="expiring")
    for ref in (truncated, missing, garbage, good):
        _write(storage, ref, payload=ref.name)
    _write(storage, expiring, ttl_seconds=60)
    meta = storage.link_path(truncated) / CHECKPOINT_METADATA
    meta.write_bytes(meta.read_bytes()[:20])
    (storage.link_path(missing) / CHECKPOINT_METADATA).unlink()
    (storage.link_path(garbage) / CHECKPOINT_METADATA).write_text('{"id": 5}')
    # Leftovers of a crash: a partial write, a version no name points to, a deletion under way.
    (run / ".tmp" / "good.0123456789ab").mkdir()
    (run / ".tmp" / "good.0123456789ab" / "adapter_model.safetensors").write_text("half")
    (run / ".store" / "good.ba9876543210").mkdir()
    (tmp_path / ".trash" / "run-a.x.1").mkdir(parents=True)
    _fake_clock(monkeypatch)[0] = 61.0

    with caplog.at_level(logging.WARNING, logger="loops_async.server"):
        removed = storage.sweep()
    assert removed == 4  # the .tmp entry, the unreferenced version, the trash, the expired one

    for ref in (truncated, missing, garbage):
        assert storage.lookup(ref) is None
        assert not os.path.lexists(storage.link_path(ref))
        (moved,) = (tmp_path / QUARANTINE / "run-a" / ref.kind).glob(f"{ref.name}-*")
        assert (moved / "adapter_model.safetensors").read_text() == ref.name
        assert (moved / "sub" / "optimizer.pt").read_text() == ref.name * 2
        (warning,) = [r for r in caplog.records if ref.uri in r.getMessage()]
        assert warning.levelno == logging.WARNING
        assert "unreadable metadata" in warning.getMessage()
        assert str(moved) in warning.getMessage()
    assert "is not valid" in caplog.text
    assert "cannot open checkpoint.json" in caplog.text
    found = storage.lookup(good)
    assert found is not None
    assert (found[0] / "adapter_model.safetensors").read_text() == "good"
    assert storage.lookup(expiring) is None
    assert not list((run / ".tmp").iterdir())
    assert not list((tmp_path / ".trash").iterdir())
    assert sorted(os.listdir(run / ".store")) == [found[0].name]
    # Idempotent; quarantine is never touched.
    caplog.clear()
    assert storage.sweep() == 0
    assert not caplog.records
    assert len(list((tmp_path / QUARANTINE / "run-a").rglob("adapter_model.safetensors"))) == 3


def test_restart_quarantines_a_truncated_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()
        t.run_op("optim_step", adam_params={})
        broken = t.run_op("save_state", name="broken")["path"]
        kept = t.run_op("save_state", name="kept")["path"]
    meta = tmp_path / "runs" / t.id / "weights" / "broken" / CHECKPOINT_METADATA
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with (
        caplog.at_level(logging.WARNING, logger="loops_async.server"),
        LocalServer(backend="null", data_dir=tmp_path) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        listed = c.get("/v1/loops/checkpoints", params={"run_id": t.id}).json()["checkpoints"]
        assert [x["checkpoint_id"] for x in listed] == ["kept"]
        other = Trainer(c)
        other.init()
        assert other.run_op("load_state_with_optimizer", path=kept)["step"] == 1
        r = other.post("load_state", other.body(path=broken))
        assert r.status_code == 422, r.text
    (moved,) = (tmp_path / QUARANTINE / t.id / "weights").glob("broken-*")
    assert {p.name for p in moved.iterdir()} >= {"adapter_model.safetensors", NULL_STATE_FILE}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and broken in r.message]
    assert len(warnings) == 1
    assert "quarantine" in warnings[0].message


def test_sweep_deletes_no_version_when_names_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="keep")
    _write(storage, ref)
    # A link with a name this server would not give still protects the version it points to.
    odd = tmp_path / "runs" / "run-a" / "weights" / "odd name"
    _write(storage, CheckpointRef(run_id="run-a", kind="weights", name="other"))
    os.rename(storage.link_path(ref).parent / "other", odd)
    real_listdir = os.listdir

    def failing_listdir(path: Any) -> list[str]:
        if Path(path).name == "weights":
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", failing_listdir)
    with caplog.at_level(logging.WARNING, logger="loops_async.server"):
        storage.sweep()
    assert "skipped run run-a" in caplog.text
    monkeypatch.setattr(os, "listdir", real_listdir)
    assert storage.lookup(ref) is not None
    assert len(os.listdir(tmp_path / "runs" / "run-a" / ".store")) == 2
    assert storage.sweep() == 0  # the version behind "odd name" is kept too
    assert (odd / CHECKPOINT_METADATA).is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_save_syncs_everything_before_the_swap_and_deletes_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="x")
    _write(storage, ref, payload="old")
    old = storage.link_path(ref).resolve()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    def rmtree(path: Any, *args: Any, **kw: Any) -> None:
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    _write(storage, ref, payload="new")
    new = storage.link_path(ref).resolve()
    swap = events.index(("replace", str(storage.link_path(ref))))
    synced_before = {path for kind, path in events[:swap] if kind == "fsync"}
    for name in ("adapter_model.safetensors", "sub/optimizer.pt", CHECKPOINT_METADATA):
        tmp_file = tmp_path / "runs" / "run-a" / ".tmp" / new.name / name
        assert str(tmp_file) in synced_before, name
    assert str(tmp_path / "runs" / "run-a" / ".tmp" / new.name / "sub") in synced_before
    assert str(tmp_path / "runs" / "run-a" / ".store") in synced_before  # the rename into it
    after = events[swap + 1 :]
    synced_kind_dir = after.index(("fsync", str(storage.link_path(ref).parent)))
    (deleted,) = [i for i, (kind, path) in enumerate(after) if kind == "rmtree"]
    assert synced_kind_dir < deleted
    assert old.name in after[deleted][1]
    assert not old.exists()
    assert (new / "adapter_model.safetensors").read_text() == "new"


def test_failed_saves_leave_nothing_and_keep_the_old_version(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="x")
    _write(storage, ref, payload="old")

    def broken(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_text("half")
        raise OSError("disk full")

    for _ in range(3):
        with pytest.raises(OSError, match="disk full"):
            storage.write_checkpoint(
                ref, broken, base_model="m", lora_rank=4, step=9, with_optimizer=True
            )
    found = storage.lookup(ref)
    assert found is not None
    assert (found[0] / "adapter_model.safetensors").read_text() == "old"
    assert not list((tmp_path / "runs" / "run-a" / ".tmp").iterdir())
    assert len(list((tmp_path / "runs" / "run-a" / ".store").iterdir())) == 1


# --------------------------------------------------------------------------- deletion API


def test_delete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    storage = Storage(root)
    a = CheckpointRef(run_id="run-a", kind="weights", name="a")
    b = CheckpointRef(run_id="run-a", kind="sampler_weights", name="a")
    _write(storage, a)
    _write(storage, b)
    assert storage.delete_checkpoint(a) is True
    assert storage.lookup(a) is None
    assert not os.path.lexists(storage.link_path(a))
    assert storage.lookup(b) is not None  # the same name of the other kind is another one
    assert storage.delete_checkpoint(a) is False
    assert storage.delete_checkpoint(CheckpointRef("run-none", "weights", "a")) is False
    assert len(list((root / "runs" / "run-a" / ".store").iterdir())) == 1
    assert not list((root / ".trash").iterdir())
    expired = CheckpointRef(run_id="run-a", kind="weights", name="e")
    _write(storage, expired, ttl_seconds=5)
    _fake_clock(monkeypatch)[0] = 6.0
    assert storage.delete_checkpoint(expired) is False  # already gone for clients; removed
    assert not os.path.lexists(storage.link_path(expired))
    with pytest.raises(storage_mod.InvalidRequest, match="name"):
        storage.delete_checkpoint(CheckpointRef("run-a", "weights", "../x"))
    with pytest.raises(storage_mod.InvalidRequest, match="run_id"):
        storage.delete_checkpoint(CheckpointRef("..", "weights", "a"))
    outside = tmp_path / "outside"
    _write(Storage(outside), CheckpointRef("run-o", "weights", "a"))
    os.symlink(outside / "runs" / "run-o", root / "runs" / "run-o")
    with pytest.raises(storage_mod.InvalidRequest, match="outside"):
        storage.delete_checkpoint(CheckpointRef("run-o", "weights", "a"))
    assert (outside / "runs" / "run-o" / "weights" / "a" / CHECKPOINT_METADATA).is_file()


def test_delete_run(tmp_path: Path) -> None:
    root = tmp_path / "data"
    storage = Storage(root)
    for ref in (
        CheckpointRef(run_id="run-a", kind="weights", name="a"),
        CheckpointRef(run_id="run-a", kind="weights", name="b"),
        CheckpointRef(run_id="run-a", kind="sampler_weights", name="a"),
    ):
        _write(storage, ref)
    _write(storage, CheckpointRef(run_id="run-b", kind="weights", name="a"))
    (root / "runs" / "run-a" / "stray.txt").write_text("x")
    assert storage.delete_run("run-a") == 3
    assert not os.path.lexists(root / "runs" / "run-a")
    assert storage.list_run("run-a") == []
    assert storage.delete_run("run-a") == 0
    assert storage.lookup(CheckpointRef(run_id="run-b", kind="weights", name="a")) is not None
    assert not list((root / ".trash").iterdir())
    # A run directory that is a symlink is unlinked, never followed.
    outside = tmp_path / "outside"
    _write(Storage(outside), CheckpointRef("run-o", "weights", "a"))
    os.symlink(outside / "runs" / "run-o", root / "runs" / "run-o")
    assert storage.delete_run("run-o") == 0
    assert not os.path.lexists(root / "runs" / "run-o")
    assert (outside / "runs" / "run-o" / "weights" / "a" / CHECKPOINT_METADATA).is_file()
    with pytest.raises(storage_mod.InvalidRequest, match="run_id"):
        storage.delete_run("../outside")
    assert storage.delete_run("run-never") == 0


# --------------------------------------------------------------------------- races


def _hammer(calls: list[Callable[[], None]], stop: threading.Event) -> list[BaseException]:
    """Run each call in its own thread in a loop until ``stop``; what they raised."""
    errors: list[BaseException] = []

    def loop(call: Callable[[], None]) -> None:
        try:
            while not stop.is_set():
                call()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=loop, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    if not stop.wait(30):
        stop.set()
        errors.append(TimeoutError("the race did not finish in 30 s"))
    for thread in threads:
        thread.join(10)
    return errors


def test_overwrite_never_leaves_a_name_missing(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="hot")
    _write(storage, ref, step=0)
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(3)]

    def reader(out: list[int]) -> Callable[[], None]:
        def read() -> None:
            found = storage.lookup(ref)
            assert found is not None, "the name was missing during an overwrite"
            out.append(found[1].step)

        return read

    def writer() -> None:
        for step in range(1, 41):
            _write(storage, ref, step=step)
        stop.set()

    errors = _hammer([writer, *(reader(out) for out in seen)], stop)
    assert not errors, errors
    for steps in seen:
        assert steps
        assert steps == sorted(steps)  # never an older version after a newer one
    assert len(os.listdir(tmp_path / "runs" / "run-a" / ".store")) == 1


def test_lookups_racing_expiry_and_deletion_never_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path)
    offset = _fake_clock(monkeypatch)
    refs = [CheckpointRef(run_id=f"run-{i % 2}", kind="weights", name=f"c{i}") for i in range(6)]
    last_id = [""]

    def read_all() -> None:
        for ref in refs:
            found = storage.lookup(ref)
            if found is not None:
                storage.checkpoint_files(found[0])
        storage.list_run("run-0")
        storage.find_by_id(last_id[0])
        storage.find(refs[0].uri)

    for rounds in range(9):
        offset[0] = 0.0
        last_id[0] = [_write(storage, ref, ttl_seconds=30) for ref in refs][-1].id
        stop = threading.Event()

        def destroy(r: int = rounds, stop: threading.Event = stop) -> None:
            time.sleep(0.002)
            if r % 3 == 0:
                offset[0] = 31.0  # everything expires under the readers
            elif r % 3 == 1:
                for ref in refs:
                    storage.delete_checkpoint(ref)
            else:
                storage.delete_run("run-0")
                storage.delete_run("run-1")
            for _ in range(5):
                read_all()
            stop.set()

        errors = _hammer([destroy, read_all, read_all, read_all], stop)
        assert not errors, errors
        assert all(storage.lookup(ref) is None for ref in refs)
        assert storage.find_by_id(last_id[0]) is None


def test_lookup_when_the_version_vanishes_mid_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic versions of the races: the directory a lookup resolved is deleted, or
    replaced by a new save, before it reads the metadata."""
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="x")
    _write(storage, ref, step=1)
    real_link_target = Storage._link_target
    action: list[Callable[[], None]] = []

    def racing_link_target(link: Path) -> Path | None:
        target = real_link_target(link)
        while action:
            action.pop()()
        return target

    monkeypatch.setattr(Storage, "_link_target", staticmethod(racing_link_target))
    action.append(lambda: _write(storage, ref, step=2))
    found = storage.lookup(ref)
    assert found is not None
    assert found[1].step == 2  # the new version, not "not found"
    action.append(lambda: shutil.rmtree(storage.link_path(ref).resolve()))
    assert storage.lookup(ref) is None
    record = _write(storage, ref, step=3)
    action.append(lambda: storage.delete_run("run-a"))
    assert storage.list_run("run-a") == []
    assert storage.find_by_id(record.id) is None
    assert storage.delete_checkpoint(ref) is False
    assert storage.delete_run("run-a") == 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    with LocalServer(backend="null", data_dir=tmp_path, poll_hold=2.0) as srv:
        yield srv


def test_http_lookups_racing_expiry_and_deletion_are_200_or_404(
    server: LocalServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = _fake_clock(monkeypatch)
    storage = server.state.storage
    trainer = Trainer(client)
    trainer.init()
    run_id = trainer.id
    for rounds in range(6):
        offset[0] = 0.0
        paths = [
            trainer.run_op("save_state", name=f"c{i}", ttl_seconds=30)["path"] for i in range(4)
        ]
        ids = [
            client.get("/v1/loops/checkpoints", params={"checkpoint_path": p}).json()[
                "checkpoints"
            ][0]["id"]
            for p in paths
        ]
        statuses: set[int] = set()
        stop = threading.Event()

        def get_many(
            c: httpx.Client,
            ids: list[str] = ids,
            paths: list[str] = paths,
            statuses: set[int] = statuses,
        ) -> None:
            for checkpoint_id, path in zip(ids, paths, strict=True):
                r = c.get(f"/v1/loops/checkpoints/{checkpoint_id}/source")
                statuses.add(r.status_code)
                assert r.status_code in (200, 404), r.text
                r = c.get("/v1/loops/checkpoints", params={"checkpoint_path": path})
                statuses.add(r.status_code)
                assert r.status_code == 200, r.text
            r = c.get("/v1/loops/checkpoints", params={"run_id": run_id})
            assert r.status_code == 200, r.text

        def destroy(
            r: int = rounds, paths: list[str] = paths, stop: threading.Event = stop
        ) -> None:
            time.sleep(0.01)
            if r % 2 == 0:
                offset[0] = 31.0
            else:
                for path in paths:
                    storage.delete_checkpoint(storage_mod.parse_checkpoint_uri(path))
            time.sleep(0.05)
            stop.set()

        clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(4)]
        try:
            errors = _hammer([destroy, *(lambda c=c: get_many(c) for c in clients)], stop)
        finally:
            for c in clients:
                c.close()
        assert not errors, errors
        assert statuses <= {200, 404}
        for checkpoint_id in ids:
            assert client.get(f"/v1/loops/checkpoints/{checkpoint_id}/source").status_code == 404
