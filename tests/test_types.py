"""Wire types: construction, conversion and the JSON shapes of PROTOCOL §4."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch

from loops_async import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageChunk,
    ModelInput,
    TensorData,
)
from loops_async._codec import decode, encode
from loops_async._wire import ForwardBackwardRequest, SaveStateRequest, SaveWeightsForSamplerRequest


def test_tensor_from_numpy_keeps_shape_and_dtype() -> None:
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = TensorData.from_numpy(arr)
    assert t.dtype == "int64"
    assert t.shape == [2, 3]
    assert t.data == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(t.to_numpy(), arr)


def test_tensor_float_nan_travels_as_null_and_comes_back_as_nan() -> None:
    t = TensorData.from_numpy(np.array([1.5, np.nan, -2.0], dtype=np.float32))
    wire = encode(t)
    assert wire == b'{"data":[1.5,null,-2.0],"dtype":"float32","shape":[3]}'
    back = decode(wire, TensorData)
    assert back.data[1] is None
    arr = back.to_numpy()
    assert arr.dtype == np.float32
    assert math.isnan(arr[1])
    assert math.isnan(back.tolist()[1])


def test_tensor_from_torch_and_back() -> None:
    src = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    t = TensorData.from_torch(src)
    assert t.dtype == "bfloat16"
    assert t.shape == [2, 2]
    back = t.to_torch()
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, src)
    ints = TensorData.from_torch(torch.tensor([3, 4, 5]))
    assert ints.dtype == "int64"
    assert ints.to_torch().tolist() == [3, 4, 5]


def test_tensor_from_list_infers_dtype_and_defaults_shape() -> None:
    assert TensorData.from_list([1, 2, 3]).dtype == "float32", "upstream's default"
    assert TensorData.from_list([1, 2, 3], dtype=None).dtype == "int64"
    assert TensorData.from_list([1, 2, 3], "int64").tolist() == [1, 2, 3]
    assert TensorData.from_list([1.0, 2.5], dtype=None).dtype == "float32"
    assert TensorData.from_list([[1, 2], [3, 4]]).shape == [2, 2]
    assert TensorData(data=[1, 2, 3], dtype="int64").shape == [3]


def test_model_input_helpers() -> None:
    mi = ModelInput.from_ints([1, 2, 3])
    assert mi.length == 3
    assert mi.to_ints() == [1, 2, 3]
    mi2 = mi.append_int(4)
    assert mi2.to_ints() == [1, 2, 3, 4]
    assert mi.to_ints() == [1, 2, 3], "append_int returns a new input"
    assert ModelInput.empty().length == 0
    assert ModelInput.empty().append_int(7).to_ints() == [7]
    img = ImageChunk(data=b"\x89PNG", format="png", expected_tokens=5)
    mixed = mi.append(img)
    assert mixed.length == 8
    with pytest.raises(TypeError):
        mixed.to_ints()
    assert ModelInput.from_ints(np.array([5, 6])).to_ints() == [5, 6]


def test_chunks_are_tagged_and_images_base64() -> None:
    mi = ModelInput(
        chunks=[
            EncodedTextChunk(tokens=[1]),
            ImageChunk(data=b"\x00\x01", format="png", expected_tokens=2),
        ]
    )
    wire = msgspec.json.decode(encode(mi))
    assert wire == {
        "chunks": [
            {"type": "encoded_text", "tokens": [1]},
            {"type": "image", "data": "AAE=", "format": "png", "expected_tokens": 2},
        ]
    }
    assert decode(encode(mi), ModelInput) == mi


def test_datum_converts_arrays_tensors_and_lists() -> None:
    d = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4]),
            "weights": torch.ones(3),
            "advantages": [0.5, 0.5, 0.5],
        },
    )
    assert all(isinstance(v, TensorData) for v in d.loss_fn_inputs.values())
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    wire = msgspec.json.decode(encode(d))
    assert wire["routed_experts_ref"] is None
    assert wire["model_input"]["chunks"][0] == {"type": "encoded_text", "tokens": [1, 2, 3]}


def test_request_bodies_follow_the_protocol() -> None:
    d = Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    body = msgspec.json.decode(
        encode(ForwardBackwardRequest(seq_id=2, run_id="r", model="m", data=[d]))
    )
    assert body["seq_id"] == 2
    assert body["run_id"] == "r"
    assert body["loss_fn"] == "cross_entropy"
    assert body["loss_fn_config"] is None
    assert body["top_k_logprobs"] == 0
    save = msgspec.json.decode(encode(SaveStateRequest(seq_id=3, run_id=None, model="m", name="a")))
    assert save == {"seq_id": 3, "run_id": None, "model": "m", "name": "a"}, "ttl omitted"
    publish = msgspec.json.decode(
        encode(
            SaveWeightsForSamplerRequest(
                seq_id=4, run_id="r", model="m", name="p", bump_version=True
            )
        )
    )
    assert publish["bump_version"] is True
    assert "ttl_seconds" not in publish


def test_adam_defaults_match_protocol() -> None:
    assert msgspec.json.decode(encode(AdamParams())) == {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 1.0,
    }


def test_responses_decode_tolerantly() -> None:
    raw = (
        b'{"loss": 2, "loss_fn_output_type": "x", "new_field": [1],'
        b' "loss_fn_outputs": [{"logprobs": {"data": [null, -1.5], "dtype": "float32"}}],'
        b' "metrics": {"loss": 2}}'
    )
    out = decode(raw, ForwardBackwardOutput)
    assert out.loss == 2.0
    lp = out.loss_fn_outputs[0]["logprobs"]
    assert lp.shape == [2]
    assert math.isnan(lp.to_numpy()[0])
    assert decode(b"{}", ForwardBackwardOutput).loss_fn_outputs == []


def test_encoding_a_large_batch_needs_no_python_loop() -> None:
    """64 x 2048 tokens with four per-position tensors encode to valid JSON quickly."""
    rng = np.random.default_rng(0)
    data = [
        Datum(
            model_input=ModelInput.from_ints(rng.integers(0, 1000, 2048)),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, 1000, 2048),
                "weights": np.ones(2048, dtype=np.float32),
                "logprobs": rng.standard_normal(2048).astype(np.float32),
                "advantages": rng.standard_normal(2048).astype(np.float32),
            },
        )
        for _ in range(64)
    ]
    body = encode(ForwardBackwardRequest(seq_id=1, run_id="r", model="m", data=data))
    back = decode(body, ForwardBackwardRequest)
    assert len(back.data) == 64
    assert back.data[5].loss_fn_inputs["logprobs"].to_numpy().shape == (2048,)


def test_arrays_encode_with_and_without_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from loops_async import _codec

    rng = np.random.default_rng(1)
    arrays = {
        "float32": rng.standard_normal(50).astype(np.float32),
        "float64": rng.standard_normal(50),
        "float16": rng.standard_normal(50).astype(np.float16),
        "int64": rng.integers(-(2**40), 2**40, 50),
        "int32": rng.integers(-1000, 1000, 50).astype(np.int32),
        "bool": rng.random(50) > 0.5,
    }
    arrays["float32"][3] = np.nan
    fast = {k: encode(TensorData.from_numpy(a)) for k, a in arrays.items()}
    monkeypatch.setattr(_codec, "_array_json", lambda array: array.tolist())
    plain = {k: encode(TensorData.from_numpy(a)) for k, a in arrays.items()}
    for name, array in arrays.items():
        for body in (fast[name], plain[name]):
            back = decode(body, TensorData).to_numpy()
            assert back.dtype == array.dtype
            np.testing.assert_array_equal(back, array)  # NaN == NaN here
    assert b"null" in fast["float32"]


def test_array_data_reads_like_a_list() -> None:
    t = TensorData.from_numpy(np.array([1.5, 2.5], dtype=np.float32))
    assert t.data == [1.5, 2.5]
    assert list(t.data) == [1.5, 2.5]
    assert t.data[1] == 2.5
    assert len(t.data) == 2
    assert t == TensorData(data=[1.5, 2.5], dtype="float32", shape=[2])
    assert t.tolist() == [1.5, 2.5]
    import pickle

    assert pickle.loads(pickle.dumps(t)) == t
    view = t.to_numpy()
    view[0] = 9.0
    assert t.data[0] == 1.5, "to_numpy returns a copy"


def test_model_inputs_copy_the_lists_they_are_given() -> None:
    """A caller may reuse or clear its token list afterwards (tinker-cookbook does)."""
    tokens = [1, 2, 3]
    chunk = EncodedTextChunk(tokens=tokens)
    from_ints = ModelInput.from_ints(tokens)
    chunks = [chunk]
    model_input = ModelInput(chunks=chunks)
    tokens.clear()
    chunks.clear()
    assert chunk.tokens == [1, 2, 3]
    assert from_ints.to_ints() == [1, 2, 3]
    assert model_input.to_ints() == [1, 2, 3]
    grid = np.array([[4, 5], [6, 7]], dtype=np.int32)
    assert ModelInput.from_ints(grid).to_ints() == [4, 5, 6, 7]
    assert ModelInput.from_ints(range(3)).to_ints() == [0, 1, 2]


def test_model_input_append_takes_chunks_only() -> None:
    model_input = ModelInput.from_ints([1, 2])
    with pytest.raises(TypeError, match="append\\(\\) takes a chunk"):
        model_input.append(model_input)  # type: ignore[arg-type]
    assert model_input.append(EncodedTextChunk(tokens=[3])).to_ints() == [1, 2, 3]
