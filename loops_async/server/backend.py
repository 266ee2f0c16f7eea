"""The interface between the local server's HTTP layer and a training backend.

A backend holds one run's model, adapter and optimizer. The HTTP layer calls its methods from a
worker thread, one at a time per run, in ``seq_id`` order, so a backend needs no locking of its
own. Methods are blocking. ``validate_*`` methods are cheap (no model work) and are called in
the request handler before a submit is accepted, so bad input becomes a 422 at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .._wire import ForwardBackwardRequest
from ..types import (
    AdamParams,
    ForwardBackwardOutput,
    InitTrainerServerResponse,
    OptimStepResponse,
)
from .models import ModelSpec

__all__ = [
    "ADAPTER_FILES",
    "NULL_STATE_FILE",
    "OPTIMIZER_FILE",
    "TRAINER_STATE_FILE",
    "InvalidRequest",
    "TrainerBackend",
    "has_optimizer_state",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The PEFT files every checkpoint directory holds (the names :mod:`~loops_async.server.lora`
writes; that module imports torch, this one must not)."""
OPTIMIZER_FILE = "optimizer.safetensors"
"""The torch trainer's Adam moments (``save_state`` with the optimizer)."""
TRAINER_STATE_FILE = "trainer_state.json"
"""The torch trainer's step counter and adapter shape."""
NULL_STATE_FILE = "null_trainer_state.json"
"""The ``null`` trainer's counters (``with_optimizer`` says whether they are optimizer state)."""
_MAX_STATE_BYTES = 1 << 20


def has_optimizer_state(directory: Path) -> bool:
    """Whether a checkpoint directory in the server's on-disk format holds optimizer state (the
    torch trainer's, or the null trainer's). Reads only; never raises for a bad directory."""
    try:
        if (directory / OPTIMIZER_FILE).is_file() and (directory / TRAINER_STATE_FILE).is_file():
            return True
        null_state = directory / NULL_STATE_FILE
        if not null_state.is_file() or null_state.stat().st_size > _MAX_STATE_BYTES:
            return False
        state = json.loads(null_state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("with_optimizer") is True


class InvalidRequest(ValueError):
    """A request the server rejects: 422 at submit time, or an operation error
    (``error_class`` ``"ValidationError"``) when found while running. The message names the
    field, e.g. ``data[0].loss_fn_inputs['target_tokens']: ...``."""


class TrainerBackend(Protocol):
    """One run's trainer (see the module docstring for the threading contract)."""

    spec: ModelSpec
    """The base model: name, vocabulary size, context length."""

    @property
    def step(self) -> int:
        """Number of ``optim_step`` calls applied since init / load (the policy version)."""
        ...

    def validate_forward(self, req: ForwardBackwardRequest) -> None:
        """Raise :class:`InvalidRequest` for input that can never run (token ids outside the
        vocabulary, sequences over the context, missing or ill-shaped loss inputs, unknown
        ``loss_fn`` or config keys, ...)."""
        ...

    def init(self, lora_rank: int) -> InitTrainerServerResponse:
        """Start over with a fresh adapter of ``lora_rank``, zero gradients and step 0."""
        ...

    def forward_backward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Compute the loss and accumulate its gradient into the adapter's gradient buffer."""
        ...

    def forward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Compute the loss and logprobs; the gradient buffer is left untouched."""
        ...

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """Apply the accumulated gradient (normalised per active token) and clear it.
        Metrics include ``step``, ``learning_rate`` and ``grad_norm``."""
        ...

    def save_state(self, directory: Path, *, with_optimizer: bool) -> None:
        """Write the adapter in PEFT format (``adapter_model.safetensors`` and
        ``adapter_config.json``) into ``directory`` (which exists and is empty), plus the
        optimizer state and step when ``with_optimizer``."""
        ...

    def load_state(self, directory: Path, *, with_optimizer: bool) -> int:
        """Load a directory written by :meth:`save_state`. Without ``with_optimizer`` the
        optimizer state and step reset to zero. Returns the step counter after loading."""
        ...
