"""Request bodies and envelopes of the Loops protocol, shared by the client and the local server.

Public result types live in :mod:`loops_async.types`; these are the bodies users never build
themselves. Requests are encoded with ``omit_defaults`` where the protocol marks a field optional.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from .types import AdamParams, Checkpoint, Datum

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
    replicas: int = 1
    availability_model: str = "dedicated"
    seed: int | None = None
    max_seq_len: int | None = None
    name: str | None = None
    path: str | None = None
    base_checkpoint: str | None = None
    reuse_from_run_id: str | None = None


class RunInfo(msgspec.Struct, kw_only=True):
    id: str
    base_model: str
    base_url: str
    deployment_id: str | None = None


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
