"""Public wire types of the Loops protocol (PROTOCOL.md §3-4 and the operation results).

All types are :class:`msgspec.Struct` classes: cheap to build, compared by value, and encoded by
the module-level codecs in :mod:`loops_async._codec` without a Python-level loop over tensor
elements. Response types tolerate unknown fields and missing optional fields.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdamParams",
    "ArrayData",
    "AvailabilityModel",
    "Checkpoint",
    "CheckpointDownload",
    "CheckpointFile",
    "CheckpointFilesResponse",
    "CheckpointTarget",
    "Chunk",
    "DType",
    "Datum",
    "EncodedTextChunk",
    "ExternalRef",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "InitTrainerServerResponse",
    "LoadWeightsResponse",
    "LoraAdapterConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplerScope",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TrainerScope",
    "WandbConfig",
]

DType: TypeAlias = Literal["int64", "int32", "float32", "float16", "bfloat16", "float64", "bool"]
"""The tensor dtypes of the wire protocol."""

LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dpo", "dppo"
]
"""The loss functions a Loops trainer offers (PROTOCOL.md §5)."""

_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    # numpy has no bfloat16: it is widened to float32 on the way in and out.
    "bfloat16": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
}
_DTYPE_OF_NUMPY: dict[np.dtype[Any], str] = {
    np.dtype(np.int64): "int64",
    np.dtype(np.int32): "int32",
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.float64): "float64",
    np.dtype(np.bool_): "bool",
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
INT_DTYPES = frozenset({"int64", "int32"})


class ArrayData(Sequence[Any]):
    """Flat tensor values kept as a numpy array: what :meth:`TensorData.from_numpy` and
    :meth:`TensorData.from_torch` store in ``TensorData.data``.

    It reads like a list (``len``, indexing, iteration, ``tolist()``, ``==`` against lists) but
    holds 4-8 bytes per value instead of a Python object, and is encoded straight from the
    array (with ``orjson`` when it is installed), so a large batch is never turned into
    millions of Python floats.
    """

    __slots__ = ("array",)

    def __init__(self, array: npt.NDArray[Any]) -> None:
        self.array = np.ascontiguousarray(array).reshape(-1)
        """The flat, C-contiguous array."""

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: Any) -> Any:
        item = self.array[index]
        return item.tolist() if isinstance(item, np.ndarray | np.generic) else item

    def __iter__(self) -> Any:
        return iter(self.array.tolist())

    def tolist(self) -> list[Any]:
        """The values as a Python list."""
        return self.array.tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ArrayData):
            other = other.array
        elif isinstance(other, Sequence) and not isinstance(other, str):
            other = np.asarray(other, dtype=self.array.dtype if len(other) else None)
        else:
            return NotImplemented
        return bool(np.array_equal(self.array, other, equal_nan=self.array.dtype.kind == "f"))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.array.tolist()) if len(self) <= 16 else f"ArrayData({self.array!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ArrayData, (self.array,))


def _numpy_dtype(dtype: str) -> np.dtype[Any]:
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {sorted(_NUMPY_DTYPES)}"
        ) from None


class TensorData(msgspec.Struct, kw_only=True):
    """A tensor on the wire: flat ``data``, a ``dtype`` name and a ``shape``.

    Build one from a list (:meth:`from_list`), a numpy array (:meth:`from_numpy`) or a torch
    tensor (:meth:`from_torch`); read it back with :meth:`to_numpy`, :meth:`to_torch` or
    :meth:`tolist`. Float tensors carry NaN as JSON ``null``; readers turn ``null`` back into
    NaN. ``shape`` defaults to ``[len(data)]``.
    """

    data: Sequence[bool | int | float | None]
    """Flat values: a list once decoded, an :class:`ArrayData` when built from numpy or torch,
    any sequence when built by hand."""
    dtype: str
    shape: list[int] | None = None

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = [len(self.data)]

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any], dtype: DType | None = None) -> TensorData:
        """Wrap a numpy array (any shape). ``dtype`` overrides the wire dtype name."""
        arr = np.asarray(array)
        if dtype is None:
            name = _DTYPE_OF_NUMPY.get(arr.dtype)
            if name is None:
                if arr.dtype.kind in "iu":
                    name = "int64"
                elif arr.dtype.kind == "f":
                    name = "float32"
                else:
                    raise ValueError(f"unsupported numpy dtype {arr.dtype}")
        else:
            name = dtype
        target = _numpy_dtype(name)
        if arr.dtype != target:
            arr = arr.astype(target)
        return cls(data=ArrayData(arr), dtype=name, shape=list(arr.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """Wrap a torch tensor (moved to CPU; ``bfloat16`` travels as float values)."""
        import torch

        t = tensor.detach().cpu()
        names = {
            torch.int64: "int64",
            torch.int32: "int32",
            torch.float32: "float32",
            torch.float16: "float16",
            torch.bfloat16: "bfloat16",
            torch.float64: "float64",
            torch.bool: "bool",
        }
        name = names.get(t.dtype)
        if name is None:
            raise ValueError(f"unsupported torch dtype {t.dtype}")
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return cls(data=ArrayData(t.numpy().copy()), dtype=name, shape=list(t.shape))

    @classmethod
    def from_list(
        cls,
        data: Sequence[Any],
        dtype: DType | None = "float32",
        shape: Sequence[int] | None = None,
    ) -> TensorData:
        """Build from a flat or nested list (``shape`` inferred unless given). ``dtype``
        defaults to ``float32`` as in the official SDK; pass ``None`` to infer it (integers
        become ``int64``)."""
        arr = np.asarray(data, dtype=_numpy_dtype(dtype) if dtype else None)
        if shape is not None:
            arr = arr.reshape(tuple(shape))
        if dtype is None and arr.dtype.kind == "f":
            dtype = "float32"
        return cls.from_numpy(arr, dtype=dtype)

    def to_numpy(self) -> npt.NDArray[Any]:
        """Return a numpy array of ``shape`` (``null`` becomes NaN for float dtypes)."""
        data = self.data
        if isinstance(data, ArrayData):
            arr = data.array.astype(_numpy_dtype(self.dtype), copy=True)
        else:
            arr = np.asarray(data, dtype=_numpy_dtype(self.dtype))
        return arr.reshape(tuple(self.shape)) if self.shape is not None else arr

    def to_torch(self) -> torch.Tensor:
        """Return a torch tensor of ``shape`` and ``dtype``."""
        import torch

        t = torch.from_numpy(self.to_numpy())
        if self.dtype == "bfloat16":
            t = t.to(torch.bfloat16)
        return t

    def tolist(self) -> list[Any]:
        """Return the values as a nested list of ``shape`` (``null`` becomes NaN for floats)."""
        return self.to_numpy().tolist()  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape) if self.shape is not None else len(self.data)


def _as_tensor_data(value: object) -> TensorData:
    """Convert what users pass in ``loss_fn_inputs`` (array, tensor, list) to TensorData."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list | tuple):
        return TensorData.from_list(value, dtype=None)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)  # type: ignore[arg-type]
    raise TypeError(
        f"expected TensorData, numpy array, torch tensor or list, got {type(value).__name__}"
    )


