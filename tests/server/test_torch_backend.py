"""The torch trainer, called directly (no HTTP): tokenizer, base model, LoRA, losses, Adam,
checkpoints, PEFT compatibility and request validation."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loops_async._wire import ForwardBackwardRequest  # noqa: E402
from loops_async.server.backend import InvalidRequest  # noqa: E402
from loops_async.server.lora import (  # noqa: E402
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    TARGET_MODULES,
    lora_parameters,
)
from loops_async.server.models import BUILTIN_MODELS, TINY_CHAT, resolve_model  # noqa: E402
from loops_async.server.torch_backend import OPTIMIZER_FILE, TorchTrainer  # noqa: E402
from loops_async.server.torch_models import (  # noqa: E402
    load_base_model,
    save_builtin_as_directory,
)
from loops_async.server.validation import LOSS_SPECS, validate_forward_request  # noqa: E402
from loops_async.tokenizer import builtin_tokenizer_dir, load_tokenizer  # noqa: E402
from loops_async.types import (  # noqa: E402
    AdamParams,
    Datum,
    EncodedTextChunk,
    ImageChunk,
    ModelInput,
    TensorData,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC = BUILTIN_MODELS[TINY_CHAT]
CHATS = [
    ("What is 12+34?", "46"),
    ("Reverse the word: apple", "e l p p a"),
    ("Say hello.", "Hello!"),
    ("What is 7+8?", "15"),
    ("What is 21+30?", "51"),
    ("Reverse the word: cat", "t a c"),
    ("Name a color.", "Blue."),
    ("What is 5+5?", "10"),
]


# --------------------------------------------------------------------------- helpers


def sft_datum(question: str, answer: str) -> Datum:
    """A chat example: loss on the assistant's answer and its <|end|> only."""
    tok = load_tokenizer(TINY_CHAT)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    return Datum(
        model_input=ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64")},
    )


def sft_data(n: int = 4) -> list[Datum]:
    return [sft_datum(q, a) for q, a in CHATS[:n]]


def request(data: list[Datum], loss_fn: str = "cross_entropy", **kw: Any) -> ForwardBackwardRequest:
    return ForwardBackwardRequest(
        seq_id=1, run_id=None, model=TINY_CHAT, data=data, loss_fn=loss_fn, **kw
    )


def adapter(trainer: TorchTrainer) -> dict[str, Any]:
    return {k: p.detach().clone() for k, p in lora_parameters(trainer.model)}


