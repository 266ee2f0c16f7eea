"""Client overhead per submit-and-result round trip, against the ``null`` backend.

Three contenders do the same work, interleaved round by round in one run so machine noise hits
them alike:

- ``httpx``  a bare ``httpx.AsyncClient``: POST /forward_backward + GET /operations/<id>;
- ``async``  ``await (await training.forward_backward_async(data))``;
- ``sync``   ``training.forward_backward(data).result()`` (through the portal thread).

The async contenders run on asyncio and on trio. Prints the median time per round trip and the
ratios client/httpx (targets: async <= 1.5, sync <= 2.0).

    python benchmarks/roundtrip.py [--ops 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections import defaultdict

import anyio
import httpx
import msgspec

from loops_async import Datum, ModelInput, ServiceClient, TensorData, TrainingClient
from loops_async._codec import encode
from loops_async._wire import ForwardBackwardRequest
from loops_async.server import LocalServer

MODEL = "loops-local/tiny-chat"
DATUM = Datum(
    model_input=ModelInput.from_ints(list(range(1, 65))),
    loss_fn_inputs={"target_tokens": TensorData(data=list(range(2, 66)), dtype="int64")},
)


class BareHttpx:
    """The baseline: what a hand-written httpx loop does for the same round trip."""

    def __init__(self, training: TrainingClient) -> None:
        self.base = training._endpoint.base_url
        self.run_id = training.run_id
        self.seq = training._gate.next_ticket - 1

    async def run(self, client: httpx.AsyncClient, ops: int) -> float:
        start = time.perf_counter()
        for _ in range(ops):
            self.seq += 1
            body = encode(
                ForwardBackwardRequest(
                    seq_id=self.seq, run_id=self.run_id, model=MODEL, data=[DATUM]
                )
            )
            submit = await client.post(
                f"{self.base}/forward_backward",
                content=body,
                headers={"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"},
            )
            op_id = msgspec.json.decode(submit.content)["operation_id"]
            while True:
                poll = await client.get(f"{self.base}/operations/{op_id}")
                if poll.status_code == 200:
                    msgspec.json.decode(poll.content)
                    break
        return (time.perf_counter() - start) / ops


async def async_client(training: TrainingClient, ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        await (await training.forward_backward_async([DATUM]))
    return (time.perf_counter() - start) / ops


def sync_client(training: TrainingClient, ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        training.forward_backward([DATUM]).result()
    return (time.perf_counter() - start) / ops


async def async_round(url: str, ops: int, results: dict[str, list[float]], loop: str) -> None:
    """One round of the bare-httpx baseline and the async client, on the current loop."""
    async with ServiceClient(url, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=8)
        bare = BareHttpx(await service.create_lora_training_client_async(MODEL, rank=8))
        async with httpx.AsyncClient(headers={"X-Run-Id": bare.run_id}, timeout=60) as client:
            await bare.run(client, 10)  # warm up both
            await async_client(training, 10)
            results[f"httpx/{loop}"].append(await bare.run(client, ops))
            results[f"async/{loop}"].append(await async_client(training, ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200, help="round trips per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    results: dict[str, list[float]] = defaultdict(list)
    # Each contender gets its own run so their seq_ids never interleave.
    with (
        LocalServer(backend="null", log_level="warning") as server,
        ServiceClient(server.url, heartbeat_interval=0) as sync_service,
    ):
        sync_training = sync_service.create_lora_training_client(MODEL, rank=8)
        sync_client(sync_training, 10)
        for _ in range(args.rounds):
            for loop in ("asyncio", "trio"):
                anyio.run(async_round, server.url, args.ops, results, loop, backend=loop)
            results["sync"].append(sync_client(sync_training, args.ops))

    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"{args.ops} round trips x {args.rounds} rounds per contender (null backend)")
    for name in sorted(med):
        print(f"  {name:>14}: {med[name] * 1e6:8.1f} us per submit+result")
    for loop in ("asyncio", "trio"):
        ratio = med[f"async/{loop}"] / med[f"httpx/{loop}"]
        print(f"  ratio async/httpx on {loop:<7} = {ratio:.2f}  (target <= 1.5)")
    ratio = med["sync"] / med["httpx/asyncio"]
    print(f"  ratio sync/httpx (asyncio)    = {ratio:.2f}  (target <= 2.0)")


if __name__ == "__main__":
    main()