class EncodedTextChunk(msgspec.Struct, tag="encoded_text", tag_field="type", kw_only=True):
    """A run of token ids."""

    tokens: list[int]

    def __post_init__(self) -> None:
        tokens = self.tokens
        if type(tokens) is list:
            self.tokens = tokens.copy()  # the caller's list stays theirs (reused, cleared, ...)
        elif isinstance(tokens, np.ndarray):
            self.tokens = tokens.astype(np.int64, copy=False).ravel().tolist()

    @property
    def type(self) -> Literal["encoded_text"]:
        """The chunk kind on the wire (``"encoded_text"``)."""
        return "encoded_text"

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.tokens)


class ImageChunk(msgspec.Struct, tag="image", tag_field="type", kw_only=True):
    """An image that the model sees as ``expected_tokens`` positions (``data`` is raw bytes;
    it travels base64-encoded)."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int

    @property
    def type(self) -> Literal["image"]:
        """The chunk kind on the wire (``"image"``)."""
        return "image"

    @property
    def length(self) -> int:
        """Number of model positions the image occupies."""
        return self.expected_tokens

    @classmethod
    def from_bytes(
        cls, raw: bytes, fmt: Literal["png", "jpeg"], expected_tokens: int
    ) -> ImageChunk:
        """An image chunk from encoded image bytes ``raw`` in format ``fmt``."""
        return cls(data=bytes(raw), format=fmt, expected_tokens=expected_tokens)

    def to_bytes(self) -> bytes:
        """The encoded image bytes."""
        return self.data


class ImageAssetPointerChunk(
    msgspec.Struct, tag="image_asset_pointer", tag_field="type", kw_only=True
):
    """An image referenced by location instead of carried inline. Defined for wire
    compatibility; no Loops service accepts it yet, so constructing one raises
    :class:`ValueError` (as in the official SDK)."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None

    def __post_init__(self) -> None:
        raise ValueError(
            "ImageAssetPointerChunk is not supported yet: send the image inline as an ImageChunk"
        )

    @property
    def type(self) -> Literal["image_asset_pointer"]:
        """The chunk kind on the wire (``"image_asset_pointer"``)."""
        return "image_asset_pointer"

    @property
    def length(self) -> int:
        """Number of model positions the image occupies."""
        return self.expected_tokens or 0