def assert_close_dicts(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def logprobs_of(out: Any) -> list[np.ndarray]:
    return [rec["logprobs"].to_numpy() for rec in out.loss_fn_outputs]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """The tiny model is as fast on one thread, and one thread does not collapse when other
    processes keep the CPUs busy (OpenMP spin-waits do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trainer() -> TorchTrainer:
    """One shared trainer; every test that uses it starts with ``init``."""
    return TorchTrainer(SPEC, lora_rank=8, seed=0)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline_through_transformers() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir(TINY_CHAT)))
    assert len(tok) <= SPEC.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.eos_token == "<|end|>"
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|system|>"]) == [3, 4, 5]
    for text in ["Hello world! What is 12+34? 46.", "naïve café ☕ 日本", "  spaces\tand\nlines "]:
        ids = tok.encode(text)
        assert max(ids) < SPEC.vocab_size
        assert tok.decode(ids) == text
    # Digits are single tokens, whatever surrounds them.
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]
    assert load_tokenizer(TINY_CHAT) is load_tokenizer(TINY_CHAT)


def test_chat_template() -> None:
    tok = load_tokenizer(TINY_CHAT)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    assert ids[0] == 1
    assert ids[-1] == 4
    assert tok.decode(ids) == text
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "4"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    masked = [t for t, m in zip(full["input_ids"], full["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "4<|end|>"
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_generator_is_deterministic() -> None:
    script = ROOT / "scripts" / "build_tiny_chat_tokenizer.py"
    if not script.is_file():
        pytest.skip("scripts/ is not part of this tree")
    spec = importlib.util.spec_from_file_location("build_tiny_chat_tokenizer", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
    total = sum(f.stat().st_size for f in builtin_tokenizer_dir(TINY_CHAT).iterdir())
    assert total < 64_000


def test_client_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from loops_async.tokenizer import load_tokenizer\n"
        "import loops_async.server.validation\n"
        "tok = load_tokenizer('loops-local/tiny-chat')\n"
        "assert tok.encode('hi') \n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_unknown_tokenizer_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no-such-model"):
        load_tokenizer(str(tmp_path / "no-such-model"))


# --------------------------------------------------------------------------- base model


def test_base_model_rebuilds_identically() -> None:
    a, b = load_base_model(TINY_CHAT), load_base_model(TINY_CHAT)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The weights follow the documented recipe, not transformers' init code.
    gen = torch.Generator().manual_seed(SPEC.seed)
    names = sorted(n for n, _ in a.named_parameters())
    assert names[0] == "lm_head.weight"
    expected = torch.empty(1024, 128).normal_(0.0, 1 / math.sqrt(128), generator=gen)
    assert torch.equal(sa["lm_head.weight"], expected)
    assert torch.equal(sa["model.norm.weight"], torch.ones(128))
    assert not a.training


def test_same_seed_same_ops_bit_identical() -> None:
    data = sft_data(4)
    runs = []
    for _ in range(2):
        t = TorchTrainer(SPEC, lora_rank=4, seed=7)
        for _ in range(3):
            t.forward_backward(request(data))
            t.optim_step(AdamParams(learning_rate=1e-2))
        runs.append(adapter(t))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # The seed picks the initial adapter (lora_A; lora_B starts at zero).
    seven = adapter(TorchTrainer(SPEC, lora_rank=4, seed=7))
    eight = adapter(TorchTrainer(SPEC, lora_rank=4, seed=8))
    key = next(k for k in seven if "lora_A" in k)
    assert not torch.equal(seven[key], eight[key])


# --------------------------------------------------------------------------- training


def test_sft_loss_halves_in_30_steps(trainer: TorchTrainer) -> None:
    trainer.init(8)
    req = request(sft_data(4))
    losses = []
    for _ in range(30):
        out = trainer.forward_backward(req)
        assert out.metrics["loss"] == out.loss
        losses.append(out.loss)
        metrics = trainer.optim_step(AdamParams(learning_rate=3e-3)).metrics
    assert metrics is not None
    assert metrics["step"] == 30
    assert metrics["learning_rate"] == 3e-3
    assert math.isfinite(metrics["grad_norm"])
    print(f"SFT loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    assert losses[-1] <= 0.5 * losses[0]
    assert trainer.step == 30


def test_outputs_shapes_and_masking(trainer: TorchTrainer) -> None:
    trainer.init(8)
    data = sft_data(3)
    out = trainer.forward(request(data))
    assert out.loss_fn_output_type == "ArrayRecord"
    assert len(out.loss_fn_outputs) == 3
    for datum, rec in zip(data, out.loss_fn_outputs, strict=True):
        lp = rec["logprobs"]
        target = datum.loss_fn_inputs["target_tokens"]
        assert lp.dtype == "float32"
        assert lp.shape == target.shape
        arr, tgt = lp.to_numpy(), target.to_numpy()
        assert np.isnan(arr[tgt == -100]).all()
        assert np.isfinite(arr[tgt != -100]).all()
        assert (arr[tgt != -100] <= 0).all()
    # The mean over active tokens is what `loss` reports.
    active = np.concatenate([a[~np.isnan(a)] for a in logprobs_of(out)])
    assert out.loss == pytest.approx(-active.mean(), rel=1e-5)


def test_batched_equals_per_datum(trainer: TorchTrainer) -> None:
    trainer.init(8)
    trainer.forward_backward(request(sft_data(8)))
    trainer.optim_step(AdamParams(learning_rate=1e-2))  # a non-zero adapter
    data = sft_data(8)
    batched = logprobs_of(trainer.forward(request(data)))
    for i, datum in enumerate(data):
        (single,) = logprobs_of(trainer.forward(request([datum])))
        np.testing.assert_allclose(batched[i], single, atol=1e-5, equal_nan=True)


def test_one_call_equals_split_calls() -> None:
    data = sft_data(8)
    one = TorchTrainer(SPEC, lora_rank=8, seed=3)
    two = TorchTrainer(SPEC, lora_rank=8, seed=3)
    for _ in range(2):  # two steps, so lora_A gets a gradient too
        out = one.forward_backward(request(data))
        out_a = two.forward_backward(request(data[:4]))
        out_b = two.forward_backward(request(data[4:]))
        np.testing.assert_allclose(
            np.concatenate([x.ravel() for x in logprobs_of(out)]),
            np.concatenate([x.ravel() for x in logprobs_of(out_a) + logprobs_of(out_b)]),
            atol=1e-5,
            equal_nan=True,
        )
        m1 = one.optim_step(AdamParams(learning_rate=1e-3)).metrics
        m2 = two.optim_step(AdamParams(learning_rate=1e-3)).metrics
        assert m1 is not None
        assert m2 is not None
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
        assert_close_dicts(adapter(one), adapter(two), atol=1e-6)


def test_forward_leaves_gradient_untouched(trainer: TorchTrainer) -> None:
    trainer.init(8)
    data = sft_data(4)
    trainer.forward(request(data))
    assert all(p.grad is None for _, p in lora_parameters(trainer.model))
    trainer.forward_backward(request(data[:2]))
    before = {k: p.grad.clone() for k, p in lora_parameters(trainer.model) if p.grad is not None}
    assert before
    trainer.forward(request(data))
    after = {k: p.grad.clone() for k, p in lora_parameters(trainer.model) if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... and the pending token count: the step equals one made without the forward.
    ref = TorchTrainer(SPEC, lora_rank=8, seed=0)
    ref.forward_backward(request(data[:2]))
    ref.optim_step(AdamParams(learning_rate=1e-3))
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    assert_close_dicts(adapter(trainer), adapter(ref), atol=0)


def test_adam_matches_torch_adamw(trainer: TorchTrainer) -> None:
    trainer.init(4)
    data = sft_data(4)
    params = AdamParams(
        learning_rate=2e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.01
    )
    # Reference: torch.optim.AdamW + clip_grad_norm_ on copies with the same normalised grads.
    trainer.forward_backward(request(data))
    n_active = sum(int((d.loss_fn_inputs["target_tokens"].to_numpy() != -100).sum()) for d in data)
    copies = []
    for _, p in lora_parameters(trainer.model):
        c = p.detach().clone().requires_grad_(True)
        c.grad = p.grad.detach() / n_active
        copies.append(c)
    expected_norm = float(torch.nn.utils.clip_grad_norm_(copies, 0.01))
    opt = torch.optim.AdamW(
        copies, lr=2e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, foreach=False
    )
    opt.step()
    metrics = trainer.optim_step(params).metrics
    assert metrics is not None
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert metrics.get("grad_clipped") == 1.0
    for (key, p), c in zip(lora_parameters(trainer.model), copies, strict=True):
        torch.testing.assert_close(p.detach(), c.detach(), atol=1e-7, rtol=0, msg=key)


def test_skip_token_normalization(trainer: TorchTrainer) -> None:
    data = sft_data(4)
    n_active = sum(int((d.loss_fn_inputs["target_tokens"].to_numpy() != -100).sum()) for d in data)
    # Summed contributions with weights 1/n give the same step as the normalised loss.
    trainer.init(8)
    trainer.forward_backward(request(data))
    trainer.forward_backward(request(data))
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    expected = adapter(trainer)

    weighted = []
    for d in data:
        tgt = d.loss_fn_inputs["target_tokens"].to_numpy()
        w = np.where(tgt != -100, 1.0 / (2 * n_active), 0.0).astype(np.float32)
        weighted.append(
            Datum(model_input=d.model_input, loss_fn_inputs={**d.loss_fn_inputs, "weights": w})
        )
    trainer.init(8)
    cfg = {"skip_token_normalization": True}
    out = trainer.forward_backward(request(weighted, loss_fn_config=cfg))
    assert out.metrics["skip_token_normalization"] == 1.0
    trainer.forward_backward(request(weighted, loss_fn_config=cfg))
    with pytest.raises(InvalidRequest, match="skip_token_normalization"):
        trainer.forward_backward(request(data))
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    assert_close_dicts(adapter(trainer), expected, atol=1e-6)
    # After the step the buffer is empty, so the other kind is accepted again.
    out = trainer.forward_backward(request(data))
    assert "skip_token_normalization" not in out.metrics


def test_save_load_with_optimizer_resumes_exactly(trainer: TorchTrainer, tmp_path: Path) -> None:
    trainer.init(8)
    data = sft_data(4)
    adam = AdamParams(learning_rate=3e-3)
    for _ in range(3):
        trainer.forward_backward(request(data))
        trainer.optim_step(adam)
    trainer.save_state(tmp_path / "ckpt", with_optimizer=True)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {
        ADAPTER_WEIGHTS_FILE,
        ADAPTER_CONFIG_FILE,
        OPTIMIZER_FILE,
    }

    def five_steps() -> list[np.ndarray]:
        for _ in range(5):
            trainer.forward_backward(request(data))
            trainer.optim_step(adam)
        return logprobs_of(trainer.forward(request(data)))

    first = five_steps()
    assert trainer.step == 8
    trainer.init(4)  # different rank in between: the checkpoint's rank is adopted
    assert trainer.load_state(tmp_path / "ckpt", with_optimizer=True) == 3
    assert trainer.lora_rank == 8
    second = five_steps()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)


def test_load_without_optimizer_resets_step(trainer: TorchTrainer, tmp_path: Path) -> None:
    trainer.init(8)
    data = sft_data(2)
    for _ in range(2):
        trainer.forward_backward(request(data))
        trainer.optim_step(AdamParams(learning_rate=3e-3))
    weights = adapter(trainer)
    trainer.save_state(tmp_path / "w", with_optimizer=False)
    assert not (tmp_path / "w" / OPTIMIZER_FILE).exists()
    trainer.forward_backward(request(data))
    trainer.optim_step(AdamParams(learning_rate=3e-3))
    assert trainer.load_state(tmp_path / "w", with_optimizer=False) == 0
    assert trainer.step == 0
    assert_close_dicts(adapter(trainer), weights, atol=0)
    assert all(p.grad is None for _, p in lora_parameters(trainer.model))
    with pytest.raises(InvalidRequest, match="no optimizer state"):
        trainer.load_state(tmp_path / "w", with_optimizer=True)
    with pytest.raises(InvalidRequest, match="does not exist"):
        trainer.load_state(tmp_path / "missing", with_optimizer=False)


def test_peft_round_trip_matches_server_logits(trainer: TorchTrainer, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    trainer.init(8)
    data = sft_data(4)
    for _ in range(3):
        trainer.forward_backward(request(data))
        trainer.optim_step(AdamParams(learning_rate=1e-2))
    trainer.save_state(tmp_path / "adapter", with_optimizer=False)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE)).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in keys

    model = peft.PeftModel.from_pretrained(load_base_model(TINY_CHAT), str(tmp_path / "adapter"))
    model.eval()
    ids = torch.tensor([data[0].model_input.to_ints()])
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        ours = trainer.model(input_ids=ids).logits
    assert not torch.allclose(ours, load_base_model(TINY_CHAT)(input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_local_directory_model_trains(tmp_path: Path) -> None:
    directory = save_builtin_as_directory(TINY_CHAT, tmp_path / "tiny")
    assert (directory / "config.json").is_file()
    assert load_tokenizer(str(directory)).encode("12") == load_tokenizer(TINY_CHAT).encode("12")
    spec = resolve_model(str(directory))
    assert spec.path is not None
    assert spec.vocab_size == SPEC.vocab_size
    local = TorchTrainer(spec, lora_rank=4, seed=0)
    builtin = TorchTrainer(SPEC, lora_rank=4, seed=0)
    req = request(sft_data(4))
    for a, b in zip(
        logprobs_of(local.forward(req)), logprobs_of(builtin.forward(req)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    losses = []
    for _ in range(10):
        losses.append(local.forward_backward(req).loss)
        local.optim_step(AdamParams(learning_rate=3e-3))
    assert losses[-1] < 0.7 * losses[0]
    local.save_state(tmp_path / "ckpt", with_optimizer=False)
    config = json.loads((tmp_path / "ckpt" / ADAPTER_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(directory.resolve())


# --------------------------------------------------------------------------- other losses


def rl_datum(datum: Datum, q: np.ndarray, adv: np.ndarray) -> Datum:
    tgt = datum.loss_fn_inputs["target_tokens"]
    return Datum(
        model_input=datum.model_input,
        loss_fn_inputs={
            "target_tokens": tgt,
            "logprobs": TensorData.from_numpy(np.nan_to_num(q).astype(np.float32)),
            "advantages": TensorData.from_numpy(adv.astype(np.float32)),
        },
    )


def test_rl_losses_on_policy(trainer: TorchTrainer) -> None:
    """With q = the trainer's own logprobs, r = 1: every RL loss has a closed form."""
    trainer.init(8)
    base = sft_data(4)
    q = logprobs_of(trainer.forward(request(base)))
    rng = np.random.default_rng(0)
    advs = [np.where(np.isnan(x), 0.0, rng.normal(size=x.shape)) for x in q]
    data = [rl_datum(d, qi, a) for d, qi, a in zip(base, q, advs, strict=True)]
    lp = np.concatenate([np.nan_to_num(x).ravel() for x in q])
    adv = np.concatenate([a.ravel() for a in advs])
    act = adv != 0
    expected = {
        "importance_sampling": -adv[act].mean(),
        "ppo": -adv[act].mean(),
        "cispo": -(lp * adv)[act].mean(),
        "dro": -(lp * adv)[act].mean(),
        "dppo": -adv[act].mean(),
    }
    for loss_fn, value in expected.items():
        out = trainer.forward(request(data, loss_fn=loss_fn))
        assert out.loss == pytest.approx(value, rel=1e-4, abs=1e-5), loss_fn

    # On-policy, the importance-sampling gradient is the CE gradient with weights = A.
    trainer.forward_backward(request(data, loss_fn="importance_sampling"))
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    is_adapter = adapter(trainer)
    trainer.init(8)
    ce = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_numpy(a.astype(np.float32)),
            },
        )
        for d, a in zip(base, advs, strict=True)
    ]
    trainer.forward_backward(request(ce))
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    assert_close_dicts(adapter(trainer), is_adapter, atol=1e-6)


