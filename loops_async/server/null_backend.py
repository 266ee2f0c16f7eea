"""The ``null`` training backend: the protocol without the model.

:class:`NullTrainer` validates requests exactly like the torch trainer (through
:func:`~loops_async.server.validation.validate_forward_request`) and answers at once with results
of the right shapes: zero logprobs shaped like ``target_tokens``, loss 0, an ``optim_step``
counter, and checkpoints that are small placeholder files. It does no blocking work, so the server
runs it inline on the event loop (``blocking = False``); client benchmarks measure the client and
the HTTP layer, not a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, ClassVar

from .._wire import ForwardBackwardRequest
from ..types import (
    AdamParams,
    ForwardBackwardOutput,
    InitTrainerServerResponse,
    OptimStepResponse,
    TensorData,
)
from .backend import NULL_STATE_FILE, InvalidRequest
from .models import ModelSpec
from .validation import validate_forward_request

__all__ = ["NullTrainer"]

_STATE_FILE = NULL_STATE_FILE
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _empty_safetensors() -> bytes:
    """A valid safetensors file that holds no tensors."""
    header = json.dumps({"__metadata__": {"format": "pt", "backend": "null"}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


class NullTrainer:
    """A :class:`~loops_async.server.backend.TrainerBackend` that does no model work.

    Args:
        spec: the base model (its vocabulary and context length drive validation).
        lora_rank: the adapter rank reported by ``init`` and written to checkpoints.
        seed: recorded in checkpoints; results do not depend on it.
        delay: seconds the server waits before each operation (a test knob for slow
            operations; the server awaits it with ``anyio.sleep``, never blocking the loop).
    """

    blocking: ClassVar[bool] = False
    """The server calls this backend inline on the event loop (no worker thread)."""

    def __init__(
        self, spec: ModelSpec, *, lora_rank: int, seed: int = 0, delay: float = 0.0
    ) -> None:
        self.spec = spec
        self.lora_rank = lora_rank
        self.seed = seed
        self.delay = delay
        self._step = 0

    def __repr__(self) -> str:
        return f"NullTrainer({self.spec.name!r}, lora_rank={self.lora_rank}, step={self._step})"

    @property
    def step(self) -> int:
        """Number of ``optim_step`` calls since init / load."""
        return self._step

    def validate_forward(self, req: ForwardBackwardRequest) -> None:
        """Raise :class:`InvalidRequest` for input the torch trainer would reject."""
        validate_forward_request(req, self.spec)

    def init(self, lora_rank: int) -> InitTrainerServerResponse:
        """Start over at ``lora_rank`` and step 0."""
        self.lora_rank = lora_rank
        self._step = 0
        return InitTrainerServerResponse(lora_rank=lora_rank, step=0)

    def _output(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        validate_forward_request(req, self.spec)
        outputs: list[dict[str, TensorData]] = []
        for datum in req.data:
            target = datum.loss_fn_inputs.get("target_tokens")
            shape = list(target.shape) if target is not None and target.shape is not None else None
            if shape is None:
                shape = [datum.model_input.length]
            size = 1
            for dim in shape:
                size *= dim
            outputs.append(
                {"logprobs": TensorData(data=[0.0] * size, dtype="float32", shape=shape)}
            )
        metrics: dict[str, float] = {"loss": 0.0}
        if (req.loss_fn_config or {}).get("skip_token_normalization") is True:
            metrics["skip_token_normalization"] = 1.0
        return ForwardBackwardOutput(
            loss=0.0, loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics=metrics
        )

    def forward_backward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Zero logprobs and loss; no gradient is kept."""
        return self._output(req)

    def forward(self, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        """Zero logprobs and loss."""
        return self._output(req)

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """Count the step; report the learning rate and a zero gradient norm."""
        self._step += 1
        return OptimStepResponse(
            metrics={
                "step": float(self._step),
                "learning_rate": float(params.learning_rate),
                "grad_norm": 0.0,
            }
        )

    def save_state(self, directory: Path, *, with_optimizer: bool) -> None:
        """Write a PEFT-shaped placeholder adapter (an empty safetensors file and an
        ``adapter_config.json``) and the trainer counters."""
        config: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.lora_rank,
            "lora_alpha": self.lora_rank,
            "target_modules": [],
            "base_model_name_or_path": self.spec.name,
        }
        (directory / _ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        (directory / _ADAPTER_WEIGHTS).write_bytes(_empty_safetensors())
        state = {
            "backend": "null",
            "lora_rank": self.lora_rank,
            "seed": self.seed,
            "step": self._step if with_optimizer else 0,
            "with_optimizer": with_optimizer,
        }
        (directory / _STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def load_state(self, directory: Path, *, with_optimizer: bool) -> int:
        """Read a directory written by :meth:`save_state`; returns the step after loading."""
        try:
            config = json.loads((directory / _ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidRequest(f"path: no {_ADAPTER_CONFIG} in the checkpoint") from None
        rank = config.get("r")
        if not isinstance(rank, int) or rank < 1:
            raise InvalidRequest(f"path: {_ADAPTER_CONFIG} has no valid rank 'r'")
        step = 0
        if with_optimizer:
            try:
                state = json.loads((directory / _STATE_FILE).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise InvalidRequest("path: the checkpoint holds no optimizer state") from None
            if not state.get("with_optimizer"):
                raise InvalidRequest("path: the checkpoint holds no optimizer state")
            step = int(state.get("step", 0))
        self.lora_rank = rank
        self._step = step
        return step
