"""Latency of a trainer submit with 2,000 samples in flight, against the ``null`` backend.

The server runs in its own process (``loops-async serve --backend null``) with every sampling
batch held for ``--sample-seconds`` (as a real model would), so the samples stay in flight while
the client idles. For each event loop (asyncio, trio) the script measures the latency of
``forward_backward_async`` (returns at the server's 202) three ways, side by side in one run:

- ``idle``      nothing else in flight;
- ``lanes``     while 2,000 ``sample_async`` calls are in flight (the client's default: samples
                in their own connection lane);
- ``one lane``  the same flood with samples forced into the trainer/control lane, as before
                lanes existed: the submit queues behind every sample ahead of it.

Prints median and p90 latencies and the ratios to idle (goal: ``lanes`` within 2x of idle).

    python benchmarks/lanes.py [--samples 2000] [--submits 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import anyio
import anyio.lowlevel
from sampling import MODEL, PARAMS, PROMPT, free_port, start_server

import loops_async.sampling
from loops_async import Datum, ModelInput, ServiceClient, TensorData
from loops_async._http import SAMPLE, Lane

DATUM = Datum(
    model_input=ModelInput.from_ints(list(range(1, 33))),
    loss_fn_inputs={
        "target_tokens": TensorData(data=list(range(2, 34)), dtype="int64", shape=[32])
    },
)


async def measure(
    url: str, samples: int, submits: int, results: dict[str, list[float]], in_flight: list[int]
) -> None:
    loop = anyio.lowlevel.current_token().backend_class.__module__.rsplit("_", 1)[-1]
    async with ServiceClient(url, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        sampler = await service.create_sampling_client_async(base_model=MODEL)

        async def submit_latency() -> float:
            start = time.perf_counter()
            await training.forward_backward_async([DATUM])
            return time.perf_counter() - start

        for _ in range(5):  # warm up
            await submit_latency()
            await sampler.sample_async(PROMPT, sampling_params=PARAMS)
        results[f"{loop} idle"] += [await submit_latency() for _ in range(submits)]

        for mode in ("lanes", "one lane"):
            table = SAMPLE if mode == "lanes" else dataclasses.replace(SAMPLE, lane=Lane.CONTROL)
            loops_async.sampling.SAMPLE = table  # type: ignore[misc]
            done = 0

            async def one() -> None:
                nonlocal done
                await sampler.sample_async(PROMPT, sampling_params=PARAMS)
                done += 1

            try:
                async with anyio.create_task_group() as group:
                    for _ in range(samples):
                        group.start_soon(one)
                    await anyio.sleep(0.2)  # every sample is sent or queued in the client
                    with anyio.move_on_after(10):
                        for _ in range(submits):
                            results[f"{loop} {mode}"].append(await submit_latency())
                    in_flight.append(samples - done)
                    group.cancel_scope.cancel()  # the measurement is over: drop the flood
            finally:
                loops_async.sampling.SAMPLE = SAMPLE  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--submits", type=int, default=20)
    parser.add_argument("--sample-seconds", type=float, default=2.0)
    args = parser.parse_args()

    port = free_port()
    server = start_server(port, null_sample_delay=str(args.sample_seconds))
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[float]] = {}
    in_flight: list[int] = []
    for loop in ("asyncio", "trio"):
        for mode in ("idle", "lanes", "one lane"):
            results[f"{loop} {mode}"] = []
    try:
        for backend in ("asyncio", "trio"):
            anyio.run(measure, url, args.samples, args.submits, results, in_flight, backend=backend)
    finally:
        server.terminate()
        server.wait(10)

    print(
        f"trainer submit latency, {args.submits} submits, {args.samples} samples in flight "
        f"(null backend, own process; samples still in flight after the last submit: "
        f"min {min(in_flight)})"
    )
    for loop in ("asyncio", "trio"):
        idle = statistics.median(results[f"{loop} idle"])
        for mode in ("idle", "lanes", "one lane"):
            values = sorted(results[f"{loop} {mode}"])
            if not values:
                print(
                    f"  {loop:>7} {mode:>8}: no submit finished within 10 s "
                    "(queued behind the samples)"
                )
                continue
            med = statistics.median(values)
            p90 = values[int(0.9 * (len(values) - 1))]
            print(
                f"  {loop:>7} {mode:>8}: median {med * 1e3:8.2f} ms   p90 {p90 * 1e3:8.2f} ms   "
                f"median/idle {med / idle:6.2f}"
            )


if __name__ == "__main__":
    main()
