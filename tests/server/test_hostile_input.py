"""Hostile and malformed input against the local server over real HTTP, and the client's
answers to bad input.

The rules: bad input gets a 4xx (422 ``{"detail", "error_class": "ValidationError"}`` naming the
field), never a 5xx, a crash or a hang; the server keeps serving afterwards; no user-supplied
name becomes a path outside the data directory; the API key never shows up in reprs, exception
messages or log records.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from loops_async import AdamParams, Datum, ModelInput, ServiceClient, TensorData, errors
from loops_async.server import LocalServer

from ._http import MODEL, Trainer, assert_422, datum


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """A null server with a short hold and gap timeout (gaps are skipped quickly)."""
    with LocalServer(backend="null", poll_hold=1.0, seq_gap_timeout=0.2) as srv:
        yield srv


def _serving(trainer: Trainer) -> None:
    """The run still answers health and still runs operations."""
    assert trainer.client.get(trainer.url("health")).status_code == 200
    assert trainer.run_op("forward", data=[datum([1, 2, 3])])["loss"] == 0.0


def _raw(trainer: Trainer, op: str, body: bytes | str, **headers: str) -> httpx.Response:
    return trainer.client.post(
        trainer.url(op),
        content=body,
        headers={
            "X-Run-Id": trainer.id,
            "Idempotency-Key": uuid.uuid4().hex,
            "Content-Type": "application/json",
            **headers,
        },
    )


def _fwd(trainer: Trainer, *data: dict[str, Any], op: str = "forward", **fields: Any) -> Any:
    """Submit a forward with the next seq_id without consuming it (the request is expected to
    be rejected)."""
    return trainer.post(op, trainer.body(trainer.seq + 1, data=list(data), **fields))


def _td(data: list[Any], dtype: str = "float32", shape: list[int] | None = None) -> Any:
    return {"data": data, "dtype": dtype, "shape": [len(data)] if shape is None else shape}


def _datum(tokens: list[int], **inputs: Any) -> dict[str, Any]:
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": inputs,
    }


def _wait(trainer: Trainer, op_id: str, seconds: float = 5.0) -> httpx.Response:
    """Poll until the operation answers 200 (bounded: a 408 forever is a hang)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = trainer.poll(op_id)
        if r.status_code != 408:
            return r
    raise AssertionError(f"operation {op_id} never finished (408 for {seconds} s)")


# --------------------------------------------------------------------------- JSON itself


