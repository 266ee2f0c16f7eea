"""Every loss of PROTOCOL.md §5, gradient by gradient, against an independent reference.

The trainer runs ``forward_backward`` and shows the gradient its next ``optim_step`` would apply
(:meth:`TorchTrainer.pending_gradient`: normalised per PROTOCOL §5, before clipping). The
reference shares nothing with the server but the base model: it loads the trainer's saved adapter
with ``peft`` onto ``load_base_model(...)`` (not the server's ``lora.py``), runs in float64, takes
logprobs with ``log_softmax`` + ``gather`` one datum at a time (position i predicts token i+1),
writes each per-token loss of §5 out again below, normalises as §5 says (summed, divided by the
number of active units: CE tokens with weight != 0, RL tokens with advantage != 0, dpo pairs;
not divided with ``skip_token_normalization``) and backpropagates. Every adapter gradient must
agree within 1e-4 relative; logprobs, top-k logprobs, ``loss`` and the loss's metrics too. Adam
(decoupled weight decay, global-norm clipping) is checked against an Adam written here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from loops_async import AdamParams, Datum, ModelInput, TensorData  # noqa: E402
from loops_async._wire import ForwardBackwardRequest  # noqa: E402
from loops_async.server.backend import InvalidRequest  # noqa: E402
from loops_async.server.models import TINY_CHAT, resolve_model  # noqa: E402
from loops_async.server.torch_backend import TorchTrainer  # noqa: E402
from loops_async.server.torch_models import load_base_model  # noqa: E402

SPEC = resolve_model(TINY_CHAT)
VOCAB = SPEC.vocab_size
RANK = 4
# The layers the server adapts, spelled out here (not imported) so the reference is independent.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100
# PROTOCOL.md §5 defaults, copied from the spec (not from the server's registry).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cross_entropy": {"skip_token_normalization": False},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "dppo": {"dppo_mask_high": 0.2, "dppo_mask_low": 0.2, "adv_tau": 1.0, "kl_tau": 1e-3},
}
GRAD_RTOL = 1e-4
"""Relative tolerance of a server gradient (float32) against the float64 reference: per tensor
in norm, and elementwise ..."""
GRAD_ATOL = 1e-5
"""... plus this fraction of the tensor's largest reference entry (float32 rounding leaves
errors of ~2e-6 of that scale on entries that are near zero by cancellation)."""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter with random ``A`` and ``B`` (a fresh adapter's ``B = 0`` would leave every
    ``A`` without gradient), written by ``peft`` itself."""
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(load_base_model(TINY_CHAT), config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("random_adapter")
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def shared_trainer(adapter_dir: Path) -> TorchTrainer:
    trainer = TorchTrainer(SPEC, lora_rank=1, seed=0)
    trainer.load_state(adapter_dir, with_optimizer=False)
    assert trainer.lora_rank == RANK
    return trainer


@pytest.fixture
def trainer(shared_trainer: TorchTrainer, adapter_dir: Path) -> TorchTrainer:
    """The shared trainer back at the random adapter: empty gradient buffer, fresh Adam."""
    shared_trainer.load_state(adapter_dir, with_optimizer=False)
    return shared_trainer


@pytest.fixture(scope="module")
def reference(shared_trainer: TorchTrainer, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The reference model, carrying the adapter the trainer saves (``save_state``)."""
    saved = tmp_path_factory.mktemp("trainer_adapter")
    shared_trainer.save_state(saved, with_optimizer=False)
    return Reference(saved)


# --------------------------------------------------------------------------- the reference


@dataclass
class Row:
    """One datum as the reference sees it; every array is shaped like ``targets``."""

    tokens: list[int]
    targets: np.ndarray
    inputs: dict[str, np.ndarray]
    logp_all: torch.Tensor
    """``(N, V)`` float64 log-softmax of the next-token logits."""
    lp: torch.Tensor
    """The target logprobs (float64, differentiable); 0 where the target is ``-100``."""

    @property
    def valid(self) -> torch.Tensor:
        return torch.from_numpy(self.targets != IGNORE)

    def input(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.inputs[name].astype(np.float64))


class Reference:
    """``load_base_model`` + ``peft.PeftModel.from_pretrained`` in float64."""

    def __init__(self, adapter: Path) -> None:
        model = peft.PeftModel.from_pretrained(
            load_base_model(TINY_CHAT), str(adapter), is_trainable=True
        )
        self.model = model.double().eval()
        self.params = {
            name.replace(".default.", "."): p
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }
        assert len(self.params) == 2 * len(TARGET_MODULES) * 4  # 4 layers, A and B each

    def log_softmax(self, tokens: Sequence[int]) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([list(tokens)])).logits[0]
        return F.log_softmax(logits.double(), dim=-1)

    def target_logprobs(self, tokens: Sequence[int], targets: np.ndarray) -> np.ndarray:
        """Logprobs of ``targets`` (no gradient; NaN where ``-100``), to make inputs from."""
        with torch.no_grad():
            logp = self.log_softmax(tokens)
        t = targets.reshape(len(tokens), -1)
        lp = logp.gather(1, torch.from_numpy(np.where(t == IGNORE, 0, t))).numpy()
        return np.where(t == IGNORE, np.nan, lp).reshape(targets.shape)

    def row(self, datum: Datum) -> Row:
        tokens = datum.model_input.to_ints()
        inputs = {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}
        targets = inputs.pop("target_tokens", None)
        if targets is None:  # PROTOCOL §5 local: RL targets default to the next input token
            targets = np.array([*tokens[1:], IGNORE], dtype=np.int64)
        logp_all = self.log_softmax(tokens)
        t = torch.from_numpy(targets.reshape(len(tokens), -1).astype(np.int64))
        gathered = logp_all.gather(1, t.clamp(min=0))
        lp = torch.where(t != IGNORE, gathered, torch.zeros_like(gathered))
        return Row(tokens, targets, inputs, logp_all, lp.reshape(targets.shape))

    def gradient(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        out = {}
        for key, p in self.params.items():
            assert p.grad is not None, key
            out[key] = p.grad.detach().clone()
        self.model.zero_grad(set_to_none=True)
        return out


@dataclass
class RefLoss:
    loss_sum: torch.Tensor
    units: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Means over the active units."""


def ref_cross_entropy(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    """``-w * lp`` summed; active where ``w != 0`` (``w`` = 1 by default, 0 where ``-100``)."""
    total = torch.zeros((), dtype=torch.float64)
    units = 0
    for row in rows:
        w = row.input("weights") if "weights" in row.inputs else torch.ones(row.targets.shape)
        w = torch.where(row.valid, w.double(), torch.zeros_like(w.double()))
        total = total - (w * row.lp).sum()
        units += int((w != 0).sum())
    return RefLoss(total, units)


def _rl_rows(rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp, q, A)`` at the active tokens (target present, advantage != 0) of all rows."""
    lps, qs, advs = [], [], []
    for row in rows:
        adv = row.input("advantages")
        active = row.valid & (adv != 0)
        lps.append(row.lp[active])
        qs.append(row.input("logprobs")[active])
        advs.append(adv[active])
    return torch.cat(lps), torch.cat(qs), torch.cat(advs)


def ref_importance_sampling(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    lp, q, adv = _rl_rows(rows)
    ratio = torch.exp(lp - q)
    return RefLoss((-ratio * adv).sum(), len(adv), {"ratio_mean": float(ratio.detach().mean())})


def ref_ppo(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    lp, q, adv = _rl_rows(rows)
    low, high = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    ratio = torch.exp(lp - q)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, low, high) * adv
    per_token = -torch.where(unclipped <= clipped, unclipped, clipped)
    return RefLoss(
        per_token.sum(),
        len(adv),
        {
            "clip_fraction": float((clipped < unclipped).double().mean()),
            "ratio_mean": float(ratio.detach().mean()),
        },
    )


def ref_cispo(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    lp, q, adv = _rl_rows(rows)
    low, high = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    ratio = torch.exp(lp - q).detach()
    per_token = -torch.clamp(ratio, low, high) * lp * adv
    return RefLoss(
        per_token.sum(),
        len(adv),
        {
            "clip_fraction": float(((ratio < low) | (ratio > high)).double().mean()),
            "ratio_mean": float(ratio.mean()),
        },
    )


def ref_dro(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    lp, q, adv = _rl_rows(rows)
    per_token = -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2)
    return RefLoss(per_token.sum(), len(adv))


def dppo_dropped(
    lp: torch.Tensor, q: torch.Tensor, adv: torch.Tensor, cfg: Mapping[str, Any]
) -> torch.Tensor:
    """The tokens dppo drops from the policy term (PROTOCOL §5 local rule)."""
    d = torch.exp(lp.detach()) - torch.exp(q)
    return ((adv > 0) & (d > cfg["dppo_mask_high"])) | ((adv < 0) & (d < -cfg["dppo_mask_low"]))


def ref_dppo(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    lp, q, adv = _rl_rows(rows)
    keep = (~dppo_dropped(lp, q, adv, cfg)).double()
    ratio = torch.exp(lp - q)
    per_token = -keep * cfg["adv_tau"] * ratio * adv + cfg["kl_tau"] * (lp - q) ** 2
    return RefLoss(per_token.sum(), len(adv), {"masked_fraction": float(1 - keep.mean())})


def ref_dpo(rows: Sequence[Row], cfg: Mapping[str, Any]) -> RefLoss:
    """Per (chosen, rejected) pair; one unit per pair (the server's normaliser for dpo)."""
    beta, ls = cfg["beta"], cfg["label_smoothing"]
    seq = []
    for row in rows:
        w = row.input("weights") if "weights" in row.inputs else torch.ones(row.targets.shape)
        used = row.valid & (w != 0)
        seq.append((w.double()[used] * (row.lp[used] - row.input("ref_logprobs")[used])).sum())
    delta = torch.stack(seq[0::2]) - torch.stack(seq[1::2])
    per_pair = -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
    return RefLoss(
        per_pair.sum(),
        len(per_pair),
        {
            "reward_accuracy": float((delta > 0).double().mean()),
            "reward_margin": float((beta * delta).detach().mean()),
        },
    )


REF_LOSSES: dict[str, Callable[[Sequence[Row], Mapping[str, Any]], RefLoss]] = {
    "cross_entropy": ref_cross_entropy,
    "importance_sampling": ref_importance_sampling,
    "ppo": ref_ppo,
    "cispo": ref_cispo,
    "dro": ref_dro,
    "dppo": ref_dppo,
    "dpo": ref_dpo,
}


# --------------------------------------------------------------------------- comparisons


def request(
    data: list[Datum],
    loss_fn: str,
    config: Mapping[str, Any] | None = None,
    top_k: int = 0,
) -> ForwardBackwardRequest:
    return ForwardBackwardRequest(
        seq_id=1,
        run_id=None,
        model=TINY_CHAT,
        data=data,
        loss_fn=loss_fn,
        loss_fn_config=None if config is None else dict(config),
        top_k_logprobs=top_k,
    )


def assert_gradients_close(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    rtol: float = GRAD_RTOL,
    atol: float = GRAD_ATOL,
) -> float:
    """Every tensor within ``rtol`` in norm (``|got - expected| <= rtol |expected|``) and
    elementwise within ``rtol`` plus ``atol * max |expected|``; returns the largest relative
    error in norm over the tensors."""
    assert set(got) == set(expected)
    worst = 0.0
    for key in sorted(expected):
        want = expected[key].double()
        have = got[key].double()
        scale = float(want.abs().max())
        assert scale > 0, f"{key}: the reference gradient is zero"
        error = float(torch.linalg.vector_norm(have - want) / torch.linalg.vector_norm(want))
        assert error <= rtol, f"{key}: relative error {error:.2e} in norm"
        torch.testing.assert_close(
            have, want, rtol=rtol, atol=atol * scale, msg=lambda m, key=key: f"{key}: {m}"
        )
        worst = max(worst, error)
    return worst


def reference_gradient(
    reference: Reference, data: list[Datum], loss_fn: str, config: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], RefLoss, list[Row]]:
    cfg = {**DEFAULTS[loss_fn], **(config or {})}
    rows = [reference.row(d) for d in data]
    ref = REF_LOSSES[loss_fn](rows, cfg)
    normaliser = 1 if cfg.get("skip_token_normalization") else ref.units
    return reference.gradient(ref.loss_sum / normaliser), ref, rows


# --------------------------------------------------------------------------- data


def datum(tokens: list[int], inputs: Mapping[str, np.ndarray]) -> Datum:
    """A datum whose tensors hold plain lists (NaN for null), as a decoded request body does."""
    tensors = {}
    for name, value in inputs.items():
        arr = np.asarray(value)
        dtype = "int64" if arr.dtype.kind in "iu" else "float32"
        tensors[name] = TensorData(data=arr.ravel().tolist(), dtype=dtype, shape=list(arr.shape))
    return Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=tensors)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(3, VOCAB, size=n)]


def _next_targets(tokens: Sequence[int]) -> np.ndarray:
    return np.array([*tokens[1:], IGNORE], dtype=np.int64)


LENGTHS = (7, 9, 6, 8)


def ce_data(
    ref: Reference,
    *,
    weights: bool = False,
    multi: bool = False,
    mixed: bool = False,
    seed: int = 0,
    n: int = 4,
) -> list[Datum]:
    """``n`` datums: next-token targets (``-100`` at the end and at a random position), or with
    ``multi`` three random targets per position (with ``mixed`` shapes ``(N,)``, ``(N, 2)``,
    ``(N, 3)`` in turn); with ``weights`` random weights of both signs with zeros (also non-zero
    weights at ``-100`` positions, which must not count), except on datum 1, which has none
    (defaults to 1)."""
    rng = _rng(seed)
    out = []
    for i in range(n):
        tokens = _tokens(rng, LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS))
        k = 1 + i % 3 if mixed else 3
        if multi and k > 1:
            targets = rng.integers(0, VOCAB, size=(len(tokens), k))
            targets[rng.random(targets.shape) < 0.2] = IGNORE
        else:
            targets = _next_targets(tokens)
            targets[rng.integers(0, len(tokens) - 1)] = IGNORE
        inputs: dict[str, Any] = {"target_tokens": targets.astype(np.int64)}
        if weights and i != 1:
            w = rng.uniform(-0.5, 2.0, size=targets.shape)
            w[rng.random(targets.shape) < 0.25] = 0.0
            w[targets == IGNORE] = 3.0  # ignored: the target is -100
            inputs["weights"] = w.astype(np.float32)
        out.append(datum(tokens, inputs))
    return out


