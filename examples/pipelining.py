"""Keep a busy trainer fed: queue ``forward_backward`` + ``optim_step`` before awaiting.

    python examples/pipelining.py [--steps 10] [--env-ms 50] [--server URL]

Each call returns as soon as the server accepted it, and the trainer runs operations in the
order they were called. An RL actor that awaits every result leaves the trainer idle while it
collects its next batch (``--env-ms`` of environment time per step here); a pipelined actor
collects the next batch while the trainer computes the last one. This times both on the same
steps and checks they train identically.
"""

from __future__ import annotations

import argparse
import time

import anyio
import numpy as np

from loops_async import AdamParams, Datum, ModelInput, ServiceClient, TensorData
from loops_async.server import embedded

MODEL = "loops-local/tiny-chat"
ADAM = AdamParams(learning_rate=1e-3)


def batch(seed: int, size: int = 16, length: int = 128) -> list[Datum]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1000, (size, length + 1))
    return [
        Datum(
            model_input=ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": TensorData.from_numpy(row[1:])},
        )
        for row in tokens
    ]


async def collect(seed: int, env_seconds: float) -> list[Datum]:
    """Stand-in for rollouts: waiting on environments, then a batch."""
    await anyio.sleep(env_seconds)
    return batch(seed)


async def one_by_one(service: ServiceClient, steps: int, env: float) -> tuple[float, float]:
    training = await service.create_lora_training_client_async(MODEL, rank=8, seed=1)
    start = time.perf_counter()
    for step in range(steps):
        data = await collect(step, env)
        await (await training.forward_backward_async(data))
        await (await training.optim_step_async(ADAM))
    elapsed = time.perf_counter() - start
    probe = await (await training.forward_async(batch(0)))
    return elapsed, probe.loss


async def pipelined(service: ServiceClient, steps: int, env: float) -> tuple[float, float]:
    training = await service.create_lora_training_client_async(MODEL, rank=8, seed=1)
    start = time.perf_counter()
    futures = []
    for step in range(steps):
        data = await collect(step, env)  # the trainer is busy with the previous step meanwhile
        futures.append(await training.forward_backward_async(data))
        futures.append(await training.optim_step_async(ADAM))
    for future in futures:  # results come back in submission order
        await future
    elapsed = time.perf_counter() - start
    probe = await (await training.forward_async(batch(0)))
    return elapsed, probe.loss


async def compare(url: str, steps: int, env_ms: float) -> tuple[float, float]:
    env = env_ms / 1000
    async with ServiceClient(base_url=url) as service:
        serial, serial_loss = await one_by_one(service, steps, env)
        piped, piped_loss = await pipelined(service, steps, env)
    print(f"{steps} steps awaited one by one: {serial:6.2f} s")
    print(f"{steps} steps pipelined:          {piped:6.2f} s  ({serial / piped:.2f}x)")
    print(f"same training either way: loss {serial_loss:.6f} vs {piped_loss:.6f}")
    assert abs(serial_loss - piped_loss) < 1e-5
    return serial, piped


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--env-ms", type=float, default=50.0, help="environment time per step")
    parser.add_argument("--server", default=None)
    args = parser.parse_args(argv)
    with embedded(args.server) as url:
        return anyio.run(compare, url, args.steps, args.env_ms)


if __name__ == "__main__":
    main()