def test_malformed_json_is_422(trainer: Trainer) -> None:
    for body in (
        b'{"seq_id": NaN, "run_id": null, "model": "m"}',
        b'{"seq_id": Infinity, "run_id": null, "model": "m"}',
        b"",
        b"null",
        b"[]",
        b'{"seq_id": 2, "run_id": "\xff\xfe", "model": "m"}',
        json.dumps({"seq_id": 2}).encode("utf-16"),
    ):
        r = _raw(trainer, "optim_step", body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error_class"] == "ValidationError"
    _serving(trainer)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deeply_nested_json_is_422(trainer: Trainer, client: httpx.Client, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    body = b'{"seq_id": 2, "run_id": null, "model": "m", "loss_fn_config": {"a": ' + nested + b"}}"
    assert_422(_raw(trainer, "forward", body), "nested")
    obj = b'{"a": ' * depth + b"1" + b"}" * depth
    r = client.post(
        "/v1/loops/trainers",
        content=b'{"session_id": "s", "base_model": "m", "lora_rank": 1, "x": ' + obj + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert_422(r, "nested")
    _serving(trainer)


def test_wrong_content_types_are_415(trainer: Trainer) -> None:
    # What a web page can POST without a CORS preflight is refused before it is read (a 415,
    # never a 5xx); a JSON type with parameters is fine, and garbage declared JSON is a 422.
    for ctype in (
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        r = trainer.post(
            "optim_step",
            trainer.body(trainer.seq + 1, adam_params={}),
            headers={"Content-Type": ctype},
        )
        assert r.status_code == 415, r.text
        assert r.json()["error_class"] == "UnsupportedMediaTypeError"
    r = trainer.post(
        "optim_step",
        trainer.body(adam_params={}),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 202, r.text
    assert _wait(trainer, r.json()["operation_id"]).json()["status"] == "done"
    assert_422(_raw(trainer, "optim_step", b"a=1&b=2"), "not valid JSON")
    _serving(trainer)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("seq_id", ["9223372036854775808", "1" + "0" * 400])
def test_seq_id_beyond_int64_is_422(trainer: Trainer, seq_id: str) -> None:
    body = json.dumps(trainer.body(trainer.seq + 1, adam_params={}))
    body = body.replace(f'"seq_id": {trainer.seq + 1}', f'"seq_id": {seq_id}')
    assert_422(_raw(trainer, "optim_step", body), "seq_id")
    _serving(trainer)


def test_huge_seq_gap_is_skipped_without_materialising_it(
    trainer: Trainer, server: LocalServer
) -> None:
    # A seq_id far ahead leaves a gap of ~10**6 missing seq_ids: the executor must skip it in
    # O(1), not build a list of every missing id (that ran out of memory and killed the run).
    # Beyond max_seq_ahead (10**6) a seq_id is refused outright: it would wedge the run.
    run = server.state.runs[trainer.id]
    assert_422(trainer.post("optim_step", trainer.body(2**62, adam_params={})), "seq_id")
    big = run.ops.next_seq + server.settings.max_seq_ahead
    op = trainer.submit("optim_step", seq_id=big, adam_params={})
    assert _wait(trainer, op).json()["status"] == "done"
    assert run.status == "ACTIVE"
    assert run.ops.next_seq == big + 1
    assert len(run.ops.skipped_seqs) <= 1000
    assert run.ops.skipped_seqs[-1] == big - 1
    trainer.seq = big
    _serving(trainer)


def test_huge_ttl_is_422(trainer: Trainer) -> None:
    for op, extra in (("save_state", {}), ("save_weights_for_sampler", {"bump_version": False})):
        body = json.dumps(trainer.body(trainer.seq + 1, name="ok", ttl_seconds=7, **extra))
        body = body.replace('"ttl_seconds": 7', '"ttl_seconds": ' + "9" * 30)
        assert_422(_raw(trainer, op, body), "ttl_seconds")
    _serving(trainer)


def test_out_of_range_numbers(trainer: Trainer) -> None:
    body = json.dumps(trainer.body(trainer.seq + 1, adam_params={"learning_rate": 1.5}))
    assert_422(_raw(trainer, "optim_step", body.replace("1.5", "1e400")), "learning_rate")
    assert_422(_raw(trainer, "optim_step", body.replace("1.5", "9" * 400)), "learning_rate")
    assert_422(
        trainer.post("init_trainer_server", trainer.body(1, lora_rank=2**70, base_model=MODEL)),
        "lora_rank",
    )
    for top_k in (-1, 21, 2**64):
        assert_422(_fwd(trainer, datum([1, 2]), top_k_logprobs=top_k), "top_k_logprobs")
    for top_k in (True, None, 1.5, "3"):
        assert_422(_fwd(trainer, datum([1, 2]), top_k_logprobs=top_k), "top_k_logprobs")
    _serving(trainer)


@pytest.mark.parametrize(
    ("loss_fn", "config", "field"),
    [
        ("ppo", {"clip_low_threshold": 0.0, "clip_high_threshold": 1e308}, "clip_high_threshold"),
        ("dro", {"beta": 1e300}, "beta"),
        ("dpo", {"beta": 1e39}, "beta"),
        ("dppo", {"kl_tau": 3.5e38}, "kl_tau"),
        ("dppo", {"adv_tau": 10**400}, "adv_tau"),
        ("cross_entropy", {"skip_token_normalization": 1}, "skip_token_normalization"),
        ("cross_entropy", {"skip_token_normalization": {"a": [1]}}, "skip_token_normalization"),
        ("ppo", {"clip_low_threshold": "0.1"}, "clip_low_threshold"),
        ("cross_entropy", {"nope": 1}, "nope"),
    ],
)
def test_loss_fn_config_values(
    trainer: Trainer, loss_fn: str, config: dict[str, Any], field: str
) -> None:
    # Config numbers must fit the trainer's float32 arithmetic: 1e308 used to reach torch and
    # fail there with "value cannot be converted to type float without overflow".
    rl = _datum([1, 2, 3], logprobs=_td([-1.0, -1.0, -1.0]), advantages=_td([1.0, 1.0, 1.0]))
    ref = _datum([1, 2], target_tokens=_td([2, 3], "int64"), ref_logprobs=_td([-1.0, -1.0]))
    data = {"cross_entropy": [datum([1, 2])], "dpo": [ref, ref]}.get(loss_fn, [rl])
    r = _fwd(trainer, *data, loss_fn=loss_fn, loss_fn_config=config)
    assert_422(r, "loss_fn_config", field)


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "tensor",
    [
        _td([], "int64", [2**63 - 1, 0]),
        _td([], "int64", [2**70, 0]),
        _td([], "int64", [0, 2**62, 2**62]),
        _td([1], "int64", [1] * 100),
        _td([1, 2], "int64", [-1, -2]),
        _td([1, 2], "int64", [2**62, 2**62]),
        _td([1, 2], "int64", []),
        _td([1, 2], "float32", [2]),
        _td([True, False], "bool", [2]),
        _td([1, 2], "complex128", [2]),
        _td([1.5, 2], "int64", [2]),
        _td([None, 2], "int64", [2]),
        _td([1e300, 2], "int64", [2]),
        _td([2**70, 2], "int64", [2]),
        _td([-(2**70), 2], "int64", [2]),
        _td([4096, 2], "int64", [2]),
        _td([1, 2, 3], "int64", [3]),
    ],
)
def test_bad_target_tokens(trainer: Trainer, tensor: dict[str, Any]) -> None:
    r = _fwd(trainer, _datum([1, 2], target_tokens=tensor))
    assert_422(r, "data[0].loss_fn_inputs['target_tokens']")


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1e300, "float32"),
        (1e300, "float16"),
        (-1e300, "bfloat16"),
        (1e39, "float32"),
        (None, "float32"),
    ],
)
def test_non_finite_float_inputs(trainer: Trainer, value: Any, dtype: str) -> None:
    # 1e300 does not fit float32: it must be a 422 naming the input, without a numpy overflow
    # warning (which the test suite turns into an exception, i.e. a 500).
    r = _fwd(
        trainer, _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([value, 1], dtype))
    )
    assert_422(r, "data[0].loss_fn_inputs['weights']", "non-finite")
    rl = _datum([1, 2], logprobs=_td([-1.0, -1.0]), advantages=_td([value, 1.0], dtype))
    assert_422(_fwd(trainer, rl, loss_fn="ppo"), "advantages")


