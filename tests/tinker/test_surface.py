"""Drift check: ``loops_async.tinker`` against tinker 0.38's public surface, name by name.

``tests/data/tinker_surface.json`` was extracted from the tinker 0.38.0 wheel (its ``note`` key
describes the format). Every public name of every tinker module must exist on the matching
``loops_async.tinker`` module; every class tinker defines must have its public methods with the
same parameters (name, kind, position, default), the same async-ness and the same attributes;
every exception must keep tinker's bases. Deliberate differences are listed below with the
reason, and the lists may only shrink: an entry that no longer excuses anything fails
:func:`test_no_stale_entries`.

The comparison itself lives in :mod:`tests.tinker._surface_helpers`. Rules beyond "equal":

- the layer may add keyword-only parameters with defaults, and a ``**kwargs``;
- defaults compare loosely (``1`` == ``1.0``, quote styles, an enum member == its value,
  ``<factory: dict>`` == any factory that makes ``{}``);
- tinker's pydantic models are compared field by field (name, requiredness, default: order and
  parameter kind do not matter, they are keyword-only there); its dataclasses by ``__init__``
  (positional order matters);
- private parameters (``_holder``, ``_tokens_list``) are not compared, nor are the constructors of
  the clients made by the library (``TrainingClient``, ``SamplingClient``, ``RestClient``) and of
  the exceptions (the layer makes those); ``ServiceClient``'s is;
- a ``(*args, **kwargs)`` forwarder (``BackcompatTrainingClientFuture.forward``) is compared as
  the method it forwards to, and what a class inherits from another tinker class that the layer
  provides as the very same object is checked once, under the class that defines it.

Keys: ``"Name"`` / ``"module.Name"`` in :data:`NOT_PROVIDED`; ``"Class.method"`` (all of its
differences), ``"Class.method(param)"``, ``"Class.attr"``, ``"Exception(Base)"`` in
:data:`DEVIATIONS`. A reason starting with ``GAP:`` marks something the layer should have and
does not yet.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import pytest

import loops_async.tinker as layer

from ._surface_helpers import (
    SURFACE,
    Audit,
    Problem,
    audit_layer,
    class_problems,
    compare_parameters,
    locate,
)

WIRE = "tinker's own wire protocol; Loops speaks its own (docs/protocol.md)"
NO_EQUIVALENT = "no Loops equivalent"
COPY_WEIGHTS = (
    "no Loops equivalent (copying a checkpoint, possibly shared with an access token, into "
    "one's own storage)"
)
CUSTOM_LOSS = (
    "server-side custom loss graphs do not exist on Loops; forward_backward_custom with a "
    "callable does"
)
SESSIONS = "no Loops equivalent (tinker's session bookkeeping: list/search/status of sessions)"
BILLING = "no Loops equivalent (tinker's billing and storage accounting)"
INTERNAL = "tinker-internal (takes or serves tinker's InternalClientHolder)"
TELEMETRY = "no Loops equivalent (tinker's client telemetry)"
CORE_RESULT = "the Loops core result type is reused as is (loops_async.types)"

NOT_PROVIDED_MODULES: dict[str, str] = {
    # tinker module: why none of its names is provided
    "tinker.auth": NO_EQUIVALENT + " (tinker's credential lookup; Loops takes api_key / "
    "LOOPS_API_KEY / TINKER_API_KEY directly)",
    "tinker.lib.api_future_impl": NO_EQUIVALENT + " (tinker's queue-state callbacks: the Loops "
    "service reports no queue state)",
}

NOT_PROVIDED: dict[str, str] = {
    # tinker name (or "module.Name"): why loops_async.tinker does not offer it
    **dict.fromkeys(
        [
            # telemetry
            "EventType",
            "GenericEvent",
            "SessionEndEvent",
            "SessionStartEvent",
            "Severity",
            "TelemetryBatch",
            "TelemetryEvent",
            "TelemetryResponse",
            "TelemetrySendRequest",
            "UnhandledExceptionEvent",
            # futures retrieval
            "FutureCompletion",
            "FutureFailed",
            "FutureFinished",
            "FutureRetrieveRequest",
            "FutureRetrieveResponse",
            "FuturesRetrieveRequest",
            "FuturesRetrieveResponse",
            "RequestFailedResponse",
            "RequestID",
            "SamplingSessionFuturesTarget",
            "TryAgainResponse",
            "UntypedAPIFuture",
            # sessions, heartbeats, client config
            "ClientConfigRequest",
            "ClientConfigResponse",
            "ClientDynamicConfigResponse",
            "CreateModelRequest",
            "CreateModelResponse",
            "CreateSamplingSessionRequest",
            "CreateSamplingSessionResponse",
            "CreateSessionRequest",
            "CreateSessionResponse",
            "HealthResponse",
            "JoinSamplingSessionRequest",
            "JoinSamplingSessionResponse",
            "SessionHeartbeatRequest",
            "SessionHeartbeatResponse",
            # request bodies and internal responses
            "ForwardBackwardRequest",
            "ForwardRequest",
            "GetInfoRequest",
            "LoadWeightsRequest",
            "SaveWeightsExternalRequest",
            "SaveWeightsExternalResponseInternal",
            "SaveWeightsForSamplerRequest",
            "SaveWeightsForSamplerResponseInternal",
            "SaveWeightsRequest",
            "UnloadModelRequest",
            "UnloadModelResponse",
        ],
        WIRE,
    ),
    **dict.fromkeys(
        [
            "AccessibleSearchOwner",
            "ActiveSessionStatusQuery",
            "CancelledSessionStatusQuery",
            "ClientFinishedSessionStatusQuery",
            "ClientSessionFinishErrored",
            "ClientSessionFinishInterrupted",
            "ClientSessionFinishReason",
            "ClientSessionFinishReasonType",
            "ClientSessionFinishSuccess",
            "ClientSessionFinished",
            "FailedSessionStatusQuery",
            "GetSessionResponse",
            "ListSessionsResponse",
            "OwnSearchOwner",
            "SearchOwner",
            "SessionActive",
            "SessionCancelled",
            "SessionFailed",
            "SessionFailedReason",
            "SessionFailedRequestReason",
            "SessionFailedSamplingSessionReason",
            "SessionFailedTrainingRunReason",
            "SessionSearchCursor",
            "SessionSearchRequest",
            "SessionSearchResponse",
            "SessionStatus",
            "SessionStatusQuery",
            "SessionSummary",
            "UserSearchOwner",
        ],
        SESSIONS,
    ),
    **dict.fromkeys(
        [
            "BillingEventInfo",
            "BillingUsageEvent",
            "BillingUsageResponse",
            "BillingUsageSession",
            "CheckpointBillingEvent",
            "CurrentCheckpointStorageUsageItem",
            "CurrentCheckpointStorageUsageResponse",
            "GetBillingUsageRequest",
            "GetCurrentCheckpointStorageUsageRequest",
            "SamplingPrefillBillingEvent",
            "SamplingSampleBillingEvent",
            "StorageBillingEvent",
            "TrainingBillingEvent",
        ],
        BILLING,
    ),
    **dict.fromkeys(
        [
            "CreateCustomLossRequest",
            "CreateCustomLossResponse",
            "CustomLossGraph",
            "CustomLossInput",
            "CustomLossInputRank",
            "CustomLossNode",
            "CustomLossNodeOp",
            "LossHandle",
        ],
        CUSTOM_LOSS,
    ),
    "AdminClient": NO_EQUIVALENT + " (tinker's organisation admin API: audit log, billing)",
    "AuditLogEntry": NO_EQUIVALENT + " (tinker's audit log)",
    "AuditLogResponse": NO_EQUIVALENT + " (tinker's audit log)",
    "AuthTokenResponse": NO_EQUIVALENT + " (tinker's auth tokens)",
    "WhoamiResponse": NO_EQUIVALENT + " (tinker's whoami)",
    "CopyWeightsRequest": NO_EQUIVALENT + " (copy_weights)",
    "CopyWeightsResponse": NO_EQUIVALENT + " (copy_weights)",
    "ExternalWeightsUrlsResponse": NO_EQUIVALENT + " (RestClient.get_external_weights_urls)",
    "GetSamplerResponse": NO_EQUIVALENT + " (tinker's sampler sessions, RestClient.get_sampler)",
    "DmelChunk": "Loops models take no DMEL input",
    "BackcompatClientFuture": "the layer's clients are their own futures "
    "(BackcompatTrainingClientFuture is TrainingClient); there is no generic wrapper",
    "RetryHandler": "tinker's retry machinery: the loops_async core retries (RetryConfig is "
    "accepted)",
    "is_retryable_status_code": "tinker's retry machinery: the loops_async core retries",
    "fetch_training_info": INTERNAL,
    "rest_client_holder": INTERNAL,
    "MODEL_ID_NOT_SET_ERROR": "tinker-internal error message (the layer's TrainingClient always "
    "has a model id)",
    "experimental": "tinker-internal decorator (an alias of typing_extensions.deprecated)",
}
"""tinker names with no counterpart in the layer."""

DEVIATIONS: dict[str, str] = {
    # "Class.member" or "Class.member(param)": why ours differs from tinker 0.38
    # ---- clients
    "TrainingClient.get_console_url": NO_EQUIVALENT + " (tinker's web console)",
    "TrainingClient.get_telemetry": TELEMETRY,
    "TrainingClient.save_weights_external": NO_EQUIVALENT
    + " (age-encrypted export of weights to external storage)",
    "TrainingClient.save_weights_external_async": NO_EQUIVALENT
    + " (age-encrypted export of weights to external storage)",
    "SamplingClient.create": NO_EQUIVALENT + " (tinker's sampling sessions; SamplingClients come "
    "from ServiceClient/TrainingClient.create_sampling_client)",
    "SamplingClient.from_sampler_handle": NO_EQUIVALENT + " (tinker's sampler handles)",
    "SamplingClient.get_sampler_handle": NO_EQUIVALENT + " (tinker's sampler handles)",
    "SamplingClient.on_queue_state_change": NO_EQUIVALENT
    + " (tinker's QueueStateObserver callback: Loops reports no queue state)",
    "SamplingClient.get_telemetry": TELEMETRY,
    "SamplingClient.holder": INTERNAL,
    "SamplingClient.retry_handler": "tinker's retry machinery: the loops_async core retries",
    "SamplingClient.feature_gates": "tinker-internal server feature flags",
    "ServiceClient.get_console_url": NO_EQUIVALENT + " (tinker's web console)",
    "ServiceClient.copy_weights": COPY_WEIGHTS,
    "ServiceClient.create_custom_loss": CUSTOM_LOSS,
    "ServiceClient.get_telemetry": TELEMETRY,
    "ServiceClient.holder": INTERNAL,
    "ServiceClient.close(status)": "defaults to 'success' here (required in tinker), so a "
    "plain close() works as it does in loops_async",
    "RestClient.get_telemetry": TELEMETRY,
    "RestClient.holder": INTERNAL,
    "RestClient.list_training_runs": NO_EQUIVALENT
    + " (the Loops control plane lists checkpoints per run, not runs)",
    "RestClient.list_training_runs_async": NO_EQUIVALENT
    + " (the Loops control plane lists checkpoints per run, not runs)",
    "RestClient.list_user_checkpoints": NO_EQUIVALENT
    + " (the Loops control plane lists checkpoints per run only)",
    "RestClient.list_user_checkpoints_async": NO_EQUIVALENT
    + " (the Loops control plane lists checkpoints per run only)",
    **{
        f"RestClient.{method}{suffix}": reason
        for method, reason in {
            "get_external_weights_urls": NO_EQUIVALENT + " (save_weights_external)",
            "copy_weights": COPY_WEIGHTS,
            "publish_checkpoint_from_tinker_path": NO_EQUIVALENT + " (public checkpoints)",
            "unpublish_checkpoint_from_tinker_path": NO_EQUIVALENT + " (public checkpoints)",
            "set_checkpoint_ttl_from_tinker_path": NO_EQUIVALENT + " (checkpoint TTLs)",
            "get_audit_log": NO_EQUIVALENT + " (tinker's audit log)",
            "get_session": SESSIONS,
            "list_sessions": SESSIONS,
            "assign_session_project": SESSIONS,
            "export_session_trace": SESSIONS,
            "get_sampler": NO_EQUIVALENT + " (tinker's sampler sessions)",
            "get_billing_usage": BILLING,
            "get_current_checkpoint_storage_usage": BILLING,
        }.items()
        for suffix in ("", "_async")
    },
    "RestClient.whoami": NO_EQUIVALENT + " (tinker's whoami)",
    "RestClient.search_sessions": SESSIONS,
    # ---- data types
    "TensorData.__init__": "a keyword-only msgspec Struct (TensorData(data=..., dtype=...)): "
    "data and dtype are required, shape is inferred, and there is no sparse format "
    "(sparse_crow_indices/sparse_col_indices)",
    "TensorData.sparse_crow_indices": "no sparse wire format: from_torch_sparse stores dense",
    "TensorData.sparse_col_indices": "no sparse wire format: from_torch_sparse stores dense",
    "TensorData.from_numpy(dtype)": "an extra optional dtype (a Loops addition), "
    "positional-or-keyword rather than keyword-only",
    "ModelInput.__init__(chunks)": "defaults to no chunks here (required in tinker): "
    f"{CORE_RESULT}",
    "ImageChunk.__init__(expected_tokens)": "required here (None in tinker): Loops needs an "
    "image's token count up front (docs/protocol.md)",
    "ImageChunk.validate_data": "a pydantic validator in tinker; the msgspec Struct here takes "
    "raw bytes and encodes them itself",
    "ImageChunk.serialize_data": "a pydantic serializer in tinker; the msgspec Struct here "
    "encodes its bytes itself",
    "ForwardBackwardOutput.__init__": f"{CORE_RESULT}: keyword-only with defaults (and an extra "
    "`loss`); made by the library, not by user code",
    "GetInfoResponse.__init__": f"{CORE_RESULT}: model_data and model_id have defaults, and "
    "there is no `type` tag or `optimizer_config`",
    "GetInfoResponse.type": f"{CORE_RESULT} (no `type` tag)",
    "GetInfoResponse.optimizer_config": f"{CORE_RESULT}: Loops does not report the optimizer "
    "config of a training model",
    "LoadWeightsResponse.__init__": f"{CORE_RESULT}: no `model_id` or `type`",
    "LoadWeightsResponse.model_id": f"{CORE_RESULT}: no `model_id`",
    "LoadWeightsResponse.type": f"{CORE_RESULT}: no `type` tag",
    "SaveWeightsResponse.__init__": f"{CORE_RESULT}: `path` defaults to '', no `type` tag",
    "SaveWeightsResponse.type": f"{CORE_RESULT}: no `type` tag",
    "SaveWeightsResponse.get_console_url": NO_EQUIVALENT + " (tinker's web console)",
    "SaveWeightsForSamplerResponse.__init__": f"{CORE_RESULT}: `path` defaults to '', no `type` "
    "tag",
    "SaveWeightsForSamplerResponse.type": f"{CORE_RESULT}: no `type` tag",
    "SaveWeightsForSamplerResponse.get_console_url": NO_EQUIVALENT + " (tinker's web console)",
    "SaveWeightsForSamplerResponse.get_playground_url": NO_EQUIVALENT
    + " (tinker's web playground)",
    "Checkpoint.__init__(time)": "may be None (and defaults to it): the Loops control plane does "
    "not always know it",
    "TrainingRun.__init__(last_request_time)": "may be None (and defaults to it): the Loops "
    "control plane does not always know it",
    "RetryConfig.__init__(retryable_exceptions)": "tinker's private RetryableException is not "
    "part of the default (the loops_async core does the retrying)",
    "RequestOptions": "a plain dict alias, not a TypedDict: the layer takes no per-request options",
    # ---- exceptions
}
"""Deliberate differences from tinker 0.38 (a ``GAP:`` reason marks one not yet fixed)."""


# ------------------------------------------------------------------------------- helpers


@cache
def _audit() -> Audit:
    return audit_layer()


def _excuse(key: str) -> str | None:
    """The DEVIATIONS entry that covers problem ``key`` (itself, or its method)."""
    if key in DEVIATIONS:
        return key
    method = key.split("(", 1)[0]
    return method if "(" in key and method in DEVIATIONS else None


def _not_provided_entry(module: str, name: str) -> str | None:
    for key in (f"{module}.{name}", name):
        if key in NOT_PROVIDED:
            return key
    return module if module in NOT_PROVIDED_MODULES else None


def _unexcused(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems if _excuse(p.key) is None]


# --------------------------------------------------------------------------------- tests


def test_every_tinker_name_exists() -> None:
    """Every name of ``tinker`` and of each tinker submodule is on the matching
    ``loops_async.tinker`` module, unless listed in NOT_PROVIDED / NOT_PROVIDED_MODULES."""
    audit = _audit()
    missing = [
        f"{layer.__name__}{module[len('tinker') :]}.{name} (tinker has {module}.{name})"
        for module, name in audit.missing
        if _not_provided_entry(module, name) is None
    ]
    missing += [
        f"module {module} does not import"
        for module in audit.missing_modules
        if module not in NOT_PROVIDED_MODULES
    ]
    assert not missing, "\n".join(missing)
    assert set(SURFACE["top_level_all"]) <= set(SURFACE["modules"]["tinker"])


def test_classes_match_tinker() -> None:
    """Methods (parameters, async-ness), constructors and attributes of every class tinker
    defines that the layer provides; enum members; literal type aliases; constants."""
    problems = [p for p in _audit().problems if p.section != "exceptions"]
    unexcused = _unexcused(problems)
    assert not unexcused, "\n".join(unexcused)


def test_exceptions_match_tinker() -> None:
    """Each exception exists, keeps tinker's bases in its MRO and its attributes, and those
    under ``TinkerError`` in tinker derive from ``loops_async.tinker.TinkerError``."""
    for name, spec in SURFACE["exceptions"].items():
        if name in NOT_PROVIDED:
            continue
        ours = locate(name, spec)
        assert isinstance(ours, type), f"exception {name} is missing"
        assert issubclass(ours, BaseException), name
        if "tinker._exceptions.TinkerError" in (spec.get("tinker_bases_mro") or []):
            assert issubclass(ours, layer.TinkerError), name
    problems = [p for p in _audit().problems if p.section == "exceptions"]
    unexcused = _unexcused(problems)
    assert not unexcused, "\n".join(unexcused)


def test_no_stale_entries() -> None:
    """NOT_PROVIDED, NOT_PROVIDED_MODULES and DEVIATIONS only hold entries that still excuse
    something: once the layer grows the name or matches the signature, the entry must go."""
    audit = _audit()
    used_names = {_not_provided_entry(module, name) for module, name in audit.missing}
    used_names |= {m for m in audit.missing_modules if m in NOT_PROVIDED_MODULES}
    stale = [f"NOT_PROVIDED[{k!r}]" for k in NOT_PROVIDED if k not in used_names]
    stale += [f"NOT_PROVIDED_MODULES[{k!r}]" for k in NOT_PROVIDED_MODULES if k not in used_names]
    used_deviations = {_excuse(p.key) for p in audit.problems}
    stale += [f"DEVIATIONS[{k!r}]" for k in DEVIATIONS if k not in used_deviations]
    assert not stale, "no longer needed (remove them):\n" + "\n".join(stale)


def test_all_is_sorted_and_complete() -> None:
    exported = layer.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(layer, name), f"loops_async.tinker.__all__ names missing {name!r}"
    provided = {
        name
        for name in SURFACE["top_level_all"]
        if _not_provided_entry("tinker", name) is None
        and f"tinker.{name}" not in NOT_PROVIDED_MODULES
    }
    assert provided <= set(exported), sorted(provided - set(exported))


def test_public_classes_and_functions_have_docstrings() -> None:
    """Each class and function the layer exports (its own or reused from the core) documents
    itself, and so does each of its public methods."""
    missing = []
    for name in layer.__all__:
        obj = getattr(layer, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("loops_async.tinker"):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                if not member.__doc__:
                    missing.append(f"{name}.{attr}")
    assert missing == []


# The machinery itself: a comparison that passed everything would pass drift too.


def _params(func: Any) -> list[inspect.Parameter]:
    return list(inspect.signature(func).parameters.values())


def _theirs(*params: tuple[str, str, str | None]) -> list[dict[str, Any]]:
    return [{"name": n, "kind": k, "default": d, "annotation": None} for n, k, d in params]


POK, KW = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"
REFERENCE = _theirs(("data", POK, None), ("lr", POK, "1"), ("name", KW, '"x"'))


def _same(data, lr=1.0, *, name="x", extra=None, **kwargs):  # type: ignore[no-untyped-def]
    """Equal to REFERENCE: 1.0 == 1, another quote style, a keyword-only extra, **kwargs."""


def _wrong_default(data, lr=2, *, name="x"):  # type: ignore[no-untyped-def]
    """lr's default differs."""


