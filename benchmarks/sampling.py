"""Throughput and client CPU of 1000 concurrent samples, against the ``null`` backend.

The server runs in a separate process (``loops-async serve --backend null``), so the CPU time
measured here is the client's alone. Two contenders fire the same 1000 ``POST /sample``
requests concurrently, interleaved round by round on asyncio and on trio:

- ``httpx``  a bare ``httpx.AsyncClient`` (default limits) + ``msgspec.json.decode``;
- ``client`` ``SamplingClient.sample_async`` (validation, retries, response parsing).

Prints samples per second, client CPU per sample, and the client/httpx ratios.

    python benchmarks/sampling.py [--samples 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import httpx
import msgspec

from loops_async import ModelInput, SamplingClient, SamplingParams, ServiceClient

MODEL = "loops-local/tiny-chat"
PROMPT = ModelInput.from_ints(list(range(1, 33)))
PARAMS = SamplingParams(max_tokens=16, temperature=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, **settings: str) -> subprocess.Popen[bytes]:
    """``loops-async serve --backend null`` in its own process; ``settings`` become
    ``LOOPS_ASYNC_<NAME>`` variables."""
    env = {**os.environ, "LOOPS_ASYNC_LOG_LEVEL": "warning"}
    env.update({f"LOOPS_ASYNC_{name.upper()}": value for name, value in settings.items()})
    cmd = [sys.executable, "-m", "loops_async", "serve", "--backend", "null", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


async def fan_out(samples: int, one: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """Run ``one`` ``samples`` times concurrently; (wall seconds, CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(samples):
            tg.start_soon(one)
    return time.perf_counter() - wall, time.process_time() - cpu


async def one_round(
    url: str,
    samples: int,
    results: dict[str, list[tuple[float, float]]],
    connections: int | None,
) -> None:
    loop = anyio.lowlevel.current_token().backend_class.__module__.rsplit("_", 1)[-1]
    options = {} if connections is None else {"max_connections": connections}
    async with ServiceClient(url, heartbeat_interval=0, **options) as service:
        sampler: SamplingClient = await service.create_sampling_client_async(base_model=MODEL)
        body = sampler._build(PROMPT, 1, PARAMS, False, 0)[0]
        headers = {
            "Content-Type": "application/json",
            "X-Sampler-Id": sampler._headers["X-Sampler-Id"],
        }
        async with httpx.AsyncClient(timeout=120) as bare:

            async def bare_one() -> None:
                response = await bare.post(
                    f"{sampler._base_url}/sample",
                    content=body,
                    headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
                )
                response.raise_for_status()
                msgspec.json.decode(response.content)

            async def client_one() -> None:
                await sampler.sample_async(PROMPT, sampling_params=PARAMS)

            await fan_out(50, bare_one)  # warm both pools
            await fan_out(50, client_one)
            results[f"httpx/{loop}"].append(await fan_out(samples, bare_one))
            results[f"client/{loop}"].append(await fan_out(samples, client_one))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--max-connections", type=int, default=None, help="the client's pool (default: its own)"
    )
    args = parser.parse_args()

    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        for _ in range(args.rounds):
            for backend in ("asyncio", "trio"):
                anyio.run(
                    one_round, url, args.samples, results, args.max_connections, backend=backend
                )
    finally:
        server.terminate()
        server.wait(10)

    print(f"{args.samples} concurrent samples x {args.rounds} rounds (null backend, own process)")
    med: dict[str, tuple[float, float]] = {}
    for name in sorted(results):
        wall = statistics.median(w for w, _ in results[name])
        cpu = statistics.median(c for _, c in results[name])
        med[name] = (wall, cpu)
        print(
            f"  {name:>15}: {args.samples / wall:8.0f} samples/s   "
            f"{cpu / args.samples * 1e6:7.1f} us client CPU per sample"
        )
    for loop in ("asyncio", "trio"):
        client, bare = med[f"client/{loop}"], med[f"httpx/{loop}"]
        print(
            f"  {loop:>7}: throughput client/httpx = {bare[0] / client[0]:.2f}, "
            f"CPU per sample client/httpx = {client[1] / bare[1]:.2f}"
        )


if __name__ == "__main__":
    main()