def test_float16_bfloat16_bool_and_int_float_inputs_are_accepted(trainer: Trainer) -> None:
    for dtype, weights in (
        ("float16", [1.0, 0.5]),
        ("bfloat16", [1.0, 0.5]),
        ("float64", [1.0, 0.5]),
        ("bool", [True, False]),
        ("int32", [1, 0]),
    ):
        out = trainer.run_op(
            "forward",
            data=[_datum([1, 2], target_tokens=_td([2, 3], "int32"), weights=_td(weights, dtype))],
        )
        assert out["loss_fn_outputs"][0]["logprobs"]["shape"] == [2]


@pytest.mark.parametrize(
    ("loss_fn", "inputs", "needle"),
    [
        ("cross_entropy", {}, "missing 'target_tokens'"),
        ("cross_entropy", {"target_tokens": _td([2], "int64")}, "first dimension 1"),
        (
            "cross_entropy",
            {"target_tokens": _td([2, 3], "int64"), "weights": _td([1.0])},
            "weights",
        ),
        ("cross_entropy", {"target_tokens": _td([2, 3], "int64"), "weight": _td([1, 1])}, "weight"),
        ("importance_sampling", {"logprobs": _td([-1.0, -1.0])}, "missing 'advantages'"),
        ("ppo", {"advantages": _td([1.0, 1.0])}, "missing 'logprobs'"),
        ("cispo", {"logprobs": _td([-1.0, -1.0]), "advantages": _td([1.0])}, "advantages"),
        (
            "dro",
            {"logprobs": _td([-1.0] * 4, shape=[2, 2]), "advantages": _td([1.0] * 4, shape=[2, 2])},
            "logprobs",
        ),
        ("dppo", {"logprobs": _td([None, -1.0]), "advantages": _td([1.0, 1.0])}, "logprobs"),
        ("dpo", {"target_tokens": _td([2, 3], "int64")}, "missing 'ref_logprobs'"),
        (
            "dpo",
            {"target_tokens": _td([2, 3], "int64"), "ref_logprobs": _td([None, -1.0])},
            "ref_logprobs",
        ),
    ],
)
def test_every_loss_fn_with_missing_or_ill_shaped_inputs(
    trainer: Trainer, loss_fn: str, inputs: dict[str, Any], needle: str
) -> None:
    d = _datum([1, 2], **inputs)
    data = [d, d] if loss_fn == "dpo" else [d]
    assert_422(_fwd(trainer, *data, loss_fn=loss_fn), "data[0].loss_fn_inputs", needle)


def test_dpo_needs_pairs(trainer: Trainer) -> None:
    d = _datum([1, 2], target_tokens=_td([2, 3], "int64"), ref_logprobs=_td([-1.0, -1.0]))
    assert_422(_fwd(trainer, d, loss_fn="dpo"), "data", "even number")
    assert_422(_fwd(trainer, d, d, d, loss_fn="dpo"), "data", "even number")


def test_chunks(trainer: Trainer) -> None:
    def chunks(*cs: dict[str, Any], n: int = 2) -> Any:
        d = {"model_input": {"chunks": list(cs)}, "loss_fn_inputs": {}}
        d["loss_fn_inputs"]["target_tokens"] = _td([1] * n, "int64")
        return _fwd(trainer, d)

    text = {"type": "encoded_text", "tokens": [1, 2]}
    image = {"type": "image", "data": "iVBORw0KGgo=", "format": "png", "expected_tokens": 2}
    assert_422(chunks(), "model_input", "empty")
    assert_422(chunks({"type": "encoded_text", "tokens": []}), "model_input", "0 tokens")
    assert_422(chunks(image), "chunks[0]", "image")
    assert_422(chunks(text, image, n=4), "chunks[1]", "image")
    assert_422(chunks({**image, "data": "!!not base64"}), "chunks[0].data")
    assert_422(chunks({**image, "format": "gif"}), "chunks[0].format")
    assert_422(chunks({**image, "expected_tokens": 2**70}), "chunks[0]")
    assert_422(chunks({"type": "video", "tokens": [1]}), "chunks[0].type")
    assert_422(chunks({"tokens": [1, 2]}), "chunks[0]")
    assert_422(chunks({"type": "encoded_text", "tokens": [1, 2.5]}), "tokens")
    assert_422(chunks({"type": "encoded_text", "tokens": [1, 2**70]}), "tokens")
    assert_422(chunks({"type": "encoded_text", "tokens": [-1, 2]}), "tokens")
    assert_422(chunks({"type": "encoded_text", "tokens": [1, "2"]}), "tokens")
    # An empty chunk next to a real one is fine.
    out = trainer.run_op(
        "forward",
        data=[
            {
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": []}, text]},
                "loss_fn_inputs": {"target_tokens": _td([2, 3], "int64")},
            }
        ],
    )
    assert out["loss_fn_outputs"][0]["logprobs"]["shape"] == [2]