def test_rl_losses_clip_and_default_targets(trainer: TorchTrainer) -> None:
    trainer.init(8)
    (datum,) = sft_data(1)
    tokens = datum.model_input.to_ints()
    n = len(tokens)
    # No target_tokens: the next input token; the last position has none.
    q = np.full(n, -1.0, dtype=np.float32)
    q[-1] = np.nan
    adv = np.ones(n, dtype=np.float32)
    rl = Datum(model_input=datum.model_input, loss_fn_inputs={"logprobs": q, "advantages": adv})
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro", "dppo"):
        out = trainer.forward_backward(request([rl], loss_fn=loss_fn))
        lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
        assert lp.shape == (n,)
        assert np.isnan(lp[-1])
        assert np.isfinite(lp[:-1]).all()
        assert math.isfinite(out.loss)
    # r = exp(lp - q) is far below 0.8 (lp is about -7): with A > 0, PPO's minimum is the
    # unclipped term (nothing clipped), while CISPO clips every ratio to 0.8.
    out = trainer.forward(request([rl], loss_fn="ppo"))
    assert out.metrics["clip_fraction"] == 0.0
    out = trainer.forward(request([rl], loss_fn="cispo"))
    assert out.metrics["clip_fraction"] == 1.0
    trainer.optim_step(AdamParams(learning_rate=1e-3))


