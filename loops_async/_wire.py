"""Request bodies and envelopes of the Loops protocol, shared by the client and the local server.

Public result types live in :mod:`loops_async.types`; these are the bodies users never build
themselves. Requests are encoded with ``omit_defaults`` where the protocol marks a field optional.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from .types import (
    AdamParams,
    Checkpoint,
    CheckpointFile,
    Datum,
    ExternalRef,
    ServerCapabilities,
)

Capabilities = ServerCapabilities  # the body of GET /capabilities

T = TypeVar("T")

OPERATION_SCHEMA_VERSION = 1

# --------------------------------------------------------------------------- trainer ops


class OpRequest(msgspec.Struct, kw_only=True):
    """Fields every trainer operation body carries."""

    seq_id: int
    run_id: str | None
    model: str


class InitTrainerServerRequest(OpRequest, kw_only=True):
    lora_rank: int
    base_model: str


class ForwardBackwardRequest(OpRequest, kw_only=True):
    """Body of ``forward_backward`` and ``forward``."""

    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None
    top_k_logprobs: int = 0


class OptimStepRequest(OpRequest, kw_only=True):
    adam_params: AdamParams


class SaveStateRequest(OpRequest, kw_only=True, omit_defaults=True):
    name: str
    ttl_seconds: int | None = None


class SaveWeightsForSamplerRequest(OpRequest, kw_only=True, omit_defaults=True):
    name: str
    bump_version: bool
    ttl_seconds: int | None = None


class LoadStateRequest(OpRequest, kw_only=True):
    path: str


# --------------------------------------------------------------------------- envelopes


class SubmitAccepted(msgspec.Struct, kw_only=True):
    """The 202 answer to a submit."""

    operation_id: str | None = None
    schema_version: int = OPERATION_SCHEMA_VERSION


class OpEnvelope(msgspec.Struct, Generic[T], kw_only=True):
    """The 200 answer to a retrieve: ``done`` with a result, or ``error``."""

    status: str
    result: T | None = None
    error: str | None = None
    error_class: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the local server answers for a rejected request."""

    detail: str
    error_class: str | None = None


class PolicyVersion(msgspec.Struct, kw_only=True):
    policy_version: int


# --------------------------------------------------------------------------- control plane


class SessionInfo(msgspec.Struct, kw_only=True):
    id: str


class CreateSessionResponse(msgspec.Struct, kw_only=True):
    session: SessionInfo


class CreateTrainerRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    session_id: str
    base_model: str
    lora_rank: int
    replicas: int  # always sent (no default: omit_defaults would drop it), PROTOCOL §8
    availability_model: str  # always sent
    seed: int | None = None
    max_seq_len: int | None = None
    name: str | None = None
    path: str | None = None
    base_checkpoint: str | None = None
    reuse_from_run_id: str | None = None
    reuse_from_session_id: str | None = None
    scope: str | None = None
    debug_version: str | None = None


class CreateTrainerRequestIn(CreateTrainerRequest, kw_only=True, omit_defaults=True):
    """``POST /trainers`` as the local server reads it: clients older than PROTOCOL §8 may
    leave out ``replicas`` and ``availability_model``."""

    replicas: int = 1
    availability_model: str = "dedicated"


class RunInfo(msgspec.Struct, kw_only=True):
    id: str
    base_model: str
    base_url: str
    deployment_id: str | None = None
    base_checkpoint: str | None = None


class CreateTrainerResponse(msgspec.Struct, kw_only=True):
    run: RunInfo


class CheckpointList(msgspec.Struct, kw_only=True):
    checkpoints: list[Checkpoint] = msgspec.field(default_factory=list)


class DeploymentStatusName(msgspec.Struct, kw_only=True):
    name: str


class DeploymentStatus(msgspec.Struct, kw_only=True):
    status: DeploymentStatusName


class DeploymentResponse(msgspec.Struct, kw_only=True):
    deployment: DeploymentStatus


# --------------------------------------------------------------------------- sampler (§6)


class SampleRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of ``POST {sampler}/sample`` (OpenAI-completions shaped). The fields without a
    default are always sent; the optional ones only when set."""

    prompt: list[int]
    n: int
    temperature: float
    top_p: float
    logprobs: int
    return_tokens_as_token_ids: bool
    max_tokens: int | None = None
    seed: int | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    model: str | None = None
    """Shared samplers only: the base model."""
    lora: str | None = None
    """Shared samplers only: the pinned ``bt://`` adapter path."""
    structured_outputs: dict[str, Any] | None = None
    include_routed_experts: bool | None = None


class ChoiceLogprobs(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``choices[i].logprobs``: the completion's tokens and their logprobs (``top_logprobs``:
    per token the ``logprobs`` likeliest candidates, ``{token: logprob}``, when asked for)."""

    tokens: list[str | int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None


class PromptLogprob(msgspec.Struct, kw_only=True):
    """One candidate of a prompt position: ``{"logprob", "rank", "decoded_token"}``."""

    logprob: float | None
    rank: int | None = None
    decoded_token: str | None = None


class SampleChoice(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One completion of a ``/sample`` answer."""

    logprobs: ChoiceLogprobs
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """What stopped it (vLLM): the stop string or stop token id; None for EOS or length."""
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    routed_experts_ref: ExternalRef | None = None


class SampleAnswer(msgspec.Struct, kw_only=True):
    """The 200 answer of ``POST {sampler}/sample``."""

    choices: list[SampleChoice]


class ModelEntry(msgspec.Struct, kw_only=True):
    id: str
    parent: str | None = None


class ModelList(msgspec.Struct, kw_only=True):
    """``GET {sampler}/v1/models``."""

    data: list[ModelEntry] = msgspec.field(default_factory=list)


class CreateSamplerRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /samplers``: paired (``run_id``) or standalone (``base_model`` / ``model_path``)."""

    session_id: str
    run_id: str | None = None
    num_replicas: int | None = None
    availability_model: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    max_seq_length: int | None = None
    reuse_from_session_id: str | None = None
    scope: str | None = None
    debug_version: str | None = None


class SamplerInfo(msgspec.Struct, kw_only=True):
    id: str
    base_url: str
    base_model: str | None = None
    model_id: str | None = None
    deployment_id: str | None = None
    created_at: str | None = None


class CreateSamplerResponse(msgspec.Struct, kw_only=True):
    sampler: SamplerInfo


class SamplerDeploymentStatus(msgspec.Struct, kw_only=True):
    """``GET {base}/v1/models/<model_id>/deployments/<deployment_id>``."""

    status: str


class CheckpointSourceInfo(msgspec.Struct, kw_only=True):
    kind: str
    volume_ref: str | None = None
    path: str | None = None


class CheckpointSource(msgspec.Struct, kw_only=True):
    """``GET /checkpoints/<id>/source``."""

    source: CheckpointSourceInfo


class CheckpointFiles(msgspec.Struct, kw_only=True):
    """``GET /checkpoints/<id>/files?page_size=&page_token=``."""

    presigned_urls: list[CheckpointFile] = msgspec.field(default_factory=list)
    next_page_token: str | int | None = None
    total_count: int | None = None


class ValidateCheckpointRequest(msgspec.Struct, kw_only=True):
    checkpoint_path: str
    run_id: str | None = None