def test_wrong_json_types_everywhere(trainer: Trainer) -> None:
    good = datum([1, 2])
    for fields, needle in (
        ({"data": "x"}, "data"),
        ({"data": [1]}, "data[0]"),
        ({"data": [{}]}, "model_input"),
        ({"data": [{**good, "model_input": None}]}, "model_input"),
        ({"data": [{**good, "loss_fn_inputs": None}]}, "loss_fn_inputs"),
        ({"data": [{**good, "loss_fn_inputs": {"target_tokens": [1, 2]}}]}, "loss_fn_inputs"),
        ({"data": [good], "loss_fn": None}, "loss_fn"),
        ({"data": [good], "loss_fn": 3}, "loss_fn"),
        ({"data": [good], "loss_fn": "__class__"}, "loss_fn"),
        ({"data": [good], "loss_fn_config": []}, "loss_fn_config"),
        ({"data": [good], "loss_fn_config": "x"}, "loss_fn_config"),
    ):
        assert_422(trainer.post("forward", trainer.body(trainer.seq + 1, **fields)), needle)
    for op, fields, needle in (
        ("optim_step", {}, "adam_params"),
        ("optim_step", {"adam_params": None}, "adam_params"),
        ("optim_step", {"adam_params": {"eps": "small"}}, "eps"),
        ("save_state", {"name": 5}, "name"),
        ("save_state", {"name": None}, "name"),
        ("save_weights_for_sampler", {"name": "x", "bump_version": "yes"}, "bump_version"),
        ("load_state", {"path": ["bt://x"]}, "path"),
        ("load_state", {"path": None}, "path"),
    ):
        assert_422(trainer.post(op, trainer.body(trainer.seq + 1, **fields)), needle)
    base = trainer.body(trainer.seq + 1, adam_params={})
    for key, value in (("seq_id", "2"), ("seq_id", 2.0), ("seq_id", True), ("run_id", 5)):
        assert_422(trainer.post("optim_step", {**base, key: value}), key)
    _serving(trainer)


def test_big_valid_body_just_under_the_cap() -> None:
    with (
        LocalServer(backend="null", max_body_bytes=2_000_000) as srv,
        httpx.Client(base_url=srv.url, timeout=30.0) as c,
    ):
        t = Trainer(c)
        t.init()
        d = datum(list(range(1, 1000)))
        n = 2_000_000 // len(json.dumps(d)) - 1
        body = json.dumps(t.body(data=[d] * n)).encode()
        assert 1_500_000 < len(body) <= 2_000_000
        json_type = {"Content-Type": "application/json"}
        op = c.post(t.url("forward"), content=body, headers={"Idempotency-Key": "big", **json_type})
        assert op.status_code == 202, op.text
        assert len(_wait(t, op.json()["operation_id"]).json()["result"]["loss_fn_outputs"]) == n
        # One token list just under the cap: over the context length, a quick 422.
        big = json.dumps(t.body(t.seq + 1, data=[datum(list(range(1, 1000)) * 150)])).encode()
        assert 1_000_000 < len(big) <= 2_000_000
        assert_422(c.post(t.url("forward"), content=big, headers=json_type), "context length")

        def chunked() -> Iterator[bytes]:  # no Content-Length, over the cap
            yield b'{"seq_id": 3, "run_id": null, "model": "m", "data": [' + b"1," * 1000
            for _ in range(50):
                yield b"1," * 25_000
            yield b"1]}"

        r = c.post(t.url("forward"), content=chunked(), headers=json_type)
        assert r.status_code == 413
        assert c.get(t.url("health")).status_code == 200


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../../etc",
        "/etc/passwd",
        "a/b",
        "a\\b",
        "%2e%2e",
        "a%2Fb",
        "a\x00b",
        "ü",
        "a\nb",
        " a",
        "~",
        "$HOME",
        "a" * 129,
        "",
    ],
)
def test_hostile_checkpoint_names(trainer: Trainer, server: LocalServer, name: str) -> None:
    for op, extra in (("save_state", {}), ("save_weights_for_sampler", {"bump_version": True})):
        assert_422(trainer.post(op, trainer.body(trainer.seq + 1, name=name, **extra)), "name")
    run_dir = server.data_dir / "runs" / trainer.id
    assert not (run_dir / "weights").exists()
    assert not (run_dir / "sampler_weights").exists()


def test_hostile_checkpoint_paths(
    trainer: Trainer, client: httpx.Client, server: LocalServer, tmp_path: Path
) -> None:
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "checkpoint.json").write_text("{}")
    other = Trainer(client)
    other.init()
    saved = other.run_op("save_state", name="theirs")["path"]
    bad = [
        f"bt://loops:{trainer.id}/weights/..",
        f"bt://loops:{trainer.id}/weights/%2e%2e",
        f"bt://loops:{trainer.id}/weights/../../../../{secret}",
        f"bt://loops:{trainer.id}/weights/a/b",
        f"bt://loops:{trainer.id}/weights/",
        f"bt://loops:{trainer.id}/.store/x",
        f"bt://loops:{trainer.id}/weights/x?y",
        f"bt://loops:..%2F{trainer.id}/weights/x",
        "bt://loops:/weights/x",
        f"bt://loops:{secret}/weights/x",
        f"bt://loops:{trainer.id}/weights/x\x00",
        f"bt://loops:{trainer.id}/weights/ü",
        "bt://loops:run-x/weights/" + "a" * 5000,
        f"BT://loops:{trainer.id}/weights/x",
        f"file://{secret}",
        str(secret),
        "",
    ]
    for path in bad:
        for op in ("load_state", "load_state_with_optimizer"):
            r = trainer.post(op, trainer.body(trainer.seq + 1, path=path))
            assert_422(r, "path")
            assert len(r.text) < 2000
        r = client.get("/v1/loops/checkpoints", params={"checkpoint_path": path})
        assert_422(r, "checkpoint_path")
    # Only a trainer checkpoint of that name exists.
    sampler_path = saved.replace("/weights/", "/sampler_weights/")
    assert_422(trainer.post("load_state", trainer.body(trainer.seq + 1, path=sampler_path)), "path")
    # Another run's checkpoint is addressable on purpose (PROTOCOL §7 "possibly another run's").
    assert trainer.run_op("load_state_with_optimizer", path=saved)["step"] == 0
    # A symlink planted in a run's weights folder that points outside the data dir is ignored.
    weights = server.data_dir / "runs" / other.id / "weights"
    (weights / "planted").symlink_to(secret, target_is_directory=True)
    r = trainer.post(
        "load_state", trainer.body(trainer.seq + 1, path=f"bt://loops:{other.id}/weights/planted")
    )
    assert_422(r, "path", "does not exist")
    listed = client.get("/v1/loops/checkpoints", params={"run_id": other.id}).json()
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["theirs"]
    _serving(trainer)


