"""Supervised fine-tuning from plain synchronous code (the documented example, in a loop).

    python examples/sft_sync.py [--steps 20] [--server URL]

Starts an embedded local server unless ``--server`` (or ``$LOOPS_BASE_URL``) names one.
"""

from __future__ import annotations

import argparse

from loops_async import AdamParams, Datum, ModelInput, ServiceClient, TensorData
from loops_async.server import embedded

MODEL = "loops-local/tiny-chat"
CONVERSATIONS = [
    ("What is the capital of France?", "Paris"),
    ("Reverse the word cat.", "tac"),
    ("What is 12+7?", "19"),
    ("Say hello.", "hello"),
]


def chat_datum(tokenizer, question: str, answer: str) -> Datum:  # type: ignore[no-untyped-def]
    """Train on the answer only: position i predicts token i+1, weights mask the prompt."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    tokens = [*prompt, *tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(tokens) - len(prompt))
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--server", default=None)
    args = parser.parse_args(argv)

    with embedded(args.server) as url, ServiceClient(base_url=url) as service:
        training = service.create_lora_training_client(base_model=MODEL, rank=16)
        tokenizer = training.get_tokenizer()
        data = [chat_datum(tokenizer, q, a) for q, a in CONVERSATIONS]

        losses = []
        for step in range(args.steps):
            fb = training.forward_backward(data=data)  # submitted now
            training.optim_step(AdamParams(learning_rate=3e-3))  # queued right behind it
            losses.append(fb.result(timeout=600.0).loss)
            print(f"step {step + 1:3d}  loss {losses[-1]:.4f}")

        saved = training.save_state(name="sft-final").result(timeout=600.0)
        print(f"saved {saved.path}")
        return losses


if __name__ == "__main__":
    main()
