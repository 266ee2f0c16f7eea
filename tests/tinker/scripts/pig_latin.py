"""The shape of tinker's quickstart (supervised "Pig Latin" fine-tuning, then sampling),
written against the tinker API; only the base model differs. Run by
``tests/tinker/test_scripts.py`` through ``python -m loops_async.tinker``."""

import numpy as np
import tinker
from tinker import types

service_client = tinker.ServiceClient()
base_model = "loops-local/tiny-chat"  # tinker: a Qwen or Llama model
training_client = service_client.create_lora_training_client(base_model=base_model)
tokenizer = training_client.get_tokenizer()
examples = [
    {"input": "banana split", "output": "anana-bay plit-say"},
    {"input": "quantum physics", "output": "uantum-qay ysics-phay"},
    {"input": "donut shop", "output": "onut-day op-shay"},
]


def process_example(example: dict[str, str], tokenizer: object) -> types.Datum:
    prompt = f"English: {example['input']}\nPig Latin:"
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=True)  # type: ignore[attr-defined]
    prompt_weights = [0] * len(prompt_tokens)
    completion = f" {example['output']}\n\n"
    completion_tokens = tokenizer.encode(completion, add_special_tokens=False)  # type: ignore[attr-defined]
    completion_weights = [1] * len(completion_tokens)
    tokens = prompt_tokens + completion_tokens
    weights = prompt_weights + completion_weights
    input_tokens = tokens[:-1]
    target_tokens = tokens[1:]
    weights = weights[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens=input_tokens),
        loss_fn_inputs=dict(weights=weights, target_tokens=target_tokens),
    )


processed_examples = [process_example(ex, tokenizer) for ex in examples]
for _ in range(6):
    fwdbwd_future = training_client.forward_backward(processed_examples, "cross_entropy")
    optim_future = training_client.optim_step(types.AdamParams(learning_rate=1e-4))
    fwdbwd_result = fwdbwd_future.result()
    optim_result = optim_future.result()
    logprobs = np.concatenate([o["logprobs"].tolist() for o in fwdbwd_result.loss_fn_outputs])
    weights = np.concatenate([e.loss_fn_inputs["weights"].tolist() for e in processed_examples])
    print(f"Loss per token: {-np.dot(logprobs, weights) / weights.sum():.4f}")

sampling_client = training_client.save_weights_and_get_sampling_client(name="pig-latin-model")
prompt = types.ModelInput.from_ints(tokenizer.encode("English: coffee break\nPig Latin:"))
params = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["\n"])
future = sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=8)
result = future.result()
print("Responses:")
for i, seq in enumerate(result.sequences):
    print(f"{i}: {tokenizer.decode(seq.tokens)!r}")