def test_checkpoint_named_like_a_temp_file_survives_a_restart(tmp_path: Path) -> None:
    # The start-up sweep removes the temporary links of interrupted saves; a user's checkpoint
    # whose name merely ends in ".tmp" is not one of them.
    names = ["keep", "ckpt.tmp", "a.b.tmp"]
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        t = Trainer(c)
        t.init()
        for name in names:
            t.run_op("save_state", name=name)
    with LocalServer(backend="null", data_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        listed = c.get("/v1/loops/checkpoints", params={"run_id": t.id}).json()["checkpoints"]
        assert sorted(x["checkpoint_id"] for x in listed) == sorted(names)


def test_control_plane_hostile_fields(client: httpx.Client, trainer: Trainer) -> None:
    def create(**fields: Any) -> httpx.Response:
        body = {"session_id": trainer.session_id, "base_model": MODEL, "lora_rank": 8, **fields}
        return client.post("/v1/loops/trainers", json=body)

    for base_model in ("~nosuchuser-loops/x", "a\x00b", "x" * 5000, "/proc/self", "", "."):
        assert_422(create(base_model=base_model), "base_model")
    for fields, needle in (
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"lora_rank": 2**70}, "lora_rank"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": True}, "replicas"),
        ({"max_seq_len": 10**30}, "max_seq_len"),
        ({"max_seq_len": -5}, "max_seq_len"),
        ({"name": "x" * 300}, "name"),
        ({"path": "bt://loops:../weights/x"}, "path"),
        ({"path": "/etc/passwd"}, "path"),
        ({"reuse_from_run_id": 5}, "reuse_from_run_id"),
        ({"session_id": None}, "session_id"),
    ):
        assert_422(create(**fields), needle)
    for params, needle in (
        ({"run_id": "../x"}, "run_id"),
        ({"run_id": "x" * 200}, "run_id"),
        ({"checkpoint_path": "bt://loops:rün/weights/ä"}, "checkpoint_path"),
    ):
        assert_422(client.get("/v1/loops/checkpoints", params=params), needle)
    assert client.get("/v1/loops/deployments/%2e%2e").status_code == 404
    assert client.post("/v1/teams/%2F/loops/sessions").status_code == 404
    _serving(trainer)


# --------------------------------------------------------------------------- routing and ids


def test_op_ids_and_unknown_runs(trainer: Trainer, client: httpx.Client) -> None:
    for op_id in ("a%2Fb", "%2e%2e", "a%00b", "x" * 5000, "%ff", "ü", "a b"):
        r = client.get(trainer.url(f"operations/{op_id}"))
        assert r.status_code == 404, (op_id, r.text)
        assert len(r.text) < 12_000
        r = client.post(trainer.url(f"operations/{op_id}/cancel"))
        assert r.status_code == 404, (op_id, r.text)
    assert client.get("/runs/nope/health").status_code == 404
    assert client.get("/runs/%2e%2e/operations/x").status_code == 404
    assert client.post("/runs/nope/forward", json={}).status_code == 404
    assert client.post(trainer.url("nope"), json={}).status_code == 404
    assert client.get(trainer.url("optim_step")).status_code == 405
    for path in ("health", "policy_version", "operations/x"):
        r = client.get(trainer.url(path), headers={"X-Run-Id": "run-other"})
        assert_422(r, "X-Run-Id")
    r = trainer.post("optim_step", trainer.body(adam_params={}), headers={"X-Run-Id": "run-other"})
    assert_422(r, "X-Run-Id")
    trainer.seq -= 1
    _serving(trainer)


@pytest.mark.parametrize("key", ["..", ".", "~", "a:b", "a/b", "%2F", "x" * 200, "a b"])
def test_every_idempotency_key_gives_a_pollable_operation_id(trainer: Trainer, key: str) -> None:
    # httpx (like browsers) removes "." and ".." path segments, so an operation id that is
    # only dots could never be polled.
    op_id = trainer.submit("optim_step", key=key, adam_params={})
    assert trainer.client.get(trainer.url(f"operations/{quote(op_id, safe='')}")).status_code in (
        200,
        408,
    )
    assert _wait(trainer, op_id).json()["status"] == "done"
    # The same key again: the same operation.
    r = trainer.post("optim_step", trainer.body(trainer.seq, adam_params={}), key=key)
    assert r.json()["operation_id"] == op_id


def test_concurrent_duplicate_submit_gets_the_same_operation(
    trainer: Trainer, server: LocalServer
) -> None:
    # The second copy of a submit arrives (headers first) before the first is admitted and its
    # body finishes after: it must get the first one's id, not "seq_id already queued".
    key = uuid.uuid4().hex
    body = json.dumps(trainer.body(data=[datum([1, 2, 3])])).encode()
    results: list[httpx.Response] = []
    sent_head = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[:10]
        sent_head.set()
        time.sleep(0.5)
        yield body[10:]

    def slow_copy() -> None:
        with httpx.Client(timeout=10.0) as c:
            results.append(
                c.post(
                    trainer.url("forward"),
                    content=slow_body(),
                    headers={
                        "Idempotency-Key": key,
                        "X-Run-Id": trainer.id,
                        "Content-Type": "application/json",
                    },
                )
            )

    thread = threading.Thread(target=slow_copy)
    thread.start()
    assert sent_head.wait(5.0)
    time.sleep(0.1)
    first = trainer.post("forward", json.loads(body), key=key)
    thread.join(10.0)
    assert first.status_code == 202, first.text
    assert results[0].status_code == 202, results[0].text
    assert results[0].json()["operation_id"] == first.json()["operation_id"]
    assert _wait(trainer, first.json()["operation_id"]).json()["status"] == "done"
    assert server.state.runs[trainer.id].executions["forward"] == 1


