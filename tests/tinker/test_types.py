"""``loops_async.tinker.types``: tinker 0.38's data types over the Loops core types."""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import warnings
from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
import numpy as np
import pytest

from loops_async import types as core
from loops_async._codec import decode, encode
from loops_async.tinker import types as tt

REUSED = [
    "ModelInput",
    "EncodedTextChunk",
    "ImageChunk",
    "ImageAssetPointerChunk",
    "ModelInputChunk",
    "SamplingParams",
    "ForwardBackwardOutput",
    "OptimStepResponse",
    "SaveWeightsResponse",
    "SaveWeightsForSamplerResponse",
    "LoadWeightsResponse",
    "GetInfoResponse",
    "ModelData",
    "StopReason",
]


def mi(n: int = 3) -> core.ModelInput:
    return core.ModelInput.from_ints(range(1, n + 1))


def datum(**inputs: Any) -> tt.Datum:
    return tt.Datum(model_input=mi(), loss_fn_inputs=inputs)


# --------------------------------------------------------------------------- module surface


def test_reused_names_are_the_core_objects() -> None:
    for name in REUSED:
        assert getattr(tt, name) is getattr(core, name), name


def test_all_is_sorted_complete_and_documented() -> None:
    assert tt.__all__ == sorted(tt.__all__)
    assert len(set(tt.__all__)) == len(tt.__all__)
    for name in tt.__all__:
        assert hasattr(tt, name), name
    defined_here = {
        name
        for name, obj in vars(tt).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == tt.__name__
    }
    assert defined_here <= set(tt.__all__)
    for name in tt.__all__:
        obj = getattr(tt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_aliases_match_tinker() -> None:
    assert set(get_args(tt.LossFnType)) == {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "gspo",
        "stable_reinforce",
        "custom",
    }
    assert set(get_args(tt.TensorDtype)) == {"int64", "float32"}
    assert set(get_args(tt.CheckpointType)) == {"training", "sampler", "external"}
    assert tt.ModelID is str
    assert [c.value for c in tt.RequestErrorCategory] == ["unknown", "server", "user"]
    assert str(tt.RequestErrorCategory.User) == "user"
    assert tt.RequestErrorCategory("server") is tt.RequestErrorCategory.Server


def test_supported_loss_fns_are_what_the_server_implements() -> None:
    from loops_async.server.validation import LOSS_SPECS

    assert set(tt.SUPPORTED_LOSS_FNS) == set(LOSS_SPECS)
    assert len(tt.SUPPORTED_LOSS_FNS) == len(LOSS_SPECS)


# --------------------------------------------------------------------------- TensorData


def test_tensor_data_is_a_frozen_core_subclass_that_encodes_identically() -> None:
    td = tt.TensorData.from_numpy(np.array([[1.5, -2.0], [0.25, 4.0]], dtype=np.float64))
    assert type(td) is tt.TensorData
    assert isinstance(td, core.TensorData)
    assert (td.dtype, td.shape) == ("float32", [2, 2])
    same = core.TensorData(data=[1.5, -2.0, 0.25, 4.0], dtype="float32", shape=[2, 2])
    assert encode(td) == encode(same)
    with pytest.raises(AttributeError):
        td.shape = [4]  # type: ignore[misc]


def test_tensor_data_from_numpy_dtype_rules() -> None:
    assert tt.TensorData.from_numpy(np.zeros(2, np.float16)).dtype == "float32"
    assert tt.TensorData.from_numpy(np.zeros(2, np.float64)).to_numpy().dtype == np.float32
    ints = tt.TensorData.from_numpy(np.array([1, 2], np.int32))
    assert ints.dtype == "int64"
    assert ints.to_numpy().dtype == np.int64
    for bad in (np.array([1], np.uint8), np.array([True]), np.array(["a"])):
        with pytest.raises(ValueError, match="Unsupported numpy dtype"):
            tt.TensorData.from_numpy(bad)


def test_tensor_data_round_trips() -> None:
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    td = tt.TensorData.from_numpy(arr)
    np.testing.assert_array_equal(td.to_numpy(), arr)
    np.testing.assert_array_equal(td.to_numpy(pad_value=-1), arr)
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert td.tolist(pad_value=7) == [[0, 1, 2], [3, 4, 5]]
    assert td.data == [0, 1, 2, 3, 4, 5]
    back = decode(encode(td), tt.TensorData)
    assert type(back) is tt.TensorData
    assert back == td
    assert pickle.loads(pickle.dumps(td)) == td
    nan = tt.TensorData.from_numpy(np.array([1.0, np.nan], np.float32))
    core_back = decode(encode(nan), core.TensorData)
    assert core_back.data[1] is None
    assert math.isnan(core_back.to_numpy()[1])


def test_tensor_data_constructor_casts_and_infers_shape() -> None:
    td = tt.TensorData(data=[[1, 2], [3, 4]], dtype="float32")  # type: ignore[list-item]
    assert td.shape == [2, 2]
    assert td.to_numpy().dtype == np.float32
    assert td.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    flat = tt.TensorData(data=[1.0, 2.0, 3.0, 4.0], dtype="int64", shape=[2, 2])
    assert flat.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="shape"):
        tt.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
    with pytest.raises(TypeError):
        tt.TensorData(data=[1])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        tt.TensorData([1], "int64")  # type: ignore[call-arg]


