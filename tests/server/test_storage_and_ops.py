"""Unit tests of the data directory (storage.py), the operations store (operations.py),
the settings and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from loops_async import cli
from loops_async.server import ServerSettings
from loops_async.server.backend import InvalidRequest
from loops_async.server.operations import OperationLog, OpStatus, SubmitRejected
from loops_async.server.storage import (
    CheckpointRef,
    Storage,
    parse_checkpoint_uri,
    validate_name,
)

# --------------------------------------------------------------------------- names and URIs


@pytest.mark.parametrize("name", ["a", "step-1", "x.y_z", "A" * 128, "0", "-x", "_"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".x", "..", "a/b", "../x", "a\\b", "A" * 129, "a b", "é", "a\x00b", 5, None]
)
def test_invalid_names(name: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"^name: "):
        validate_name(name)


def test_parse_uri() -> None:
    ref = parse_checkpoint_uri("bt://loops:run-1/weights/step-1")
    assert ref == CheckpointRef(run_id="run-1", kind="weights", name="step-1")
    assert ref.uri == "bt://loops:run-1/weights/step-1"
    assert ref.target == "trainer"
    ref = parse_checkpoint_uri("bt://loops:run-1/sampler_weights/p")
    assert ref.kind == "sampler_weights"
    assert ref.target == "sampler"


@pytest.mark.parametrize(
    "uri",
    [
        "bt://loops:run-1/weights/",
        "bt://loops:/weights/x",
        "bt://loops:run-1/weights/a/b",
        "bt://loops:run-1/weights/../x",
        "bt://loops:../run-1/weights/x",
        "bt://loops:run-1/optimizer/x",
        "bt://other:run-1/weights/x",
        "bt://loops:run-1/weights/x/",
        " bt://loops:run-1/weights/x",
        "/abs/path",
        "file:///etc/passwd",
        "",
        42,
    ],
)
def test_parse_uri_rejects(uri: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"^path"):
        parse_checkpoint_uri(uri)


# --------------------------------------------------------------------------- storage


def _write(storage: Storage, ref: CheckpointRef, payload: str = "x", **kw: Any) -> Any:
    def write(directory: Path) -> None:
        assert directory.is_dir()
        assert not any(directory.iterdir())
        (directory / "adapter_model.safetensors").write_text(payload)

    args: dict[str, Any] = {"base_model": "m", "lora_rank": 4, "step": 3, "with_optimizer": True}
    args.update(kw)
    return storage.write_checkpoint(ref, write, **args)


def test_write_lookup_list(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="s1")
    record = _write(storage, ref)
    assert record.size_bytes == 1
    assert record.target == "trainer"
    assert record.checkpoint_type == "training"
    found = storage.lookup(ref)
    assert found is not None
    directory, again = found
    assert again == record
    assert directory.parent.name == ".store"
    link = tmp_path / "runs" / "run-a" / "weights" / "s1"
    assert (link / "adapter_model.safetensors").read_text() == "x"
    meta = json.loads((link / "checkpoint.json").read_text())
    assert meta["checkpoint_id"] == "s1"
    assert meta["lora_adapter_config"] == {"r": 4}
    listed = storage.list_run("run-a")
    assert [r.checkpoint_id for r in listed] == ["s1"]
    public = msgspec.to_builtins(listed[0].public())
    assert set(public) == {
        "id", "run_id", "checkpoint_id", "checkpoint_type", "created_at", "base_model",
        "lora_adapter_config", "size_bytes", "sync_status", "target",
    }  # fmt: skip
    assert storage.list_run("run-none") == []
    assert storage.find("bt://loops:run-a/weights/s1") == [record]
    assert storage.find("bt://loops:run-a/weights/s2") == []


def test_overwrite_is_atomic_and_failed_writes_leave_nothing(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="s1")
    _write(storage, ref, "old")

    def broken(directory: Path) -> None:
        (directory / "partial").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_checkpoint(
            ref, broken, base_model="m", lora_rank=4, step=0, with_optimizer=False
        )
    store = tmp_path / "runs" / "run-a" / ".store"
    assert len(list(store.iterdir())) == 1
    found = storage.lookup(ref)
    assert found is not None
    assert (found[0] / "adapter_model.safetensors").read_text() == "old"
    _write(storage, ref, "new")
    found = storage.lookup(ref)
    assert found is not None
    assert (found[0] / "adapter_model.safetensors").read_text() == "new"
    assert len(list(store.iterdir())) == 1


def test_ttl_expiry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="sampler_weights", name="tmp")
    _write(storage, ref, ttl_seconds=10)
    assert storage.lookup(ref) is not None
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 11)
    assert storage.lookup(ref) is None
    assert storage.list_run("run-a") == []
    assert not (tmp_path / "runs" / "run-a" / "sampler_weights" / "tmp").exists()


def test_links_outside_the_store_are_ignored(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "checkpoint.json").write_text("{}")
    folder = tmp_path / "data" / "runs" / "run-a" / "weights"
    folder.mkdir(parents=True)
    os.symlink(outside, folder / "evil")
    ref = CheckpointRef(run_id="run-a", kind="weights", name="evil")
    assert storage.lookup(ref) is None
    with pytest.raises(InvalidRequest, match="does not exist"):
        storage.resolve(ref.uri)
    assert storage.list_run("run-a") == []


def test_sweep_removes_orphans(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ref = CheckpointRef(run_id="run-a", kind="weights", name="keep")
    _write(storage, ref)
    orphan = tmp_path / "runs" / "run-a" / ".store" / "crashed.123"
    orphan.mkdir()
    assert storage.sweep() == 1
    assert not orphan.exists()
    assert storage.lookup(ref) is not None


# --------------------------------------------------------------------------- operations


async def _run_log(log: OperationLog, execute: Any, body: Any) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run, execute)
        await body()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_log_orders_and_skips_gaps(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=0.3, result_ttl=60.0, name="t")
    ran: list[int] = []

    async def execute(op: Any) -> Any:
        ran.append(op.seq_id)
        return {"seq": op.seq_id}

    async def body() -> None:
        op3 = log.admit("forward", 3, None, "k3")
        op2 = log.admit("forward", 2, None, "k2")
        await anyio.sleep(0.05)
        assert ran == []  # seq 1 is missing
        assert log.queued_seqs == [2, 3]
        with anyio.fail_after(2):
            assert await log.wait(op3, 5.0)
        assert ran == [2, 3]
        assert log.skipped_seqs == [1]
        assert op2.status is OpStatus.DONE
        assert op3.body == b'{"status":"done","result":{"seq":3}}'
        with pytest.raises(SubmitRejected, match="behind"):
            log.check_seq("forward", 1)
        assert log.find_key("k3") is op3

    await _run_log(log, execute, body)


@pytest.mark.anyio
async def test_log_errors_do_not_stop_the_executor(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0)

    async def execute(op: Any) -> Any:
        if op.seq_id == 1:
            raise InvalidRequest("data[0]: bad")
        if op.seq_id == 2:
            raise KeyError("boom")
        return None

    async def body() -> None:
        ops = [log.admit("forward", i, None, None) for i in (1, 2, 3)]
        for op in ops:
            assert await log.wait(op, 2.0)
        assert json.loads(ops[0].body or b"") == {
            "status": "error", "error": "data[0]: bad", "error_class": "ValidationError"
        }  # fmt: skip
        assert json.loads(ops[1].body or b"")["error_class"] == "KeyError"
        assert ops[2].status is OpStatus.DONE
        assert log.executions["forward"] == 3

    await _run_log(log, execute, body)


@pytest.mark.anyio
async def test_log_wait_hold_and_close(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=60.0)
    op = log.admit("forward", 2, None, None)  # never runs: no executor
    start = anyio.current_time()
    assert not await log.wait(op, 0.1)
    assert anyio.current_time() - start >= 0.09

    async def closer() -> None:
        await anyio.sleep(0.05)
        log.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(closer)
        with anyio.fail_after(2):
            assert not await log.wait(op, 30.0)
    assert log.closed


@pytest.mark.anyio
async def test_log_ttl(anyio_backend: str) -> None:
    log = OperationLog(seq_gap_timeout=5.0, result_ttl=0.1)

    async def execute(op: Any) -> Any:
        return 1

    async def body() -> None:
        op = log.admit("forward", 1, None, "key")
        assert await log.wait(op, 1.0)
        assert log.get(op.id) is op
        await anyio.sleep(0.15)
        assert log.sweep() == 1
        assert log.get(op.id) is None
        assert log.find_key("key") is None

    await _run_log(log, execute, body)


# --------------------------------------------------------------------------- settings, CLI


def test_settings_hide_key_and_validate() -> None:
    s = ServerSettings(api_key="hunter2")
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s)
    with pytest.raises(ValueError, match="backend"):
        ServerSettings(backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="poll_hold"):
        ServerSettings(poll_hold=0)
    with pytest.raises(ValueError, match="port"):
        ServerSettings(port=70000)


def test_settings_from_env() -> None:
    env = {
        "LOOPS_ASYNC_PORT": "9001",
        "LOOPS_ASYNC_API_KEY": "k",
        "LOOPS_ASYNC_BACKEND": "null",
        "LOOPS_ASYNC_POLL_HOLD": "2.5",
        "LOOPS_ASYNC_DATA_DIR": "/tmp/x",
    }
    s = ServerSettings.from_env(env, port=None, host="0.0.0.0")
    assert (s.port, s.api_key, s.backend, s.poll_hold) == (9001, "k", "null", 2.5)
    assert s.data_dir == Path("/tmp/x")
    assert s.host == "0.0.0.0"
    assert ServerSettings.from_env(env, port=1).port == 1
    with pytest.raises(ValueError, match="LOOPS_ASYNC_PORT"):
        ServerSettings.from_env({"LOOPS_ASYNC_PORT": "eighty"})


def test_cli_serve_builds_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loops_async.server import local

    seen: list[ServerSettings] = []
    monkeypatch.setattr(local, "serve", seen.append)
    monkeypatch.setenv("LOOPS_ASYNC_API_KEY", "from-env")
    monkeypatch.setenv("LOOPS_ASYNC_SEED", "7")
    argv = ["serve", "--port", "0", "--backend", "null", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    (s,) = seen
    assert (s.port, s.backend, s.data_dir, s.api_key, s.seed) == (
        0,
        "null",
        tmp_path,
        "from-env",
        7,
    )
    assert s.host == "127.0.0.1"
    assert cli.main(["serve", "--api-key", "flag", "--log-level", "debug"]) == 0
    assert (seen[1].api_key, seen[1].log_level) == ("flag", "debug")


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--backend", "gpu"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_python_dash_m_and_import_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loops_async", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.startswith("loops-async ")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from loops_async.server import LocalServer\n"
        "import httpx\n"
        "with LocalServer(backend='null') as s:\n"
        "    assert httpx.get(s.url + '/v1/loops/capabilities').status_code == 200\n"
        "assert 'loops_async.server.torch_backend' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
