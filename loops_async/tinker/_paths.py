"""``tinker://`` checkpoint paths and their Loops (``bt://loops:``) equivalents.

tinker names a checkpoint ``tinker://<training_run_id>/<weights|sampler_weights>/<name>``;
Loops names the same one ``bt://loops:<run_id>/<weights|sampler_weights>/<name>``. The layer
hands tinker paths to tinker code and maps them back when they are passed in; ``bt://``,
``file://`` and local paths pass through unchanged.
"""

from __future__ import annotations

from .. import errors

__all__ = ["LOCAL_RUN_ID", "to_loops_path", "to_tinker_path"]

_TINKER = "tinker://"
_LOOPS = "bt://loops:"
_KINDS = ("weights", "sampler_weights")

LOCAL_RUN_ID = "local"
"""The run id shown for a trainer that has none (``loops_async.ServiceClient.local``)."""


def to_loops_path(path: str, field: str = "path") -> str:
    """The Loops form of a ``tinker://`` path (others are returned unchanged)."""
    if not isinstance(path, str):
        raise errors.ValidationError(f"{field}: expected a checkpoint path, got {path!r}")
    if not path.startswith(_TINKER):
        return path
    parts = path[len(_TINKER) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise errors.ValidationError(
            f"{field}: expected 'tinker://<run_id>/<weights|sampler_weights>/<name>', got {path!r}"
        )
    run_id, kind, name = parts
    if kind not in _KINDS:
        raise errors.ValidationError(
            f"{field}: {kind!r} checkpoints are not supported by Loops (only weights and "
            f"sampler_weights), in {path!r}"
        )
    return f"{_LOOPS}{run_id}/{kind}/{name}"


def to_tinker_path(path: str) -> str:
    """The ``tinker://`` form of a Loops ``bt://loops:`` path (others unchanged)."""
    if path.startswith(_LOOPS):
        return _TINKER + path[len(_LOOPS) :]
    return path