def test_dpo(trainer: TorchTrainer) -> None:
    trainer.init(8)
    base = sft_data(4)
    ref = logprobs_of(trainer.forward(request(base)))
    data = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "ref_logprobs": TensorData.from_numpy(r),  # NaN where masked: allowed
            },
        )
        for d, r in zip(base, ref, strict=True)
    ]
    out = trainer.forward_backward(request(data, loss_fn="dpo"))
    assert out.loss == pytest.approx(math.log(2), rel=1e-5)
    assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    trainer.optim_step(AdamParams(learning_rate=3e-3))
    for _ in range(5):
        out = trainer.forward_backward(request(data, loss_fn="dpo", loss_fn_config={"beta": 0.5}))
        trainer.optim_step(AdamParams(learning_rate=3e-3))
    assert out.loss < math.log(2)
    assert out.metrics["reward_accuracy"] == 1.0


def test_multi_target_cross_entropy_and_top_k(trainer: TorchTrainer) -> None:
    trainer.init(8)
    tokens = [1, 3, 30, 31, 32, 2]
    n = len(tokens)
    targets = np.array([[t, 40] for t in tokens[1:]] + [[-100, -100]], dtype=np.int64)
    weights = np.ones((n, 2), dtype=np.float32)
    weights[:, 1] = 0.5
    datum = Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    out = trainer.forward(request([datum], top_k_logprobs=5))
    rec = out.loss_fn_outputs[0]
    lp = rec["logprobs"].to_numpy()
    assert lp.shape == (n, 2)
    assert np.isnan(lp[-1]).all()
    valid = targets != -100
    assert out.loss == pytest.approx(-(weights * np.nan_to_num(lp)).sum() / valid.sum(), rel=1e-5)
    top = rec["top_k_logprobs"].to_numpy()
    top_ids = rec["top_k_token_ids"].to_numpy()
    assert top.shape == top_ids.shape == (n, 5)
    assert (np.diff(top, axis=1) <= 0).all()
    assert (top[:-1, 0] >= lp[:-1, 0] - 1e-6).all()
    assert rec["top_k_token_ids"].dtype == "int64"