ModelInputChunk: TypeAlias = EncodedTextChunk | ImageChunk | ImageAssetPointerChunk
"""One piece of a :class:`ModelInput` (the official SDK's name)."""
Chunk: TypeAlias = ModelInputChunk
"""One piece of a :class:`ModelInput`."""


class ModelInput(msgspec.Struct, kw_only=True):
    """The input sequence of a datum or a prompt: a list of chunks."""

    chunks: list[Chunk] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if type(self.chunks) is list:
            self.chunks = self.chunks.copy()  # the caller's list stays theirs

    @classmethod
    def from_ints(cls, tokens: Iterable[int] | npt.NDArray[np.integer[Any]]) -> ModelInput:
        """One text chunk holding a copy of ``tokens`` (a list, any iterable of ints, or an
        int array)."""
        if isinstance(tokens, np.ndarray | list):
            return cls(chunks=[EncodedTextChunk(tokens=tokens)])  # type: ignore[arg-type]
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        """A model input with no chunks."""
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """All token ids in order. Raises ``TypeError`` if an image chunk is present."""
        out: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise TypeError("to_ints() is only defined for text-only model inputs")
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        """Number of model positions (tokens, plus each image's ``expected_tokens``)."""
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: Chunk) -> ModelInput:
        """Return a new model input with ``chunk`` added at the end."""
        if not isinstance(chunk, EncodedTextChunk | ImageChunk | ImageAssetPointerChunk):
            raise TypeError(
                f"append() takes a chunk (EncodedTextChunk, ImageChunk, ImageAssetPointerChunk), "
                f"got {type(chunk).__name__}"
            )
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """Return a new model input with one token added (to the last text chunk if any)."""
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = EncodedTextChunk(tokens=[*self.chunks[-1].tokens, int(token)])
            return ModelInput(chunks=[*self.chunks[:-1], last])
        return self.append(EncodedTextChunk(tokens=[int(token)]))


class ExternalRef(msgspec.Struct, kw_only=True):
    """A versioned reference to data stored by the service (e.g. routed experts)."""

    uri: str
    version: int

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version: must be an integer >= 1, got {self.version!r}")


class Datum(msgspec.Struct, kw_only=True):
    """One training example: the input sequence and the loss function's per-position inputs.

    ``loss_fn_inputs`` values may be given as :class:`TensorData`, numpy arrays, torch tensors
    or lists; they are converted to :class:`TensorData` on construction. Position ``i`` of
    ``model_input`` predicts token ``i + 1``; every per-position tensor has length
    ``model_input.length`` (the trainer never shifts labels).
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = msgspec.field(default_factory=dict)
    routed_experts_ref: ExternalRef | None = None
    """Where the sampler stored the routed experts of this sequence (MoE models)."""

    def __post_init__(self) -> None:
        inputs = self.loss_fn_inputs
        for key, value in inputs.items():
            if not isinstance(value, TensorData):
                inputs[key] = _as_tensor_data(value)


class AdamParams(msgspec.Struct, kw_only=True):
    """Optimizer settings for one ``optim_step`` (Adam with decoupled weight decay).

    ``grad_clip_norm=0`` disables gradient clipping.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


