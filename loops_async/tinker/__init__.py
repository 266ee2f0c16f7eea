"""tinker compatibility: tinker and tinker-cookbook code runs on ``loops_async`` unchanged.

Run a tinker script with ``python -m loops_async.tinker SCRIPT [ARGS...]`` (``--local`` starts
the embedded local server for it), or call :func:`install` before ``import tinker``: ``tinker``,
``tinker.types``, ``tinker.types.tensor_data``, ``tinker.lib.public_interfaces...`` then resolve
to this package. A real ``tinker`` install is never required, and never shadowed unless asked
(``install(shadow=True)``, ``--shadow``). Or import the names from here directly::

    import loops_async.tinker as tinker

    service = tinker.ServiceClient(base_url="http://127.0.0.1:8700")
    training = service.create_lora_training_client("loops-local/tiny-chat", rank=16)
    fb = training.forward_backward(data, "cross_entropy")   # returns at once
    opt = training.optim_step(tinker.AdamParams(learning_rate=1e-4))
    fb.result(); opt.result()

This is a layer over the one async core, not a second client: every call runs a coroutine of
:mod:`loops_async` on the portal thread (sync methods return futures without blocking, even
inside a running event loop), and the ``*_async`` sampling methods run on the caller's own loop,
asyncio or trio. ``docs/coming-from-tinker.md`` lists what differs from tinker 0.38.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from httpx import Timeout

from . import types
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    ConflictError,
    ExperimentalWarning,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    TinkerError,
    UnprocessableEntityError,
)
from ._futures import APIFuture, AwaitableConcurrentFuture
from ._install import TinkerAlreadyInstalledError, install, is_installed, uninstall
from ._rest import RestClient
from ._retry import RetryConfig
from ._sampling import SamplingClient
from ._service import ServiceClient
from ._training import TrainingClient
from .types import (
    AdamOptimizerConfig,
    AdamParams,
    Checkpoint,
    CheckpointType,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageAssetPointerChunk,
    ImageChunk,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    OptimParams,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
    TensorData,
    TensorDtype,
    TrainingRun,
)

__title__ = "tinker"
__version__ = "0.38.0"
"""The tinker API version this layer follows (``loops_async.__version__`` is the library's)."""

BackcompatTrainingClientFuture = TrainingClient
"""tinker's name for what ``create_lora_training_client`` returns: here the client itself,
which is also a future of itself."""

BackcompatSamplingClientFuture = SamplingClient
"""tinker's name for what ``create_sampling_client`` returns: the client, also a future."""

PerDatumLossFn = Any
"""tinker's type of a per-datum custom loss (``forward_backward_custom`` takes a batch loss)."""

CustomLossFnV1 = Callable[[list[Datum], list[Any]], tuple[Any, dict[str, float]]]
"""The loss ``forward_backward_custom`` takes: ``loss_fn(data, logprobs) -> (loss, metrics)``
(tinker's ``tinker.lib.public_interfaces.training_client.CustomLossFnV1``)."""

RequestOptions = dict[str, Any]
"""tinker's per-request options (headers, retries, timeout): not used by this layer."""

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AdamOptimizerConfig",
    "AdamParams",
    "AuthenticationError",
    "AwaitableConcurrentFuture",
    "BackcompatSamplingClientFuture",
    "BackcompatTrainingClientFuture",
    "BadRequestError",
    "BillingError",
    "Checkpoint",
    "CheckpointType",
    "ConflictError",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "EncodedTextChunk",
    "ExperimentalWarning",
    "ForwardBackwardOutput",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "InternalServerError",
    "LoraConfig",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "NotFoundError",
    "OptimParams",
    "OptimStepRequest",
    "OptimStepResponse",
    "ParsedCheckpointTinkerPath",
    "PerDatumLossFn",
    "PermissionDeniedError",
    "PromptProvenanceSpan",
    "RateLimitError",
    "RequestFailedError",
    "RequestOptions",
    "RestClient",
    "RetryConfig",
    "SampleRequest",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "Timeout",
    "TinkerAlreadyInstalledError",
    "TinkerError",
    "TrainingClient",
    "TrainingRun",
    "UnprocessableEntityError",
    "__title__",
    "__version__",
    "install",
    "is_installed",
    "types",
    "uninstall",
]

from ._install import register_submodules  # noqa: E402  (after every name above exists)

register_submodules()