def rl_data(ref: Reference, *, seed: int = 1, noise: float = 0.3, n: int = 4) -> list[Datum]:
    """``n`` RL datums: advantages of both signs with zeros (``q`` null there), ``q`` = the
    reference logprobs + noise (ratios both inside and outside the clip range). Datum 0 has a
    ``-100`` target where its advantage is non-zero; datum 1 omits ``target_tokens`` (the next
    input token); datum 2 has random (not next-token) targets."""
    rng = _rng(seed)
    out = []
    for i in range(n):
        tokens = _tokens(rng, LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS))
        targets = _next_targets(tokens)
        if i % 4 == 0:
            targets[2] = IGNORE
        if i % 4 == 2:
            targets[:-1] = rng.integers(0, VOCAB, size=len(tokens) - 1)
        adv = rng.normal(size=len(tokens))
        adv[rng.random(len(tokens)) < 0.2] = 0.0
        if i % 4 == 0:
            adv[2] = 1.5  # non-zero advantage at a -100 target: not active
        q = ref.target_logprobs(tokens, targets) + rng.normal(0.0, noise, size=len(tokens))
        q[adv == 0] = np.nan
        inputs: dict[str, Any] = {
            "logprobs": q.astype(np.float32),
            "advantages": adv.astype(np.float32),
        }
        if i % 4 != 1:
            inputs["target_tokens"] = targets
        out.append(datum(tokens, inputs))
    return out


