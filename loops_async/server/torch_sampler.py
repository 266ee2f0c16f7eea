"""The torch sampling engine: batched generation with a KV cache on a ``transformers`` causal LM
plus the hand-written LoRA of :mod:`~loops_async.server.lora`.

How a batch runs (:meth:`TorchSamplerEngine.generate`, called on a worker thread, one batch at a
time):

1. The adapter is put in place: the LoRA matrices of the served checkpoint are copied into the
   model's :class:`~loops_async.server.lora.LoRALinear` layers (read from the checkpoint
   directory once, then kept in an LRU of
   :data:`~loops_async.server.sampler_engine.ADAPTER_CACHE_SIZE` state dicts); the base model is
   served with every ``lora_B`` zeroed, which is exactly the base model. Nothing is copied when
   the batch uses the adapter already in place.
2. The batch's sequences (``n`` per request) are split into chunks that fit the KV-cache budget.
   For each chunk the distinct prompts are left-padded and prefilled once (attention mask,
   position ids counted from each prompt's first real token), and the cache rows are repeated
   for the ``n`` completions of each prompt (``Cache.batch_select_indices``).
3. Decoding feeds one token per live sequence per step through the cache. A finished sequence is
   dropped from the cache at once, so the step cost follows the live sequences.

Sampling per sequence: temperature 0 (or below 1e-5) is argmax; otherwise the logits are divided
by the temperature, sorted (stable), cut to ``top_k`` and to the ``top_p`` nucleus, and one
uniform number drawn from the sequence's own ``torch.Generator`` picks the token by inverse CDF.
Each sequence's generator is seeded from the request's ``seed`` and the completion index, so a
seeded completion depends only on the seed, the prompt and the weights (not on batching or other
requests). The logprob reported for a sampled token is the log-softmax of the **untempered**
float32 logits — the same number the trainer's ``forward`` computes for that token.

Stopping (vLLM's rules): the model's EOS ids or a ``stop_token_ids`` id end with ``"stop"`` (the
token is kept in ``token_ids``; its text is not in ``text``); a ``stop`` string ends with
``"stop"`` once the decoded completion contains it (``text`` is cut before it; the tokens run up
to the one that completed it); ``max_tokens`` ends with ``"length"``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._wire import ChoiceLogprobs, PromptLogprob, SampleChoice
from .backend import InvalidRequest
from .lora import (
    AdapterFormatError,
    apply_lora,
    load_adapter_state_dict,
    lora_modules,
    read_adapter,
)
from .models import ModelSpec
from .sampler_engine import (
    ADAPTER_CACHE_SIZE,
    MAX_BATCH_ROWS,
    AdapterRef,
    GenerationRequest,
    token_label,
)
from .torch_models import build_model

__all__ = ["KV_CACHE_BUDGET_BYTES", "TorchSamplerEngine"]

logger = logging.getLogger("loops_async.server")

KV_CACHE_BUDGET_BYTES = 512 * 1024 * 1024
"""Bytes of KV cache one chunk of a batch may use (sequences x positions x bytes per position)."""

SMALL_MODEL_PARAMETERS = 50_000_000
"""Models below this many parameters generate on one intra-op thread (see :func:`_one_thread`)."""

_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (process-wide; nested and concurrent
    blocks share one save/restore of the previous setting).

    The matrices of a small model are too small for a second thread to help, and OpenMP's
    spin-waiting helper threads collapse (milliseconds per op) as soon as the event loop or
    another process keeps the cores busy; one thread is 10-50x faster then.
    """
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


@dataclass(eq=False)
class _Sequence:
    """One completion being generated."""

    req: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None
    """Set when a stop string cut the text."""


