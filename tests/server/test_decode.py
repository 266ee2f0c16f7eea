"""``forward`` / ``forward_backward`` bodies decoded into numpy-backed tensors
(:mod:`loops_async.server.decode`): the same request, values, validation, errors and training
results as the plain decoder, with ``ArrayData`` instead of lists of Python objects."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from loops_async._wire import ForwardBackwardRequest, OptimStepRequest
from loops_async.server import LocalServer
from loops_async.server import decode as decode_module
from loops_async.server.backend import InvalidRequest
from loops_async.server.decode import decode_forward_request, decode_request
from loops_async.server.http import _decode
from loops_async.server.models import BUILTIN_MODELS, TINY_CHAT
from loops_async.server.null_backend import NullTrainer
from loops_async.server.operations import OpStatus, body_fingerprint
from loops_async.server.validation import prepare_forward_request
from loops_async.types import (
    AdamParams,
    ArrayData,
    Datum,
    EncodedTextChunk,
    ModelInput,
    TensorData,
)

from ._http import MODEL, Trainer, assert_422

SPEC = BUILTIN_MODELS[TINY_CHAT]


def _body(data: list[Any], **fields: Any) -> bytes:
    return json.dumps(
        {"seq_id": 2, "run_id": None, "model": MODEL, "data": data, **fields}
    ).encode()


def _td(data: Any, dtype: str = "float32", shape: Any = "auto") -> dict[str, Any]:
    out: dict[str, Any] = {"data": data, "dtype": dtype}
    if shape == "auto":
        out["shape"] = [len(data)] if isinstance(data, list) else None
    elif shape is not None:
        out["shape"] = shape
    return out


def _datum(tokens: Any, **inputs: Any) -> dict[str, Any]:
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": inputs,
    }


def _plain(body: bytes) -> ForwardBackwardRequest:
    return _decode(ForwardBackwardRequest, body)


def _same_error(body: bytes) -> str:
    """Both decoders reject ``body`` with the same message; returns it."""
    with pytest.raises(InvalidRequest) as plain:
        _plain(body)
    with pytest.raises(InvalidRequest) as fast:
        decode_forward_request(body)
    assert str(fast.value) == str(plain.value)
    return str(fast.value)


def _arrays_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def _assert_prepared_equal(body: bytes) -> None:
    """Validation reads the two decodings alike: equal arrays, or the same error."""
    outcomes = []
    for req in (_plain(body), decode_forward_request(body)):
        try:
            outcomes.append(prepare_forward_request(req, SPEC))
        except InvalidRequest as exc:
            outcomes.append(str(exc))
    plain, fast = outcomes
    if isinstance(plain, str) or isinstance(fast, str):
        assert fast == plain
        return
    assert len(fast.data) == len(plain.data)
    for p, f in zip(plain.data, fast.data, strict=True):
        assert _arrays_equal(f.tokens, p.tokens)
        assert _arrays_equal(f.targets, p.targets)
        assert sorted(f.inputs) == sorted(p.inputs)
        for name in p.inputs:
            assert _arrays_equal(f.inputs[name], p.inputs[name]), name


# --------------------------------------------------------------------------- shape of the result


def test_mirror_types_match_the_wire_types() -> None:
    # A field added to a wire type must be added to its mirror, or it would be dropped.
    pairs = [
        (decode_module._RawForwardBackwardRequest, ForwardBackwardRequest),
        (decode_module._RawDatum, Datum),
        (decode_module._RawModelInput, ModelInput),
        (decode_module._RawTensor, TensorData),
        (decode_module._RawTextChunk, EncodedTextChunk),
    ]
    for mirror, wire in pairs:
        assert [(f.name, f.default, f.default_factory) for f in msgspec.structs.fields(mirror)] == [
            (f.name, f.default, f.default_factory) for f in msgspec.structs.fields(wire)
        ], wire
        assert mirror.__struct_config__.tag == wire.__struct_config__.tag
        assert mirror.__struct_config__.tag_field == wire.__struct_config__.tag_field


def test_tensors_and_tokens_are_numpy_backed() -> None:
    body = _body(
        [
            _datum(
                [5, 6, 7],
                target_tokens=_td([6, 7, -100], "int64"),
                weights=_td([1.0, 0.5, 0.0]),
                logprobs=_td([-1.5, None, -0.25], "float64"),
                advantages=_td([1, 2, 3], "bfloat16"),
                extra=_td([1.5, 2.0], "float16"),
                big=_td([2**40, 1], "int64"),
            )
        ]
    )
    req = decode_request(ForwardBackwardRequest, body)
    assert isinstance(req, ForwardBackwardRequest)
    datum = req.data[0]
    chunk = datum.model_input.chunks[0]
    assert isinstance(chunk, EncodedTextChunk)
    assert isinstance(chunk.tokens, ArrayData)
    assert chunk.tokens.array.dtype == np.int32
    assert chunk.length == 3
    assert datum.model_input.to_ints() == [5, 6, 7]
    dtypes = {}
    for name, tensor in datum.loss_fn_inputs.items():
        assert isinstance(tensor.data, ArrayData), name
        dtypes[name] = tensor.data.array.dtype
    assert dtypes == {
        "target_tokens": np.int32,
        "weights": np.float32,
        "logprobs": np.float64,
        "advantages": np.float32,
        "extra": np.float64,
        "big": np.int64,
    }
    inputs = datum.loss_fn_inputs
    assert inputs["logprobs"].data[1] != inputs["logprobs"].data[1]  # NaN
    assert len(inputs["weights"].data) == 3
    assert inputs["target_tokens"].data[2] == -100
    assert inputs["target_tokens"].to_numpy().dtype == np.int64
    assert inputs["target_tokens"].shape == [3]
    # Equal, field for field, to the plain decoding (ArrayData compares with lists, NaN too).
    assert req == _plain(body)
    # Other operations decode as before.
    optim = b'{"seq_id": 3, "run_id": null, "model": "m", "adam_params": {}}'
    assert decode_request(OptimStepRequest, optim) == _decode(OptimStepRequest, optim)


def test_decoded_request_keeps_no_view_of_the_body() -> None:
    body = _body([_datum([1, 2, 3], target_tokens=_td([2, 3, 4], "int64"), w=_td([1.0] * 3))])
    req = decode_forward_request(body)
    seen: list[Any] = []

    def walk(obj: Any) -> None:
        assert not isinstance(obj, msgspec.Raw | bytes | memoryview), obj
        if isinstance(obj, ArrayData):
            array = obj.array
            while isinstance(array.base, np.ndarray):
                array = array.base
            assert array.base is None  # owns its memory: no view of the body
            seen.append(obj)
        elif isinstance(obj, msgspec.Struct):
            for f in obj.__struct_fields__:
                walk(getattr(obj, f))
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(req)
    assert len(seen) == 3  # tokens, target_tokens, w


# --------------------------------------------------------------------------- same values


def test_same_values_as_the_plain_decoder_on_random_bodies() -> None:
    rng = random.Random(20260101)
    spaces = ["", "", "", " ", "\n", "\t", "\r\n "]

    def number(kind: str) -> str:
        if kind == "token":
            return str(rng.randint(0, SPEC.vocab_size - 1))
        if kind == "int":
            return rng.choice(
                [str(rng.randint(0, 1023)), "-100", str(rng.randint(-(2**62), 2**62)), "-0"]
            )
        return rng.choice(
            [
                repr(rng.uniform(-1e3, 1e3)),
                repr(float(np.float32(rng.gauss(0, 1)))),
                repr(float(np.float32(rng.gauss(0, 1)))),
                f"{rng.randint(-9, 9)}.{rng.randint(0, 10**20)}e{rng.randint(-330, 300)}",
                f"0.{rng.randint(0, 10**30):030d}",
                str(rng.randint(-(2**64), 2**64)),
                "null",
                "-0",
                "1E5",
                "3e+2",
                "-0.0",
            ]
        )

    def array(kind: str, n: int) -> str:
        items = [rng.choice(spaces) + number(kind) + rng.choice(spaces) for _ in range(n)]
        return "[" + ",".join(items) + rng.choice(spaces) + "]"

    for _ in range(80):
        n = rng.randint(0, 40)
        datums = []
        for _ in range(rng.randint(1, 3)):
            inputs = []
            for name, dtype in (
                ("target_tokens", rng.choice(["int64", "int32"])),
                ("weights", rng.choice(["float32", "float64", "float16", "bfloat16", "int64"])),
            ):
                kind = "int" if dtype.startswith("int") and rng.random() < 0.8 else "float"
                inputs.append(f'"{name}":{{"data":{array(kind, n)},"dtype":"{dtype}"}}')
            datums.append(
                '{"model_input":{"chunks":[{"type":"encoded_text","tokens":'
                + array("token", n)
                + '}]},"loss_fn_inputs":{'
                + ",".join(inputs)
                + "}}"
            )
        body = ('{"seq_id":2,"run_id":null,"model":"m","data":[' + ",".join(datums) + "]}").encode()
        plain = _plain(body)
        fast = decode_forward_request(body)
        with np.errstate(over="ignore"):  # float32 data beyond float32 compares as inf
            assert fast == plain
        for dp, df in zip(plain.data, fast.data, strict=True):
            for name, tp in dp.loss_fn_inputs.items():
                if tp.dtype in ("float32", "float64", "float16", "bfloat16"):
                    with np.errstate(over="ignore"):
                        assert _arrays_equal(df.loss_fn_inputs[name].to_numpy(), tp.to_numpy())
        _assert_prepared_equal(body)


@pytest.mark.parametrize(
    "datum",
    [
        # null in float data: NaN (accepted where inactive, rejected where it counts)
        _datum([1, 2], target_tokens=_td([2, -100], "int64"), weights=_td([1.0, None])),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([None, 1.0])),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([1e39, 1.0])),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([1e300, 1.0], "float16")),
        # empty arrays
        _datum([], target_tokens=_td([], "int64")),
        _datum([1, 2], target_tokens=_td([], "int64", [0])),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([], shape=[0])),
        # huge ints
        _datum([1, 2], target_tokens=_td([2**63 - 1, 2], "int64")),
        _datum([1, 2], target_tokens=_td([-(2**63), 2], "int64")),
        _datum([1, 2], target_tokens=_td([2**70, 2], "int64")),
        _datum([1, 2], target_tokens=_td([10**400, 2], "int64")),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([10**400, 1])),
        _datum([1, 2**63], target_tokens=_td([2, 3], "int64")),
        _datum([1, 2**70], target_tokens=_td([2, 3], "int64")),
        # integers written as floats, fractions, null in integer tensors
        _datum([1, 2], target_tokens=_td([2.0, 3e0], "int64")),
        _datum([1, 2], target_tokens=_td([2.5, 3], "int64")),
        _datum([1, 2], target_tokens=_td([None, 3], "int32")),
        # other dtypes: bool (a list, as before), unknown
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([True, False], "bool")),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([1, 0], "bool")),
        _datum([1, 2], target_tokens=_td([2, 3], "int64"), weights=_td([True, 1.0])),
        _datum([1, 2], target_tokens=_td([2, 3], "complex128")),
        # shapes
        _datum([1, 2], target_tokens=_td([2, 3, 4, 5], "int64", [2, 2])),
        _datum([1, 2], target_tokens=_td([2, 3], "int64", None)),
        _datum([1, 2], target_tokens=_td([2, 3], "int64", [3])),
    ],
)
def test_edge_cases_decode_and_validate_alike(datum: dict[str, Any]) -> None:
    body = _body([datum])
    with np.errstate(over="ignore"):  # float32 data beyond float32 compares as inf
        assert decode_forward_request(body) == _plain(body)
    _assert_prepared_equal(body)


def test_bool_tensors_and_out_of_range_numbers_stay_lists() -> None:
    body = _body(
        [
            _datum(
                [1, 2**64],
                target_tokens=_td([2, 3], "int64"),
                weights=_td([True, False], "bool"),
                advantages=_td([10**400, 1]),
            )
        ]
    )
    req = decode_forward_request(body)
    assert req == _plain(body)
    inputs = req.data[0].loss_fn_inputs
    assert inputs["weights"].data == [True, False]
    assert isinstance(inputs["weights"].data, list)
    assert isinstance(inputs["advantages"].data, list)
    chunk = req.data[0].model_input.chunks[0]
    assert isinstance(chunk, EncodedTextChunk)
    assert chunk.tokens == [1, 2**64]
    assert isinstance(chunk.tokens, list)
    assert isinstance(inputs["target_tokens"].data, ArrayData)


@pytest.mark.parametrize(
    "body",
    [
        _body([_datum([1, 2], target_tokens=_td([[2], [3]], "int64"))]),
        _body([_datum([1, 2], target_tokens=_td([2, "3"], "int64"))]),
        _body([_datum([1, 2], target_tokens=_td([2, {}], "int64"))]),
        _body([_datum([1, 2], target_tokens=_td("23", "int64"))]),
        _body([_datum([1, 2], target_tokens=_td({"a": 1}, "int64", None))]),
        _body([_datum([1, 2], target_tokens=_td(None, "int64", None))]),
        _body([_datum([1, 2], target_tokens={"dtype": "int64"})]),
        _body([_datum([1, [2]], target_tokens=_td([2, 3], "int64"))]),
        _body([_datum([1, 2.5], target_tokens=_td([2, 3], "int64"))]),
        _body([_datum([1, None], target_tokens=_td([2, 3], "int64"))]),
        _body([_datum([1, True], target_tokens=_td([2, 3], "int64"))]),
        _body([_datum("12", target_tokens=_td([2, 3], "int64"))]),
        _body([_datum([1, 2], target_tokens=_td([2, 3], 64))]),
        _body([_datum([1, 2], target_tokens=_td([2, 3], "int64", [2.0]))]),
        # the first error in the body is the one named, wherever it is
        _body([_datum([1, 2], target_tokens=_td([2, "x"], "int64"))], loss_fn=3),
        _body([_datum([1, 2], target_tokens=_td([2, 3], "int64"))], loss_fn=3),
        _body([_datum([1, 2], w=_td(["x"]), target_tokens=_td([2, "y"], "int64"))]),
        b'{"seq_id": 2, "run_id": null, "model": "m", "data": [{"model_input": {"chunks": '
        b'[{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": {"w": {"data": '
        b'[1e400], "dtype": "float32"}}}]}',
        b'{"seq_id": 2, "run_id": null, "model": "m", "data": [{"model_input": {"chunks": '
        b'[{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": {"w": {"data": '
        b"[1, 2,]}}}]}",
        b'{"seq_id": 2, "run_id": null, "model": "m", "data": [{"model_input": {"chunks": '
        b'[{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": {"w": {"data": '
        b"[1, 2",
        b'{"seq_id": 2, "run_id": null, "model": "m", "data": [' + b"[" * 5000 + b"]" * 5000,
        b"\xff\xfe",
        b"",
    ],
)
def test_malformed_bodies_get_the_plain_decoders_error(body: bytes) -> None:
    assert _same_error(body)


def test_pretty_printed_and_compact_bodies_decode_and_fingerprint_alike() -> None:
    data = [
        _datum(
            [3, 4, 5],
            target_tokens=_td([4, 5, -100], "int64"),
            logprobs=_td([-1.0, None, -2.5]),
            advantages=_td([0.5, 0.0, 1e-7]),
        )
    ]
    compact = json.dumps({"seq_id": 2, "run_id": None, "model": MODEL, "data": data}).encode()
    compact = msgspec.json.format(compact, indent=-1)
    pretty = msgspec.json.format(compact, indent=3)
    assert b" " not in compact
    assert decode_forward_request(pretty) == decode_forward_request(compact) == _plain(compact)
    assert body_fingerprint(pretty) == body_fingerprint(compact)
    # A compact body is hashed as it is; anything else is reformatted first (as before).
    import hashlib

    assert body_fingerprint(compact) == hashlib.blake2b(compact, digest_size=16).hexdigest()
    assert body_fingerprint(b"not json") == hashlib.blake2b(b"not json", digest_size=16).hexdigest()
    assert body_fingerprint(b"not json at all") == body_fingerprint(b"not json at all")


# --------------------------------------------------------------------------- same training


def _rl_batch(rng: np.random.Generator, n: int = 12) -> list[Datum]:
    out = []
    for _ in range(3):
        ids = rng.integers(3, SPEC.vocab_size, n)
        targets = np.append(ids[1:], -100)
        targets[:3] = -100
        logprobs = -rng.exponential(1.0, n).astype(np.float32)
        logprobs[:3] = np.nan
        advantages = rng.normal(0, 1, n).astype(np.float32)
        advantages[:3] = 0
        out.append(
            Datum(
                model_input=ModelInput.from_ints(ids),
                loss_fn_inputs={
                    "target_tokens": TensorData.from_numpy(targets),
                    "logprobs": TensorData.from_numpy(logprobs),
                    "advantages": TensorData.from_numpy(advantages),
                },
            )
        )
    return out


def _encoded(data: list[Datum], loss_fn: str) -> bytes:
    from loops_async._codec import encode

    return encode(
        ForwardBackwardRequest(seq_id=2, run_id=None, model=MODEL, data=data, loss_fn=loss_fn)
    )


def test_null_backend_gives_the_same_result() -> None:
    body = _encoded(_rl_batch(np.random.default_rng(1)), "ppo")
    trainer = NullTrainer(SPEC, lora_rank=4)
    plain = trainer.forward_backward(_plain(body))
    fast = trainer.forward_backward(decode_forward_request(body))
    assert msgspec.json.encode(fast) == msgspec.json.encode(plain)


@pytest.mark.parametrize("loss_fn", ["ppo", "cross_entropy"])
def test_torch_backend_gives_the_same_loss_and_gradients(loss_fn: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from loops_async.server.torch_backend import TorchTrainer

    data = _rl_batch(np.random.default_rng(2))
    if loss_fn == "cross_entropy":
        for d in data:
            d.loss_fn_inputs = {"target_tokens": d.loss_fn_inputs["target_tokens"]}
    body = _encoded(data, loss_fn)
    fast_req = decode_forward_request(body)
    assert isinstance(fast_req.data[0].loss_fn_inputs["target_tokens"].data, ArrayData)
    results = []
    for req in (_plain(body), fast_req):
        trainer = TorchTrainer(SPEC, lora_rank=4, seed=5)
        trainer.init(4)
        out = trainer.forward_backward(req)
        step = trainer.optim_step(AdamParams(learning_rate=1e-2))
        after = trainer.forward(req)
        results.append((out, step, after))
    (p_out, p_step, p_after), (f_out, f_step, f_after) = results
    assert math.isfinite(p_out.loss)
    assert f_out.loss == p_out.loss
    assert f_step.metrics == p_step.metrics  # same gradient norm
    assert f_after.loss == p_after.loss
    assert msgspec.json.encode(f_out.loss_fn_outputs) == msgspec.json.encode(p_out.loss_fn_outputs)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    # A long gap timeout: an operation queued behind a missing seq_id waits for it.
    with LocalServer(backend="null", poll_hold=1.0, seq_gap_timeout=30.0) as srv:
        yield srv


def test_server_queues_numpy_backed_requests_and_drops_them_when_done(
    trainer: Trainer, server: LocalServer
) -> None:
    # A body over LARGE_BODY_BYTES (decoded on a worker thread), queued behind a missing
    # seq_id so that it can be looked at before it runs.
    n = 1000
    d = _datum(
        list(range(1, n + 1)),
        target_tokens=_td([*range(2, n + 1), -100], "int64"),
        weights=_td([0.25] * n),
    )
    first, second = trainer.seq + 1, trainer.seq + 2
    big = trainer.post("forward_backward", trainer.body(second, data=[d] * 100), key="big-1")
    assert big.status_code == 202, big.text
    assert len(big.request.content) > (1 << 20)
    op_id = big.json()["operation_id"]
    (op,) = [o for o in server.state.runs[trainer.id].ops if o.id == op_id]
    assert op.status is OpStatus.QUEUED
    datum = op.request.data[0]
    assert isinstance(datum.loss_fn_inputs["weights"].data, ArrayData)
    assert isinstance(datum.loss_fn_inputs["target_tokens"].data, ArrayData)
    assert isinstance(datum.model_input.chunks[0].tokens, ArrayData)
    del datum
    small = trainer.submit(
        "forward", seq_id=first, data=[_datum([1, 2], target_tokens=_td([2, 3], "int64"))]
    )
    assert trainer.result(small)["status"] == "done"
    env = trainer.result(op.id)
    assert env["status"] == "done", env
    assert env["result"]["loss_fn_outputs"][0]["logprobs"]["shape"] == [n]
    assert op.request is None  # a finished operation keeps its answer, not its request
    trainer.seq = second


def test_bad_tensors_over_http_are_422_naming_the_field(trainer: Trainer) -> None:
    def fwd(*data: Any) -> httpx.Response:
        return trainer.post("forward", trainer.body(trainer.seq + 1, data=list(data)))

    ok = _td([2, 3], "int64")
    assert_422(
        fwd(_datum([1, 2], target_tokens=_td([[2], [3]], "int64"))), "loss_fn_inputs[...].data[0]"
    )
    assert_422(fwd(_datum([1, 2], target_tokens=_td([2, "3"], "int64"))), "data[1]", "str")
    assert_422(fwd(_datum([1, 2], target_tokens=_td([2**70, 3], "int64"))), "target_tokens")
    assert_422(fwd(_datum([1, [2]], target_tokens=ok)), "tokens")
    assert_422(fwd(_datum([1, 2], target_tokens=ok, weights=_td([None, 1.0]))), "non-finite")
    assert_422(fwd(_datum([1, 2], target_tokens=ok, weights=_td([1.0]))), "weights")
    body = (
        b'{"seq_id": %d, "run_id": null, "model": "%s", "data": [{"model_input": {"chunks": '
        b'[{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": {"target_tokens": '
        b'{"data": [2, 1e400], "dtype": "int64"}}}]}'
    ) % (trainer.seq + 1, MODEL.encode())
    r = trainer.client.post(
        trainer.url("forward"),
        content=body,
        headers={"X-Run-Id": trainer.id, "Content-Type": "application/json"},
    )
    assert_422(r, "loss_fn_inputs[...].data[1]", "out of range")
    # Still serving; a body with null at an inactive position trains.
    out = trainer.run_op(
        "forward_backward",
        data=[
            _datum(
                [1, 2, 3],
                logprobs=_td([None, -1.0, -1.0]),
                advantages=_td([0.0, 1.0, 1.0]),
                target_tokens=_td([-100, 3, 4], "int64"),
            )
        ],
        loss_fn="ppo",
    )
    assert out["loss_fn_outputs"][0]["logprobs"]["shape"] == [3]
