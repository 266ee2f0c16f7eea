"""Small, fixed training data built with the built-in model's tokenizer."""

from __future__ import annotations

from functools import cache

import numpy as np

from loops_async import Datum, ModelInput, TensorData
from loops_async.tokenizer import load_tokenizer

MODEL = "loops-local/tiny-chat"

EXAMPLES = [
    ("What is 12+7?", "19"),
    ("Reverse the word cat.", "tac"),
    ("What is 30+45?", "75"),
    ("Say hello.", "hello"),
    ("What is 8+5?", "13"),
    ("Reverse the word dog.", "god"),
    ("What is 21+21?", "42"),
    ("Name a color.", "blue"),
]


def chat_tokens(prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of a one-turn chat and the number of prompt tokens."""
    tok = load_tokenizer(MODEL)
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    answer_ids = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
    return [*prompt_ids, *answer_ids], len(prompt_ids)


def sft_datum(prompt: str, answer: str) -> Datum:
    """A cross-entropy datum that trains on the answer tokens only."""
    tokens, n_prompt = chat_tokens(prompt, answer)
    inputs, targets = tokens[:-1], tokens[1:]
    weights = np.zeros(len(targets), dtype=np.float32)
    weights[n_prompt - 1 :] = 1.0
    return Datum(
        model_input=ModelInput.from_ints(inputs),
        loss_fn_inputs={
            "target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": TensorData.from_numpy(weights),
        },
    )


@cache
def sft_batch(n: int = 4) -> tuple[Datum, ...]:
    """The first ``n`` examples as SFT datums."""
    return tuple(sft_datum(p, a) for p, a in EXAMPLES[:n])


def snippet_datum() -> Datum:
    """The datum of the documented example: next-token targets over the whole sequence."""
    tokens, _ = chat_tokens(*EXAMPLES[0])
    inputs, targets = tokens[:-1], tokens[1:]
    return Datum(
        model_input=ModelInput.from_ints(inputs),
        loss_fn_inputs={
            "target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])
        },
    )
