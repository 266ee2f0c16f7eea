"""LoRA adapters written in plain torch, saved and loaded in the PEFT adapter format.

:func:`apply_lora` wraps the ``nn.Linear`` layers named ``q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj`` in :class:`LoRALinear` (``y = W x + (B A x) * alpha / r``), freezes
every base weight and initialises the adapters like PEFT does (``A`` Kaiming-uniform with
``a = sqrt(5)``, ``B`` zeros), from a seeded generator so the same seed gives the same adapter.

On disk an adapter is what ``peft`` writes for a ``LlamaForCausalLM``: ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and
``adapter_config.json`` (``peft_type: LORA``, ``task_type: CAUSAL_LM``, ...), so
``peft.PeftModel.from_pretrained(base_model, directory)`` loads it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "TARGET_MODULES",
    "AdapterFormatError",
    "LoRALinear",
    "adapter_config",
    "adapter_state_dict",
    "apply_lora",
    "default_alpha",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_modules",
    "lora_parameters",
    "lora_rank_of",
    "peft_key",
    "read_adapter",
    "save_adapter",
]

TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Names of the linear layers that get an adapter."""

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory that does not fit the model (missing files, keys or shapes)."""


def default_alpha(rank: int) -> float:
    """The ``lora_alpha`` used when none is given: ``2 * rank`` (scaling 2)."""
    return float(2 * rank)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(B @ A) * alpha / r``.

    The attribute names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``); ``lora_A`` has shape
    ``(r, in_features)`` and ``lora_B`` ``(out_features, r)``.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = 0
        self.alpha = 0.0
        self.scaling = 0.0
        self.lora_A = nn.Parameter(torch.empty(0))
        self.lora_B = nn.Parameter(torch.empty(0))
        self.reset(rank, alpha, generator=None)

    def reset(self, rank: int, alpha: float, generator: torch.Generator | None) -> None:
        """Replace the adapter with a fresh one of ``rank`` (``A`` Kaiming-uniform, ``B`` = 0)."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        weight = self.base_layer.weight
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix: bound = 1 / sqrt(in_features).
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(rank, self.in_features, dtype=weight.dtype, device=weight.device)
        a.uniform_(-bound, bound, generator=generator)
        b = torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x) + lora_B(lora_A(x)) * scaling`` (the order PEFT computes it in)."""
        result: torch.Tensor = self.base_layer(x)
        lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return result + (lora * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"rank={self.rank}, alpha={self.alpha:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's :class:`LoRALinear` modules by module path, in sorted order."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return dict(sorted(found.items()))


def lora_rank_of(model: nn.Module) -> int:
    """The rank of the model's adapters (0 when it has none)."""
    mods = lora_modules(model)
    return next(iter(mods.values())).rank if mods else 0