class TorchSamplerEngine:
    """Generation for one base model (implements
    :class:`~loops_async.server.sampler_engine.SamplerEngine`).

    Args:
        spec: the base model (built-in, or a local Hugging Face directory).
        kv_budget_bytes: KV-cache bytes a chunk of a batch may use.
        adapter_cache_size: adapters kept loaded (LRU).
    """

    blocking = True

    def __init__(
        self,
        spec: ModelSpec,
        *,
        kv_budget_bytes: int = KV_CACHE_BUDGET_BYTES,
        adapter_cache_size: int = ADAPTER_CACHE_SIZE,
    ) -> None:
        self.spec = spec
        model: Any = build_model(spec)
        apply_lora(model, 1, seed=0)  # B = 0: exactly the base model until an adapter loads
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        config = model.config
        text_config = getattr(config, "text_config", None) or config
        pad = getattr(text_config, "pad_token_id", None)
        self._pad = pad if isinstance(pad, int) and 0 <= pad < spec.vocab_size else 0
        self._tokenizer = self._load_tokenizer()
        self.eos_token_ids = self._eos_ids(text_config)
        """Token ids that end a completion with ``"stop"`` (the model's EOS)."""
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        per_position = self._kv_bytes_per_position(text_config)
        self.max_chunk_positions = max(4096, kv_budget_bytes // per_position)
        """Sequences x positions one chunk may hold."""
        self._adapter_cache_size = max(1, adapter_cache_size)
        self._adapters: OrderedDict[str, tuple[int, float, dict[str, torch.Tensor]]] = OrderedDict()
        self._current: str | None = None
        self._pieces: dict[int, str] = {}
        self._vocab_tokens = spec.vocab_size if self._tokenizer is None else len(self._tokenizer)
        self.adapter_loads = 0
        """How many times an adapter was read from disk (for tests and diagnostics)."""
        parameters = sum(p.numel() for p in model.parameters())
        self.single_thread = parameters < SMALL_MODEL_PARAMETERS
        """Whether batches run on one intra-op thread (small models)."""

    def __repr__(self) -> str:
        return f"TorchSamplerEngine({self.spec.name!r}, adapter={self._current!r})"

    # ------------------------------------------------------------------ setup helpers

    def _load_tokenizer(self) -> Any:
        from ..tokenizer import load_tokenizer

        try:
            return load_tokenizer(self.spec.name)
        except (ValueError, OSError) as exc:
            logger.warning(
                "sampler for %s: no tokenizer (%s); completions have no text and stop strings "
                "are refused",
                self.spec.name,
                exc,
            )
            return None

    def _eos_ids(self, text_config: Any) -> frozenset[int]:
        ids: set[int] = set()
        sources = [
            getattr(text_config, "eos_token_id", None),
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
            None if self._tokenizer is None else self._tokenizer.eos_token_id,
        ]
        for value in sources:
            values = value if isinstance(value, list | tuple) else [value]
            ids.update(v for v in values if isinstance(v, int) and 0 <= v < self.spec.vocab_size)
        return frozenset(ids)

    @staticmethod
    def _kv_bytes_per_position(config: Any) -> int:
        layers = int(getattr(config, "num_hidden_layers", 1) or 1)
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        hidden = int(getattr(config, "hidden_size", 1) or 1)
        head_dim = int(getattr(config, "head_dim", None) or max(1, hidden // heads))
        return max(1, layers * 2 * kv_heads * head_dim * 4)

    # ------------------------------------------------------------------ text

    def piece(self, token_id: int) -> str:
        """The text of one token (special tokens included), cached."""
        text = self._pieces.get(token_id)
        if text is None:
            text = ""
            if self._tokenizer is not None and token_id < self._vocab_tokens:
                text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
            self._pieces[token_id] = text
        return text

    def _label(self, token_id: int, as_id: bool) -> str:
        return token_label(token_id, "" if as_id else self.piece(token_id), as_id)

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of a completion (special tokens skipped, as vLLM does)."""
        if self._tokenizer is None:
            return ""
        known = [t for t in tokens if t < self._vocab_tokens]
        return str(self._tokenizer.decode(known, skip_special_tokens=True))

    # ------------------------------------------------------------------ adapters

    def _use_adapter(self, adapter: AdapterRef | None) -> None:
        key = None if adapter is None else adapter.key
        if key == self._current:
            return
        if adapter is None:
            for module in lora_modules(self.model).values():
                module.lora_B.zero_()
            self._current = None
            return
        entry = self._adapters.get(adapter.key)
        if entry is None:
            try:
                config, state = read_adapter(adapter.directory)
            except (AdapterFormatError, OSError) as exc:
                raise InvalidRequest(
                    f"{adapter.field}: cannot load the adapter of {adapter.uri}: {exc}"
                ) from None
            rank = int(config["r"])
            entry = (rank, float(config.get("lora_alpha", rank)), state)
            self.adapter_loads += 1
            self._adapters[adapter.key] = entry
            while len(self._adapters) > self._adapter_cache_size:
                self._adapters.popitem(last=False)
        else:
            self._adapters.move_to_end(adapter.key)
        rank, alpha, state = entry
        try:
            load_adapter_state_dict(self.model, state, rank=rank, alpha=alpha)
        except AdapterFormatError as exc:
            self._adapters.pop(adapter.key, None)
            raise InvalidRequest(
                f"{adapter.field}: the adapter of {adapter.uri} does not fit the base model "
                f"{self.spec.name!r}: {exc}"
            ) from None
        self._current = adapter.key

    # ------------------------------------------------------------------ generation

    def generate(
        self, adapter: AdapterRef | None, requests: Sequence[GenerationRequest]
    ) -> list[list[SampleChoice]]:
        """Run one batch (every request under ``adapter``; None = the base model) and return
        each request's ``n`` choices."""
        if self._tokenizer is None:
            for req in requests:
                if req.stop:
                    raise InvalidRequest(
                        "stop: this model has no tokenizer, so stop strings cannot be matched; "
                        "use stop_token_ids"
                    )
        threads = _one_thread() if self.single_thread else contextlib.nullcontext()
        with threads, torch.no_grad():
            self._use_adapter(adapter)
            sequences: list[list[_Sequence]] = []
            for req in requests:
                base = secrets.randbits(64) if req.seed is None else req.seed
                sequences.append(
                    [
                        _Sequence(
                            req=req,
                            generator=None
                            if req.greedy
                            else torch.Generator().manual_seed(req.choice_seed(i, base)),
                        )
                        for i in range(req.n)
                    ]
                )
            prompt_logprobs = [
                None if req.prompt_logprobs is None else self._prompt_logprobs(req)
                for req in requests
            ]
            flat = [seq for group in sequences for seq in group]
            for chunk in self._chunks(flat):
                self._generate_chunk(chunk)
        return [
            [self._choice(seq, plp) for seq in group]
            for group, plp in zip(sequences, prompt_logprobs, strict=True)
        ]

    def _chunks(self, flat: list[_Sequence]) -> list[list[_Sequence]]:
        """Consecutive sequences in chunks of at most ``MAX_BATCH_ROWS`` whose cache
        (sequences x (longest prompt + most new tokens)) fits ``max_chunk_positions``."""
        chunks: list[list[_Sequence]] = []
        current: list[_Sequence] = []
        prompt_width = new_width = 0
        for seq in flat:
            p = max(prompt_width, len(seq.req.prompt))
            t = max(new_width, seq.req.max_tokens)
            if current and (
                len(current) >= MAX_BATCH_ROWS
                or (len(current) + 1) * (p + t) > self.max_chunk_positions
            ):
                chunks.append(current)
                current = []
                p, t = len(seq.req.prompt), seq.req.max_tokens
            current.append(seq)
            prompt_width, new_width = p, t
        if current:
            chunks.append(current)
        return chunks

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """One cached forward step; returns the float32 logits of the last position and the
        cache."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        out = self.model(**kwargs)
        new_cache = out.get("cache")
        if new_cache is None:
            new_cache = out.get("past_key_values")
        return out.logits[:, -1, :].float(), new_cache

    def _generate_chunk(self, chunk: list[_Sequence]) -> None:
        # Prefill each distinct prompt once, left-padded.
        slot: dict[int, int] = {}
        prompts: list[tuple[int, ...]] = []
        for seq in chunk:
            if id(seq.req) not in slot:
                slot[id(seq.req)] = len(prompts)
                prompts.append(seq.req.prompt)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None)
        select = [slot[id(seq.req)] for seq in chunk]
        last = positions[:, -1]
        if select != list(range(len(prompts))):
            index = torch.tensor(select, dtype=torch.long)
            cache.batch_select_indices(index)
            logits, mask, last = logits[index], mask[index], last[index]
        live = list(chunk)
        while True:
            chosen = self._choose(logits, live)
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
            tokens = chosen.tolist()
            keep: list[int] = []
            for j, seq in enumerate(live):
                top = self._top(logprobs[j], tokens[j], chosen_lp[j], seq.req)
                if not self._push(seq, tokens[j], chosen_lp[j], top):
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask, last, chosen = mask[index], last[index], chosen[index]
                live = [live[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype)], dim=1)
            last = last + 1
            logits, cache = self._forward(chosen[:, None], mask, last[:, None], cache)

    def _choose(self, logits: torch.Tensor, live: list[_Sequence]) -> torch.Tensor:
        """The next token of every live sequence (see the module docstring)."""
        chosen = torch.argmax(logits, dim=-1)
        sampled = [j for j, seq in enumerate(live) if not seq.req.greedy]
        if not sampled:
            return chosen
        vocab = logits.shape[-1]
        index = torch.tensor(sampled, dtype=torch.long)
        reqs = [live[j].req for j in sampled]
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32)
        scaled = logits[index] / temps[:, None]
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        top_k = torch.tensor([r.top_k or vocab for r in reqs], dtype=torch.long)
        ranks = torch.arange(vocab)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], -math.inf)
        probs = torch.softmax(sorted_logits, dim=-1)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32)
        before = probs.cumsum(dim=-1) - probs  # mass of the likelier tokens
        probs = probs.masked_fill(before > top_p[:, None], 0.0)
        cdf = probs.cumsum(dim=-1)
        kept = (probs > 0).sum(dim=-1)
        draws = []
        for j in sampled:
            generator = live[j].generator
            assert generator is not None
            draws.append(float(torch.rand((), generator=generator)))
        u = torch.tensor(draws, dtype=torch.float32) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
        pick = torch.minimum(pick, kept - 1)
        chosen[index] = order.gather(1, pick[:, None]).squeeze(1)
        return chosen

    def _top(
        self, logprobs: torch.Tensor, token: int, logprob: float, req: GenerationRequest
    ) -> dict[str, float] | None:
        if not req.logprobs:
            return None
        values, ids = torch.topk(logprobs, req.logprobs)
        top = {self._label(token, req.tokens_as_ids): logprob}
        for tid, value in zip(ids.tolist(), values.tolist(), strict=True):
            top.setdefault(self._label(tid, req.tokens_as_ids), value)
        return top

    def _push(
        self, seq: _Sequence, token: int, logprob: float, top: dict[str, float] | None
    ) -> bool:
        """Append a token; return whether the sequence is finished."""
        req = seq.req
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if top is not None:
            seq.top.append(top)
        if token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in req.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif req.stop:
            text = self.decode(seq.tokens)
            hits = [(pos, s) for s in req.stop if (pos := text.find(s)) >= 0]
            if hits:
                pos, stop = min(hits, key=lambda hit: hit[0])
                seq.finish_reason, seq.stop_reason, seq.text = "stop", stop, text[:pos]
        if seq.finish_reason is None and len(seq.tokens) >= req.max_tokens:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _prompt_logprobs(self, req: GenerationRequest) -> list[dict[str, PromptLogprob] | None]:
        """Per prompt position the actual token's logprob and rank plus the top
        ``prompt_logprobs`` candidates (position 0: None). A plain forward of the prompt, as the
        trainer computes it."""
        ids = torch.tensor([req.prompt], dtype=torch.long)
        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(req.prompt[1:], dtype=torch.long)
        actual = logprobs.gather(1, targets[:, None]).squeeze(1)
        ranks = ((logprobs > actual[:, None]).sum(dim=-1) + 1).tolist()
        k = req.prompt_logprobs or 0
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if k:
            values, top = torch.topk(logprobs, k, dim=-1)
            top_values, top_ids = values.tolist(), top.tolist()
        out: list[dict[str, PromptLogprob] | None] = [None]
        for i, (tok, value) in enumerate(zip(req.prompt[1:], actual.tolist(), strict=True)):
            entry = {
                str(tok): PromptLogprob(logprob=value, rank=ranks[i], decoded_token=self.piece(tok))
            }
            for r in range(k):
                tid = top_ids[i][r]
                if str(tid) not in entry:
                    entry[str(tid)] = PromptLogprob(
                        logprob=top_values[i][r], rank=r + 1, decoded_token=self.piece(tid)
                    )
            out.append(entry)
        return out

    def _choice(
        self, seq: _Sequence, prompt_logprobs: list[dict[str, PromptLogprob] | None] | None
    ) -> SampleChoice:
        req = seq.req
        if seq.text is not None:
            text = seq.text
        elif seq.finish_reason == "stop":
            text = self.decode(seq.tokens[:-1])
        else:
            text = self.decode(seq.tokens)
        labels: list[str | int] = [self._label(t, req.tokens_as_ids) for t in seq.tokens]
        token_logprobs: list[float | None] = list(seq.logprobs)
        return SampleChoice(
            logprobs=ChoiceLogprobs(
                tokens=labels,
                token_logprobs=token_logprobs,
                top_logprobs=seq.top if req.logprobs else None,
            ),
            text=text,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            token_ids=seq.tokens,
            prompt_token_ids=list(req.prompt) if req.return_token_ids else None,
            prompt_logprobs=prompt_logprobs,
        )
