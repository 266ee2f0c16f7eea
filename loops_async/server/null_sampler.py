"""The ``null`` sampling engine: instant, right-shaped answers without a model (the sampling
counterpart of :mod:`~loops_async.server.null_backend`, for benchmarks and fast tests)."""

from __future__ import annotations

from collections.abc import Sequence

from .._wire import ChoiceLogprobs, PromptLogprob, SampleChoice
from .models import ModelSpec
from .sampler_engine import AdapterRef, GenerationRequest, token_label

__all__ = ["NullSamplerEngine"]


class NullSamplerEngine:
    """Instant, right-shaped answers without a model (the ``null`` backend, for benchmarks).

    Every completion is ``max_tokens`` copies of :attr:`token_id` with logprob 0.0 and
    ``finish_reason`` ``"length"`` (``"stop"`` after one token when that id is in
    ``stop_token_ids``); ``text`` is empty and ``logprobs.tokens`` are always
    ``"token_id:<n>"`` (there is no tokenizer); prompt logprobs are 0.0 with rank 1.
    """

    blocking = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.token_id = min(10, spec.vocab_size - 1)
        """The id every completion repeats."""

    def generate(
        self, adapter: AdapterRef | None, requests: Sequence[GenerationRequest]
    ) -> list[list[SampleChoice]]:
        """Synthetic choices for every request."""
        out: list[list[SampleChoice]] = []
        tok = self.token_id
        for req in requests:
            stops = tok in req.stop_token_ids
            count = 1 if stops else req.max_tokens
            label = token_label(tok, "", as_id=True)  # no tokenizer: ids even when not asked
            prompt_lps: list[dict[str, PromptLogprob] | None] | None = None
            if req.prompt_logprobs is not None:
                prompt_lps = [None] + [
                    {str(t): PromptLogprob(logprob=0.0, rank=1, decoded_token="")}
                    for t in req.prompt[1:]
                ]
            choices = []
            for _ in range(req.n):
                top = [{label: 0.0}] * count if req.logprobs else None
                choices.append(
                    SampleChoice(
                        logprobs=ChoiceLogprobs(
                            tokens=[label] * count,
                            token_logprobs=[0.0] * count,
                            top_logprobs=top,
                        ),
                        text="",
                        finish_reason="stop" if stops else "length",
                        stop_reason=tok if stops else None,
                        token_ids=[tok] * count,
                        prompt_token_ids=list(req.prompt) if req.return_token_ids else None,
                        prompt_logprobs=prompt_lps,
                    )
                )
            out.append(choices)
        return out
