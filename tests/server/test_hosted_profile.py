"""The local server's hosted profile (PROTOCOL.md §8) and the hosted behaviours that work in
both profiles: sampler URLs under ``/sync``, cold starts (answers without ``error_class``), the
"no status here" deployment route, presigned storage on another port that refuses a second
auth mechanism, shared (serverless) samplers with the operation protocol and their adapter
cache by name, ``/debug/*`` control-plane routes, results without ``path``, and ``load_state``
from local directories. Plus: the local profile is unchanged where it matters."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from loops_async import cli
from loops_async._codec import encode
from loops_async.server import LocalServer, ServerSettings
from loops_async.server.storage_app import ONE_AUTH_MECHANISM

from .._data import sft_batch
from ._http import MODEL, Trainer, assert_422

COLD = 2
"""``cold_start_requests`` of the module's hosted server."""
RETRY_AFTER = 0.05
"""``cold_start_retry_after`` of the module's hosted server."""


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(
        backend="null",
        profile="hosted",
        cold_start_requests=COLD,
        cold_start_retry_after=RETRY_AFTER,
        poll_hold=1.0,
        seq_gap_timeout=0.5,
    ) as srv:
        yield srv


# --------------------------------------------------------------------------- helpers


def sample_body(prompt: list[int] | None = None, **fields: Any) -> dict[str, Any]:
    """A /sample body as the client sends it."""
    out: dict[str, Any] = {
        "prompt": prompt or [1, 2, 3],
        "n": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "max_tokens": 3,
    }
    out.update(fields)
    return out


def assert_proxy(r: httpx.Response, status: int) -> None:
    """A cold-start answer: ``status`` with ``{"detail"}`` and no ``error_class`` (clients
    retry it), and ``Retry-After`` on a 503."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if status == 503:
        assert float(r.headers["retry-after"]) == RETRY_AFTER


def session(client: httpx.Client) -> str:
    r = client.post("/v1/loops/sessions")
    assert r.status_code == 200, r.text
    return str(r.json()["session"]["id"])


def create_sampler(
    client: httpx.Client, path: str = "/v1/loops/samplers", **fields: Any
) -> dict[str, Any]:
    """``POST /samplers`` (no readiness wait: the hosted profile has no status route)."""
    fields.setdefault("session_id", session(client))
    r = client.post(path, json=fields)
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()["sampler"]
    return info


def warm_sampler(client: httpx.Client, info: dict[str, Any]) -> None:
    """Ride out a dedicated sampler's cold start (``2 * COLD`` refusals)."""
    for _ in range(2 * COLD + 1):
        r = client.get(f"{info['base_url']}/health")
        if r.status_code == 200:
            return
        assert r.status_code in (404, 503), r.text
        assert "error_class" not in r.json(), r.text
    raise AssertionError("the sampler never got warm")


def hosted_trainer(client: httpx.Client, **extra: Any) -> Trainer:
    """A run whose cold start is over, initialised (seq 1)."""
    t = Trainer(client, **extra)
    for _ in range(COLD):
        assert_proxy(client.get(t.url("health")), 503)
    assert client.get(t.url("health")).status_code == 200
    body = t.body(1, lora_rank=t.lora_rank, base_model=MODEL)
    for _ in range(COLD):
        assert_proxy(t.post("init_trainer_server", body, key=uuid.uuid4().hex), 404)
    t.init()
    return t