def dpo_data(ref: Reference, *, seed: int = 2, pairs: int = 2) -> list[Datum]:
    """``pairs`` (chosen, rejected) pairs sharing a prompt; ``weights`` masks the prompt
    (except on row 1, which has no weights: every target counts); ``ref_logprobs`` = the
    reference logprobs + noise, null where masked."""
    rng = _rng(seed)
    out = []
    for i in range(2 * pairs):
        if i % 2 == 0:
            prompt = _tokens(rng, 3 + i % 3)
        tokens = prompt + _tokens(rng, 3 + (i * 5) % 4)
        targets = _next_targets(tokens)
        w = np.zeros(len(tokens), dtype=np.float32)
        w[len(prompt) - 1 : -1] = 1.0
        ref_lp = ref.target_logprobs(tokens, targets) + rng.normal(0.0, 0.5, size=len(tokens))
        inputs: dict[str, Any] = {"target_tokens": targets}
        if i != 1:
            ref_lp[w == 0] = np.nan
            inputs["weights"] = w
        inputs["ref_logprobs"] = ref_lp.astype(np.float32)
        out.append(datum(tokens, inputs))
    return out


def _threshold_between(values: np.ndarray) -> float:
    """A value splitting ``values`` (at least 2, positive) at their widest ratio gap, so float32
    vs float64 rounding cannot move any of them across it."""
    v = np.sort(values)
    ratios = v[1:] / v[:-1]
    i = int(np.argmax(ratios))
    assert ratios[i] > 1.01, v
    return float(np.sqrt(v[i] * v[i + 1]))