def test_tensor_data_from_list_returns_the_subclass() -> None:
    td = tt.TensorData.from_list([[1, 2], [3, 4]], dtype=None)
    assert type(td) is tt.TensorData
    assert (td.dtype, td.shape) == ("int64", [2, 2])
    assert tt.TensorData.from_list([1, 2]).dtype == "float32"


def test_tensor_data_torch_conversions() -> None:
    torch = pytest.importorskip("torch")
    bf = tt.TensorData.from_torch(torch.tensor([[0.5, 1.0]], dtype=torch.bfloat16))
    assert type(bf) is tt.TensorData
    assert (bf.dtype, bf.shape, bf.tolist()) == ("float32", [1, 2], [[0.5, 1.0]])
    assert tt.TensorData.from_torch(torch.tensor([1.0], dtype=torch.float64)).dtype == "float32"
    i32 = tt.TensorData.from_torch(torch.tensor([1, 2], dtype=torch.int32))
    assert i32.dtype == "int64"
    t = i32.to_torch(pad_value=0)
    assert t.dtype == torch.int64
    assert t.tolist() == [1, 2]
    grad = torch.ones(2, requires_grad=True)
    assert tt.TensorData.from_torch(grad * 2).tolist() == [2.0, 2.0]
    for bad in (torch.tensor([True]), torch.tensor([1], dtype=torch.uint8)):
        with pytest.raises(ValueError, match="Unsupported torch dtype"):
            tt.TensorData.from_torch(bad)