# --------------------------------------------------------------------------- results


class ForwardBackwardOutput(msgspec.Struct, kw_only=True):
    """Result of ``forward`` / ``forward_backward``.

    ``loss`` is the mean loss per active token of the call; ``loss_fn_outputs`` has one dict
    per datum, in order, holding at least ``"logprobs"`` shaped like ``target_tokens``.
    """

    loss: float = 0.0
    loss_fn_output_type: str = ""
    loss_fn_outputs: list[dict[str, TensorData]] = msgspec.field(default_factory=list)
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class OptimStepResponse(msgspec.Struct, kw_only=True):
    """Result of ``optim_step``: metrics such as ``step``, ``learning_rate``, ``grad_norm``."""

    metrics: dict[str, float] | None = None


class SaveWeightsResponse(msgspec.Struct, kw_only=True):
    """Result of ``save_state``: the ``bt://loops:<run>/weights/<name>`` path."""

    path: str = ""
    """``bt://loops:<run>/weights/<name>`` (derived by the client when a trainer omits it)."""
    mode: str = ""


class SaveWeightsForSamplerResponse(msgspec.Struct, kw_only=True):
    """Result of ``save_weights_for_sampler``: the ``.../sampler_weights/<name>`` path and the
    policy version at the moment of the call."""

    path: str = ""
    """``bt://loops:<run>/sampler_weights/<name>`` (derived by the client when omitted)."""
    version: int | None = None


class LoadWeightsResponse(msgspec.Struct, kw_only=True):
    """Result of ``load_state`` / ``load_state_with_optimizer``: the trainer's step counter
    after loading and the path that was loaded."""

    step: int | None = None
    path: str | None = None


class InitTrainerServerResponse(msgspec.Struct, kw_only=True):
    """Result of ``init_trainer_server``: a fresh adapter of ``lora_rank``."""

    lora_rank: int
    step: int = 0


class ModelData(msgspec.Struct, kw_only=True):
    """Static facts about the base model of a run."""

    model_name: str | None = None
    tokenizer_id: str | None = None
    arch: str | None = None


class GetInfoResponse(msgspec.Struct, kw_only=True):
    """What ``TrainingClient.get_info()`` reports about its run."""

    model_data: ModelData = msgspec.field(default_factory=ModelData)
    model_name: str | None = None
    is_lora: bool | None = None
    lora_rank: int | None = None
    max_seq_len: int | None = None
    """The longest sequence the trainer was asked to accept (``None``: the model's own)."""
    model_id: str | None = None
    """The run id."""
    base_url: str | None = None


class LoraAdapterConfig(msgspec.Struct, kw_only=True):
    """The LoRA configuration of a checkpoint (``{"r": rank}`` on the wire)."""

    r: int
    """The LoRA rank."""

    @property
    def rank(self) -> int:
        """The LoRA rank (the official SDK's attribute name)."""
        return self.r

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access, for code written against the plain JSON (``config.get("r")``)."""
        return self.r if key == "r" else default


class CheckpointTarget(enum.StrEnum):
    """What a checkpoint was saved for."""

    sampler = "sampler"
    """``save_weights_for_sampler``: the adapter only."""
    trainer = "trainer"
    """``save_state``: adapter and optimizer state."""


class Checkpoint(msgspec.Struct, kw_only=True):
    """A saved checkpoint as listed by the control plane (PROTOCOL.md §7)."""

    id: str = ""
    run_id: str
    checkpoint_id: str
    checkpoint_type: str | None = None
    created_at: str | None = None
    base_model: str | None = None
    lora_adapter_config: LoraAdapterConfig | None = None
    size_bytes: int | None = None
    sync_status: str | None = None
    target: str | None = None

    _KIND: ClassVar[dict[str, str]] = {"trainer": "weights", "sampler": "sampler_weights"}

    @property
    def path(self) -> str:
        """The ``bt://loops:<run_id>/<weights|sampler_weights>/<name>`` URI of the checkpoint."""
        kind = self._KIND.get(self.target or "trainer", "weights")
        return f"bt://loops:{self.run_id}/{kind}/{self.checkpoint_id}"