def apply_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    seed: int = 0,
    target_modules: Iterable[str] = TARGET_MODULES,
) -> list[str]:
    """Give ``model`` a fresh adapter of ``rank`` and freeze everything else.

    Wraps the target linear layers on the first call; later calls re-initialise the existing
    adapters (possibly at another rank). Initialisation draws from one ``torch.Generator``
    seeded with ``seed``, module by module in sorted path order, so it is reproducible.
    Returns the adapted module paths. Raises ``ValueError`` when no target layer exists.
    """
    alpha = default_alpha(rank) if alpha is None else float(alpha)
    targets = frozenset(target_modules)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not isinstance(parent, LoRALinear):
                setattr(parent, child, LoRALinear(module, rank, alpha))
    mods = lora_modules(model)
    if not mods:
        raise ValueError(
            f"the model has no linear layers named {', '.join(sorted(targets))}; "
            "LoRA cannot be applied"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for module in mods.values():
        module.reset(rank, alpha, generator)
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    return list(mods)


def peft_key(module_path: str, which: str) -> str:
    """The PEFT state-dict key of ``lora_A`` / ``lora_B`` (``which``) of a module path."""
    return f"{_PEFT_PREFIX}{module_path}.lora_{which}.weight"


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(PEFT key, parameter)`` for every adapter matrix, in a fixed (sorted) order."""
    out: list[tuple[str, nn.Parameter]] = []
    for path, module in lora_modules(model).items():
        out.append((peft_key(path, "A"), module.lora_A))
        out.append((peft_key(path, "B"), module.lora_B))
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the adapter weights under their PEFT keys."""
    return {
        key: param.detach().to("cpu", copy=True).contiguous()
        for key, param in lora_parameters(model)
    }


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT expects for the model's adapter."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapter")
    first = next(iter(mods.values()))
    targets = sorted({path.rsplit(".", 1)[-1] for path in mods})
    alpha: float | int = int(first.alpha) if first.alpha.is_integer() else first.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(
    model: nn.Module, directory: Path, *, base_model_name_or_path: str | None = None
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    save_file(
        adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (directory / ADAPTER_CONFIG_FILE).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(adapter_config, state_dict)`` from a PEFT adapter directory.

    Raises :class:`AdapterFormatError` for a missing file or a config that is not a plain LoRA
    adapter this trainer can load (DoRA, rsLoRA, per-module ranks, biases, fan-in-fan-out).
    """
    from safetensors.torch import load_file

    config_file = directory / ADAPTER_CONFIG_FILE
    weights_file = directory / ADAPTER_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterFormatError(f"{directory}: missing {file.name}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterFormatError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{config_file}: not a LoRA adapter config")
    unsupported = {
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for key, plain in unsupported.items():
        if config.get(key) not in (plain, None):
            raise AdapterFormatError(f"{config_file}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{config_file}: bias={config['bias']!r} is not supported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterFormatError(f"{config_file}: r={rank!r} is not a positive integer")
    return config, load_file(str(weights_file))


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, rank: int, alpha: float
) -> None:
    """Load PEFT-keyed adapter weights into the model's :class:`LoRALinear` layers.

    The adapters are re-created at ``rank`` / ``alpha`` first when they differ. Every adapted
    module must have both matrices in ``state`` with the right shapes, and ``state`` must hold
    no other key; otherwise :class:`AdapterFormatError` is raised and the model is unchanged.
    """
    mods = lora_modules(model)
    if not mods:
        raise AdapterFormatError("the model has no LoRA layers to load an adapter into")
    # PEFT sometimes keeps the adapter name in keys (``lora_A.default.weight``); accept both.
    normalised = {key.replace(".default.weight", ".weight"): t for key, t in state.items()}
    expected: dict[str, tuple[int, int]] = {}
    for path, module in mods.items():
        expected[peft_key(path, "A")] = (rank, module.in_features)
        expected[peft_key(path, "B")] = (module.out_features, rank)
    missing = sorted(set(expected) - set(normalised))
    extra = sorted(set(normalised) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {extra[0]!r})")
        raise AdapterFormatError(
            f"adapter does not fit the model: {'; '.join(parts)} (rank {rank})"
        )
    for key, shape in expected.items():
        got = tuple(normalised[key].shape)
        if got != shape:
            raise AdapterFormatError(
                f"adapter does not fit the model: {key} has shape {list(got)}, expected "
                f"{list(shape)} (rank {rank})"
            )
    with torch.no_grad():
        for path, module in mods.items():
            if module.rank != rank or module.alpha != float(alpha):
                module.reset(rank, alpha, generator=None)
            a = normalised[peft_key(path, "A")]
            b = normalised[peft_key(path, "B")]
            module.lora_A.copy_(a.to(module.lora_A.dtype))
            module.lora_B.copy_(b.to(module.lora_B.dtype))
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            module.lora_A.grad = None
            module.lora_B.grad = None


def load_adapter(model: nn.Module, directory: Path) -> dict[str, Any]:
    """Load a PEFT adapter directory into a model that went through :func:`apply_lora`,
    adopting the checkpoint's rank and alpha. Returns the adapter config."""
    config, state = read_adapter(directory)
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    load_adapter_state_dict(model, state, rank=rank, alpha=alpha)
    return config
