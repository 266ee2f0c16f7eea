"""The local server over raw HTTP (null backend): submit/retrieve, ordering, idempotency,
validation, auth, limits, checkpoints."""

from __future__ import annotations

import importlib.util
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from loops_async.server import LocalServer

from ._http import MODEL, Trainer, assert_422, datum


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(backend="null", poll_hold=2.0, seq_gap_timeout=0.5) as srv:
        yield srv


def _still_serving(client: httpx.Client) -> None:
    r = client.get("/v1/loops/capabilities")
    assert r.status_code == 200
    assert r.json()["supported_models"][0]["model_name"] == MODEL


# --------------------------------------------------------------------------- basics


def test_control_plane(client: httpx.Client, server: LocalServer) -> None:
    assert client.get("/v1/teams").json() == {"teams": [{"id": "local", "name": "local"}]}
    r = client.post("/v1/teams/local/loops/sessions")
    assert r.status_code == 200
    session = r.json()["session"]["id"]
    r = client.post(
        "/v1/teams/local/loops/trainers",
        json={"session_id": session, "base_model": MODEL, "lora_rank": 4, "replicas": 1},
    )
    assert r.status_code == 200, r.text
    run = r.json()["run"]
    assert run["base_model"] == MODEL
    assert run["base_url"] == f"{server.url}/runs/{run['id']}"
    dep = client.get(f"/v1/loops/deployments/{run['deployment_id']}")
    assert dep.json()["deployment"]["status"]["name"] == "ACTIVE"
    assert client.get("/v1/loops/deployments/nope").status_code == 404
    assert client.post("/v1/teams/other/loops/sessions").status_code == 404
    caps = client.get("/v1/loops/capabilities").json()["supported_models"]
    assert {"model_name": MODEL, "max_context_length": 1024} in caps


def test_health_and_policy_version(trainer: Trainer, client: httpx.Client) -> None:
    r = client.get(trainer.url("health"), params={"base_model": MODEL})
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert client.get(trainer.url("policy_version")).json() == {"policy_version": 0}
    trainer.run_op("optim_step", adam_params={"learning_rate": 1e-3})
    trainer.run_op("optim_step", adam_params={})
    assert client.get(trainer.url("policy_version")).json() == {"policy_version": 2}
    assert_422(client.get(trainer.url("health"), params={"base_model": "other"}), "base_model")


def test_submit_and_poll_done(trainer: Trainer) -> None:
    op_id = trainer.submit("forward_backward", data=[datum([1, 2, 3]), datum([4, 5])])
    env = trainer.result(op_id)
    assert env["status"] == "done"
    out = env["result"]
    assert out["loss"] == 0.0
    assert out["metrics"]["loss"] == 0.0
    assert [o["logprobs"]["shape"] for o in out["loss_fn_outputs"]] == [[3], [2]]
    assert out["loss_fn_outputs"][0]["logprobs"]["dtype"] == "float32"
    opt = trainer.run_op("optim_step", adam_params={"learning_rate": 0.01})
    assert opt["metrics"] == {"step": 1.0, "learning_rate": 0.01, "grad_norm": 0.0}
    fwd = trainer.run_op(
        "forward",
        data=[datum([1, 2, 3])],
        loss_fn_config={"skip_token_normalization": True},
    )
    assert fwd["metrics"]["skip_token_normalization"] == 1.0
    # A done result can be retrieved again (until it expires).
    assert trainer.poll(op_id).json() == env


def test_unknown_ids_404(trainer: Trainer, client: httpx.Client) -> None:
    r = trainer.poll("no-such-op")
    assert r.status_code == 404
    assert "unknown operation id" in r.json()["detail"]
    r = client.get("/runs/run-nope/operations/x")
    assert r.status_code == 404
    assert "unknown run" in r.json()["detail"]
    assert client.post("/runs/run-nope/forward", json={}).status_code == 404
    assert client.post(trainer.url("no_such_op"), json={}).status_code == 404
    assert client.get("/nope").json() == {
        "detail": "no route GET /nope",
        "error_class": "NotFoundError",
    }
    assert client.delete("/v1/loops/checkpoints").status_code == 405
    assert "detail" in client.delete("/v1/loops/checkpoints").json()