# --------------------------------------------------------------------------- sampling

StopReason: TypeAlias = Literal["stop", "length"]
"""Why a sampled sequence ended: a stop string / stop token / EOS, or ``max_tokens``."""


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample.

    ``temperature=0`` is greedy decoding. ``top_k=-1`` / ``top_p=1`` disable those filters.
    ``stop`` is a string, a list of strings, or a list of token ids. The same ``seed``, weights
    and prompt give the same tokens. Logprobs are always those of the untempered model.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | list[int] | None = None
    seed: int | None = None
    structured_outputs: dict[str, Any] | None = None
    """Constrained decoding (vLLM's ``structured_outputs``: ``json``, ``regex``, ``choice``,
    ...), sent as is; a sampler that does not support it answers 422."""


class SampledSequence(msgspec.Struct, kw_only=True):
    """One completion: its token ids, their logprobs, why it stopped, and its text."""

    tokens: list[int] = msgspec.field(default_factory=list)
    logprobs: list[float] | None = None
    stop_reason: StopReason = "length"
    text: str | None = None
    routed_experts: ExternalRef | None = None
    """Where the sampler stored the experts each token was routed to (MoE models, when asked
    with ``include_routed_experts``)."""


class SampleResponse(msgspec.Struct, kw_only=True):
    """What ``SamplingClient.sample`` returns.

    ``prompt_logprobs[i]`` is the logprob of prompt token ``i`` given the ones before it
    (``None`` for the first); ``topk_prompt_logprobs[i]`` lists ``(token_id, logprob)`` pairs,
    most likely first. ``policy_version`` is the adapter version that served the request.
    """

    sequences: list[SampledSequence] = msgspec.field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    """The prompt's token ids, when the sampler echoes them."""
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    policy_version: int | None = None


# --------------------------------------------------------------------------- checkpoint files


class CheckpointFile(msgspec.Struct, kw_only=True):
    """One file of a checkpoint and a URL to download it from."""

    url: str
    relative_file_name: str
    node_rank: int | None = None
    size_bytes: int | None = None
    last_modified: str | None = None


class CheckpointFilesResponse(msgspec.Struct, kw_only=True):
    """One page of a checkpoint's files (``get_checkpoint_archive_url``): presigned download
    URLs, the token of the next page (``None`` on the last) and the total number of files."""

    presigned_urls: list[CheckpointFile] = msgspec.field(default_factory=list)
    next_page_token: int | str | None = None
    total_count: int = 0


class CheckpointDownload(msgspec.Struct, kw_only=True):
    """What ``download_checkpoint`` wrote: the directory, how many files and bytes."""

    dest_dir: Path
    file_count: int
    bytes_written: int


class SupportedModel(msgspec.Struct, kw_only=True):
    """A base model the server can train or sample."""

    model_name: str
    max_context_length: int | None = None


class ServerCapabilities(msgspec.Struct, kw_only=True):
    """What ``get_server_capabilities()`` reports."""

    supported_models: list[SupportedModel] = msgspec.field(default_factory=list)


class AvailabilityModel(enum.StrEnum):
    """The capacity a trainer runs on."""

    dedicated = "dedicated"
    """Reserved capacity (the default)."""
    spot = "spot"
    """Preemptible capacity: cheaper, and a run can be preempted."""


class TrainerScope(enum.StrEnum):
    """Where a trainer is provisioned (``scope=`` of ``create_lora_training_client``)."""

    default = "default"
    serverless = "serverless"
    team = "team"
    deployment = "deployment"


class SamplerScope(enum.StrEnum):
    """Where a sampler is provisioned (``scope=`` of ``create_sampling_client``)."""

    default = "default"
    serverless = "serverless"
    """Shared capacity that speaks the operation protocol (PROTOCOL §6)."""
    deployment = "deployment"


class WandbConfig(msgspec.Struct, kw_only=True):
    """Weights & Biases tracking for a training run (``wandb_config=`` of
    ``create_lora_training_client``): every operation's metrics are logged to the run
    ``name`` of ``project``."""

    project: str
    name: str | None = None