def test_cancel_races(null_server: LocalServer) -> None:
    # null_server waits 1 s for a missing seq_id: long enough to cancel what queues behind one.
    client = httpx.Client(base_url=null_server.url, timeout=10.0)
    trainer = Trainer(client)
    trainer.init()
    s = trainer.seq
    ahead = trainer.submit("optim_step", key="cancel-me", seq_id=s + 2, adam_params={})
    url = trainer.url(f"operations/{ahead}/cancel")
    with httpx.Client(timeout=10.0) as c2:
        codes = {client.post(url).status_code, c2.post(url).status_code}
    assert codes == {200}
    assert trainer.poll(ahead).json()["error_class"] == "OperationCancelled"
    # Resubmitting the cancelled key returns the cancelled operation; it never runs.
    again = trainer.post("optim_step", trainer.body(s + 2, adam_params={}), key="cancel-me")
    assert again.json()["operation_id"] == ahead
    trainer.seq = s + 2  # s + 1 is a gap: skipped after the gap timeout
    done = trainer.run_op("optim_step", adam_params={})
    assert done["metrics"]["step"] == 1.0
    r = client.post(
        trainer.url(f"operations/{ahead}/cancel"),
        content=b"x" * 100,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200
    client.close()


def test_executor_crash_fails_pending_ops_instead_of_hanging(
    server: LocalServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever kills a run's executor, its queued operations must end (not answer 408 forever,
    # which a client re-polls at once, forever) and later submits must get a clear 503.
    t = Trainer(client)
    t.init()
    run = server.state.runs[t.id]

    async def crash(op: Any, execute: Any) -> None:
        raise RuntimeError("simulated executor bug")

    monkeypatch.setattr(run.ops, "_execute", crash)
    queued = t.submit("optim_step", seq_id=t.seq + 2, adam_params={})  # behind a gap
    first = t.submit("optim_step", seq_id=t.seq + 1, adam_params={})  # runs, and crashes
    t.seq += 2
    for op in (first, queued):
        env = _wait(t, op).json()
        assert env["status"] == "error", env
        assert "simulated executor bug" in env["error"]
    assert run.status == "FAILED"
    r = t.post("optim_step", t.body(adam_params={}), key=uuid.uuid4().hex)
    assert r.status_code == 503, r.text
    assert "simulated executor bug" in r.json()["detail"]
    assert client.get(t.url("health")).status_code == 503
    assert client.get("/v1/loops/capabilities").status_code == 200


def test_poll_after_ttl_and_shutdown() -> None:
    srv = LocalServer(backend="null", result_ttl=0.2, poll_hold=5.0, null_delay=0.05)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10.0) as c:
            t = Trainer(c)
            t.init()
            key = uuid.uuid4().hex
            op = t.submit("optim_step", key=key, adam_params={})
            assert t.result(op)["status"] == "done"
            time.sleep(0.3)
            assert t.poll(op).status_code == 404
            assert c.post(t.url(f"operations/{op}/cancel")).status_code == 404
            slow = t.submit("optim_step", seq_id=t.seq + 2, adam_params={})  # waits on a gap
            answers: list[int] = []
            poller = threading.Thread(target=lambda: answers.append(t.poll(slow).status_code))
            poller.start()
            time.sleep(0.2)
            srv.stop()
            poller.join(10.0)
            assert answers == [503]
    finally:
        srv.stop()


# --------------------------------------------------------------------------- auth


def test_api_key_is_required_everywhere_and_never_echoed(caplog: pytest.LogCaptureFixture) -> None:
    key = "hostile-secret-key-123"
    caplog.set_level(logging.DEBUG)
    with LocalServer(backend="null", api_key=key) as srv, httpx.Client(base_url=srv.url) as c:
        assert key not in repr(srv)
        assert key not in repr(srv.settings)
        for method, path in (
            ("GET", "/"),
            ("GET", "/v1/teams"),
            ("POST", "/v1/loops/sessions"),
            ("POST", "/v1/teams/local/loops/trainers"),
            ("GET", "/v1/loops/checkpoints?run_id=x"),
            ("GET", "/v1/loops/capabilities"),
            ("GET", "/v1/loops/deployments/x"),
            ("GET", "/runs/x/health"),
            ("POST", "/runs/x/forward"),
            ("GET", "/runs/x/operations/y"),
            ("POST", "/runs/x/operations/y/cancel"),
            ("GET", "/nope"),
        ):
            for auth in (
                None,
                "Api-Key",
                f"Api-Key {key}x",
                f"Api-Key {key[:-1]}",
                key,
                f"Basic {key}",
                b"Api-Key \xe9",
            ):
                headers = {} if auth is None else {"Authorization": auth}
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert key not in r.text
        good = {"Authorization": f"Api-Key {key}"}
        assert c.get("/v1/teams", headers=good).status_code == 200
    assert key not in caplog.text


# --------------------------------------------------------------------------- torch backend


def test_torch_hostile_inputs(torch_server: LocalServer) -> None:
    with httpx.Client(base_url=torch_server.url, timeout=60.0) as c:
        t = Trainer(c, lora_rank=4)
        t.init()
        # Mismatched per-position lengths: 422 at submit, as on the null backend.
        for inputs, needle in (
            ({"target_tokens": _td([2, 3], "int64")}, "target_tokens"),
            ({"target_tokens": _td([2, 3, 4, 5], "int64"), "weights": _td([1.0])}, "weights"),
        ):
            assert_422(_fwd(t, _datum([1, 2, 3, 4], **inputs)), needle)
        # Edge shapes and dtypes that are valid run and keep their shapes.
        out = t.run_op(
            "forward",
            data=[
                _datum([1, 2], target_tokens=_td([], "int64", [2, 0])),
                _datum(
                    [1, 2],
                    target_tokens=_td([2, 3, 4, 5], "int32", [2, 2]),
                    weights=_td([1.0, 0.0, 0.5, 1.0], "bfloat16", [2, 2]),
                ),
                _datum([1, 2, 3], target_tokens=_td([-100, -100, -100], "int64")),
            ],
            top_k_logprobs=20,
        )
        outputs = out["loss_fn_outputs"]
        assert [o["logprobs"]["shape"] for o in outputs] == [[2, 0], [2, 2], [3]]
        assert outputs[1]["top_k_logprobs"]["shape"] == [2, 20]
        assert outputs[2]["logprobs"]["data"] == [None, None, None]
        rl = _datum(
            [1, 2, 3],
            logprobs=_td([-1.0, -2.0, None], "float16"),
            advantages=_td([True, True, False], "bool"),
        )
        for loss_fn in ("importance_sampling", "ppo", "cispo", "dro", "dppo"):
            assert isinstance(t.run_op("forward", data=[rl], loss_fn=loss_fn)["loss"], float)

        # Finite inputs whose loss overflows float32: an operation error, never "loss": null
        # (PROTOCOL §4: loss and metrics are JSON numbers).
        huge = [
            (
                "cross_entropy",
                [
                    _datum(
                        [1, 2, 3],
                        target_tokens=_td([2, 3, 4], "int64"),
                        weights=_td([3e38, 3e38, 3e38]),
                    )
                ],
                None,
            ),
            (
                "dro",
                [
                    _datum(
                        [1, 2, 3],
                        logprobs=_td([-3e38, 3e38, -1.0]),
                        advantages=_td([1.0, 1.0, 1.0]),
                    )
                ],
                None,
            ),
            ("dppo", [rl], {"kl_tau": 3e38, "adv_tau": 3e38}),
            (
                "dpo",
                [
                    _datum(
                        [1, 2], target_tokens=_td([2, 3], "int64"), ref_logprobs=_td([-3e38, -3e38])
                    )
                ]
                * 2,
                None,
            ),
            # A finite loss (log sigmoid of +inf is 0) with an infinite reward_margin metric.
            (
                "dpo",
                [
                    _datum(
                        [1, 2], target_tokens=_td([2, 3], "int64"), ref_logprobs=_td([-3e38, -3e38])
                    ),
                    _datum(
                        [1, 2], target_tokens=_td([2, 3], "int64"), ref_logprobs=_td([-1.0, -1.0])
                    ),
                ],
                None,
            ),
        ]
        for loss_fn, data, config in huge:
            for op in ("forward", "forward_backward"):
                op_id = t.submit(op, data=data, loss_fn=loss_fn, loss_fn_config=config)
                env = t.result(op_id)
                assert env["status"] == "error", (loss_fn, op, env)
                assert env["error_class"] == "ValidationError"
                assert "not finite" in env["error"]
        # The run is unharmed: the gradient buffer holds nothing from the failed calls.
        t.run_op("forward_backward", data=[datum([1, 2, 3])])
        step = t.run_op("optim_step", adam_params={})["metrics"]
        assert step["active_tokens"] == 3.0
        assert "update_skipped" not in step
        assert c.get(t.url("health")).status_code == 200


# --------------------------------------------------------------------------- the client


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LocalServer]:
    # A short gap timeout: every 422 at submit burns the client's seq_id (PROTOCOL §3).
    with LocalServer(
        backend="null", api_key="client-secret-key-42", poll_hold=2.0, seq_gap_timeout=0.2
    ) as srv:
        yield srv


