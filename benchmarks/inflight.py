"""Client CPU per sample from 100 to 10,000 samples in flight, and memory per in-flight sample.

The ``null`` backend runs in its own process. Every count runs on asyncio (``asyncio.gather``)
and on trio (a nursery), each in a process of its own:

- CPU: N concurrent ``sample_async`` (32-token prompt, 16 new tokens), ``time.process_time()``
  per sample, the median of ``--rounds`` (the pool warmed first). It should stay flat: nothing
  in the client costs more per request when more are waiting. A second pass runs with the
  cyclic garbage collector off, to show what its passes over the waiting samples cost.
- memory: N ``sample_async`` calls in flight, held by the server
  (``LOOPS_ASYNC_NULL_SAMPLE_DELAY``): the Python heap traced by ``tracemalloc`` while they
  wait, per sample (the slope between the smallest and the largest count, so the client's
  fixed cost cancels out). With the default limits 100 are on the wire and the rest wait for
  the sampling lane; the calls are cancelled after the measurement.

    python benchmarks/inflight.py [--counts 100,1000,3000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "loops-local/tiny-chat"
HOLD = 3.0
"""Seconds the server holds each sample in the memory pass."""


def _fan_out(loop: str, n: int, one: Any) -> Any:
    if loop == "trio":
        import trio

        async def nursery() -> None:
            async with trio.open_nursery() as tasks:
                for _ in range(n):
                    tasks.start_soon(one)

        return nursery
    import asyncio

    async def gather() -> None:
        await asyncio.gather(*(one() for _ in range(n)))

    return gather


def worker(kind: str, url: str, loop: str, counts: list[int], rounds: int) -> dict[str, Any]:
    import gc

    import anyio

    from loops_async import ModelInput, SamplingParams, ServiceClient

    prompt = ModelInput.from_ints(list(range(1, 33)))
    params = SamplingParams(max_tokens=16, temperature=1.0)
    service = ServiceClient(base_url=url, api_key="bench")
    sampler = service.create_sampling_client(base_model=MODEL)

    async def one() -> None:
        await sampler.sample_async(prompt, 1, params)

    out: dict[str, Any] = {}

    async def cpu() -> None:
        await _fan_out(loop, 200, one)()  # warm the pool
        if kind == "cpu-nogc":
            gc.collect()
            gc.disable()  # what is left when the collector's passes are taken out
        for n in counts:
            per = []
            for _ in range(rounds):
                start = time.process_time()
                await _fan_out(loop, n, one)()
                per.append((time.process_time() - start) / n)
            out[str(n)] = statistics.median(per)

    async def memory() -> None:
        import tracemalloc

        await _fan_out(loop, 200, one)()  # warm: connections, caches, decoders
        tracemalloc.start()
        for n in counts:
            base = tracemalloc.get_traced_memory()[0]
            peak: list[int] = []

            async with anyio.create_task_group() as tg:
                tg.start_soon(_fan_out(loop, n, one))
                await anyio.sleep(HOLD / 2)  # every sample is in flight (or queued) now
                peak.append(tracemalloc.get_traced_memory()[0] - base)
                tg.cancel_scope.cancel()  # no need to wait for the server's answers
            out[str(n)] = peak[0]
            await anyio.sleep(0.2)
        tracemalloc.stop()

    anyio.run(memory if kind == "memory" else cpu, backend=loop)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, url, loop, counts, rounds = sys.argv[2:7]
        result = worker(kind, url, loop, [int(c) for c in counts.split(",")], int(rounds))
        print(json.dumps(result), flush=True)
        import os

        os._exit(0)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", default="100,1000,3000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling import free_port, start_server

    results: dict[str, dict[str, Any]] = {}
    passes = (("cpu", {}), ("cpu-nogc", {}), ("memory", {"null_sample_delay": str(HOLD)}))
    for kind, settings in passes:
        port = free_port()
        server = start_server(port, **settings)
        try:
            for loop in ("asyncio", "trio"):
                cmd = [sys.executable, __file__, "--worker", kind, f"http://127.0.0.1:{port}"]
                cmd += [loop, args.counts, str(args.rounds)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                results[f"{kind}/{loop}"] = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait(10)

    print(f"samples in flight (null backend, own process; median of {args.rounds} rounds)")
    print("  client CPU per sample (us):")
    print("    " + " " * 15 + "".join(f"{n:>9}" for n in counts) + "   max/min")
    for kind, label in (("cpu", ""), ("cpu-nogc", ", gc off")):
        for loop in ("asyncio", "trio"):
            row = [results[f"{kind}/{loop}"][str(n)] * 1e6 for n in counts]
            cells = "".join(f"{v:9.0f}" for v in row)
            print(f"    {loop + label:>15}{cells}   {max(row) / min(row):7.2f}")
    print(f"  Python heap while in flight (tracemalloc; server holds each sample {HOLD:g} s):")
    for loop in ("asyncio", "trio"):
        mem = results[f"memory/{loop}"]
        row = "  ".join(f"{n}: {mem[str(n)] / 2**20:6.1f} MiB" for n in counts)
        lo, hi = counts[0], counts[-1]
        slope = (mem[str(hi)] - mem[str(lo)]) / (hi - lo)
        print(f"    {loop:>8}: {row}   -> {slope / 1024:.1f} KiB per in-flight sample")


if __name__ == "__main__":
    main()