def _swapped(lr, data, *, name="x"):  # type: ignore[no-untyped-def]
    """Positional order differs (and lr lost its default)."""


def _keyword_only(data, *, lr=1, name="x"):  # type: ignore[no-untyped-def]
    """lr became keyword-only."""


def _missing(data, lr=1, **kwargs):  # type: ignore[no-untyped-def]
    """name is only swallowed by **kwargs."""


def _extra_positional(data, lr=1, flag=False, *, name="x"):  # type: ignore[no-untyped-def]
    """An extra positional parameter."""


@pytest.mark.parametrize(
    ("func", "keys"),
    [
        (_same, []),
        (_wrong_default, ["f(lr)"]),
        (_swapped, ["f(lr)", "f(data)"]),
        (_keyword_only, ["f(lr)"]),
        (_missing, ["f(name)"]),
        (_extra_positional, ["f(flag)"]),
    ],
)
def test_the_comparison_catches_drift(func: Any, keys: list[str]) -> None:
    found = sorted({p.key for p in compare_parameters("f", REFERENCE, _params(func))})
    assert found == sorted(keys)


class _Drifted:
    """A stand-in whose methods drifted from a made-up tinker spec."""

    kind = "a"

    def result(self, timeout=None):  # type: ignore[no-untyped-def]
        """Sync here, async in the spec."""

    @classmethod
    def make(cls, value):  # type: ignore[no-untyped-def]
        """Fine: a classmethod, as in the spec."""


def test_class_checks_catch_drift() -> None:
    spec: dict[str, Any] = {
        "kind": "class",
        "bases": [],
        "methods": {
            "result": _theirs(("timeout", POK, "None")),
            "make": _theirs(("value", POK, None)),
            "gone": [],
        },
        "method_meta": {
            "result": {"is_async": True, "kind": "method"},
            "make": {"is_async": False, "kind": "classmethod"},
            "gone": {"is_async": False, "kind": "method"},
        },
        "attributes": ["kind", "holder"],
    }
    found = {p.key for p in class_problems("_Drifted", spec, _Drifted, Audit())}
    assert found == {"_Drifted.result", "_Drifted.gone", "_Drifted.holder"}