_KEY = "client-secret-key-42"


def test_client_bad_input(keyed_server: LocalServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with ServiceClient(keyed_server.url, api_key=_KEY, heartbeat_interval=0) as service:
        assert _KEY not in repr(service)
        training = service.create_lora_training_client(MODEL, rank=4)
        tokens = ModelInput.from_ints([1, 2, 3])
        good = Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [2, 3, 4]})
        before = keyed_server.state.runs[training.run_id].ops.next_seq
        for call in (
            lambda: training.forward_backward([]),
            lambda: training.forward_backward(good),  # type: ignore[arg-type]
            lambda: training.forward_backward([good], top_k_logprobs=21),
            lambda: training.forward_backward([good], top_k_logprobs=True),
            lambda: training.forward_backward([good, good, good], loss_fn="dpo"),
            lambda: training.forward([Datum(model_input=ModelInput.empty(), loss_fn_inputs={})]),
            lambda: training.forward(
                [Datum(model_input=ModelInput.from_ints([1, -2]), loss_fn_inputs={})]
            ),
            lambda: training.forward(
                [
                    Datum(
                        model_input=tokens,
                        loss_fn_inputs={
                            "target_tokens": TensorData(data=[1, 2, 3], dtype="int64", shape=[-3])
                        },
                    )
                ]
            ),
            lambda: training.forward(
                [Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [1, 2]})]
            ),
            lambda: training.forward(
                [
                    Datum(
                        model_input=tokens,
                        loss_fn_inputs={
                            "target_tokens": TensorData(data=[1, 2, 3], dtype="complex64")
                        },
                    )
                ]
            ),
            lambda: training.optim_step(AdamParams(learning_rate=float("nan"))),
            lambda: training.optim_step(AdamParams(beta1=1.0)),
            lambda: training.optim_step({"learning_rate": 1e-3}),  # type: ignore[arg-type]
            lambda: training.save_state(".."),
            lambda: training.save_state("a/b"),
            lambda: training.save_state("x" * 129),
            lambda: training.save_state("ok", ttl_seconds=0),
            lambda: training.save_weights_for_sampler("ok", ttl_seconds=-5),
            lambda: training.load_state("bt://" + "x" * 5000),  # over the 4096 limit
            lambda: training.init_trainer_server(0),
        ):
            with pytest.raises(errors.ValidationError):
                call()
        # Nothing was sent, no seq_id was burnt.
        assert keyed_server.state.runs[training.run_id].ops.next_seq == before

        # What only the server can know: a clear 422 or an operation error, never a hang.
        with pytest.raises(errors.UnprocessableEntityError, match="vocabulary"):
            training.forward(
                [
                    Datum(
                        model_input=ModelInput.from_ints([1, 5000]),
                        loss_fn_inputs={"target_tokens": [2, 3]},
                    )
                ]
            )
        with pytest.raises(errors.UnprocessableEntityError, match="loss_fn"):
            training.forward([good], loss_fn="nope")
        with pytest.raises(errors.UnprocessableEntityError, match="path"):
            training.load_state("bt://loops:../weights/x")
        # A local path is the server's to check (it is read, never written; a file is no
        # checkpoint directory).
        with pytest.raises(errors.UnprocessableEntityError, match="not an existing directory"):
            training.load_state("/etc/passwd")
        with pytest.raises(errors.UnprocessableEntityError, match="does not exist"):
            training.load_state(f"bt://loops:{training.run_id}/weights/nope")
        with pytest.raises(errors.UnprocessableEntityError, match="lora_rank"):
            training.init_trainer_server(1000)
        with pytest.raises(errors.UnprocessableEntityError, match="base_model"):
            service.create_lora_training_client("~nosuchuser-loops/x", rank=4)
        assert training.forward([good]).result(10.0).loss == 0.0
        training.health()  # None when healthy, else raises
        assert _KEY not in repr(training)
    assert _KEY not in caplog.text