# --------------------------------------------------------------------------- validation


def _ce(tokens: list[int], targets: TensorData, **more: Any) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, **more},
    )


def _td(data: list[Any], dtype: str = "int64", shape: list[int] | None = None) -> TensorData:
    return TensorData(data=data, dtype=dtype, shape=shape)


GOOD = _ce([1, 2, 3, 4], _td([2, 3, 4, -100]))
RL_INPUTS = {"logprobs": _td([0.0] * 4, "float32"), "advantages": _td([1.0] * 4, "float32")}

BAD_REQUESTS: list[tuple[str, Callable[[], ForwardBackwardRequest], str]] = [
    ("empty data", lambda: request([]), r"^data: empty"),
    (
        "empty model_input",
        lambda: request([GOOD, Datum(model_input=ModelInput.empty(), loss_fn_inputs={})]),
        r"^data\[1\]\.model_input: empty",
    ),
    (
        "empty tokens",
        lambda: request(
            [Datum(model_input=ModelInput(chunks=[EncodedTextChunk(tokens=[])]), loss_fn_inputs={})]
        ),
        r"^data\[0\]\.model_input: empty",
    ),
    (
        "token id too large",
        lambda: request([_ce([1, 2, 1024, 3], _td([2, 3, 4, 5]))]),
        r"^data\[0\]\.model_input\.chunks\[0\]\.tokens: token id 1024 is outside",
    ),
    (
        "negative token id",
        lambda: request([_ce([1, -5], _td([2, 3]))]),
        r"token id -5 is outside",
    ),
    (
        "too long",
        lambda: request([_ce([1] * 1025, _td([1] * 1025))]),
        r"^data\[0\]\.model_input: 1025 tokens exceed the context length 1024",
    ),
    (
        "image chunk",
        lambda: request(
            [
                Datum(
                    model_input=ModelInput(
                        chunks=[
                            EncodedTextChunk(tokens=[1]),
                            ImageChunk(data=b"x", format="png", expected_tokens=2),
                        ]
                    ),
                    loss_fn_inputs={"target_tokens": _td([1, 1, 1])},
                )
            ]
        ),
        r"^data\[0\]\.model_input\.chunks\[1\]: image chunks are not supported",
    ),
    (
        "unknown loss_fn",
        lambda: request([GOOD], loss_fn="mse"),
        r"^loss_fn: unknown loss function 'mse'; known: cross_entropy, importance_sampling",
    ),
    (
        "unknown config key",
        lambda: request([GOOD], loss_fn_config={"beta": 0.1}),
        r"^loss_fn_config: unknown key 'beta' for loss_fn 'cross_entropy'; known keys: "
        r"skip_token_normalization",
    ),
    (
        "bad config value",
        lambda: request([GOOD], loss_fn_config={"skip_token_normalization": "yes"}),
        r"^loss_fn_config\['skip_token_normalization'\]: expected true or false",
    ),
    (
        "clip order",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), **RL_INPUTS)],
            loss_fn="ppo",
            loss_fn_config={"clip_low_threshold": 1.5},
        ),
        r"clip_low_threshold \(1\.5\) must not exceed",
    ),
    (
        "missing target_tokens",
        lambda: request([Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={})]),
        r"^data\[0\]\.loss_fn_inputs: missing 'target_tokens', required by loss_fn "
        r"'cross_entropy'",
    ),
    (
        "missing advantages",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), logprobs=_td([0.0] * 4, "float32"))],
            loss_fn="ppo",
        ),
        r"^data\[0\]\.loss_fn_inputs: missing 'advantages'",
    ),
    (
        "unknown input",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), weight=_td([1.0] * 4, "float32"))]
        ),
        r"^data\[0\]\.loss_fn_inputs\['weight'\]: not an input of loss_fn 'cross_entropy'",
    ),
    (
        "unknown dtype",
        lambda: request([_ce([1, 2, 3, 4], _td([2, 3, 4, -100], "uint8"))]),
        r"^data\[0\]\.loss_fn_inputs\['target_tokens'\]: unknown dtype 'uint8'",
    ),
    (
        "float target dtype",
        lambda: request([_ce([1, 2, 3, 4], _td([2.0, 3.0, 4.0, -100.0], "float32"))]),
        r"'target_tokens'\]: dtype 'float32' is not an integer dtype",
    ),
    (
        "fractional target",
        lambda: request([_ce([1, 2, 3, 4], _td([2, 3.5, 4, -100]))]),
        r"'target_tokens'\]: data must be integers",
    ),
    (
        "size mismatch",
        lambda: request([GOOD, GOOD, GOOD, _ce([1, 2, 3, 4], _td([2, 3, 4, -100], shape=[5]))]),
        r"^data\[3\]\.loss_fn_inputs\['target_tokens'\]: shape \[5\] has 5 elements but data "
        r"has 4$",
    ),
    (
        "first dim mismatch",
        lambda: request([_ce([1, 2, 3, 4], _td([2, 3, 4]))]),
        r"^data\[0\]\.loss_fn_inputs\['target_tokens'\]: first dimension 3 does not match "
        r"model_input\.length 4",
    ),
    (
        "weights first dim mismatch",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), weights=_td([1.0] * 3, "float32"))]
        ),
        r"^data\[0\]\.loss_fn_inputs\['weights'\]: first dimension 3 does not match",
    ),
    (
        "weights shape mismatch",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), weights=_td([1.0] * 8, "float32", [4, 2]))]
        ),
        r"'weights'\]: shape \[4, 2\] does not match target_tokens shape \[4\]",
    ),
    (
        "3-d targets",
        lambda: request([_ce([1, 2], _td([1] * 8, shape=[2, 2, 2]))]),
        r"'target_tokens'\]: shape \[2, 2, 2\] is not \(N,\) or \(N, K\)",
    ),
    (
        "2-d targets for rl",
        lambda: request(
            [_ce([1, 2], _td([1] * 4, shape=[2, 2]), **RL_INPUTS)], loss_fn="importance_sampling"
        ),
        r"'target_tokens'\]: shape \[2, 2\] is not \(N,\)",
    ),
    (
        "target outside vocab",
        lambda: request([_ce([1, 2, 3, 4], _td([2, 3, 4, 5000]))]),
        r"^data\[0\]\.loss_fn_inputs\['target_tokens'\]: token id 5000 is outside the vocabulary",
    ),
    (
        "negative target",
        lambda: request([_ce([1, 2, 3, 4], _td([2, 3, 4, -1]))]),
        r"token id -1 is outside",
    ),
    (
        "nan weight",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), weights=_td([1.0, None, 1.0, 1.0], "float32"))]
        ),
        r"'weights'\]: non-finite value .* at position 1",
    ),
    (
        "nan logprob at active position",
        lambda: request(
            [
                _ce(
                    [1, 2, 3, 4],
                    _td([2, 3, 4, -100]),
                    logprobs=_td([0.0, None, 0.0, 0.0], "float32"),
                    advantages=_td([1.0] * 4, "float32"),
                )
            ],
            loss_fn="ppo",
        ),
        r"'logprobs'\]: non-finite value .* at position 1, which is active",
    ),
    ("top_k too large", lambda: request([GOOD], top_k_logprobs=21), r"^top_k_logprobs: .*0\.\.20"),
    ("top_k negative", lambda: request([GOOD], top_k_logprobs=-1), r"^top_k_logprobs"),
    (
        "odd dpo",
        lambda: request(
            [_ce([1, 2, 3, 4], _td([2, 3, 4, -100]), ref_logprobs=_td([0.0] * 4, "float32"))] * 3,
            loss_fn="dpo",
        ),
        r"^data: loss_fn 'dpo' takes \(chosen, rejected\) pairs .* got 3",
    ),
]