def test_tensor_data_from_torch_sparse_stores_dense() -> None:
    torch = pytest.importorskip("torch")
    dense = torch.tensor([[0, 0, 5], [0, 7, 0]])
    td = tt.TensorData.from_torch_sparse(dense)
    assert (td.dtype, td.shape, td.tolist()) == ("int64", [2, 3], [[0, 0, 5], [0, 7, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = dense.to_sparse_csr()
    from_csr = tt.TensorData.from_torch_sparse(csr, pad_value=0)
    assert from_csr == td
    assert tt.TensorData.from_torch_sparse(dense, pad_value=-1).tolist() == td.tolist()
    with pytest.raises(TypeError, match="pad_value"):
        tt.TensorData.from_torch_sparse(dense, pad_value=0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Datum


def test_datum_lists_take_their_dtype_from_the_key() -> None:
    d = datum(
        target_tokens=[1.0, 2.0, 3.0],
        weights=[1, 0, 1],
        advantages=[0.5, -0.5, 0.0],
        logprobs=[-1, -2, -3],
        clip_low_threshold=[1, 1, 1],
        clip_high_threshold=[2, 2, 2],
        sequence_ratio_mask=[1, 1, 0],
    )
    inputs = d.loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64"
    assert inputs["target_tokens"].tolist() == [1, 2, 3]
    for key in (
        "weights",
        "advantages",
        "logprobs",
        "clip_low_threshold",
        "clip_high_threshold",
        "sequence_ratio_mask",
    ):
        assert inputs[key].dtype == "float32", key
        assert isinstance(inputs[key], tt.TensorData)
    assert inputs["weights"].tolist() == [1.0, 0.0, 1.0]
    assert datum(weights=[True, False]).loss_fn_inputs["weights"].tolist() == [1.0, 0.0]
    assert datum(weights=[True, False]).loss_fn_inputs["weights"].dtype == "float32"
    empty = datum(target_tokens=[]).loss_fn_inputs["target_tokens"]
    assert (empty.dtype, empty.shape) == ("int64", [0])
    two_d = datum(target_tokens=[[1, 2], [3, 4]]).loss_fn_inputs["target_tokens"]
    assert (two_d.dtype, two_d.shape) == ("int64", [2, 2])
    assert datum(weights=(1, 0)).loss_fn_inputs["weights"].dtype == "float32"


def test_datum_arrays_keep_their_dtype() -> None:
    d = datum(
        weights=np.array([1, 0, 1], dtype=np.int32),
        target_tokens=np.array([1.0, 2.0], dtype=np.float64),
    )
    assert d.loss_fn_inputs["weights"].dtype == "int64"
    assert d.loss_fn_inputs["target_tokens"].dtype == "float32"
    assert d.loss_fn_inputs["target_tokens"].to_numpy().dtype == np.float32
    mask = datum(mask=np.array([1.0, 0.0])).loss_fn_inputs["mask"]
    assert mask.dtype == "float32", "arrays are accepted under any key"
    for bad in (np.array([1, 0], np.uint8), np.array([True, False])):
        with pytest.raises(ValueError, match="Unsupported numpy dtype"):
            datum(weights=bad)


def test_datum_keeps_tensor_data_instances() -> None:
    ours = tt.TensorData.from_numpy(np.array([1, 2]))
    theirs = core.TensorData(data=[1.0, 2.0], dtype="float32")
    d = datum(target_tokens=ours, weights=theirs)
    assert d.loss_fn_inputs["target_tokens"] is ours
    assert d.loss_fn_inputs["weights"] is theirs


def test_datum_conversion_errors() -> None:
    with pytest.raises(KeyError, match="mask") as info:
        datum(mask=[1, 0, 1])
    assert "target_tokens" in str(info.value), "the message lists the allowed keys"
    with pytest.raises(ValueError, match="ragged"):
        datum(target_tokens=[[1, 2], [3]])
    with pytest.raises(TypeError, match="dict"):
        datum(weights={"a": 1.0})
    with pytest.raises(TypeError, match="float"):
        datum(weights=1.0)
    with pytest.raises(ValueError, match="could not convert"):
        datum(weights=["a", "b"])


def test_datum_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    d = datum(
        logprobs=torch.tensor([-0.5, -1.0, -2.0], dtype=torch.bfloat16),
        advantages=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        target_tokens=torch.tensor([[1, 0], [0, 2], [0, 0]], dtype=torch.int32),
        weights=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
    )
    inputs = d.loss_fn_inputs
    assert (inputs["logprobs"].dtype, inputs["logprobs"].tolist()) == (
        "float32",
        [-0.5, -1.0, -2.0],
    )
    assert inputs["advantages"].dtype == "float32"
    assert (inputs["target_tokens"].dtype, inputs["target_tokens"].shape) == ("int64", [3, 2])
    assert inputs["target_tokens"].tolist() == [[1, 0], [0, 2], [0, 0]]
    assert (inputs["weights"].dtype, inputs["weights"].shape) == ("float32", [3, 2])
    with pytest.raises(ValueError, match="Unsupported torch dtype"):
        datum(weights=torch.tensor([True, False]))


def test_datum_is_a_frozen_dataclass_that_replace_works_on() -> None:
    d = datum(target_tokens=[1, 2, 3], weights=[1, 1, 0])
    assert dataclasses.is_dataclass(d)
    assert [f.name for f in dataclasses.fields(d)] == [
        "model_input",
        "loss_fn_inputs",
        "model_input_spans",
        "loss_fn_input_spans",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.model_input = mi(1)  # type: ignore[misc]
    inputs = {k: v for k, v in d.loss_fn_inputs.items() if k != "weights"}
    inputs["advantages"] = [0.5, 0.5, 0.5]  # type: ignore[assignment]
    r = dataclasses.replace(d, loss_fn_inputs=inputs)
    assert set(r.loss_fn_inputs) == {"target_tokens", "advantages"}
    assert r.loss_fn_inputs["advantages"].dtype == "float32"
    assert r.model_input is d.model_input
    assert set(d.loss_fn_inputs) == {"target_tokens", "weights"}, "the original is unchanged"
    # the stored dict is a plain dict the cookbook assigns into
    d.loss_fn_inputs["advantages"] = tt.TensorData.from_numpy(np.zeros(3))
    assert "advantages" in d.loss_fn_inputs
    positional = tt.Datum(mi(), {"weights": [1, 1, 1]})  # type: ignore[dict-item]
    assert positional.loss_fn_inputs["weights"].dtype == "float32"
    assert tt.Datum(mi()).loss_fn_inputs == {}


def test_datum_to_core_encodes_like_a_hand_built_core_datum() -> None:
    d = datum(target_tokens=[1, 2, 3], weights=[1.0, 0.5, 0.0])
    by_hand = core.Datum(
        model_input=mi(),
        loss_fn_inputs={
            "target_tokens": core.TensorData(data=[1, 2, 3], dtype="int64", shape=[3]),
            "weights": core.TensorData(data=[1.0, 0.5, 0.0], dtype="float32", shape=[3]),
        },
    )
    converted = d.to_core()
    assert type(converted) is core.Datum
    assert encode(converted) == encode(by_hand)
    assert msgspec.json.decode(encode(converted)) == msgspec.json.decode(encode(by_hand))
    converted.loss_fn_inputs.pop("weights")
    assert "weights" in d.loss_fn_inputs, "to_core copies the dict"


def test_to_core_data() -> None:
    ours = datum(target_tokens=[1, 2, 3])
    theirs = core.Datum(model_input=mi(), loss_fn_inputs={"target_tokens": [1, 2, 3]})  # type: ignore[dict-item]
    out = tt.to_core_data([ours, theirs])
    assert all(type(x) is core.Datum for x in out)
    assert out[1] is theirs
    assert encode(out[0]) == encode(out[1])
    with pytest.raises(TypeError, match=r"data\[1\]"):
        tt.to_core_data([ours, {"model_input": mi()}])


def test_with_provenance() -> None:
    d = datum(target_tokens=[1, 2, 3], weights=[1, 1, 1])
    prompt = tt.PromptProvenanceSpan(sequence_id="s0", length=1)
    sampled = tt.SampledProvenanceSpan(sequence_id="s0", offset=0, length=2)
    rows: tt.ProvenanceSpans = [tt.SampledProvenanceSpan(sequence_id="s0", length=3)]
    p = d.with_provenance(model_input=[prompt, sampled], loss_fn_inputs=rows)
    assert p.model_input_spans == [prompt, sampled]
    assert p.loss_fn_input_spans == rows
    assert d.model_input_spans is None, "a copy"
    assert p.loss_fn_inputs == d.loss_fn_inputs
    assert p.to_core() == d.to_core(), "spans do not travel"
    with pytest.raises(ValueError, match="model_input spans cover 2"):
        d.with_provenance([sampled], rows)
    with pytest.raises(ValueError, match="loss_fn_inputs spans cover 2"):
        d.with_provenance([prompt, sampled], [sampled])
    # no 1-D target_tokens: the loss spans are not checked
    no_targets = datum(weights=[1, 1, 1])
    assert no_targets.with_provenance([prompt, sampled], [sampled]).loss_fn_input_spans
    with pytest.raises(ValueError, match="pair"):
        tt.Datum(mi(), model_input_spans=[prompt])
    with pytest.raises(TypeError, match="PromptProvenanceSpan"):
        tt.Datum(mi(), model_input_spans=["x"], loss_fn_input_spans=[])  # type: ignore[list-item]


def test_provenance_spans() -> None:
    span = tt.SampledProvenanceSpan(sequence_id="a", length=2)
    assert span.offset == 0
    with pytest.raises(TypeError):
        tt.SampledProvenanceSpan("a", 0, 2)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        span.length = 3  # type: ignore[misc]
    for cls in (tt.PromptProvenanceSpan, tt.SampledProvenanceSpan):
        with pytest.raises(ValueError, match="length"):
            cls(sequence_id="a", length=-1)
        with pytest.raises(ValueError, match="sequence_id"):
            cls(sequence_id="", length=1)
        with pytest.raises(ValueError, match="offset"):
            cls(sequence_id="a", offset=-1, length=1)


# --------------------------------------------------------------------------- optimizers


def test_adam_params_defaults_strictness_and_to_core() -> None:
    p = tt.AdamParams()
    assert msgspec.structs.asdict(p) == {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    with pytest.raises(TypeError):
        tt.AdamParams(lr=1e-3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        tt.AdamParams(1e-3)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        p.learning_rate = 1.0  # type: ignore[misc]
    c = tt.AdamParams(learning_rate=3e-4, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1)
    core_params = c.to_core()
    assert type(core_params) is core.AdamParams
    assert msgspec.structs.asdict(core_params) == msgspec.structs.asdict(c)
    assert tt.AdamParams().to_core().grad_clip_norm == 0.0, "not the core default (1.0)"
    assert core.AdamParams().grad_clip_norm != 0.0


def test_optimizer_families() -> None:
    dimuon = tt.DimuonParams(learning_rate=0.02)
    assert (dimuon.type, dimuon.grad_clip_norm, dimuon.beta1) == ("dimuon", 0.0, 0.9)
    assert isinstance(dimuon, tt.OptimParamsBase)
    assert not isinstance(tt.AdamParams(), tt.OptimParamsBase)
    with pytest.raises(TypeError):
        tt.DimuonParams()  # type: ignore[call-arg]
    cases: list[dict[str, Any]] = [{"learning_rate": -1.0}, {"learning_rate": 1.0, "beta1": 1.0}]
    for bad in cases:
        with pytest.raises(ValueError, match="DimuonParams"):
            tt.DimuonParams(**bad)
    with pytest.raises(ValueError, match="finite"):
        tt.DimuonParams(learning_rate=math.inf)
    assert tt.AdamOptimizerConfig().type == "adamw"
    assert (tt.DimuonOptimizerConfig().type, tt.DimuonOptimizerConfig().version) == ("dimuon", 1)
    assert isinstance(tt.AdamOptimizerConfig(), tt.OptimizerConfigBase)
    with pytest.raises(ValueError, match="adamw"):
        tt.AdamOptimizerConfig(type="sgd")  # type: ignore[arg-type]
    info = tt.WeightsInfoResponse(base_model="m", is_lora=True, lora_rank=8)
    assert info.optimizer_config == tt.AdamOptimizerConfig()
    back = decode(encode(info), tt.WeightsInfoResponse)
    assert back.optimizer_config.type == "adamw"
    assert back.lora_rank == 8


# --------------------------------------------------------------------------- sampling


def test_sampled_sequence_constructor_and_properties() -> None:
    fields = [f.name for f in dataclasses.fields(tt.SampledSequence)]
    assert fields == ["stop_reason", "sequence_id", "tokens_np", "logprobs_np", "topk_logprobs_np"]
    seq = tt.SampledSequence(
        "stop", "seq-1", np.array([5, 6], np.int32), np.array([-0.5, -1.0], np.float32)
    )
    assert (seq.stop_reason, seq.sequence_id) == ("stop", "seq-1")
    assert seq.tokens == [5, 6]
    assert seq.logprobs == [-0.5, -1.0]
    assert seq.tokens is seq.tokens, "cached"
    assert seq.topk_logprobs is None
    bare = tt.SampledSequence(stop_reason="length", sequence_id="x")
    assert (bare.tokens, bare.logprobs) == ([], None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        seq.sequence_id = "y"  # type: ignore[misc]
    topk = tt.TopkLogprobs(
        np.array([[3, 4], [0, 0], [7, 0]], np.int32),
        np.array([[-0.5, -1.5], [-99999.0, -99999.0], [-0.25, -99999.0]], np.float32),
    )
    with_topk = tt.SampledSequence("stop", "s", np.array([3, 0, 7], np.int32), None, topk)
    assert with_topk.topk_logprobs == [[(3, -0.5), (4, -1.5)], None, [(7, -0.25)]]


def test_sampled_sequence_from_core() -> None:
    c = core.SampledSequence(tokens=[1, 2, 3], logprobs=[-0.5, -0.25, -1.0], stop_reason="stop")
    seq = tt.SampledSequence.from_core(c, "abc")
    assert seq.sequence_id == "abc"
    assert seq.stop_reason == "stop"
    assert seq.tokens_np is not None
    assert seq.tokens_np.dtype == np.int32
    assert seq.logprobs_np is not None
    assert seq.logprobs_np.dtype == np.float32
    assert seq.tokens == [1, 2, 3]
    assert seq.logprobs == [-0.5, -0.25, -1.0]
    no_lp = tt.SampledSequence.from_core(core.SampledSequence(tokens=[9]), "d")
    assert (no_lp.tokens, no_lp.logprobs, no_lp.stop_reason) == ([9], None, "length")


def test_sample_response_from_core_maps_missing_prompt_logprobs() -> None:
    c = core.SampleResponse(
        sequences=[
            core.SampledSequence(tokens=[5], logprobs=[-0.5], stop_reason="length"),
            core.SampledSequence(tokens=[6, 7], logprobs=[-1.0, -2.0], stop_reason="stop"),
        ],
        prompt_logprobs=[None, -0.25, None, -2.0],
        topk_prompt_logprobs=[None, [(1, -0.5), (2, -1.0)], [], [(3, -0.25)]],
    )
    r = tt.SampleResponse.from_core(c, ["a", "b"])
    assert [s.sequence_id for s in r.sequences] == ["a", "b"]
    assert r.sequences[1].tokens == [6, 7]
    assert r.prompt_logprobs_np is not None
    assert r.prompt_logprobs_np.dtype == np.float32
    assert np.isnan(r.prompt_logprobs_np[[0, 2]]).all()
    assert r.prompt_logprobs == [None, -0.25, None, -2.0]
    assert r.topk_prompt_logprobs_np is not None
    assert r.topk_prompt_logprobs_np.token_ids.shape == (4, 2)
    assert r.topk_prompt_logprobs == [None, [(1, -0.5), (2, -1.0)], None, [(3, -0.25)]]
    assert (r.prompt_cache_hit_tokens, r.target_prompt_logprobs, r.prompt_alt_tokens) == (
        0,
        None,
        None,
    )
    plain = tt.SampleResponse.from_core(core.SampleResponse(sequences=[]), [])
    assert (plain.prompt_logprobs, plain.topk_prompt_logprobs) == (None, None)
    all_none = tt.SampleResponse.from_core(
        core.SampleResponse(topk_prompt_logprobs=[None, None]), []
    )
    assert all_none.topk_prompt_logprobs == [None, None]
    with pytest.raises(ValueError, match="sequence ids"):
        tt.SampleResponse.from_core(c, ["a"])


def test_sample_response_fields_and_nan_view() -> None:
    fields = [f.name for f in dataclasses.fields(tt.SampleResponse)]
    assert fields == [
        "sequences",
        "prompt_logprobs_np",
        "topk_prompt_logprobs_np",
        "target_prompt_logprobs",
        "prompt_cache_hit_tokens",
        "prompt_alt_tokens",
    ]
    r = tt.SampleResponse([], np.array([np.nan, -1.5], np.float32))
    assert r.prompt_logprobs == [None, -1.5]
    assert r.prompt_cache_hit_tokens == 0


# --------------------------------------------------------------------------- checkpoints


def test_parsed_checkpoint_tinker_path() -> None:
    cases = {
        "tinker://sess:train:0/weights/step-10": ("training", "weights/step-10"),
        "tinker://run/sampler_weights/final": ("sampler", "sampler_weights/final"),
        "tinker://run/external_weights/hf": ("external", "external_weights/hf"),
    }
    for path, (kind, checkpoint_id) in cases.items():
        parsed = tt.ParsedCheckpointTinkerPath.from_tinker_path(path)
        assert parsed.tinker_path == path
        assert parsed.checkpoint_type == kind
        assert parsed.checkpoint_id == checkpoint_id
        assert parsed.training_run_id == path.removeprefix("tinker://").split("/")[0]
    for bad in (
        "bt://loops:run/weights/a",
        "tinker://run/weights",
        "tinker://run/weights/a/b",
        "tinker://run/optimizer/a",
        "run/weights/a",
    ):
        with pytest.raises(ValueError, match="Invalid tinker path"):
            tt.ParsedCheckpointTinkerPath.from_tinker_path(bad)


def test_checkpoint_models_decode_leniently() -> None:
    wire = (
        b'{"training_runs":[{"training_run_id":"r","base_model":"m","model_owner":"me",'
        b'"is_lora":true,"lora_rank":4,"last_request_time":"2025-01-02T03:04:05Z","new":1,'
        b'"last_checkpoint":{"checkpoint_id":"weights/a","checkpoint_type":"training",'
        b'"time":"2025-01-02T03:04:05Z","tinker_path":"tinker://r/weights/a"}}],'
        b'"cursor":{"offset":0,"limit":20,"total_count":1}}'
    )
    runs = decode(wire, tt.TrainingRunsResponse)
    run = runs.training_runs[0]
    assert run.last_request_time == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert run.corrupted is False
    assert run.last_checkpoint is not None
    assert run.last_checkpoint.public is False
    assert runs.cursor.total_count == 1
    ckpt = tt.Checkpoint(
        checkpoint_id="sampler_weights/b", checkpoint_type="sampler", tinker_path="p"
    )
    assert ckpt.time is None
    listing = tt.CheckpointsListResponse(checkpoints=[ckpt])
    assert listing.cursor is None
    assert decode(encode(listing), tt.CheckpointsListResponse) == listing
    with pytest.raises(AttributeError):
        ckpt.public = True  # type: ignore[misc]


def test_small_models_have_tinker_defaults() -> None:
    lora = tt.LoraConfig(rank=16)
    assert (lora.seed, lora.train_unembed, lora.train_mlp, lora.train_attn) == (
        None,
        True,
        True,
        True,
    )
    with pytest.raises(TypeError):
        tt.LoraConfig(rank=8, alpha=16)  # type: ignore[call-arg]
    model = tt.SupportedModel()
    assert (model.model_name, model.max_context_length, model.trainable, model.sampleable) == (
        None,
        None,
        None,
        None,
    )
    caps = tt.GetServerCapabilitiesResponse(supported_models=[tt.SupportedModel(model_name="m")])
    assert caps.supported_models[0].model_name == "m"
    assert tt.SaveWeightsExternalResponse(path="tinker://r/external_weights/x").type is None


def test_request_types() -> None:
    d = datum(target_tokens=[1, 2, 3])
    fb = tt.ForwardBackwardInput([d], "cross_entropy")
    assert (fb.data, fb.loss_fn, fb.loss_fn_config) == ([d], "cross_entropy", None)
    step = tt.OptimStepRequest(optim_params=tt.AdamParams(), model_id="m")
    assert (step.seq_id, step.type) == (None, "optim_step")
    req = tt.SampleRequest(prompt=mi(), sampling_params=core.SamplingParams(max_tokens=4))
    assert (req.num_samples, req.topk_prompt_logprobs, req.type) == (1, 0, "sample")
    with pytest.raises(TypeError):
        tt.SampleRequest(mi(), core.SamplingParams())  # type: ignore[call-arg, arg-type]
