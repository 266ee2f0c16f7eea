"""``tinker://`` checkpoint paths and their Loops (``bt://loops:``) equivalents.

tinker names a checkpoint ``tinker://<training_run_id>/<weights|sampler_weights>/<name>``;
Loops names the same one ``bt://loops:<run_id>/<weights|sampler_weights>/<name>``. The layer
hands tinker paths to tinker code and maps them back when they are passed in; ``bt://``,
``file://`` and local paths pass through unchanged.
"""

from __future__ import annotations

from .. import errors
from .types import ParsedCheckpointTinkerPath

__all__ = ["LOCAL_RUN_ID", "to_loops_path", "to_tinker_path"]

_TINKER = "tinker://"
_LOOPS = "bt://loops:"

LOCAL_RUN_ID = "local"
"""The run id shown for a trainer that has none (``loops_async.ServiceClient.local``)."""


def to_loops_path(path: str, field: str = "path") -> str:
    """The Loops form of a ``tinker://`` path (others are returned unchanged)."""
    if not isinstance(path, str):
        raise errors.ValidationError(f"{field}: expected a checkpoint path, got {path!r}")
    if not path.startswith(_TINKER):
        return path
    parsed: ParsedCheckpointTinkerPath | None = None
    try:
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
    except ValueError:
        pass
    if parsed is None or not parsed.training_run_id or parsed.checkpoint_id.endswith("/"):
        raise errors.ValidationError(
            f"{field}: expected 'tinker://<run_id>/<weights|sampler_weights>/<name>', got {path!r}"
        )
    if parsed.checkpoint_type == "external":
        raise errors.ValidationError(
            f"{field}: only weights and sampler_weights checkpoints exist on Loops, got {path!r}"
        )
    return f"{_LOOPS}{parsed.training_run_id}/{parsed.checkpoint_id}"


def to_tinker_path(path: str) -> str:
    """The ``tinker://`` form of a Loops ``bt://loops:`` path (others unchanged)."""
    if path.startswith(_LOOPS):
        return _TINKER + path[len(_LOOPS) :]
    return path