@pytest.mark.parametrize(
    ("make", "pattern"),
    [pytest.param(make, pattern, id=name) for name, make, pattern in BAD_REQUESTS],
)
def test_validation_errors(make: Callable[[], ForwardBackwardRequest], pattern: str) -> None:
    with pytest.raises(InvalidRequest, match=pattern):
        validate_forward_request(make(), SPEC)


def test_validation_accepts_good_requests() -> None:
    validate_forward_request(request([GOOD]), SPEC)
    rl = Datum(
        model_input=ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "logprobs": _td([None, -1.0, -1.0, None], "float32"),  # null where inactive
            "advantages": _td([0.0, 1.0, 1.0, 1.0], "float32"),  # last: no default target
        },
    )
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro", "dppo"):
        validate_forward_request(request([rl], loss_fn=loss_fn), SPEC)
    assert set(LOSS_SPECS) == {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "dpo",
        "dppo",
    }


def test_trainer_rejects_invalid_input(trainer: TorchTrainer) -> None:
    trainer.init(8)
    bad = request([_ce([1, 2, 3, 4], _td([2, 3, 4, 5000]))])
    with pytest.raises(InvalidRequest):
        trainer.validate_forward(bad)
    with pytest.raises(InvalidRequest):
        trainer.forward_backward(bad)
    with pytest.raises(InvalidRequest, match="lora_rank"):
        trainer.init(0)
    with pytest.raises(InvalidRequest, match="learning_rate"):
        trainer.optim_step(AdamParams(learning_rate=-1.0))