# --------------------------------------------------------------------------- idempotency, order


def test_idempotency_same_key_runs_once(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    before = run.executions["forward_backward"]
    body = trainer.body(data=[datum([1, 2, 3])], loss_fn="cross_entropy")
    key = uuid.uuid4().hex
    first = trainer.post("forward_backward", body, key=key)
    second = trainer.post("forward_backward", body, key=key)
    assert first.status_code == second.status_code == 202
    assert first.json()["operation_id"] == second.json()["operation_id"] == key
    assert trainer.result(key)["status"] == "done"
    third = trainer.post("forward_backward", body, key=key)  # a late retry
    assert third.json()["operation_id"] == key
    assert run.executions["forward_backward"] == before + 1


def test_insane_key_gets_generated_id(trainer: Trainer) -> None:
    body = trainer.body(adam_params={})
    key = "not a sane/key"
    first = trainer.post("optim_step", body, key=key)
    second = trainer.post("optim_step", body, key=key)
    assert first.status_code == 202
    op_id = first.json()["operation_id"]
    assert op_id != key
    assert second.json()["operation_id"] == op_id


def test_seq_order(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    s = trainer.seq
    opt = trainer.submit("optim_step", seq_id=s + 2, adam_params={})
    time.sleep(0.2)
    assert run.executions["optim_step"] == 0  # waits for its predecessor
    fb = trainer.submit("forward_backward", seq_id=s + 1, data=[datum([1, 2])])
    trainer.seq = s + 2
    assert trainer.result(opt)["status"] == "done"
    assert trainer.result(fb)["status"] == "done"
    order = [(seq, kind) for seq, kind, _ in run.ops.history][-2:]
    assert order == [(s + 1, "forward_backward"), (s + 2, "optim_step")]


def test_pipelined_submits_run_in_order(trainer: Trainer, server: LocalServer) -> None:
    ids = [trainer.submit("forward_backward", data=[datum([1, 2])]) for _ in range(5)]
    ids.append(trainer.submit("optim_step", adam_params={}))
    for op_id in ids:
        assert trainer.result(op_id)["status"] == "done"
    history = list(server.state.runs[trainer.id].ops.history)[-6:]
    assert [seq for seq, _, _ in history] == list(range(trainer.seq - 5, trainer.seq + 1))


def test_gap_skipped_after_timeout(trainer: Trainer, server: LocalServer) -> None:
    run = server.state.runs[trainer.id]
    s = trainer.seq
    start = time.monotonic()
    op = trainer.submit("optim_step", seq_id=s + 2, adam_params={})  # s + 1 never comes
    env = trainer.result(op)
    elapsed = time.monotonic() - start
    assert env["status"] == "done"
    assert 0.4 <= elapsed < 3.0
    assert s + 1 in run.ops.skipped_seqs
    # The burned seq is gone for good; the sequence goes on after it.
    trainer.seq = s + 2
    assert_422(trainer.post("forward", trainer.body(s + 1, data=[datum([1])])), "seq_id")
    trainer.run_op("forward", data=[datum([1, 2])])


def test_seq_behind_or_taken_is_422(trainer: Trainer) -> None:
    assert_422(trainer.post("optim_step", trainer.body(1, adam_params={})), "seq_id", "behind")
    assert_422(trainer.post("optim_step", trainer.body(0, adam_params={})), "seq_id")
    nxt = trainer.seq + 5  # queued behind a gap, so it stays queued for a moment
    assert trainer.post("optim_step", trainer.body(nxt, adam_params={})).status_code == 202
    assert_422(trainer.post("optim_step", trainer.body(nxt, adam_params={})), "already queued")
    trainer.seq = nxt


def test_init_seq_1_starts_new_sequence(trainer: Trainer, server: LocalServer) -> None:
    trainer.run_op("optim_step", adam_params={})
    far = trainer.submit("optim_step", seq_id=trainer.seq + 3, adam_params={})  # queued
    trainer.seq = 0
    trainer.init()
    env = trainer.result(far)
    assert env["status"] == "error"
    assert env["error_class"] == "OperationCancelled"
    trainer.run_op("optim_step", adam_params={})
    assert server.state.runs[trainer.id].policy_version == 1


def test_cancel(server: LocalServer, client: httpx.Client, trainer: Trainer) -> None:
    s = trainer.seq
    queued = trainer.submit("optim_step", seq_id=s + 2, adam_params={})  # waits for s + 1
    r = client.post(trainer.url(f"operations/{queued}/cancel"))
    assert r.status_code == 200
    assert r.json() == {"operation_id": queued, "status": "cancelled"}
    assert client.post(trainer.url(f"operations/{queued}/cancel")).status_code == 200
    env = trainer.result(queued)
    assert env["status"] == "error"
    assert env["error_class"] == "OperationCancelled"
    done = trainer.submit("forward", seq_id=s + 1, data=[datum([1])])
    assert trainer.result(done)["status"] == "done"
    assert client.post(trainer.url(f"operations/{done}/cancel")).status_code == 409
    assert client.post(trainer.url("operations/nope/cancel")).status_code == 404
    trainer.seq = s + 2
    # The cancelled seq is passed over at once (no gap wait), and never ran.
    start = time.monotonic()
    trainer.run_op("forward", data=[datum([1])])
    assert time.monotonic() - start < 0.4
    assert server.state.runs[trainer.id].executions["optim_step"] == 0


# --------------------------------------------------------------------------- 422s


def test_422_bad_bodies(trainer: Trainer, client: httpx.Client) -> None:
    url = trainer.url("forward_backward")
    r = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_422(r, "not valid JSON")
    assert_422(
        trainer.post(
            "forward_backward", {"seq_id": "x", "run_id": None, "model": MODEL, "data": []}
        ),
        "seq_id",
    )
    assert_422(
        trainer.post("forward_backward", {"run_id": None, "model": MODEL, "data": []}), "seq_id"
    )
    assert_422(
        trainer.post("optim_step", trainer.body(adam_params={"learning_rate": "fast"})),
        "learning_rate",
    )
    assert_422(trainer.post("forward", trainer.body(data=[datum([1])], loss_fn="nope")), "loss_fn")
    assert_422(
        trainer.post("forward", trainer.body(data=[datum([1, 5000])])),
        "model_input.chunks[0].tokens",
        "vocabulary",
    )
    assert_422(trainer.post("forward", trainer.body(data=[datum([1], [4096])])), "target_tokens")
    assert_422(
        trainer.post("forward", trainer.body(data=[datum([1])], top_k_logprobs=99)),
        "top_k_logprobs",
    )
    assert_422(trainer.post("forward", trainer.body(data=[])), "data")
    assert_422(trainer.post("forward", {**trainer.body(data=[datum([1])]), "model": "x"}), "model")
    assert_422(
        trainer.post("forward", {**trainer.body(data=[datum([1])]), "run_id": "run-x"}), "run_id"
    )
    r = trainer.post("forward", trainer.body(data=[datum([1])]), headers={"X-Run-Id": "run-x"})
    assert_422(r, "X-Run-Id")
    for bad in ({"learning_rate": -1.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"eps": 0.0}):
        name = next(iter(bad))
        assert_422(trainer.post("optim_step", trainer.body(adam_params=bad)), f"adam_params.{name}")
    assert_422(
        trainer.post("init_trainer_server", trainer.body(1, lora_rank=0, base_model=MODEL)),
        "lora_rank",
    )
    assert_422(
        trainer.post("init_trainer_server", trainer.body(1, lora_rank=1000, base_model=MODEL)),
        "lora_rank",
    )
    assert_422(
        trainer.post("init_trainer_server", trainer.body(1, lora_rank=8, base_model="other")),
        "base_model",
    )
    _still_serving(client)
    assert trainer.poll("x").status_code == 404


@pytest.mark.parametrize(
    "name", ["../x", "a/b", ".hidden", "", "x" * 129, "a b", "a\\b", "..", "é"]
)
def test_422_bad_checkpoint_names(trainer: Trainer, client: httpx.Client, name: str) -> None:
    seq = trainer.seq + 1
    for op, extra in (("save_state", {}), ("save_weights_for_sampler", {"bump_version": False})):
        assert_422(trainer.post(op, trainer.body(seq, name=name, **extra)), "name")
    _still_serving(client)


def test_422_bad_ttl(trainer: Trainer) -> None:
    seq = trainer.seq + 1
    assert_422(
        trainer.post("save_state", trainer.body(seq, name="ok", ttl_seconds=0)), "ttl_seconds"
    )


def test_422_bad_load_paths(trainer: Trainer, client: httpx.Client, tmp_path: Any) -> None:
    seq = trainer.seq + 1
    bad_paths = [
        f"bt://loops:{trainer.id}/weights/missing",  # nonexistent
        "bt://loops:run-other-data-dir/weights/step-1",  # a run this data dir never had
        f"bt://loops:{trainer.id}/weights/../../etc",
        f"bt://loops:{trainer.id}/other/x",
        f"bt://loops:../{trainer.id}/weights/x",
        str(tmp_path),
        "s3://bucket/x",
        "",
    ]
    for path in bad_paths:
        for op in ("load_state", "load_state_with_optimizer"):
            assert_422(trainer.post(op, trainer.body(seq, path=path)), "path")
    _still_serving(client)


def test_422_control_plane(client: httpx.Client, trainer: Trainer) -> None:
    r = client.post(
        "/v1/loops/trainers",
        json={"session_id": trainer.session_id, "base_model": "no/such-model", "lora_rank": 8},
    )
    assert_422(r, "base_model")
    r = client.post(
        "/v1/loops/trainers", json={"session_id": "nope", "base_model": MODEL, "lora_rank": 8}
    )
    assert_422(r, "session_id")
    r = client.post(
        "/v1/loops/trainers",
        json={"session_id": trainer.session_id, "base_model": MODEL, "lora_rank": 257},
    )
    assert_422(r, "lora_rank")
    r = client.post(
        "/v1/loops/trainers",
        json={"session_id": trainer.session_id, "base_model": MODEL, "lora_rank": "8"},
    )
    assert_422(r, "lora_rank")
    r = client.post(
        "/v1/loops/trainers",
        json={
            "session_id": trainer.session_id,
            "base_model": MODEL,
            "lora_rank": 8,
            "path": "bt://loops:run-x/weights/nope",
        },
    )
    assert_422(r, "path")
    r = client.post(
        "/v1/loops/trainers", content=b"[]", headers={"Content-Type": "application/json"}
    )
    assert_422(r, "invalid request body")
    assert_422(client.get("/v1/loops/checkpoints"), "run_id")
    assert_422(client.get("/v1/loops/checkpoints", params={"run_id": "../x"}), "run_id")
    assert_422(
        client.get("/v1/loops/checkpoints", params={"checkpoint_path": "/etc/passwd"}),
        "checkpoint_path",
    )
    _still_serving(client)


def test_op_errors_become_error_envelopes(trainer: Trainer, server: LocalServer) -> None:
    # The checkpoint exists at submit time but is gone when the load runs.
    trainer.run_op("save_state", name="doomed")
    path = f"bt://loops:{trainer.id}/weights/doomed"
    s = trainer.seq
    load = trainer.submit("load_state", seq_id=s + 2, path=path)  # waits for s + 1
    link = server.data_dir / "runs" / trainer.id / "weights" / "doomed"
    link.unlink()
    trainer.submit("forward", seq_id=s + 1, data=[datum([1])])
    trainer.seq = s + 2
    env = trainer.result(load)
    assert env == {"status": "error", "error": env["error"], "error_class": "ValidationError"}
    assert "does not exist" in env["error"]
    trainer.run_op("forward", data=[datum([1])])


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_save_list_load(trainer: Trainer, client: httpx.Client) -> None:
    trainer.run_op("optim_step", adam_params={})
    saved = trainer.run_op("save_state", name="step-1")
    assert saved["path"] == f"bt://loops:{trainer.id}/weights/step-1"
    pub = trainer.run_op("save_weights_for_sampler", name="pub-1", bump_version=True)
    assert pub == {"path": f"bt://loops:{trainer.id}/sampler_weights/pub-1", "version": 1}
    listed = client.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
    by_name = {c["checkpoint_id"]: c for c in listed["checkpoints"]}
    assert set(by_name) == {"step-1", "pub-1"}
    ckpt = by_name["step-1"]
    assert ckpt["run_id"] == trainer.id
    assert ckpt["target"] == "trainer"
    assert ckpt["base_model"] == MODEL
    assert ckpt["lora_adapter_config"] == {"r": 8}
    assert ckpt["size_bytes"] > 0
    assert ckpt["created_at"].startswith("20")
    assert by_name["pub-1"]["target"] == "sampler"
    one = client.get("/v1/loops/checkpoints", params={"checkpoint_path": saved["path"]}).json()
    assert [c["id"] for c in one["checkpoints"]] == [ckpt["id"]]
    none = client.get(
        "/v1/loops/checkpoints", params={"checkpoint_path": f"bt://loops:{trainer.id}/weights/x"}
    ).json()
    assert none == {"checkpoints": []}

    trainer.run_op("optim_step", adam_params={})
    assert trainer.run_op("load_state_with_optimizer", path=saved["path"])["step"] == 1
    assert trainer.run_op("load_state", path=saved["path"])["step"] == 0
    # A sampler checkpoint has no optimizer state.
    assert_422(
        trainer.post("load_state_with_optimizer", trainer.body(trainer.seq + 1, path=pub["path"])),
        "path",
    )
    assert trainer.run_op("load_state", path=pub["path"])["step"] == 0


def test_checkpoint_overwrite_replaces(
    trainer: Trainer, client: httpx.Client, server: LocalServer
) -> None:
    trainer.run_op("save_state", name="same")
    first = client.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
    trainer.run_op("optim_step", adam_params={})
    trainer.run_op("save_state", name="same")
    second = client.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
    assert len(second["checkpoints"]) == 1
    assert second["checkpoints"][0]["id"] != first["checkpoints"][0]["id"]
    store = server.data_dir / "runs" / trainer.id / ".store"
    assert len(list(store.iterdir())) == 1  # the old version is gone
    assert (
        trainer.run_op("load_state_with_optimizer", path=f"bt://loops:{trainer.id}/weights/same")[
            "step"
        ]
        == 1
    )


def test_trainer_from_checkpoint(
    trainer: Trainer, client: httpx.Client, server: LocalServer
) -> None:
    trainer.run_op("optim_step", adam_params={})
    path = trainer.run_op("save_state", name="seed-ckpt")["path"]
    other = Trainer(client, lora_rank=8, path=path)
    assert other.init() == {"lora_rank": 8, "step": 0}
    r = client.post(
        "/v1/loops/trainers",
        json={"session_id": trainer.session_id, "base_model": MODEL, "lora_rank": 4, "path": path},
    )
    assert_422(r, "lora_rank", "rank 8")


# --------------------------------------------------------------------------- auth, limits


def test_api_key() -> None:
    with LocalServer(backend="null", api_key="s3cret-key") as srv:
        assert "s3cret" not in repr(srv.settings)
        with httpx.Client(base_url=srv.url) as c:
            for headers in (
                {},
                {"Authorization": "Api-Key wrong"},
                {"Authorization": "s3cret-key"},
            ):
                r = c.post("/v1/loops/sessions", headers=headers)
                assert r.status_code == 401
                assert "detail" in r.json()
                assert "s3cret" not in r.text
            assert c.get("/runs/x/health").status_code == 401
            assert c.get("/").status_code == 401
            good = {"Authorization": "Api-Key s3cret-key"}
            assert c.post("/v1/loops/sessions", headers=good).status_code == 200
            assert (
                c.get("/v1/teams", headers={"Authorization": "Bearer s3cret-key"}).status_code
                == 200
            )


def test_body_limit() -> None:
    with (
        LocalServer(backend="null", max_body_bytes=10_000) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        t = Trainer(c)
        t.init()
        big = t.body(data=[datum(list(range(1, 1000)) * 3)])
        r = t.post("forward_backward", big)
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
            yield b'{"seq_id": 2, "run_id": null, "model": "x", "data": ['
            for _ in range(200):
                yield b"[" + b"1," * 50 + b"1],"
            yield b"]}"

        r = c.post(
            t.url("forward_backward"),
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413
        _still_serving(c)
        t.seq = 1  # the rejected bodies were never admitted
        t.run_op("forward_backward", data=[datum([1, 2, 3])])


# --------------------------------------------------------------------------- long-poll


def test_poll_408_when_hold_expires() -> None:
    with (
        LocalServer(backend="null", poll_hold=0.3, null_delay=1.0) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        t = Trainer(c)
        op = t.submit("init_trainer_server", lora_rank=8, base_model=MODEL)
        start = time.monotonic()
        r = t.poll(op)
        assert r.status_code == 408
        assert 0.25 <= time.monotonic() - start < 1.0
        assert "poll again" in r.json()["detail"]
        assert t.result(op)["status"] == "done"


def test_result_ttl() -> None:
    with LocalServer(backend="null", result_ttl=0.3) as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()
        key = uuid.uuid4().hex
        op = t.submit("optim_step", key=key, adam_params={})
        assert t.result(op)["status"] == "done"
        time.sleep(0.5)
        assert t.poll(op).status_code == 404


def test_health_while_loading_and_failed() -> None:
    with LocalServer(backend="null") as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()  # the backend is built
        run = srv.state.runs[t.id]
        run.status = "DEPLOYING"  # as while a torch model loads
        r = c.get(t.url("health"))
        assert r.status_code == 503
        assert "loading" in r.json()["detail"]
        run.status, run.load_error = "FAILED", "OSError: disk on fire"
        r = c.get(t.url("health"))
        assert r.status_code == 503
        assert "disk on fire" in r.json()["detail"]
        dep = c.get(f"/v1/loops/deployments/{t.run['deployment_id']}").json()
        assert dep["deployment"]["status"]["name"] == "FAILED"


def test_shutdown_answers_pending_polls_503() -> None:
    srv = LocalServer(backend="null", null_delay=30.0, poll_hold=30.0)
    srv.start()
    c = httpx.Client(base_url=srv.url, timeout=20.0)
    t = Trainer(c)
    op = t.submit("init_trainer_server", lora_rank=8, base_model=MODEL)
    results: list[httpx.Response] = []
    poller = threading.Thread(target=lambda: results.append(t.poll(op)))
    poller.start()
    time.sleep(0.3)
    start = time.monotonic()
    srv.stop()
    poller.join(10.0)
    assert time.monotonic() - start < 8.0
    assert results
    assert results[0].status_code == 503
    c.close()
    srv.stop()  # idempotent


def test_local_server_lifecycle(tmp_path: Any) -> None:
    srv = LocalServer(backend="null", data_dir=tmp_path / "data")
    with pytest.raises(RuntimeError):
        _ = srv.url
    srv.start()
    port = srv.port
    assert srv.url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"{srv.url}/").json()["backend"] == "null"
    srv.stop()
    srv.stop()
    assert (tmp_path / "data" / "runs").is_dir()  # a given data dir is kept
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2.0)
    temp = LocalServer(backend="null")
    with temp:
        data_dir = temp.data_dir
        assert data_dir.is_dir()
    assert not data_dir.exists()  # a temporary data dir is removed


def test_keep_alive_requests_are_fast(server: LocalServer) -> None:
    # Regression: without TCP_NODELAY on the pre-bound socket every keep-alive response
    # waited ~40 ms for a delayed ACK.
    with httpx.Client(base_url=server.url) as c:
        c.get("/")
        start = time.monotonic()
        for _ in range(30):
            assert c.get("/").status_code == 200
        assert time.monotonic() - start < 0.6


# --------------------------------------------------------------------------- async clients


@pytest.mark.anyio
async def test_concurrent_long_polls_async(anyio_backend: str) -> None:
    with LocalServer(backend="null", null_delay=0.2, poll_hold=5.0) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30.0) as c:
            r = await c.post("/v1/loops/sessions")
            session = r.json()["session"]["id"]
            r = await c.post(
                "/v1/loops/trainers",
                json={"session_id": session, "base_model": MODEL, "lora_rank": 8},
            )
            base = r.json()["run"]["base_url"]
            ids: list[str] = []
            for seq in range(1, 11):
                body: dict[str, Any] = {"seq_id": seq, "run_id": None, "model": MODEL}
                if seq == 1:
                    op, body = "init_trainer_server", {**body, "lora_rank": 8, "base_model": MODEL}
                else:
                    op, body = "forward_backward", {**body, "data": [datum([1, 2, 3])]}
                r = await c.post(
                    f"{base}/{op}", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
                )
                assert r.status_code == 202
                ids.append(r.json()["operation_id"])
            statuses: dict[str, str] = {}

            async def wait(op_id: str) -> None:
                while True:
                    r = await c.get(f"{base}/operations/{op_id}")
                    if r.status_code != 408:
                        statuses[op_id] = r.json()["status"]
                        return

            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                for op_id in ids:
                    tg.start_soon(wait, op_id)
            elapsed = anyio.current_time() - start
            assert set(statuses.values()) == {"done"}
            assert len(statuses) == 10
            assert elapsed < 4.0  # 10 ops x 0.2 s in order, polls held concurrently
            health = await c.get(f"{base}/health")
            assert health.status_code == 200


# --------------------------------------------------------------------------- torch backend


_HAS_TORCH_BACKEND = importlib.util.find_spec("torch") is not None


def _torch_backend_importable() -> bool:
    if not _HAS_TORCH_BACKEND:
        return False
    try:
        importlib.import_module("loops_async.server.torch_backend")
    except ImportError:
        return False
    return True


def test_torch_backend_over_http() -> None:
    if not _torch_backend_importable():
        pytest.skip(
            "loops_async.server.torch_backend is not importable (torch missing or "
            "the torch trainer is not there yet)"
        )
    with LocalServer(backend="torch") as srv, httpx.Client(base_url=srv.url, timeout=60.0) as c:
        t = Trainer(c, lora_rank=4)
        assert c.get(t.url("health")).status_code in (200, 503)  # 503 while the model loads
        # Submitted while the model may still load: queued, runs once it is ready.
        init = t.submit("init_trainer_server", lora_rank=4, base_model=MODEL)
        assert t.result(init) == {"status": "done", "result": {"lora_rank": 4, "step": 0}}
        assert c.get(t.url("health")).status_code == 200
        tokens = [5, 17, 42, 99, 7, 3]
        fb = t.run_op("forward_backward", data=[datum(tokens)])
        assert fb["loss"] > 0
        assert fb["loss_fn_outputs"][0]["logprobs"]["shape"] == [len(tokens)]
        opt = t.run_op("optim_step", adam_params={"learning_rate": 1e-2})
        assert opt["metrics"]["step"] == 1
        assert opt["metrics"]["grad_norm"] > 0
        saved = t.run_op("save_state", name="torch-1")
        listed = c.get("/v1/loops/checkpoints", params={"run_id": t.id}).json()["checkpoints"]
        assert [x["checkpoint_id"] for x in listed] == ["torch-1"]
        ckpt_dir = srv.data_dir / "runs" / t.id / "weights" / "torch-1"
        assert (ckpt_dir / "adapter_model.safetensors").is_file()
        assert (ckpt_dir / "adapter_config.json").is_file()
        assert t.run_op("load_state_with_optimizer", path=saved["path"])["step"] == 1
        assert_422(t.post("forward", t.body(t.seq + 1, data=[datum([1, 5000])])), "vocabulary")
