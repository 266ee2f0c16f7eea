"""The local server's defences: web pages cannot drive it (trusted hosts, origins, JSON-only
writes), a non-loopback bind needs a key, bodies are capped and decoded a few at a time off
the event loop, runs and checkpoints can be deleted, sessions and runs are limited, download
tokens stay out of the logs, and a pickled sampling client does not carry the API key."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loops_async import SamplingClient, cli
from loops_async._chunking import MAX_REQUEST_BYTES
from loops_async._http import Transport
from loops_async.server import (
    LocalServer,
    ServerSettings,
    control_routes,
    sampler_routes,
    trainer_routes,
)
from loops_async.server.app import get_body_gate
from loops_async.server.http import LARGE_BODY_BYTES
from loops_async.server.local import RedactFileTokens
from loops_async.server.middleware import TrustedHosts, split_authority

from ._http import MODEL, Trainer, datum

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(backend="null", poll_hold=1.0, seq_gap_timeout=0.5) as srv:
        yield srv


def _refused(r: httpx.Response, status: int, error_class: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error_class"] == error_class, body
    assert body["detail"]
    return dict(body)


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- trusted hosts


def test_foreign_host_is_refused(server: LocalServer, client: httpx.Client) -> None:
    port = server.port
    for host in (
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "10.0.0.1",
        "[::1",
        "a b",
        "",
    ):
        for method, path in (("GET", "/"), ("POST", "/v1/loops/sessions"), ("GET", "/files/x")):
            r = client.request(method, path, headers={"Host": host})
            body = _refused(r, 400, "UntrustedHostError")
            assert "--allowed-host" in body["detail"]


def test_loopback_hosts_are_trusted(server: LocalServer, client: httpx.Client) -> None:
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "127.0.0.1"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
        assert client.post("/v1/loops/sessions", headers={"Host": host}).status_code == 200
    # IPv6 loopback, by name: the request still reaches the IPv4 socket.
    assert client.get("/", headers={"Host": f"[::1]:{port}"}).status_code == 200


def test_allowed_hosts() -> None:
    with (
        LocalServer(backend="null", allowed_hosts=("api.example", "pinned.example:81")) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        assert c.get("/", headers={"Host": "api.example:9999"}).status_code == 200
        assert c.get("/", headers={"Host": "API.example"}).status_code == 200
        assert c.get("/", headers={"Host": "pinned.example:81"}).status_code == 200
        _refused(c.get("/", headers={"Host": "pinned.example:82"}), 400, "UntrustedHostError")
        _refused(c.get("/", headers={"Host": "other.example"}), 400, "UntrustedHostError")
        # A run's base_url follows the Host the client used.
        session = c.post("/v1/loops/sessions", headers={"Host": "api.example:9999"}).json()
        r = c.post(
            "/v1/loops/trainers",
            json={"session_id": session["session"]["id"], "base_model": MODEL, "lora_rank": 4},
            headers={"Host": "api.example:9999"},
        )
        assert r.json()["run"]["base_url"].startswith("http://api.example:9999/runs/")
    with LocalServer(backend="null", allowed_hosts="*") as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/", headers={"Host": "anything.example"}).status_code == 200


def test_allowed_hosts_settings_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    s = ServerSettings.from_env({"LOOPS_ASYNC_ALLOWED_HOSTS": " a.example, B.example:8700 ,"})
    assert s.allowed_hosts == ("a.example", "b.example:8700")
    assert ServerSettings().allowed_hosts == ()
    with pytest.raises(ValueError, match="allowed_hosts"):
        ServerSettings(allowed_hosts=("http://a.example/",))
    from loops_async.server import local

    seen: list[ServerSettings] = []
    monkeypatch.setattr(local, "serve", seen.append)
    argv = ["serve", "--backend", "null", "--allowed-host", "a.example", "--allowed-host", "b:1"]
    assert cli.main(argv) == 0
    assert seen[0].allowed_hosts == ("a.example", "b:1")
    monkeypatch.setenv("LOOPS_ASYNC_ALLOWED_HOSTS", "env.example")
    assert cli.main(["serve", "--backend", "null"]) == 0
    assert seen[1].allowed_hosts == ("env.example",)


def test_host_parsing() -> None:
    assert split_authority("Example.COM:80") == ("example.com", 80)
    assert split_authority("[::1]:8700") == ("::1", 8700)
    assert split_authority("[::1]") == ("::1", None)
    for bad in ("", "::1", "a:b", "a:99999", "[::1]x", "a/b", "a@b", "[::1"):
        assert split_authority(bad) is None, bad
    hosts = TrustedHosts(["a.example", "b.example:1"], bound_host="192.0.2.7")
    assert hosts.trusts("127.0.0.2", None)
    assert hosts.trusts("::1", 5)
    assert hosts.trusts("192.0.2.7", 8700)  # the bound interface itself
    assert hosts.trusts("a.example", 3)
    assert hosts.trusts("b.example", 1)
    assert not hosts.trusts("b.example", 2)
    assert not hosts.trusts("c.example", None)
    assert not TrustedHosts(bound_host="0.0.0.0").trusts("0.0.0.0", None)


# --------------------------------------------------------------------------- origins


def test_foreign_origin_is_refused(server: LocalServer, client: httpx.Client) -> None:
    port = server.port
    for origin in (
        "https://evil.example",
        f"http://evil.example:{port}",
        "http://localhost:3000",  # another page on this machine
        f"http://127.0.0.1:{port + 1}",
        "null",  # sandboxed frames, file:// pages
        "garbage",
    ):
        for method, path in (("POST", "/v1/loops/sessions"), ("GET", "/"), ("GET", "/v1/teams")):
            r = client.request(method, path, headers={"Origin": origin})
            _refused(r, 403, "ForbiddenOriginError")


def test_own_origin_is_fine(server: LocalServer, client: httpx.Client) -> None:
    port = server.port
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"):
        r = client.post("/v1/loops/sessions", headers={"Origin": origin})
        assert r.status_code == 200, (origin, r.text)


# --------------------------------------------------------------------------- content types


def test_writes_must_be_json(client: httpx.Client, trainer: Trainer) -> None:
    body = json.dumps(trainer.body(trainer.seq + 1, adam_params={})).encode()
    for ctype in (
        "application/x-www-form-urlencoded",
        "text/plain",
        "text/plain;charset=UTF-8",
        "multipart/form-data; boundary=----x",
        "application/jsonp",
    ):
        r = client.post(trainer.url("optim_step"), content=body, headers={"Content-Type": ctype})
        _refused(r, 415, "UnsupportedMediaTypeError")
        r = client.post("/v1/loops/sessions", content=b"{}", headers={"Content-Type": ctype})
        _refused(r, 415, "UnsupportedMediaTypeError")
    # A body without a content type is refused too; no body needs none.
    r = client.post(trainer.url("optim_step"), content=body)
    _refused(r, 415, "UnsupportedMediaTypeError")
    assert client.post("/v1/loops/sessions").status_code == 200
    assert client.post("/v1/loops/sessions", content=b"", headers=JSON).status_code == 200
    r = client.post(trainer.url("optim_step"), content=body, headers=JSON)
    assert r.status_code == 202, r.text
    trainer.seq += 1
    # Reads need no content type whatever they carry.
    text = {"Content-Type": "text/plain"}
    assert client.get(trainer.url("health"), headers=text).status_code == 200


# --------------------------------------------------------------------------- binding


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_non_loopback_bind_needs_an_api_key(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="API key"):
        ServerSettings(host=host)
    with pytest.raises(ValueError, match="API key"):
        LocalServer(backend="null", host=host)
    assert ServerSettings(host=host, api_key="k").host == host
    from loops_async.server import local

    seen: list[ServerSettings] = []
    monkeypatch.setattr(local, "serve", seen.append)
    monkeypatch.delenv("LOOPS_ASYNC_API_KEY", raising=False)
    assert cli.main(["serve", "--backend", "null", "--host", host]) == 2
    assert not seen
    err = capsys.readouterr().err
    assert "not a loopback address" in err
    assert "API key" in err
    monkeypatch.setenv("LOOPS_ASYNC_API_KEY", "k")
    assert cli.main(["serve", "--backend", "null", "--host", host]) == 0
    assert seen[0].host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "localhost", "::1", "[::1]"])
def test_loopback_binds_need_no_key(host: str) -> None:
    assert ServerSettings(host=host).api_key is None


# --------------------------------------------------------------------------- bodies


def test_body_cap_default_fits_client_chunks() -> None:
    cap = ServerSettings().max_body_bytes
    assert cap == 32 * 1024 * 1024
    assert cap >= MAX_REQUEST_BYTES + 4 * 1024 * 1024  # headroom over the client's chunks


def test_body_cap_is_413() -> None:
    with (
        LocalServer(backend="null", max_body_bytes=50_000) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        t = Trainer(c)
        t.init()
        r = t.post("forward", t.body(t.seq + 1, data=[datum(list(range(1, 1000)))] * 10))
        body = _refused(r, 413, "RequestTooLargeError")
        assert "50000" in body["detail"]

        def stream() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"session_id": "' + b"x" * 60_000 + b'"}'

        r = c.post("/v1/loops/trainers", content=stream(), headers=JSON)
        _refused(r, 413, "RequestTooLargeError")
        assert c.get(t.url("health")).status_code == 200


def _big_forward(t: Trainer, seq_id: int) -> bytes:
    body = json.dumps(t.body(seq_id, data=[datum(list(range(1, 1000)))] * 200)).encode()
    assert len(body) > LARGE_BODY_BYTES
    return body


def test_at_most_n_large_bodies_decode_at_once_and_small_requests_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    lock = threading.Lock()
    inside = [0, 0]  # now, most at once
    real_decode = trainer_routes.decode_request

    def held_decode(typ: type[Any], body: bytes) -> Any:
        if len(body) <= LARGE_BODY_BYTES:
            return real_decode(typ, body)
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        try:
            assert release.wait(30.0)
            return real_decode(typ, body)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(trainer_routes, "decode_request", held_decode)
    with (
        LocalServer(backend="null", max_concurrent_decodes=2) as srv,
        httpx.Client(base_url=srv.url, timeout=60.0) as c,
    ):
        gate = get_body_gate(srv.app)
        assert gate.limit == 2
        t = Trainer(c)
        t.init()
        bodies = [_big_forward(t, seq) for seq in (2, 3, 4)]
        answers: list[httpx.Response] = []

        def send(body: bytes) -> None:
            with httpx.Client(timeout=60.0) as own:
                headers = {"Idempotency-Key": uuid.uuid4().hex, **JSON}
                answers.append(own.post(t.url("forward"), content=body, headers=headers))

        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        for thread in threads:
            thread.start()
        try:
            _wait_for(lambda: gate.active == 2 and gate.waiting == 1, "two admitted, one waiting")
            _wait_for(lambda: inside[0] == 2, "two decoding")
            # The event loop is free: small requests answer at once, small submits too.
            with httpx.Client(base_url=srv.url, timeout=5.0) as quick:
                assert quick.get(t.url("health")).status_code == 200
                assert quick.post("/v1/loops/sessions").status_code == 200
                small = t.body(5, data=[datum([1, 2, 3])])
                r = quick.post(t.url("forward"), json=small, headers={"Idempotency-Key": "s"})
                assert r.status_code == 202, r.text
            assert gate.active == 2
            assert gate.waiting == 1
        finally:
            release.set()
            for thread in threads:
                thread.join(60.0)
        assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]
        assert inside[1] == 2
        assert gate.peak == 2
        assert gate.admitted == 3
        assert (gate.active, gate.waiting) == (0, 0)
        t.seq = 5
        assert t.run_op("forward", data=[datum([1, 2])])["loss"] == 0.0


def test_sample_validation_of_a_large_body_runs_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer, client: httpx.Client
) -> None:
    threads: list[str] = []
    real_validate = sampler_routes.validate_sample

    def recording_validate(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(sampler_routes, "validate_sample", recording_validate)
    session = client.post("/v1/loops/sessions").json()["session"]["id"]
    info = client.post(
        "/v1/loops/samplers", json={"session_id": session, "base_model": MODEL}
    ).json()["sampler"]
    url = f"{info['base_url']}/sample"
    loop_thread = f"loops-async-server-{server.port}"
    r = client.post(url, json={"prompt": [1, 2, 3], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert threads == [loop_thread]  # small: inline
    gate = get_body_gate(server.app)
    before = gate.admitted
    r = client.post(url, json={"prompt": [1] * 600_000, "max_tokens": 1})
    assert r.status_code == 422, r.text
    assert "context" in r.json()["detail"]
    assert len(threads) == 2
    assert threads[1] != loop_thread  # large: on a worker thread
    assert gate.admitted == before + 1


# --------------------------------------------------------------------------- deletion


def _checkpoint_id(client: httpx.Client, path: str) -> str:
    r = client.get("/v1/loops/checkpoints", params={"checkpoint_path": path})
    (record,) = r.json()["checkpoints"]
    return str(record["id"])


def test_delete_checkpoint(server: LocalServer, client: httpx.Client, trainer: Trainer) -> None:
    path = trainer.run_op("save_state", name="doomed")["path"]
    kept = trainer.run_op("save_weights_for_sampler", name="kept", bump_version=False)["path"]
    ckpt_id = _checkpoint_id(client, path)
    directory = server.data_dir / "runs" / trainer.id / "weights" / "doomed"
    assert directory.exists()
    r = client.delete(f"/v1/loops/checkpoints/{ckpt_id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": ckpt_id, "path": path, "deleted": True}
    assert not directory.exists()
    listed = client.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["kept"]
    _refused(client.delete(f"/v1/loops/checkpoints/{ckpt_id}"), 404, "NotFoundError")
    _refused(client.delete("/v1/loops/checkpoints/ckpt-nope"), 404, "NotFoundError")
    _refused(client.delete("/v1/loops/checkpoints/.hidden"), 404, "NotFoundError")
    assert _checkpoint_id(client, kept)


def test_delete_run() -> None:
    with (
        LocalServer(backend="null", seq_gap_timeout=60.0) as server,
        httpx.Client(base_url=server.url, timeout=30.0) as client,
    ):
        _delete_run(server, client)


def _delete_run(server: LocalServer, client: httpx.Client) -> None:
    t = Trainer(client)
    t.init()
    t.run_op("save_state", name="a")
    t.run_op("save_weights_for_sampler", name="b", bump_version=True)
    sampler = client.post(
        "/v1/loops/samplers", json={"session_id": t.session_id, "run_id": t.id}
    ).json()["sampler"]
    # An operation queued behind a gap: deleting the run cancels it.
    queued = t.submit("optim_step", seq_id=t.seq + 5, adam_params={})
    run = server.state.runs[t.id]
    run_dir = server.data_dir / "runs" / t.id
    assert run_dir.is_dir()
    r = client.delete(f"/v1/loops/runs/{t.id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"run_id": t.id, "deleted": True, "checkpoints_removed": 2}
    assert t.id not in server.state.runs
    assert not run_dir.exists()
    assert run.ops.closed
    assert [op.status.value for op in run.ops if op.id == queued] == ["cancelled"]
    _refused(client.get(t.url("health")), 404, "NotFoundError")
    _refused(t.poll(queued), 404, "NotFoundError")
    _refused(client.get(f"{sampler['base_url']}/health"), 404, "NotFoundError")
    assert client.get("/v1/loops/checkpoints", params={"run_id": t.id}).json() == {
        "checkpoints": []
    }
    _refused(client.delete(f"/v1/loops/runs/{t.id}"), 404, "NotFoundError")
    _refused(client.delete("/v1/loops/runs/run-unknown"), 404, "NotFoundError")
    r = client.delete("/v1/loops/runs/.hidden")
    assert r.status_code == 422
    assert r.json()["error_class"] == "ValidationError"
    # The server goes on.
    other = Trainer(client)
    other.init()
    assert other.run_op("forward", data=[datum([1, 2, 3])])["loss"] == 0.0


def test_delete_a_run_left_on_disk_by_an_earlier_server(tmp_path: Path) -> None:
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()
        t.run_op("save_state", name="old")
    assert (tmp_path / "runs" / t.id).is_dir()
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.delete(f"/v1/loops/runs/{t.id}")
        assert r.status_code == 200, r.text
        assert r.json()["checkpoints_removed"] == 1
        assert not (tmp_path / "runs" / t.id).exists()


# --------------------------------------------------------------------------- limits


def test_run_limit_and_delete_frees_a_slot() -> None:
    with LocalServer(backend="null", max_runs=2) as srv, httpx.Client(base_url=srv.url) as c:
        first, _second = Trainer(c), Trainer(c)
        session = c.post("/v1/loops/sessions").json()["session"]["id"]
        body = {"session_id": session, "base_model": MODEL, "lora_rank": 4}
        r = c.post("/v1/loops/trainers", json=body)
        detail = _refused(r, 429, "LimitExceededError")["detail"]
        assert "max_runs" in detail
        assert len(srv.state.runs) == 2
        # Reusing a live run needs no new slot.
        reuse = {**body, "lora_rank": 8, "reuse_from_run_id": first.id}
        assert c.post("/v1/loops/trainers", json=reuse).json()["run"]["id"] == first.id
        assert c.delete(f"/v1/loops/runs/{first.id}").status_code == 200
        assert c.post("/v1/loops/trainers", json=body).status_code == 200
    assert ServerSettings().max_runs == 64
    with pytest.raises(ValueError, match="max_runs"):
        ServerSettings(max_runs=0)


def test_session_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalServer(backend="null", max_sessions=2) as srv, httpx.Client(base_url=srv.url) as c:
        a = c.post("/v1/loops/sessions").json()["session"]["id"]
        assert c.post("/v1/loops/sessions").status_code == 200
        detail = _refused(c.post("/v1/loops/sessions"), 429, "LimitExceededError")["detail"]
        assert "max_sessions" in detail
        # Idle sessions (no live run, old enough) are forgotten to make room; the oldest first.
        monkeypatch.setattr(control_routes, "IDLE_SESSION_SECONDS", 0.0)
        c_id = c.post("/v1/loops/sessions").json()["session"]["id"]
        assert a not in srv.state.sessions
        assert len(srv.state.sessions) == 2
        # Sessions that live runs use are never forgotten.
        for session in list(srv.state.sessions):
            body = {"session_id": session, "base_model": MODEL, "lora_rank": 4}
            assert c.post("/v1/loops/trainers", json=body).status_code == 200
        _refused(c.post("/v1/loops/sessions"), 429, "LimitExceededError")
        assert c_id in srv.state.sessions
    assert ServerSettings().max_sessions == 1000
    assert ServerSettings.from_env({"LOOPS_ASYNC_MAX_SESSIONS": "7"}).max_sessions == 7
    assert (
        ServerSettings.from_env({"LOOPS_ASYNC_MAX_CONCURRENT_DECODES": "3"}).max_concurrent_decodes
        == 3
    )


# --------------------------------------------------------------------------- secrets


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("profile", ["local", "hosted"])
def test_download_tokens_never_reach_the_access_log(profile: str) -> None:
    access = logging.getLogger("uvicorn.access")
    records = _Records()
    with LocalServer(backend="null", profile=profile, cold_start_requests=0) as srv:
        level = access.level
        access.addHandler(records)  # uvicorn logs access lines when the logger has a handler
        access.setLevel(logging.INFO)
        try:
            with httpx.Client(base_url=srv.url) as c:
                t = Trainer(c)
                t.init()
                path = t.run_op("save_state", name="secret")["path"]
                ckpt_id = _checkpoint_id(c, path)
                urls = c.get(f"/v1/loops/checkpoints/{ckpt_id}/files").json()["presigned_urls"]
                tokens = [u["url"].rsplit("/files/", 1)[1] for u in urls]
                for item in urls:
                    assert httpx.get(item["url"]).status_code == 200
                assert httpx.get(f"{srv.storage_url or srv.url}/files/bogus-token").status_code
        finally:
            access.removeHandler(records)
            access.setLevel(level)
    logged = "\n".join(records.lines)
    assert logged.count("/files/<redacted>") >= len(urls) + 1, logged
    assert "/checkpoints/" in logged  # other lines are logged as they are
    for token in tokens:
        assert token not in logged
    assert "bogus-token" not in logged


def test_redaction_filter() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s" %d',
        ("127.0.0.1:5", "GET", "/files/abc.def?x=1", 200), None,
    )  # fmt: skip
    assert RedactFileTokens().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /files/<redacted>?x=1" 200'
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "got GET /files/tok123 for %(who)s", None, None
    )
    record.args = {"who": "/files/tok456"}
    RedactFileTokens().filter(record)
    assert "tok123" not in record.getMessage()
    assert "tok456" not in record.getMessage()


def test_pickled_sampling_client_carries_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    secret = "never-pickle-this-key"
    sampler = SamplingClient(
        transport=Transport(api_key=secret, timeout=5, max_connections=2),
        owns_transport=True,
        base_url="http://127.0.0.1:1/samplers/s",
        base_model=MODEL,
        headers={"X-Sampler-Id": "s"},
        ready_timeout=1,
        sample_timeout=1,
    )
    blob = pickle.dumps(sampler)
    assert secret.encode() not in blob
    copy = pickle.loads(blob)
    assert "Authorization" not in copy._transport._headers
    monkeypatch.setenv("BASETEN_API_KEY", "from-env")
    assert pickle.loads(blob)._transport._headers["Authorization"] == "Api-Key from-env"
    sampler.pickle_api_key = True
    assert secret.encode() in pickle.dumps(sampler)
    copy.close()
    sampler.close()


# --------------------------------------------------------------------------- structure


def test_route_modules_do_not_import_the_app() -> None:
    code = (
        "import sys\n"
        "import loops_async.server.sampler_routes, loops_async.server.trainer_routes\n"
        "import loops_async.server.control_routes, loops_async.server.middleware\n"
        "import loops_async.server.storage_app\n"
        "assert 'loops_async.server.app' not in sys.modules, 'app imported'\n"
    )
    # loops_async.server's __init__ imports the app: load the submodules without it.
    prelude = (
        "import importlib.util, sys, types, pathlib\n"
        "import loops_async\n"
        "pkg = types.ModuleType('loops_async.server')\n"
        "pkg.__path__ = [str(pathlib.Path(loops_async.__file__).parent / 'server')]\n"
        "sys.modules['loops_async.server'] = pkg\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