def shared_sample(
    client: httpx.Client,
    info: dict[str, Any],
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> httpx.Response:
    """Submit a shared-sampler /sample and long-poll it to its final answer."""
    fields.setdefault("model", MODEL)
    r = client.post(
        f"{info['base_url']}/sample",
        json=sample_body(**fields),
        headers={"Idempotency-Key": key or uuid.uuid4().hex, **(headers or {})},
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["schema_version"] == 1
    for _ in range(100):
        r = client.get(f"{info['base_url']}/operations/{accepted['operation_id']}")
        if r.status_code != 408:
            assert r.status_code == 200, r.text
            return r
    raise AssertionError("the sample never finished")


def served_version(r: httpx.Response) -> int:
    assert r.json()["status"] == "done", r.text
    return int(r.headers["x-trainers-policy-version"])


def files_of(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    """The presigned URLs of checkpoint ``path``."""
    (ckpt,) = client.get("/v1/loops/checkpoints", params={"checkpoint_path": path}).json()[
        "checkpoints"
    ]
    r = client.get(f"/v1/loops/checkpoints/{ckpt['id']}/files")
    assert r.status_code == 200, r.text
    return list(r.json()["presigned_urls"])


def download(urls: list[dict[str, Any]], target: Path) -> Path:
    """Fetch every file as a client must: no Authorization header, nothing of the API's."""
    target.mkdir(parents=True)
    for item in urls:
        r = httpx.get(item["url"])
        assert r.status_code == 200, r.text
        (target / item["relative_file_name"]).write_bytes(r.content)
    return target


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(directory.rglob("*"))
    }


# --------------------------------------------------------------------------- sampler URLs


def test_sampler_routes_live_under_sync_and_wake_beside_it(
    server: LocalServer, client: httpx.Client
) -> None:
    trainer = hosted_trainer(client)
    paired = create_sampler(client, session_id=trainer.session_id, run_id=trainer.id)
    standalone = create_sampler(client, base_model=MODEL)
    for info in (paired, standalone):
        assert info["base_url"] == f"{server.url}/samplers/{info['id']}/sync"
        assert info["model_id"]
        assert info["deployment_id"]
        warm_sampler(client, info)
        base = info["base_url"]
        r = client.post(f"{base}/sample", json=sample_body())
        assert r.status_code == 200, r.text
        assert r.headers["x-trainers-policy-version"] == "0"
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 3
        assert client.get(f"{base}/v1/models").json()["data"][0] == {"id": MODEL, "parent": None}
        assert client.get(f"{base}/trainers_policy_version").json() == {"policy_version": 0}
        # Not beside /sync: those are the local profile's routes.
        home = base.removesuffix("/sync")
        r = client.post(f"{home}/sample", json=sample_body())
        assert r.status_code == 404
        assert r.json()["error_class"] == "NotFoundError"  # a final "no such route"
        # Wake is beside /sync (strip it, then /wake), never under it.
        r = client.post(f"{home}/wake", json={})
        assert r.status_code == 200
        assert r.json() == {"status": "ACTIVE"}
        assert client.post(f"{base}/wake", json={}).status_code == 404
    # The paired sampler is the same one on every call: no second cold start.
    again = create_sampler(client, session_id=trainer.session_id, run_id=trainer.id)
    assert again["id"] == paired["id"]
    assert client.get(f"{again['base_url']}/health").status_code == 200


def test_a_new_dedicated_sampler_answers_a_cold_start_first(
    server: LocalServer, client: httpx.Client
) -> None:
    info = create_sampler(client, base_model=MODEL)
    base = info["base_url"]
    # Every route under /sync counts: N 404s, then M 503s with Retry-After, no error_class.
    assert_proxy(client.post(f"{base}/sample", json=sample_body()), 404)
    assert_proxy(client.get(f"{base}/health"), 404)
    assert_proxy(client.get(f"{base}/v1/models"), 503)
    assert_proxy(client.post(f"{base}/sample", json=sample_body()), 503)
    r = client.post(f"{base}/sample", json=sample_body())
    assert r.status_code == 200, r.text
    assert client.get(f"{base}/trainers_policy_version").status_code == 200
    # Wake is not behind the replica's proxy: no cold start there, and it spends none.
    fresh = create_sampler(client, base_model=MODEL)
    wake = f"{fresh['base_url'].removesuffix('/sync')}/wake"
    assert client.post(wake, json={}).status_code == 200
    assert_proxy(client.get(f"{fresh['base_url']}/health"), 404)
    # An unknown sampler is a final 404 (it names its class), not a cold start.
    r = client.post("/samplers/sampler-nope/sync/sample", json=sample_body())
    assert r.status_code == 404
    assert r.json()["error_class"] == "NotFoundError"


def test_the_sampler_deployment_status_route_has_no_status(
    server: LocalServer, client: httpx.Client
) -> None:
    info = create_sampler(client, base_model=MODEL)
    warm_sampler(client, info)
    r = client.get(f"/v1/models/{info['model_id']}/deployments/{info['deployment_id']}")
    # "No status here": clients skip this readiness gate instead of failing.
    assert r.status_code == 404
    assert set(r.json()) == {"detail"}


# --------------------------------------------------------------------------- trainer cold start


def test_a_new_trainer_answers_a_cold_start_first(
    server: LocalServer, client: httpx.Client
) -> None:
    t = Trainer(client)
    run = server.state.runs[t.id]
    for _ in range(COLD):
        assert_proxy(client.get(t.url("health"), params={"base_model": MODEL}), 503)
    r = client.get(t.url("health"), params={"base_model": MODEL})
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    # Submits: J 404s without error_class that are neither recorded nor executed.
    body = t.body(1, lora_rank=8, base_model=MODEL)
    for _ in range(COLD):
        assert_proxy(t.post("init_trainer_server", body, key="init-key"), 404)
    assert run.ops.find_key("init-key") is None
    assert run.ops.get("init-key") is None
    assert sum(run.executions.values()) == 0
    # The retry with the same key is admitted and runs once.
    r = t.post("init_trainer_server", body, key="init-key")
    assert r.status_code == 202, r.text
    assert r.json()["operation_id"] == "init-key"
    assert t.result("init-key")["status"] == "done"
    assert run.executions["init_trainer_server"] == 1
    # After the cold start everything is as usual, final answers included.
    t.seq = 1
    assert t.run_op("optim_step", adam_params={})["metrics"]["step"] == 1.0
    assert client.get(t.url("health")).status_code == 200
    r = client.post("/runs/run-nope/forward", json={})
    assert r.status_code == 404
    assert r.json()["error_class"] == "NotFoundError"


def test_no_cold_start_when_the_count_is_zero_and_storage_refuses_the_api_key() -> None:
    key = "hosted-key-42"
    with LocalServer(backend="null", profile="hosted", cold_start_requests=0, api_key=key) as srv:
        auth = {"Authorization": f"Api-Key {key}"}
        with httpx.Client(base_url=srv.url, headers=auth, timeout=30.0) as c:
            t = Trainer(c)
            assert c.get(t.url("health")).status_code == 200
            t.init()
            path = t.run_op("save_state", name="s1")["path"]
            info = create_sampler(c, base_model=MODEL)
            assert c.post(f"{info['base_url']}/sample", json=sample_body()).status_code == 200
            urls = files_of(c, path)
        assert c.is_closed
        assert srv.storage_url is not None
        assert httpx.get(f"{srv.url}/v1/loops/capabilities").status_code == 401
        for item in urls:
            assert item["url"].startswith(f"{srv.storage_url}/files/")
            assert httpx.get(item["url"]).status_code == 200  # its own credential
            r = httpx.get(item["url"], headers=auth)  # the client's default headers: refused
            assert r.status_code == 400
            assert "only one auth mechanism allowed" in r.json()["detail"].lower()


# --------------------------------------------------------------------------- presigned storage


def test_presigned_storage_is_another_origin_that_refuses_authorization(
    server: LocalServer, client: httpx.Client
) -> None:
    t = hosted_trainer(client)
    t.run_op("optim_step", adam_params={})
    path = t.run_op("save_state", name="ckpt")["path"]
    urls = files_of(client, path)
    storage = server.storage_url
    assert storage is not None
    api, files = httpx.URL(server.url), httpx.URL(storage)
    assert files.host == "127.0.0.1"
    assert files.port != api.port  # another origin
    directory = server.data_dir / "runs" / t.id / "weights" / "ckpt"
    assert {u["relative_file_name"] for u in urls} == {
        p.name for p in directory.iterdir() if p.name != "checkpoint.json"
    }
    for item in urls:
        assert item["url"].startswith(f"{storage}/files/")
        r = httpx.get(item["url"])
        assert r.status_code == 200
        assert r.content == (directory / item["relative_file_name"]).read_bytes()
        for value in ("Api-Key k", "Bearer t", "AWS4-HMAC-SHA256 Credential=x"):
            r = httpx.get(item["url"], headers={"Authorization": value})
            assert r.status_code == 400
            body = r.json()
            assert ONE_AUTH_MECHANISM in body["detail"]
            assert body["error_class"] == "InvalidArgument"
    token = urls[0]["url"].rsplit("/", 1)[1]
    r = httpx.get(f"{storage}/files/{token[:-2]}xx")
    assert r.status_code == 404
    assert "detail" in r.json()
    # Storage serves files only; the API is not reachable there.
    r = httpx.get(f"{storage}/v1/loops/capabilities")
    assert r.status_code == 404
    assert "detail" in r.json()
    assert httpx.post(urls[0]["url"]).status_code == 405


# --------------------------------------------------------------------------- shared samplers


def test_shared_sampler_speaks_the_operation_protocol(
    server: LocalServer, client: httpx.Client
) -> None:
    t = hosted_trainer(client)
    for path in ("/v1/loops/debug/samplers", "/v1/teams/local/loops/samplers"):
        info = create_sampler(
            client, path, session_id=t.session_id, run_id=t.id, scope="serverless"
        )
        assert info["model_id"] is None
        assert info["deployment_id"] is None
        assert info["base_url"].endswith("/sync")
    # Paired shared samplers are one per run, separate from the dedicated one.
    dedicated = create_sampler(client, session_id=t.session_id, run_id=t.id)
    assert dedicated["id"] != info["id"]
    assert dedicated["model_id"] is not None
    standalone = create_sampler(
        client, "/v1/loops/debug/samplers", base_model=MODEL, scope="serverless", debug_version="7"
    )
    for shared in (info, standalone):
        base = shared["base_url"]
        # No cold start: shared capacity is warm.
        r = client.post(
            f"{base}/sample",
            json=sample_body(model=MODEL),
            headers={"Idempotency-Key": "same-key", "X-Run-Id": t.id}
            if shared is info
            else {"Idempotency-Key": "same-key"},
        )
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted == {"operation_id": "same-key", "schema_version": 1}
        assert r.headers["location"] == "/operations/same-key"
        # A retry with the same key is the same operation (it never samples twice).
        again = client.post(
            f"{base}/sample", json=sample_body(model=MODEL), headers={"Idempotency-Key": "same-key"}
        )
        assert again.status_code == 202
        assert again.json() == accepted
        # The key is bound to its request: another body under it is refused.
        other = client.post(
            f"{base}/sample",
            json=sample_body(model=MODEL, max_tokens=2),
            headers={"Idempotency-Key": "same-key"},
        )
        assert other.status_code == 422, other.text
        assert "Idempotency-Key" in other.json()["detail"]
        ops = server.state.samplers.samplers[shared["id"]].operations
        assert ops is not None
        assert len(list(ops)) == 1
        r = client.get(f"{base}/operations/same-key")
        assert r.status_code == 200
        assert r.headers["x-trainers-policy-version"] == "0"
        envelope = r.json()
        assert envelope["status"] == "done"
        choice = envelope["result"]["choices"][0]
        assert choice["logprobs"]["tokens"] == ["token_id:10"] * 3
        assert choice["logprobs"]["token_logprobs"] == [0.0] * 3
        # Cancel: too late once done (409); unknown ids are a final 404.
        assert client.post(f"{base}/operations/same-key/cancel", json={}).status_code == 409
        r = client.get(f"{base}/operations/nope")
        assert r.status_code == 404
        assert r.json()["error_class"] == "NotFoundError"
        assert client.post(f"{base}/operations/nope/cancel", json={}).status_code == 404
        # Without a key every submit is a new operation.
        ids = {
            client.post(f"{base}/sample", json=sample_body(model=MODEL)).json()["operation_id"]
            for _ in range(2)
        }
        assert len(ids) == 2
        # Bad input is a 422 at submit time, naming the field.
        assert_422(client.post(f"{base}/sample", json=sample_body()), "model")
        assert_422(client.post(f"{base}/sample", json=sample_body(model="other/model")), "model")
        assert_422(
            client.post(f"{base}/sample", json=sample_body(model=MODEL, lora="s3://x/y")), "lora"
        )
        assert_422(client.post(f"{base}/sample", json=sample_body(model=MODEL, lora=7)), "lora")
        nope = f"bt://loops:{t.id}/sampler_weights/never-saved"
        assert_422(client.post(f"{base}/sample", json=sample_body(model=MODEL, lora=nope)), "lora")
        assert_422(client.post(f"{base}/sample", json=sample_body(model=MODEL, n=0)), "n")
    # A dedicated sampler's /sample answers at once and refuses the shared-only ``lora``.
    warm_sampler(client, dedicated)
    r = client.post(f"{dedicated['base_url']}/sample", json=sample_body(lora=nope))
    assert_422(r, "lora")
    r = client.get(f"{dedicated['base_url']}/operations/same-key")
    assert r.status_code == 404


def test_shared_sampler_caches_adapters_by_name(server: LocalServer, client: httpx.Client) -> None:
    t = hosted_trainer(client)
    info = create_sampler(client, session_id=t.session_id, run_id=t.id, scope="serverless")
    assert served_version(shared_sample(client, info)) == 0  # no lora: the base model
    t.run_op("optim_step", adam_params={})
    first = t.run_op("save_weights_for_sampler", name="pub", bump_version=True)
    assert first["version"] == 1
    assert served_version(shared_sample(client, info, lora=first["path"])) == 1

    # Published again under the same name: the shared sampler keeps the first weights ...
    t.run_op("optim_step", adam_params={})
    second = t.run_op("save_weights_for_sampler", name="pub", bump_version=True)
    assert (second["version"], second["path"]) == (2, first["path"])
    assert served_version(shared_sample(client, info, lora=first["path"])) == 1
    # ... by name, whichever way the request names it (X-Checkpoint-Path alone too) ...
    header = {"X-Checkpoint-Path": first["path"]}
    assert served_version(shared_sample(client, info, headers=header)) == 1
    # ... while a dedicated sampler pinned to the path serves what is saved there now.
    dedicated = create_sampler(client, base_model=MODEL)
    warm_sampler(client, dedicated)
    r = client.post(f"{dedicated['base_url']}/sample", json=sample_body(), headers=header)
    assert r.headers["x-trainers-policy-version"] == "2"
    # A unique name is the way to get new weights to a shared sampler.
    third = t.run_op("save_weights_for_sampler", name="pub-2", bump_version=True)
    assert served_version(shared_sample(client, info, lora=third["path"])) == 2
    # The cache holds its own copy of the first adapter files.
    cache = server.data_dir / ".shared-sampler-cache" / info["id"]
    (copy,) = (p for p in cache.iterdir() if p.name.startswith(f"{t.id}.pub."))
    assert len(list(cache.iterdir())) == 2
    assert {p.name for p in copy.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # lora and X-Checkpoint-Path must agree when both are given.
    r = client.post(
        f"{info['base_url']}/sample",
        json=sample_body(model=MODEL, lora=third["path"]),
        headers=header,
    )
    assert_422(r, "lora", "X-Checkpoint-Path")


def test_shared_samplers_setting_long_polls_and_cancel() -> None:
    with (
        LocalServer(
            backend="null", shared_samplers=True, null_sample_delay=1.0, poll_hold=0.2
        ) as srv,
        httpx.Client(base_url=srv.url, timeout=30.0) as c,
    ):
        t = Trainer(c)
        t.init()
        paired = create_sampler(c, session_id=t.session_id, run_id=t.id)
        standalone = create_sampler(c, base_model=MODEL)
        for info in (paired, standalone):
            # Every sampler is shared; the local profile keeps its URLs (no /sync).
            assert (info["model_id"], info["deployment_id"]) == (None, None)
            assert info["base_url"] == f"{srv.url}/samplers/{info['id']}"
        base = standalone["base_url"]
        r = c.post(f"{base}/sample", json=sample_body(model=MODEL))
        assert r.status_code == 202
        op = r.json()["operation_id"]
        r = c.get(f"{base}/operations/{op}")
        assert r.status_code == 408  # still sampling after the hold: poll again at once
        r = c.post(f"{base}/operations/{op}/cancel", json={})
        assert r.status_code == 200
        assert r.json() == {"operation_id": op, "status": "cancelled"}
        assert c.post(f"{base}/operations/{op}/cancel", json={}).status_code == 200
        r = c.get(f"{base}/operations/{op}")
        assert r.status_code == 200
        envelope = r.json()
        assert envelope["status"] == "error"
        assert envelope["error_class"] == "OperationCancelled"
        # One that runs to its end.
        start = time.monotonic()
        r = shared_sample(c, paired, headers={"X-Run-Id": t.id})
        assert r.json()["status"] == "done"
        assert time.monotonic() - start >= 0.9
        assert_422(
            c.post(
                f"{paired['base_url']}/sample",
                json=sample_body(model=MODEL),
                headers={"X-Run-Id": "run-other"},
            ),
            "X-Run-Id",
        )


def test_shared_sampler_serves_stale_weights_for_a_reused_name(
    torch_server: LocalServer,
) -> None:
    """With real weights: the shared sampler's answer for a re-published name equals its
    answer for the first publish, while a dedicated sampler serves the new weights."""
    fast = {"learning_rate": 3e-3}
    batch = msgspec.json.decode(encode(list(sft_batch(2))))
    with httpx.Client(base_url=torch_server.url, timeout=120.0) as c:
        t = Trainer(c, lora_rank=4, seed=21)
        t.init()

        def train(steps: int) -> None:
            for _ in range(steps):
                t.submit("forward_backward", data=batch, loss_fn="cross_entropy")
                last = t.submit("optim_step", adam_params=fast)
            assert t.result(last)["status"] == "done"

        def logprobs(r: httpx.Response) -> list[float]:
            result = r.json()
            if "status" in result:
                assert result["status"] == "done", result
                result = result["result"]
            return list(result["choices"][0]["logprobs"]["token_logprobs"])

        shared = create_sampler(c, session_id=t.session_id, run_id=t.id, scope="serverless")
        dedicated = create_sampler(c, base_model=MODEL)
        fields: dict[str, Any] = {"seed": 5, "max_tokens": 6, "prompt": [1, 40, 41, 42]}
        train(3)
        path = t.run_op("save_weights_for_sampler", name="pub", bump_version=False)["path"]
        first = logprobs(shared_sample(c, shared, lora=path, **fields))
        train(5)
        again = t.run_op("save_weights_for_sampler", name="pub", bump_version=False)
        assert again["path"] == path
        stale = logprobs(shared_sample(c, shared, lora=path, **fields))
        assert stale == first
        for _ in range(600):  # the standalone sampler's engine may still be loading
            r = c.post(
                f"{dedicated['base_url']}/sample",
                json=sample_body(**fields),
                headers={"X-Checkpoint-Path": path},
            )
            if r.status_code == 200:
                break
            time.sleep(0.05)
        fresh = logprobs(r)
        assert fresh != first
        renamed = t.run_op("save_weights_for_sampler", name="pub-new", bump_version=False)
        assert logprobs(shared_sample(c, shared, lora=renamed["path"], **fields)) == fresh


# --------------------------------------------------------------------------- control plane


def test_debug_routes_and_extra_trainer_fields(server: LocalServer, client: httpx.Client) -> None:
    sid = session(client)
    for path in ("/v1/loops/debug/trainers", "/v1/teams/local/loops/debug/trainers"):
        r = client.post(
            path,
            json={
                "session_id": sid,
                "base_model": MODEL,
                "lora_rank": 4,
                "replicas": 1,
                "availability_model": "dedicated",
                "scope": "serverless",
                "debug_version": "v-debug",
                "reuse_from_session_id": "session-older",
            },
        )
        assert r.status_code == 200, r.text
        run = r.json()["run"]
        assert run["base_url"] == f"{server.url}/runs/{run['id']}"
    assert client.post("/v1/teams/other/loops/debug/trainers", json={}).status_code == 404
    assert_422(client.post("/v1/loops/debug/samplers", json={"session_id": sid}), "base_model")
    assert client.get("/").json()["profile"] == "hosted"


# --------------------------------------------------------------------------- results without path


def test_omit_result_paths() -> None:
    with (
        LocalServer(backend="null", omit_result_paths=True) as srv,
        httpx.Client(base_url=srv.url, timeout=30.0) as c,
    ):
        t = Trainer(c)
        t.init()
        t.run_op("optim_step", adam_params={})
        assert t.run_op("save_state", name="s") == {"mode": "with_optimizer"}
        assert t.run_op("save_weights_for_sampler", name="p", bump_version=True) == {"version": 1}
        # Saved where a client derives the paths to be.
        for kind, name in (("weights", "s"), ("sampler_weights", "p")):
            derived = f"bt://loops:{t.id}/{kind}/{name}"
            r = c.get("/v1/loops/checkpoints", params={"checkpoint_path": derived})
            assert len(r.json()["checkpoints"]) == 1
        assert t.run_op("load_state", path=f"bt://loops:{t.id}/weights/s")["step"] == 0


# --------------------------------------------------------------------------- load from local dirs


def test_load_state_from_a_local_directory(
    server: LocalServer, client: httpx.Client, tmp_path: Path
) -> None:
    source = hosted_trainer(client)
    for _ in range(3):
        source.run_op("optim_step", adam_params={})
    path = source.run_op("save_state", name="three")["path"]
    sampler_path = source.run_op("save_weights_for_sampler", name="pub", bump_version=False)["path"]
    ckpt = download(files_of(client, path), tmp_path / "my ckpt")
    adapter_only = download(files_of(client, sampler_path), tmp_path / "adapter-only")
    before = {d: snapshot(d) for d in (ckpt, adapter_only)}

    t = hosted_trainer(client)
    # A plain absolute path and a file:// URL (percent-encoded), with and without optimizer.
    out = t.run_op("load_state_with_optimizer", path=str(ckpt))
    assert out == {"step": 3, "path": str(ckpt)}
    assert client.get(t.url("policy_version")).json() == {"policy_version": 3}
    uri = ckpt.as_uri()
    assert "%20" in uri
    assert t.run_op("load_state_with_optimizer", path=uri)["step"] == 3
    assert t.run_op("load_state", path=uri)["step"] == 0
    assert t.run_op("load_state", path=str(adapter_only))["step"] == 0
    assert t.run_op("load_state", path=f"file://localhost{adapter_only}")["step"] == 0
    # Only read, never written.
    assert {d: snapshot(d) for d in (ckpt, adapter_only)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-only", "my ckpt"]

    def rejected(op: str, value: str, *needles: str) -> None:
        body = t.body(path=value)
        r = t.post(op, body, key=uuid.uuid4().hex)
        assert_422(r, "path", *needles)

    rejected("load_state_with_optimizer", str(adapter_only), "holds no optimizer state")
    rejected(
        "load_state",
        "s3://bucket/runs/x/weights/y",
        "s3:// checkpoints are not available on the local server; download it and pass a "
        "local path",
    )
    rejected("load_state", str(tmp_path / "missing"), "not an existing directory")
    rejected("load_state", f"file://{tmp_path / 'missing'}", "not an existing directory")
    rejected("load_state", "relative/dir", "absolute")
    rejected("load_state", "file://otherhost/dir", "file URI")
    rejected("load_state", "gs://bucket/x", "unsupported scheme")
    rejected("load_state", str(tmp_path), "holds no adapter_config.json")
    rejected("load_state", str(ckpt / "adapter_config.json"), "not an existing directory")
    bad = tmp_path / "bad-config"
    shutil.copytree(ckpt, bad)
    (bad / "adapter_config.json").write_text("[1, 2]")
    rejected("load_state", str(bad), "JSON object")
    (bad / "adapter_config.json").write_text('{"r": 0}')
    rejected("load_state", str(bad), "rank")
    (bad / "adapter_config.json").write_text('{"r": 8, "base_model_name_or_path": "other/llm"}')
    rejected("load_state", str(bad), "trained on base model")
    os.chmod(bad / "adapter_config.json", 0o000)
    try:
        if not os.access(bad / "adapter_config.json", os.R_OK):  # not when running as root
            rejected("load_state", str(bad), "cannot read")
    finally:
        os.chmod(bad / "adapter_config.json", 0o644)
    # The trainer still works after all that.
    assert client.get(t.url("health")).status_code == 200


# --------------------------------------------------------------------------- local profile


def test_the_local_profile_is_unchanged(null_server: LocalServer, tmp_path: Path) -> None:
    srv = null_server
    assert srv.settings.profile == "local"
    assert srv.storage_url is None
    with httpx.Client(base_url=srv.url, timeout=30.0) as c:
        assert c.get("/").json()["profile"] == "local"
        t = Trainer(c)  # no cold start: health and the first submit answer at once
        assert c.get(t.url("health")).status_code == 200
        t.init()
        saved = t.run_op("save_state", name="s")
        assert saved["path"] == f"bt://loops:{t.id}/weights/s"
        info = create_sampler(c, base_model=MODEL)
        assert info["base_url"] == f"{srv.url}/samplers/{info['id']}"
        assert info["model_id"]
        assert info["deployment_id"]
        r = c.get(f"/v1/models/{info['model_id']}/deployments/{info['deployment_id']}")
        assert r.status_code == 200
        assert r.json()["status"] in ("DEPLOYING", "ACTIVE")
        r = c.post(f"{info['base_url']}/sample", json=sample_body())
        assert r.status_code == 200
        assert c.post(f"{info['base_url']}/sync/sample", json=sample_body()).status_code == 404
        # Files are on the API's own port; a stray Authorization header is harmless there.
        for item in files_of(c, saved["path"]):
            assert item["url"].startswith(f"{srv.url}/files/")
            r = c.get(item["url"], headers={"Authorization": "Api-Key whatever"})
            assert r.status_code == 200
        # load_state from a local directory works in both profiles.
        ckpt = download(files_of(c, saved["path"]), tmp_path / "ckpt")
        assert t.run_op("load_state_with_optimizer", path=ckpt.as_uri())["step"] == 0


# --------------------------------------------------------------------------- settings and CLI


def test_hosted_settings_from_env_and_validation() -> None:
    env = {
        "LOOPS_ASYNC_PROFILE": "hosted",
        "LOOPS_ASYNC_COLD_START_REQUESTS": "5",
        "LOOPS_ASYNC_COLD_START_RETRY_AFTER": "0.25",
        "LOOPS_ASYNC_STORAGE_PORT": "9100",
        "LOOPS_ASYNC_SHARED_SAMPLERS": "yes",
        "LOOPS_ASYNC_OMIT_RESULT_PATHS": "0",
    }
    s = ServerSettings.from_env(env)
    assert (s.profile, s.cold_start_requests, s.cold_start_retry_after, s.storage_port) == (
        "hosted",
        5,
        0.25,
        9100,
    )
    assert (s.shared_samplers, s.omit_result_paths) == (True, False)
    defaults = ServerSettings()
    assert (defaults.profile, defaults.cold_start_requests, defaults.cold_start_retry_after) == (
        "local",
        2,
        1.0,
    )
    assert (defaults.shared_samplers, defaults.omit_result_paths, defaults.storage_port) == (
        False,
        False,
        0,
    )
    with pytest.raises(ValueError, match="LOOPS_ASYNC_SHARED_SAMPLERS"):
        ServerSettings.from_env({"LOOPS_ASYNC_SHARED_SAMPLERS": "maybe"})
    with pytest.raises(ValueError, match="profile"):
        ServerSettings(profile="cloud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cold_start_requests"):
        ServerSettings(cold_start_requests=-1)
    with pytest.raises(ValueError, match="cold_start_retry_after"):
        ServerSettings(cold_start_retry_after=float("nan"))
    with pytest.raises(ValueError, match="storage_port"):
        ServerSettings(storage_port=70000)
    with pytest.raises(ValueError, match="shared_samplers"):
        ServerSettings(shared_samplers="yes")  # type: ignore[arg-type]


def test_cli_serve_hosted_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from loops_async.server import local

    seen: list[ServerSettings] = []
    monkeypatch.setattr(local, "serve", seen.append)
    argv = [
        "serve",
        "--backend",
        "null",
        "--profile",
        "hosted",
        "--cold-start-requests",
        "0",
        "--cold-start-retry-after",
        "0.5",
        "--storage-port",
        "0",
        "--shared-samplers",
        "--omit-result-paths",
    ]
    assert cli.main(argv) == 0
    (s,) = seen
    assert (s.profile, s.cold_start_requests, s.cold_start_retry_after, s.storage_port) == (
        "hosted",
        0,
        0.5,
        0,
    )
    assert (s.shared_samplers, s.omit_result_paths) == (True, True)
    monkeypatch.setenv("LOOPS_ASYNC_PROFILE", "hosted")
    assert cli.main(["serve", "--backend", "null"]) == 0
    assert (seen[1].profile, seen[1].shared_samplers) == ("hosted", False)
    assert cli.main(["serve", "--profile", "local"]) == 0
    assert seen[2].profile == "local"
