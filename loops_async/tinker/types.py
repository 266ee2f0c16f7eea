"""The types of the tinker compatibility layer: what ``tinker.types`` resolves to.

Code written against tinker 0.38 imports its data types from here (through ``loops_async.tinker``).
Names, fields, defaults and constructor order follow tinker 0.38; the objects either *are* the
Loops core types (:mod:`loops_async.types`) or convert to them, so nothing in between has to
translate field by field.

Reused as is (the very same classes as :mod:`loops_async.types`): ``ModelInput``,
``EncodedTextChunk``, ``ImageChunk``, ``ImageAssetPointerChunk``, ``ModelInputChunk``,
``SamplingParams``, ``ForwardBackwardOutput``, ``OptimStepResponse``, ``SaveWeightsResponse``,
``SaveWeightsForSamplerResponse``, ``LoadWeightsResponse``, ``GetInfoResponse``, ``ModelData`` and
``StopReason``.

Tinker-flavoured here: :class:`TensorData` (a frozen subclass of the core ``TensorData``, so it
encodes identically and passes the core's ``isinstance`` checks), :class:`Datum` (a frozen
dataclass that converts ``loss_fn_inputs`` like tinker and turns into a core datum with
:meth:`Datum.to_core`), :class:`AdamParams` (tinker's defaults, :meth:`AdamParams.to_core`),
:class:`SampledSequence` / :class:`SampleResponse` (numpy-backed, built from core results with
``from_core``), the provenance spans, the optimizer families, the checkpoint / training-run
models and the request types, which exist so that imports and ``isinstance`` checks work.

Deviations from tinker 0.38:

- ``TensorData`` is a keyword-only msgspec Struct (``TensorData(data=..., dtype=...)``; positional
  use raises ``TypeError``), compares by value (tinker's compares by identity), infers ``shape``
  when it is omitted, and its ``data`` is an :class:`~loops_async.types.ArrayData` (a read-only,
  list-like view of a flat numpy array) instead of a fresh list. There is no sparse wire format:
  ``from_torch_sparse`` stores the tensor dense, ``sparse_crow_indices``/``sparse_col_indices``
  do not exist, and ``pad_value`` is accepted and ignored by ``to_numpy``/``to_torch``/``tolist``.
- ``Datum.loss_fn_inputs`` also accepts tuples (converted like lists). A core ``TensorData`` is
  kept as is, like ours. Setting only one of the two span lists raises ``ValueError`` (tinker
  asserts). Spans do not travel: the Loops wire has no provenance, so :meth:`Datum.to_core`
  drops them.
- ``ModelInput``, ``SamplingParams`` and the reused results are the core msgspec Structs, not
  frozen pydantic models; there is no ``DmelChunk``.
- ``AdamParams``, ``LoraConfig``, the optimizer families and the checkpoint / training-run models
  are frozen msgspec Structs: they do not coerce or validate field types on construction
  (``DimuonParams`` and the optimizer configs check their ranges and tags), and the response
  models ignore unknown fields when decoded. ``Checkpoint.time`` and
  ``TrainingRun.last_request_time`` may be ``None`` (and default to it): the Loops control plane
  does not always know them. ``WeightsInfoResponse.optimizer_config`` is typed as the base class
  (every optimizer config is one), so it decodes as :class:`OptimizerConfigBase`.
- ``OptimParamsBase`` and ``OptimizerConfigBase`` do not keep unknown extra fields.
- ``SampledSequence`` and ``SampleResponse`` take no private ``_..._list`` constructor
  arguments; their list views are computed from the numpy fields and cached. What the Loops
  sampler reports beyond tinker's fields (a sequence's ``text`` and ``routed_experts``, the
  response's ``prompt_token_ids`` and ``policy_version``) is not carried over by ``from_core``.
- ``OptimStepRequest``, ``SampleRequest`` are frozen keyword-only dataclasses, not pydantic
  models; nothing sends them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum, auto
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias, cast

import msgspec
import numpy as np
import numpy.typing as npt

from .. import types as _core
from ..types import (
    ArrayData,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    ImageAssetPointerChunk,
    ImageChunk,
    LoadWeightsResponse,
    ModelData,
    ModelInput,
    ModelInputChunk,
    OptimStepResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
    _numpy_dtype,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdamOptimizerConfig",
    "AdamParams",
    "Checkpoint",
    "CheckpointType",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "EncodedTextChunk",
    "ForwardBackwardInput",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelData",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "OptimParams",
    "OptimParamsBase",
    "OptimStepRequest",
    "OptimStepResponse",
    "OptimizerConfig",
    "OptimizerConfigBase",
    "ParsedCheckpointTinkerPath",
    "PromptAltTokens",
    "PromptProvenanceSpan",
    "ProvenanceSpans",
    "RequestErrorCategory",
    "SUPPORTED_LOSS_FNS",
    "SampleRequest",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingClientKind",
    "SamplingParams",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "TopkLogprobs",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
    "to_core_data",
]

# --------------------------------------------------------------------------- aliases

ModelID: TypeAlias = str
"""The id of a training run / model (tinker's ``ModelID``)."""

TensorDtype: TypeAlias = Literal["int64", "float32"]
"""The tensor dtypes tinker's conversions produce."""

SamplingClientKind: TypeAlias = Literal["snapshot", "inflight"]
"""What ``save_weights_and_get_sampling_client(kind=...)`` returns: a client of exactly the
weights of the call (``snapshot``), or one that follows the run's live adapter (``inflight``)."""

LossFnType: TypeAlias = Literal[
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
]
"""tinker's loss names (not checked on the client; see :data:`SUPPORTED_LOSS_FNS`)."""

SUPPORTED_LOSS_FNS: tuple[str, ...] = (
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "dpo",
    "dppo",
)
"""The loss functions a Loops trainer implements (``loops_async.server.validation.LOSS_SPECS``).
``gspo``, ``stable_reinforce`` and ``custom`` of :data:`LossFnType` are not among them;
``dpo`` and ``dppo`` are Loops additions."""

LossFnInputs: TypeAlias = dict[str, _core.TensorData]
"""A datum's loss inputs by name (tinker :class:`TensorData` or core ``TensorData`` values)."""

LossFnOutput: TypeAlias = dict[str, _core.TensorData]
"""One datum's loss outputs by name, as in ``ForwardBackwardOutput.loss_fn_outputs``."""

CheckpointType: TypeAlias = Literal["training", "sampler", "external"]
"""What a checkpoint holds: ``save_state`` (training), ``save_weights_for_sampler`` (sampler) or
``save_weights_external`` (external) weights."""


class RequestErrorCategory(StrEnum):
    """Whose fault a failed request was (``RequestFailedError.category``)."""

    Unknown = auto()
    Server = auto()
    User = auto()


# --------------------------------------------------------------------------- TensorData


@contextmanager
def _quiet_sparse_csr() -> Iterator[None]:
    """Silence torch's "sparse CSR is in beta" notice around a supported conversion."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Sparse CSR tensor support is in beta state", category=UserWarning
        )
        yield


# msgspec allows a frozen subclass of a mutable Struct; mypy's dataclass rules do not know that.
class TensorData(_core.TensorData, kw_only=True, frozen=True):  # type: ignore[misc]
    """A tensor in tinker's shape: flat ``data``, a ``dtype`` name and a ``shape``.

    A frozen subclass of the core :class:`loops_async.types.TensorData`: it encodes exactly like
    it and is accepted wherever a core tensor is. Construction casts ``data`` (a list, a nested
    list or a numpy array) to ``dtype`` and stores it flat; ``shape`` defaults to the shape of
    ``data`` and must agree with its size. :meth:`from_numpy` and :meth:`from_torch` follow
    tinker: floats become ``float32``, signed integers ``int64``, and unsigned integers and
    booleans raise ``ValueError``.
    """

    def __post_init__(self) -> None:
        np_dtype = _numpy_dtype(self.dtype)
        data = self.data
        if isinstance(data, ArrayData):
            arr = data.array
            if arr.dtype != np_dtype:
                data = ArrayData(arr.astype(np_dtype))
        else:
            arr = np.asarray(data, dtype=np_dtype)
            data = ArrayData(arr)
        shape = list(arr.shape) if self.shape is None else [int(d) for d in self.shape]
        if math.prod(shape) != arr.size:
            raise ValueError(f"shape {shape} does not match the {arr.size} values of data")
        if data is not self.data:
            msgspec.structs.force_setattr(self, "data", data)
        msgspec.structs.force_setattr(self, "shape", shape)

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any], dtype: _core.DType | None = None) -> TensorData:
        """Wrap a numpy array of any shape.

        Without ``dtype`` (tinker's call): float arrays become ``float32``, signed integer arrays
        ``int64``; unsigned integers, booleans and anything else raise ``ValueError``. ``dtype``
        (a Loops extension) casts to that wire dtype instead.
        """
        arr = np.asarray(array)
        name: str
        if dtype is not None:
            name = dtype
        elif arr.dtype.kind == "f":
            name = "float32"
        elif arr.dtype.kind == "i":
            name = "int64"
        else:
            raise ValueError(
                f"Unsupported numpy dtype: {arr.dtype} (tinker accepts float and signed int arrays)"
            )
        target = _numpy_dtype(name)
        if arr.dtype != target:
            arr = arr.astype(target)
        return cls(data=ArrayData(arr), dtype=name, shape=list(arr.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """Wrap a torch tensor (detached and moved to CPU).

        ``bfloat16``, ``float16`` and ``float64`` become ``float32``; signed integers become
        ``int64``; ``bool`` and unsigned integer tensors raise ``ValueError``.
        """
        import torch

        t = tensor.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(torch.float32)
        if t.dtype == torch.bool or (not t.dtype.is_floating_point and not t.dtype.is_signed):
            raise ValueError(
                f"Unsupported torch dtype: {t.dtype} (tinker accepts float and signed int tensors)"
            )
        return cls.from_numpy(t.contiguous().numpy())

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor, pad_value: int = 0) -> TensorData:
        """Wrap a 2-D torch tensor that is mostly ``pad_value`` (tinker's CSR constructor).

        The Loops wire has no sparse format, so the tensor is stored dense with its shape: a
        dense tensor exactly as :meth:`from_torch`, a sparse (e.g. CSR) tensor densified first.
        ``pad_value`` must be an integer (``TypeError`` otherwise, as in tinker); it does not
        change the result.
        """
        if isinstance(pad_value, bool) or not isinstance(pad_value, int | np.integer):
            raise TypeError(
                f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}"
            )
        import torch

        if tensor.layout != torch.strided:
            with _quiet_sparse_csr():
                tensor = tensor.to_dense()
        return cls.from_torch(tensor)

    @classmethod
    def from_list(
        cls,
        data: Sequence[Any],
        dtype: _core.DType | None = "float32",
        shape: Sequence[int] | None = None,
    ) -> TensorData:
        """Build from a flat or nested list, as the core's ``from_list`` does (a Loops
        extension; ``dtype=None`` infers the dtype with tinker's rules)."""
        return cast("TensorData", super().from_list(data, dtype, shape))

    def to_numpy(self, pad_value: int = 0) -> npt.NDArray[Any]:
        """A numpy array of ``shape`` (``null`` values are NaN). ``pad_value`` is accepted for
        compatibility; dense data has no padding."""
        return super().to_numpy()

    def to_torch(self, pad_value: int = 0) -> torch.Tensor:
        """A torch tensor of ``shape`` and ``dtype``. ``pad_value`` is accepted for
        compatibility; dense data has no padding."""
        return super().to_torch()

    def tolist(self, pad_value: int = 0) -> list[Any]:
        """The values as a nested list of ``shape``. ``pad_value`` is accepted for
        compatibility; dense data has no padding."""
        return super().tolist()


# --------------------------------------------------------------------------- provenance


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """A run of datum positions that were positions ``[offset, offset + length)`` of the prompt
    of the request that produced sequence ``sequence_id``."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(type(self).__name__, self.sequence_id, self.offset, self.length)


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """A run of datum positions that were positions ``[offset, offset + length)`` of the sampled
    tokens of sequence ``sequence_id``."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(type(self).__name__, self.sequence_id, self.offset, self.length)


ProvenanceSpans: TypeAlias = list[PromptProvenanceSpan | SampledProvenanceSpan]
"""Consecutive runs tiling one datum field (see :meth:`Datum.with_provenance`)."""


def _check_span(kind: str, sequence_id: str, offset: int, length: int) -> None:
    if length < 0:
        raise ValueError(f"{kind}.length must be >= 0, got {length}")
    if not sequence_id:
        raise ValueError(f"{kind}.sequence_id must be non-empty")
    if offset < 0:
        raise ValueError(f"{kind}.offset must be >= 0, got {offset}")


def _check_span_types(name: str, spans: ProvenanceSpans | None) -> None:
    if spans is None:
        return
    for span in spans:
        if not isinstance(span, PromptProvenanceSpan | SampledProvenanceSpan):
            raise TypeError(
                f"{name} entries must be PromptProvenanceSpan or SampledProvenanceSpan, "
                f"got {type(span).__name__}"
            )


def _check_tiling(name: str, spans: ProvenanceSpans, expected: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(
            f"with_provenance {name} spans cover {total} positions but the field has "
            f"{expected}; the runs must tile it exactly"
        )


# --------------------------------------------------------------------------- Datum

_KEY_TO_DTYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}
"""The dtype a plain list gets, by ``loss_fn_inputs`` key (tinker's table)."""

_SPARSE_KEYS = frozenset({"target_tokens", "weights"})


def _ragged(key: str) -> ValueError:
    return ValueError(
        f"{key} must be a rectangular numeric array; ragged nested lists are not supported"
    )


def _as_array(key: str, value: list[Any] | tuple[Any, ...], dtype: Any) -> npt.NDArray[Any]:
    try:
        array = np.asarray(value, dtype=dtype)
    except ValueError as exc:
        if any(isinstance(item, list | tuple) for item in value):
            raise _ragged(key) from exc
        raise
    if dtype is None and array.dtype.kind not in "fiub" and array.ndim > 1:
        raise _ragged(key)
    return array


def _convert_loss_input(key: str, value: object) -> _core.TensorData:
    """One ``loss_fn_inputs`` value as a tensor, by tinker's rules."""
    if isinstance(value, _core.TensorData):
        return value
    if type(value).__module__.startswith("torch"):
        import torch

        if isinstance(value, torch.Tensor):
            if key in _SPARSE_KEYS and value.ndim == 2:
                return TensorData.from_torch_sparse(value)
            return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list | tuple):
        dtype = _KEY_TO_DTYPE.get(key)
        if dtype is None:
            _as_array(key, value, None)  # a ragged list is refused as such first
            raise KeyError(
                f"loss_fn_inputs[{key!r}]: no dtype is known for a plain list under this key "
                f"(lists are accepted under {', '.join(sorted(_KEY_TO_DTYPE))}); pass a numpy "
                "array, a torch tensor or a TensorData instead"
            )
        # one conversion, straight to the key's dtype
        return TensorData.from_numpy(_as_array(key, value, _numpy_dtype(dtype)))
    raise TypeError(f"Unsupported loss_fn_inputs value for {key!r}: {type(value).__name__}")


@dataclass(frozen=True)
class Datum:
    """One training example: the input sequence and the loss function's per-position inputs.

    ``loss_fn_inputs`` values are converted on construction as tinker does: tensors are kept;
    torch tensors go through :meth:`TensorData.from_torch` (a 2-D ``target_tokens`` or
    ``weights`` through :meth:`TensorData.from_torch_sparse`); numpy arrays through
    :meth:`TensorData.from_numpy` (the dtype comes from the array); plain lists get their dtype
    from the key (``target_tokens`` int64; ``weights``, ``advantages``, ``logprobs``,
    ``clip_low_threshold``, ``clip_high_threshold`` and ``sequence_ratio_mask`` float32; any
    other key raises ``KeyError``). A frozen dataclass, so :func:`dataclasses.replace` works;
    :meth:`to_core` gives the Loops wire datum.
    """

    model_input: ModelInput
    loss_fn_inputs: LossFnInputs = field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    """Provenance of the input tokens: runs tiling ``model_input``. Set with
    :meth:`with_provenance`."""
    loss_fn_input_spans: ProvenanceSpans | None = None
    """Provenance of the loss rows: runs tiling ``loss_fn_inputs["target_tokens"]``. Set with
    :meth:`with_provenance`."""

    def __post_init__(self) -> None:
        converted: LossFnInputs = {
            key: _convert_loss_input(key, value) for key, value in self.loss_fn_inputs.items()
        }
        object.__setattr__(self, "loss_fn_inputs", converted)
        _check_span_types("model_input_spans", self.model_input_spans)
        _check_span_types("loss_fn_input_spans", self.loss_fn_input_spans)
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(
        self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans
    ) -> Self:
        """A copy carrying both span lists.

        ``model_input`` spans must tile the input (their lengths sum to ``model_input.length``);
        ``loss_fn_inputs`` spans must tile ``loss_fn_inputs["target_tokens"]`` when that is a
        1-D tensor. ``ValueError`` otherwise.
        """
        _check_tiling("model_input", model_input, self.model_input.length)
        target_tokens = self.loss_fn_inputs.get("target_tokens")
        if target_tokens is not None and target_tokens.shape and len(target_tokens.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, target_tokens.shape[0])
        return replace(self, model_input_spans=model_input, loss_fn_input_spans=loss_fn_inputs)

    def to_core(self) -> _core.Datum:
        """The Loops wire datum (provenance spans are dropped: the wire has none)."""
        return _core.Datum(model_input=self.model_input, loss_fn_inputs=dict(self.loss_fn_inputs))


def to_core_data(data: Sequence[object]) -> list[_core.Datum]:
    """Core datums for a batch of tinker :class:`Datum` and core datums (passed through).

    Raises ``TypeError`` naming the index of anything else.
    """
    out: list[_core.Datum] = []
    for i, item in enumerate(data):
        if isinstance(item, Datum):
            out.append(item.to_core())
        elif isinstance(item, _core.Datum):
            out.append(item)
        else:
            raise TypeError(f"data[{i}]: expected a Datum, got {type(item).__name__}")
    return out


# --------------------------------------------------------------------------- optimizers


class AdamParams(msgspec.Struct, kw_only=True, frozen=True):
    """Adam settings for one ``optim_step`` with tinker's defaults (decoupled weight decay;
    ``grad_clip_norm=0.0`` means no clipping). :meth:`to_core` gives the Loops type."""

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_core(self) -> _core.AdamParams:
        """The same settings as :class:`loops_async.types.AdamParams` (every field explicit:
        the core's ``grad_clip_norm`` default differs)."""
        return _core.AdamParams(
            learning_rate=self.learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )


class OptimParamsBase(msgspec.Struct, kw_only=True, frozen=True):
    """Per-step settings of a non-Adam optimizer family, named by ``type``."""

    type: str


class DimuonParams(OptimParamsBase, kw_only=True, frozen=True):
    """Settings for one Dimuon optimizer step. Defined for compatibility: Loops trainers run
    Adam only."""

    type: Literal["dimuon"] = "dimuon"
    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9

    def __post_init__(self) -> None:
        if self.type != "dimuon":
            raise ValueError(f"DimuonParams.type must be 'dimuon', got {self.type!r}")
        for name in ("learning_rate", "grad_clip_norm", "beta1"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"DimuonParams.{name} must be finite")
        if self.learning_rate < 0:
            raise ValueError(f"DimuonParams.learning_rate must be >= 0, got {self.learning_rate}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"DimuonParams.beta1 must be in [0, 1), got {self.beta1}")


OptimParams: TypeAlias = AdamParams | OptimParamsBase
"""What ``optim_step`` accepts: :class:`AdamParams` or another family's settings."""


class OptimizerConfigBase(msgspec.Struct, kw_only=True, frozen=True):
    """The optimizer family a training model is created with, named by ``type``."""

    type: str


class AdamOptimizerConfig(OptimizerConfigBase, kw_only=True, frozen=True):
    """Create the training model with AdamW (the default)."""

    type: Literal["adamw"] = "adamw"

    def __post_init__(self) -> None:
        if self.type != "adamw":
            raise ValueError(f"AdamOptimizerConfig.type must be 'adamw', got {self.type!r}")


class DimuonOptimizerConfig(OptimizerConfigBase, kw_only=True, frozen=True):
    """Create the training model with Dimuon. Defined for compatibility: Loops trainers run
    Adam only."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1

    def __post_init__(self) -> None:
        if self.type != "dimuon" or self.version != 1:
            raise ValueError(
                "DimuonOptimizerConfig needs type='dimuon' and version=1, "
                f"got type={self.type!r}, version={self.version!r}"
            )


OptimizerConfig: TypeAlias = AdamOptimizerConfig | OptimizerConfigBase
"""An optimizer family: :class:`AdamOptimizerConfig` or another :class:`OptimizerConfigBase`."""


# --------------------------------------------------------------------------- sampling

_TOPK_MASK_LOGPROB = -99999.0


@dataclass(frozen=True, slots=True)
class TopkLogprobs:
    """The top-k tokens at each position as two ``(length, k)`` matrices: ``token_ids``
    (int32) and ``logprobs`` (float32). Empty slots hold ``(0, -99999.0)``."""

    token_ids: np.ndarray[Any, Any]
    logprobs: np.ndarray[Any, Any]


def _topk_to_lists(topk: TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    n, k = topk.token_ids.shape
    if n == 0 or k == 0:
        return []
    ids: list[int] = topk.token_ids.ravel().tolist()
    lps: list[float] = topk.logprobs.ravel().tolist()
    out: list[list[tuple[int, float]] | None] = []
    for i in range(n):
        start, end = i * k, (i + 1) * k
        while end > start and ids[end - 1] == 0 and lps[end - 1] == _TOPK_MASK_LOGPROB:
            end -= 1
        out.append(list(zip(ids[start:end], lps[start:end], strict=True)) if end > start else None)
    return out


def _topk_from_lists(rows: Sequence[Sequence[tuple[int, float]] | None]) -> TopkLogprobs:
    k = max([1, *(len(row) for row in rows if row)])
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), _TOPK_MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            ids[i, j] = token
            lps[i, j] = logprob
    return TopkLogprobs(ids, lps)


@dataclass(frozen=True)
class PromptAltTokens:
    """Draws from the next-token distribution at every prompt position after the first: two
    ``[len(prompt) - 1, k]`` tensors. Not produced by Loops samplers."""

    tokens: TensorData
    logprobs: TensorData


@dataclass(frozen=True)
class SampledSequence:
    """One sampled completion, numpy-backed as in tinker.

    ``tokens_np`` (int32) and ``logprobs_np`` (float32) hold the data; :attr:`tokens`,
    :attr:`logprobs` and :attr:`topk_logprobs` are list views computed on first access.
    Build one from a core result with :meth:`from_core`.
    """

    stop_reason: StopReason
    sequence_id: str
    """Identifies this sequence in later requests (e.g. provenance spans)."""
    tokens_np: np.ndarray[Any, Any] | None = field(default=None, repr=False)
    logprobs_np: np.ndarray[Any, Any] | None = field(default=None, repr=False)
    topk_logprobs_np: TopkLogprobs | None = field(default=None, repr=False)

    @cached_property
    def tokens(self) -> list[int]:
        """The generated token ids."""
        return [] if self.tokens_np is None else self.tokens_np.tolist()

    @cached_property
    def logprobs(self) -> list[float] | None:
        """The logprob of each generated token, or ``None`` if not computed."""
        return None if self.logprobs_np is None else self.logprobs_np.tolist()

    @cached_property
    def topk_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        """Per generated position, up to k ``(token_id, logprob)`` pairs (``None`` where
        nothing was reported); ``None`` if not requested."""
        return None if self.topk_logprobs_np is None else _topk_to_lists(self.topk_logprobs_np)

    @classmethod
    def from_core(cls, seq: _core.SampledSequence, sequence_id: str) -> SampledSequence:
        """The tinker view of a core :class:`loops_async.types.SampledSequence`."""
        return cls(
            stop_reason=seq.stop_reason,
            sequence_id=sequence_id,
            tokens_np=np.asarray(seq.tokens, dtype=np.int32).reshape(-1),
            logprobs_np=(
                None if seq.logprobs is None else np.asarray(seq.logprobs, dtype=np.float32)
            ),
        )


@dataclass(frozen=True)
class SampleResponse:
    """What ``SamplingClient.sample`` returns, numpy-backed as in tinker.

    ``prompt_logprobs_np`` is float32 with NaN where there is no value (always position 0);
    :attr:`prompt_logprobs` is the list view with ``None`` there. Build one from a core result
    with :meth:`from_core`.
    """

    sequences: Sequence[SampledSequence]
    prompt_logprobs_np: np.ndarray[Any, Any] | None = field(default=None, repr=False)
    topk_prompt_logprobs_np: TopkLogprobs | None = field(default=None, repr=False)
    target_prompt_logprobs: TensorData | None = None
    prompt_cache_hit_tokens: int = 0
    prompt_alt_tokens: PromptAltTokens | None = None

    @cached_property
    def prompt_logprobs(self) -> list[float | None] | None:
        """The logprob of each prompt token given the ones before it (``None`` where not
        computed, always at position 0); ``None`` if not requested."""
        if self.prompt_logprobs_np is None:
            return None
        out: list[float | None] = self.prompt_logprobs_np.tolist()
        for i in np.flatnonzero(np.isnan(self.prompt_logprobs_np)):
            out[int(i)] = None
        return out

    @cached_property
    def topk_prompt_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        """Per prompt position, up to k ``(token_id, logprob)`` pairs, most likely first
        (``None`` where not computed); ``None`` if not requested."""
        if self.topk_prompt_logprobs_np is None:
            return None
        return _topk_to_lists(self.topk_prompt_logprobs_np)

    @classmethod
    def from_core(cls, resp: _core.SampleResponse, sequence_ids: Sequence[str]) -> SampleResponse:
        """The tinker view of a core :class:`loops_async.types.SampleResponse`;
        ``sequence_ids`` names its sequences, in order (``ValueError`` if the counts differ)."""
        if len(sequence_ids) != len(resp.sequences):
            raise ValueError(
                f"{len(sequence_ids)} sequence ids for {len(resp.sequences)} sequences"
            )
        prompt_np = None
        if resp.prompt_logprobs is not None:
            prompt_np = np.array(
                [math.nan if lp is None else lp for lp in resp.prompt_logprobs], dtype=np.float32
            )
        topk_np = None
        if resp.topk_prompt_logprobs is not None:
            topk_np = _topk_from_lists(resp.topk_prompt_logprobs)
        return cls(
            sequences=[
                SampledSequence.from_core(seq, sid)
                for seq, sid in zip(resp.sequences, sequence_ids, strict=True)
            ],
            prompt_logprobs_np=prompt_np,
            topk_prompt_logprobs_np=topk_np,
        )


# --------------------------------------------------------------------------- checkpoints, runs


class Checkpoint(msgspec.Struct, kw_only=True, frozen=True):
    """A saved checkpoint as tinker's ``RestClient`` lists it."""

    checkpoint_id: str
    """``"<weights|sampler_weights|external_weights>/<name>"``."""
    checkpoint_type: CheckpointType
    time: datetime | None = None
    """When it was saved (``None``: unknown)."""
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    """When it expires (``None``: never)."""


class Cursor(msgspec.Struct, kw_only=True, frozen=True):
    """Where a page of a listing starts, how long it is and how many items there are."""

    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(msgspec.Struct, kw_only=True, frozen=True):
    """A (page of a) list of checkpoints."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None
    """``None`` for an unpaginated listing."""


class TrainingRun(msgspec.Struct, kw_only=True, frozen=True):
    """A training run as tinker's ``RestClient`` reports it."""

    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime | None = None
    """When the run last served a request (``None``: unknown)."""
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(msgspec.Struct, kw_only=True, frozen=True):
    """A page of training runs."""

    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoResponse(msgspec.Struct, kw_only=True, frozen=True):
    """What is needed to load a checkpoint: base model, optimizer family and LoRA settings."""

    base_model: str
    optimizer_config: OptimizerConfigBase = msgspec.field(default_factory=AdamOptimizerConfig)
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class ParsedCheckpointTinkerPath(msgspec.Struct, kw_only=True, frozen=True):
    """The parts of a ``tinker://<run>/<weights|sampler_weights|external_weights>/<name>``
    path."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str
    """``"<weights|sampler_weights|external_weights>/<name>"``."""

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse ``tinker_path``: exactly three ``/``-separated parts after ``tinker://``, the
        second naming the kind; ``ValueError`` otherwise."""
        prefix = "tinker://"
        if not tinker_path.startswith(prefix):
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        parts = tinker_path[len(prefix) :].split("/")
        kinds: dict[str, CheckpointType] = {
            "weights": "training",
            "sampler_weights": "sampler",
            "external_weights": "external",
        }
        if len(parts) != 3 or parts[1] not in kinds:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(
            tinker_path=tinker_path,
            training_run_id=parts[0],
            checkpoint_type=kinds[parts[1]],
            checkpoint_id="/".join(parts[1:]),
        )


class SaveWeightsExternalResponse(msgspec.Struct, kw_only=True, frozen=True):
    """Result of ``save_weights_external``: the ``.../external_weights/<name>`` path."""

    path: str
    type: Literal["save_weights_external"] | None = None


# --------------------------------------------------------------------------- models, requests


class LoraConfig(msgspec.Struct, kw_only=True, frozen=True):
    """LoRA settings of a training model: the rank, the init seed and which layers train."""

    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class SupportedModel(msgspec.Struct, kw_only=True, frozen=True):
    """A model the server offers, and whether it can be trained and sampled."""

    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(msgspec.Struct, kw_only=True, frozen=True):
    """The models the server offers."""

    supported_models: list[SupportedModel]


@dataclass(frozen=True)
class ForwardBackwardInput:
    """The batch, loss name and loss config of one ``forward_backward`` (as tinker builds it)."""

    data: list[Datum]
    loss_fn: LossFnType
    loss_fn_config: Mapping[str, float | str] | None = None


@dataclass(frozen=True, kw_only=True)
class OptimStepRequest:
    """tinker's ``optim_step`` request body. Importable for compatibility; never sent."""

    optim_params: OptimParams
    model_id: ModelID
    seq_id: int | None = None
    type: Literal["optim_step"] = "optim_step"


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """tinker's ``sample`` request body. Importable for compatibility; never sent."""

    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"