def dppo_masks(ref: Reference, data: list[Datum]) -> dict[str, float]:
    """``dppo_mask_high`` / ``_low`` that drop some tokens with ``A > 0`` and some with
    ``A < 0`` (and keep others): with a random model ``exp(lp)`` is ~1e-3, far below 0.2."""
    lp, q, adv = _rl_rows([ref.row(d) for d in data])
    d = (torch.exp(lp) - torch.exp(q)).detach().numpy()
    a = adv.numpy()
    return {
        "dppo_mask_high": _threshold_between(d[(a > 0) & (d > 0)]),
        "dppo_mask_low": _threshold_between(-d[(a < 0) & (d < 0)]),
    }


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    loss_fn: str
    make: Callable[[Reference], tuple[list[Datum], dict[str, Any] | None]]
    top_k: int = 0


def _fixed(
    make: Callable[[Reference], list[Datum]], config: dict[str, Any] | None = None
) -> Callable[[Reference], tuple[list[Datum], dict[str, Any] | None]]:
    return lambda ref: (make(ref), config)


def _dppo_custom(ref: Reference) -> tuple[list[Datum], dict[str, Any]]:
    data = rl_data(ref, seed=6)
    return data, {**dppo_masks(ref, data), "adv_tau": 0.7, "kl_tau": 0.3}