def test_client_wrong_key_is_a_clear_error(keyed_server: LocalServer) -> None:
    with (
        ServiceClient(keyed_server.url, api_key="wrong-key-77", heartbeat_interval=0) as service,
        pytest.raises(errors.AuthenticationError) as info,
    ):
        service.create_lora_training_client(MODEL, rank=4)
    assert info.value.status_code == 401
    assert "wrong-key-77" not in str(info.value)
    assert "wrong-key-77" not in repr(info.value.body)


@pytest.mark.anyio
async def test_client_bad_input_async(anyio_backend: str, keyed_server: LocalServer) -> None:
    async with ServiceClient(keyed_server.url, api_key=_KEY, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        with pytest.raises(errors.ValidationError):
            await training.forward_backward_async([])
        with pytest.raises(errors.ValidationError):
            await training.save_state_async("../x")
        with pytest.raises(errors.UnprocessableEntityError, match="vocabulary"):
            await training.forward_async(
                [
                    Datum(
                        model_input=ModelInput.from_ints([1, 5000]),
                        loss_fn_inputs={"target_tokens": [2, 3]},
                    )
                ]
            )
        fut = await training.forward_async(
            [
                Datum(
                    model_input=ModelInput.from_ints([1, 2]),
                    loss_fn_inputs={"target_tokens": [2, 3]},
                )
            ]
        )
        assert (await fut).loss == 0.0


# Client-side hostile input: the client refuses it before sending, and never leaks the key.


@pytest.mark.parametrize("bad_key", [f"{_KEY}\n", f"{_KEY}\r\nX-Injected: 1"])
def test_client_key_with_newline_never_leaks(keyed_server: LocalServer, bad_key: str) -> None:
    # e.g. a key read from a file with its trailing newline: stripped and used, or refused up
    # front; never sent to httpx, whose header error quotes the whole value.
    failure: errors.LoopsError | None = None
    try:
        with ServiceClient(keyed_server.url, api_key=bad_key, heartbeat_interval=0) as service:
            service.create_lora_training_client(MODEL, rank=4)
    except errors.LoopsError as exc:
        failure = exc
    if failure is not None:
        assert isinstance(failure, errors.ValidationError), repr(failure)
        assert _KEY not in "".join(traceback.format_exception(failure))


def test_client_non_ascii_key_is_a_validation_error(keyed_server: LocalServer) -> None:
    with pytest.raises(errors.ValidationError):
        ServiceClient(keyed_server.url, api_key="schlüssel", ready_timeout=2.0).close()


def test_client_sends_skip_token_normalization(keyed_server: LocalServer) -> None:
    with ServiceClient(keyed_server.url, api_key=_KEY, heartbeat_interval=0) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        d = Datum(
            model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]}
        )
        out = training.forward([d], loss_fn_config={"skip_token_normalization": True}).result(10.0)
        assert out.metrics["skip_token_normalization"] == 1.0


def test_client_adam_params_of_the_wrong_type() -> None:
    from loops_async._validate import check_adam_params

    with pytest.raises(errors.ValidationError, match="learning_rate"):
        check_adam_params(AdamParams(learning_rate="fast"))  # type: ignore[arg-type]