CASES = [
    Case("ce", "cross_entropy", _fixed(ce_data), top_k=5),
    Case("ce_weights", "cross_entropy", _fixed(lambda r: ce_data(r, weights=True))),
    Case("ce_multi_target", "cross_entropy", _fixed(lambda r: ce_data(r, multi=True)), top_k=3),
    Case(
        "ce_multi_target_weights",
        "cross_entropy",
        _fixed(lambda r: ce_data(r, multi=True, weights=True, seed=3)),
    ),
    Case(
        "ce_mixed_target_shapes",
        "cross_entropy",
        _fixed(lambda r: ce_data(r, multi=True, mixed=True, weights=True, seed=10)),
        top_k=2,
    ),
    Case(
        "ce_skip_token_normalization",
        "cross_entropy",
        _fixed(lambda r: ce_data(r, weights=True, seed=4), {"skip_token_normalization": True}),
    ),
    Case("importance_sampling", "importance_sampling", _fixed(rl_data), top_k=4),
    Case("ppo", "ppo", _fixed(rl_data)),
    Case(
        "ppo_config",
        "ppo",
        _fixed(
            lambda r: rl_data(r, seed=6),
            {"clip_low_threshold": 0.9, "clip_high_threshold": 1.15},
        ),
    ),
    Case("cispo", "cispo", _fixed(rl_data)),
    Case(
        "cispo_config",
        "cispo",
        _fixed(
            lambda r: rl_data(r, seed=7), {"clip_low_threshold": 0.7, "clip_high_threshold": 1.1}
        ),
    ),
    Case("dro", "dro", _fixed(rl_data)),
    Case("dro_config", "dro", _fixed(lambda r: rl_data(r, seed=8), {"beta": 0.5})),
    Case("dppo", "dppo", _fixed(rl_data)),
    Case("dppo_config", "dppo", _dppo_custom),
    Case("dpo", "dpo", _fixed(dpo_data)),
    Case(
        "dpo_config",
        "dpo",
        _fixed(lambda r: dpo_data(r, seed=9), {"beta": 0.3, "label_smoothing": 0.2}),
        top_k=2,
    ),
]


def _check_outputs(out: Any, rows: Sequence[Row], ref: RefLoss, top_k: int) -> None:
    """``loss`` (mean per active unit), metrics, ``logprobs`` (NaN exactly at ``-100``) and
    ``top_k_logprobs`` / ``top_k_token_ids`` against the reference."""
    mean = float(ref.loss_sum.detach()) / ref.units
    assert out.loss == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
    for name, value in ref.metrics.items():
        assert out.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert len(out.loss_fn_outputs) == len(rows)
    for record, row in zip(out.loss_fn_outputs, rows, strict=True):
        got = record["logprobs"].to_numpy()
        assert got.shape == row.targets.shape
        valid = row.targets != IGNORE
        np.testing.assert_array_equal(np.isnan(got), ~valid)
        want = row.lp.detach().numpy()
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
        if top_k:
            values, ids = torch.topk(row.logp_all.detach(), top_k, dim=-1)
            np.testing.assert_allclose(
                record["top_k_logprobs"].to_numpy(), values.numpy(), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_array_equal(record["top_k_token_ids"].to_numpy(), ids.numpy())
        else:
            assert "top_k_logprobs" not in record


def _check_case_covers(case: Case, rows: Sequence[Row], cfg: Mapping[str, Any]) -> None:
    """The data exercise what the case claims (clipping both ways, masking, negative weights)."""
    if case.loss_fn in ("ppo", "cispo"):
        lp, q, adv = _rl_rows(rows)
        r = torch.exp(lp - q).detach()
        low, high = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        inside = (r >= low) & (r <= high)
        assert inside.any()
        # Clipped with zero gradient in PPO: above the range with A > 0, below it with A < 0.
        assert ((r > high) & (adv > 0)).any()
        assert ((r < low) & (adv < 0)).any()
        # Outside the range but unclipped in PPO (the min picks r * A).
        assert (((r > high) & (adv < 0)) | ((r < low) & (adv > 0))).any()
    if case.name == "dppo_config":
        lp, q, adv = _rl_rows(rows)
        dropped = dppo_dropped(lp, q, adv, cfg)
        assert (dropped & (adv > 0)).any()
        assert (dropped & (adv < 0)).any()
        assert (~dropped & (adv > 0)).any()
        assert (~dropped & (adv < 0)).any()
        # The two thresholds are told apart: swapped, they would drop other tokens.
        swapped = {
            **cfg,
            "dppo_mask_high": cfg["dppo_mask_low"],
            "dppo_mask_low": cfg["dppo_mask_high"],
        }
        assert (dppo_dropped(lp, q, adv, swapped) != dropped).any()
    if case.name == "ce_weights":
        weights = np.concatenate(
            [r.inputs["weights"].ravel() for r in rows if "weights" in r.inputs]
        )
        assert (weights < 0).any()
        assert (weights == 0).any()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loss_gradient_matches_reference(
    case: Case, trainer: TorchTrainer, reference: Reference
) -> None:
    data, config = case.make(reference)
    out = trainer.forward_backward(request(data, case.loss_fn, config, top_k=case.top_k))
    got = trainer.pending_gradient()
    expected, ref, rows = reference_gradient(reference, data, case.loss_fn, config)
    cfg = {**DEFAULTS[case.loss_fn], **(config or {})}
    _check_case_covers(case, rows, cfg)
    _check_outputs(out, rows, ref, case.top_k)
    if cfg.get("skip_token_normalization"):
        assert out.metrics["skip_token_normalization"] == 1.0
    else:
        assert "skip_token_normalization" not in out.metrics
    assert_gradients_close(got, expected)
    # Reading the pending gradient changes nothing; neither does ``forward``, whose outputs are
    # those of forward_backward.
    again = trainer.pending_gradient()
    assert all(torch.equal(got[k], again[k]) for k in got)
    out = trainer.forward(request(data, case.loss_fn, config, top_k=case.top_k))
    _check_outputs(out, rows, ref, case.top_k)
    again = trainer.pending_gradient()
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_pending_gradient_is_zero_when_nothing_is_pending(trainer: TorchTrainer) -> None:
    grads = trainer.pending_gradient()
    assert len(grads) == 2 * len(TARGET_MODULES) * 4
    assert all(not g.any() for g in grads.values())
    assert all(k.startswith("base_model.model.") for k in grads)


@pytest.mark.parametrize(
    ("loss_fn", "make", "config"),
    [
        ("cross_entropy", lambda r: ce_data(r, weights=True, n=8), None),
        (
            "cross_entropy",
            lambda r: ce_data(r, weights=True, n=8),
            {"skip_token_normalization": True},
        ),
        ("ppo", lambda r: rl_data(r, n=8), None),
        ("dpo", lambda r: dpo_data(r, pairs=4), None),
    ],
    ids=["ce", "ce_skip", "ppo", "dpo"],
)
def test_gradients_accumulate_across_calls(
    loss_fn: str,
    make: Callable[[Reference], list[Datum]],
    config: dict[str, Any] | None,
    trainer: TorchTrainer,
    adapter_dir: Path,
    reference: Reference,
) -> None:
    """8 datums in one call == 4 + 4 in two calls (with a ``forward`` between them that leaves
    the buffer untouched) == 8 in micro-batches of one datum / one pair, to 1e-6."""
    data = make(reference)
    trainer.forward_backward(request(data, loss_fn, config))
    one_call = trainer.pending_gradient()

    trainer.load_state(adapter_dir, with_optimizer=False)
    trainer.forward_backward(request(data[:4], loss_fn, config))
    half = trainer.pending_gradient()
    trainer.forward(request(data, loss_fn, config, top_k=3))
    untouched = trainer.pending_gradient()
    assert all(torch.equal(half[k], untouched[k]) for k in half)
    trainer.forward_backward(request(data[4:], loss_fn, config))
    two_calls = trainer.pending_gradient()
    assert_gradients_close(two_calls, one_call, rtol=1e-6, atol=2e-6)

    small = TorchTrainer(SPEC, lora_rank=1, seed=0, max_logits_per_batch=1)
    small.load_state(adapter_dir, with_optimizer=False)
    small.forward_backward(request(data, loss_fn, config))
    assert_gradients_close(small.pending_gradient(), one_call, rtol=1e-6, atol=2e-6)

    # And the reference agrees with the accumulated gradient.
    expected, _ref, _rows = reference_gradient(reference, data, loss_fn, config)
    assert_gradients_close(two_calls, expected)


def test_mixing_normalised_and_skip_contributions_is_an_error(
    trainer: TorchTrainer, adapter_dir: Path, reference: Reference
) -> None:
    data = ce_data(reference, weights=True)
    skip = {"skip_token_normalization": True}
    for first, second in ((None, skip), (skip, None), (skip, {"skip_token_normalization": False})):
        trainer.load_state(adapter_dir, with_optimizer=False)
        trainer.forward_backward(request(data, "cross_entropy", first))
        before = trainer.pending_gradient()
        with pytest.raises(
            InvalidRequest,
            match=r"^loss_fn_config\['skip_token_normalization'\]: cannot mix contributions",
        ):
            trainer.forward_backward(request(data, "cross_entropy", second))
        if first is skip:  # an RL loss is a normalised contribution too
            with pytest.raises(InvalidRequest, match="skip_token_normalization"):
                trainer.forward_backward(request(rl_data(reference), "importance_sampling"))
        after = trainer.pending_gradient()
        assert all(torch.equal(before[k], after[k]) for k in before)
        trainer.optim_step(AdamParams(learning_rate=1e-3))
        trainer.forward_backward(request(data, "cross_entropy", second))  # accepted now


def reference_adam(
    weights: dict[str, torch.Tensor],
    grads: Sequence[dict[str, torch.Tensor]],
    params: AdamParams,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Adam with decoupled weight decay and global-norm clipping (``grad_clip_norm`` 0 = off;
    coefficient ``clip / (norm + 1e-6)`` when below 1, as ``torch.nn.utils.clip_grad_norm_``),
    in float64, over a sequence of gradients. Returns the weights and the pre-clip norms."""
    w = {k: v.double().clone() for k, v in weights.items()}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v = {k: torch.zeros_like(x) for k, x in w.items()}
    norms = []
    for t, grad in enumerate(grads, start=1):
        g = {k: x.double() for k, x in grad.items()}
        norm = float(torch.sqrt(sum((x**2).sum() for x in g.values())))
        norms.append(norm)
        if params.grad_clip_norm > 0:
            coef = params.grad_clip_norm / (norm + 1e-6)
            if coef < 1:
                g = {k: x * coef for k, x in g.items()}
        for k in w:
            m[k] = params.beta1 * m[k] + (1 - params.beta1) * g[k]
            v[k] = params.beta2 * v[k] + (1 - params.beta2) * g[k] ** 2
            m_hat = m[k] / (1 - params.beta1**t)
            v_hat = v[k] / (1 - params.beta2**t)
            w[k] = w[k] * (1 - params.learning_rate * params.weight_decay)
            w[k] = w[k] - params.learning_rate * m_hat / (torch.sqrt(v_hat) + params.eps)
    return w, norms


@pytest.mark.parametrize(
    ("weight_decay", "clip_fraction"),
    [(0.0, 0.0), (0.1, 0.0), (0.0, 0.3), (0.05, 0.5)],
    ids=["plain", "weight_decay", "clipped", "weight_decay_clipped"],
)
def test_adam_matches_reference(
    weight_decay: float,
    clip_fraction: float,
    trainer: TorchTrainer,
    reference: Reference,
) -> None:
    """Two ``optim_step``s from the trainer's pending gradients equal the reference Adam (to
    1e-6 on the weights); ``grad_clip_norm`` = ``clip_fraction`` x the first gradient's norm
    (0 = off)."""
    from loops_async.server.lora import lora_parameters  # only to read the trainer's weights

    def weights() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in lora_parameters(trainer.model)}

    batches = [
        request(ce_data(reference, weights=True, seed=11), "cross_entropy"),
        request(rl_data(reference, seed=12), "ppo"),
    ]
    start = weights()
    grads: list[dict[str, torch.Tensor]] = []
    metrics = []
    params = None
    for batch in batches:
        trainer.forward_backward(batch)
        grads.append(trainer.pending_gradient())
        if params is None:
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads[0].values())))
            params = AdamParams(
                learning_rate=1e-2,
                beta1=0.8,
                beta2=0.9,
                eps=1e-3 * norm,  # comparable to the gradient entries: the step is not sign(g)
                weight_decay=weight_decay,
                grad_clip_norm=clip_fraction * norm,
            )
        metrics.append(trainer.optim_step(params).metrics)
        assert not any(g.any() for g in trainer.pending_gradient().values())  # cleared
    assert params is not None
    expected, norms = reference_adam(start, grads, params)
    for key, value in weights().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=1e-6, msg=key)
    for got, norm in zip(metrics, norms, strict=True):
        assert got is not None
        assert got["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert ("grad_clipped" in got) == (0 < params.grad_clip_norm < norm)
    # The settings under test make a difference.
    if weight_decay or clip_fraction:
        plain = AdamParams(**{**_as_dict(params), "weight_decay": 0.0, "grad_clip_norm": 0.0})
        other, _ = reference_adam(start, grads, plain)
        assert max(float((other[k] - expected[k]).abs().max()) for k in expected) > 1e-4


def _as_dict(params: AdamParams) -> dict[str, float]:
    return {f: getattr(params, f) for f in params.__struct_fields__}


def _rl_datum(tokens: list[int], **inputs: Any) -> Datum:
    return datum(tokens, inputs)


_TOKENS = [5, 6, 7, 8]
_F = np.zeros(4, dtype=np.float32)
_T = np.array([6, 7, 8, IGNORE], dtype=np.int64)
_RL = {"target_tokens": _T, "logprobs": _F - 1, "advantages": _F + 1}
_DPO = {"target_tokens": _T, "ref_logprobs": _F - 1}

INVALID: list[tuple[str, str, list[Datum], dict[str, Any] | None, str]] = [
    (
        "ce_unknown_key",
        "cross_entropy",
        [_rl_datum(_TOKENS, target_tokens=_T)],
        {"clip_low_threshold": 0.8},
        r"^loss_fn_config: unknown key 'clip_low_threshold' for loss_fn 'cross_entropy'",
    ),
    (
        "is_takes_no_config",
        "importance_sampling",
        [_rl_datum(_TOKENS, **_RL)],
        {"beta": 0.1},
        r"^loss_fn_config: unknown key 'beta' for loss_fn 'importance_sampling'; known keys: none",
    ),
    (
        "ppo_unknown_key",
        "ppo",
        [_rl_datum(_TOKENS, **_RL)],
        {"clip_threshold": 0.2},
        r"^loss_fn_config: unknown key 'clip_threshold' for loss_fn 'ppo'; known keys: "
        r"clip_high_threshold, clip_low_threshold",
    ),
    (
        "cispo_unknown_key",
        "cispo",
        [_rl_datum(_TOKENS, **_RL)],
        {"beta": 0.1},
        r"^loss_fn_config: unknown key 'beta' for loss_fn 'cispo'",
    ),
    (
        "dro_unknown_key",
        "dro",
        [_rl_datum(_TOKENS, **_RL)],
        {"kl_tau": 0.1},
        r"^loss_fn_config: unknown key 'kl_tau' for loss_fn 'dro'; known keys: beta",
    ),
    (
        "dppo_unknown_key",
        "dppo",
        [_rl_datum(_TOKENS, **_RL)],
        {"dppo_mask": 0.1},
        r"^loss_fn_config: unknown key 'dppo_mask' for loss_fn 'dppo'; known keys: adv_tau, "
        r"dppo_mask_high, dppo_mask_low, kl_tau",
    ),
    (
        "dpo_unknown_key",
        "dpo",
        [_rl_datum(_TOKENS, **_DPO)] * 2,
        {"skip_token_normalization": True},
        r"^loss_fn_config: unknown key 'skip_token_normalization' for loss_fn 'dpo'",
    ),
    (
        "ce_missing_targets",
        "cross_entropy",
        [_rl_datum(_TOKENS, target_tokens=_T), _rl_datum(_TOKENS, weights=_F)],
        None,
        r"^data\[1\]\.loss_fn_inputs: missing 'target_tokens', required by loss_fn "
        r"'cross_entropy'",
    ),
    (
        "ppo_missing_advantages",
        "ppo",
        [_rl_datum(_TOKENS, **_RL), _rl_datum(_TOKENS, target_tokens=_T, logprobs=_F)],
        None,
        r"^data\[1\]\.loss_fn_inputs: missing 'advantages', required by loss_fn 'ppo'",
    ),
    (
        "dro_missing_logprobs",
        "dro",
        [_rl_datum(_TOKENS, advantages=_F + 1)],
        None,
        r"^data\[0\]\.loss_fn_inputs: missing 'logprobs', required by loss_fn 'dro'",
    ),
    (
        "dpo_missing_ref_logprobs",
        "dpo",
        [_rl_datum(_TOKENS, **_DPO), _rl_datum(_TOKENS, target_tokens=_T)],
        None,
        r"^data\[1\]\.loss_fn_inputs: missing 'ref_logprobs', required by loss_fn 'dpo'",
    ),
    (
        "dpo_odd_count",
        "dpo",
        [_rl_datum(_TOKENS, **_DPO)] * 3,
        None,
        r"^data: loss_fn 'dpo' takes \(chosen, rejected\) pairs interleaved, so an even number "
        r"of datums; got 3",
    ),
    (
        "ppo_foreign_input",
        "ppo",
        [_rl_datum(_TOKENS, **_RL, weights=_F)],
        None,
        r"^data\[0\]\.loss_fn_inputs\['weights'\]: not an input of loss_fn 'ppo'",
    ),
]


@pytest.mark.parametrize(
    ("loss_fn", "data", "config", "pattern"),
    [pytest.param(*rest, id=name) for name, *rest in INVALID],
)
def test_invalid_requests_name_the_field(
    loss_fn: str,
    data: list[Datum],
    config: dict[str, Any] | None,
    pattern: str,
    trainer: TorchTrainer,
    reference: Reference,
) -> None:
    """Rejected with the offending field first, and the pending gradient is untouched."""
    trainer.forward_backward(request(ce_data(reference, n=2), "cross_entropy"))
    before = trainer.pending_gradient()
    with pytest.raises(InvalidRequest, match=pattern):
        trainer.forward_backward(request(data, loss_fn, config))
    with pytest.raises(InvalidRequest, match=pattern):
        trainer.forward(request(data, loss_fn, config))
    after = trainer.pending_gradient()
    assert all(torch.equal(before[k], after[k]) for k in before)
