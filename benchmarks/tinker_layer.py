"""Client-side cost of the tinker layer (``loops_async.tinker``) over the core client it wraps.

The ``null`` backend runs in its own process (``loops-async serve --backend null``), so
``time.process_time()`` of this process (every thread: the caller's and the portal's) is the
client's CPU alone. A core :class:`loops_async.ServiceClient` and a layer
:class:`loops_async.tinker.ServiceClient` (each with its own connections) do the same work,
interleaved round by round in one run (the order alternates each round) so machine noise hits
them alike; medians of the rounds are printed with the ratios layer/core.

- ``roundtrip``  sync ``forward_backward([datum], "cross_entropy").result()`` then
  ``optim_step(adam).result()`` (64 tokens): wall and client CPU per round trip. The core
  blocks on the portal twice per call (submit, then the long-poll); the layer spawns one
  coroutine per call and blocks on its future;
- ``sample``     N concurrent samples (32-token prompt, 16 new tokens), client CPU per sample
  (and the part of it spent in the kernel) and throughput, on asyncio and on trio: (a) core
  ``await sampler.sample_async(...)`` and (b) layer ``await sampler.sample_async(...)`` (on the
  caller's loop), each in an ``asyncio.TaskGroup`` / a trio nursery; (c) layer
  ``sampler.sample(...)`` futures (their requests run on the portal) gathered with
  ``asyncio.gather(*(f.coroutine() for f in futs))`` (trio: ``f.coroutine`` in a nursery).
  Every loop's pool is warmed first;
- ``batch``      a 64 x 1,000-token RL batch (``importance_sampling``: ``target_tokens``,
  ``logprobs``, ``advantages`` from numpy arrays): datums built (core ``TensorData.from_numpy``;
  layer ``tinker.Datum`` with the arrays, converted by tinker's rules), ``forward_backward`` and
  ``optim_step`` submitted back to back, then both results awaited (sync API): client CPU.

``--profile`` then runs the layer's round trip and sample paths (those in ``--only``) and their
core twins under cProfile (the caller's thread and the portal's, each timed by its own thread
CPU clock; the garbage collector off, so that its passes are not charged to whatever function
allocated) and prints the layer's top functions by own time and those whose own time grows most
over the core, per operation, plus micro-timings of the layer's pieces (type conversion, portal
hop, futures). ``--quick`` is a smoke run (~15 s); the defaults take about 40 s.

    python benchmarks/tinker_layer.py [--rounds 5] [--ops 100] [--samples 2000] [--batches 3]
                                      [--only roundtrip,sample,batch] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import pstats
import resource
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import trio

import loops_async
import loops_async.tinker as tinker
from loops_async import _portal

MODEL = "loops-local/tiny-chat"
DATUMS, TOKENS = 64, 1000
PROMPT = loops_async.ModelInput.from_ints(list(range(1, 33)))
PARAMS = loops_async.SamplingParams(max_tokens=16, temperature=1.0)
CORE_DATUM = loops_async.Datum(
    model_input=loops_async.ModelInput.from_ints(list(range(1, 65))),
    loss_fn_inputs={
        "target_tokens": loops_async.TensorData(data=list(range(2, 66)), dtype="int64")
    },
)
PLAIN_LIST: dict[str, Any] = {"target_tokens": list(range(2, 66))}  # as tinker code passes it
LAYER_DATUM = tinker.Datum(
    model_input=tinker.ModelInput.from_ints(list(range(1, 65))), loss_fn_inputs=PLAIN_LIST
)
CORE_ADAM = loops_async.AdamParams(learning_rate=1e-4)
LAYER_ADAM = tinker.AdamParams(learning_rate=1e-4)

Sample = Callable[[], Coroutine[Any, Any, Any]]


# ---------------------------------------------------------------------------- clients


class Clients:
    """One core and one layer client on the same server (heartbeats off: not measured)."""

    def __init__(self, url: str) -> None:
        self.core = loops_async.ServiceClient(url, api_key="bench", heartbeat_interval=0)
        self.layer = tinker.ServiceClient(base_url=url, api_key="bench", heartbeat_interval=0)
        self.core_training = self.core.create_lora_training_client(MODEL, rank=8)
        self.layer_training = self.layer.create_lora_training_client(MODEL, rank=8).result()
        self.core_sampler = self.core.create_sampling_client(base_model=MODEL)
        self.layer_sampler = self.layer.create_sampling_client(base_model=MODEL).result()

    def close(self) -> None:
        self.layer.close().result()
        self.core.close()


def _sys_time() -> float:
    """CPU seconds this process spent in the kernel (syscalls: socket I/O, thread wake-ups)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------- round trip


def core_roundtrips(c: Clients, ops: int) -> None:
    training = c.core_training
    for _ in range(ops):
        training.forward_backward([CORE_DATUM], "cross_entropy").result()
        training.optim_step(CORE_ADAM).result()


def layer_roundtrips(c: Clients, ops: int) -> None:
    training = c.layer_training
    for _ in range(ops):
        training.forward_backward([LAYER_DATUM], "cross_entropy").result()
        training.optim_step(LAYER_ADAM).result()


ROUNDTRIP = {"core": core_roundtrips, "layer": layer_roundtrips}


def roundtrip_round(c: Clients, ops: int, flip: bool, out: dict[str, list[Any]]) -> None:
    for name in sorted(ROUNDTRIP, reverse=flip):
        gc.collect()
        wall, cpu = _timed(lambda f=ROUNDTRIP[name]: f(c, ops))  # type: ignore[misc]
        out[f"roundtrip/{name}"].append((wall / ops, cpu / ops))


# ---------------------------------------------------------------------------- fan-out sampling


def samplers(c: Clients) -> dict[str, Sample | None]:
    """The one-sample coroutines of (a) and (b); (c) is ``None`` (futures, see ``fan_out``)."""
    core, layer = c.core_sampler, c.layer_sampler

    async def core_one() -> Any:
        return await core.sample_async(PROMPT, 1, PARAMS)

    async def layer_one() -> Any:
        return await layer.sample_async(PROMPT, 1, PARAMS)

    return {"core async": core_one, "layer async": layer_one, "layer sync futures": None}


async def fan_out(loop: str, n: int, one: Sample | None, c: Clients) -> None:
    """``n`` concurrent samples on the running loop."""
    if one is None:  # (c): futures from the sync API, their requests run on the portal
        futures = [c.layer_sampler.sample(PROMPT, 1, PARAMS) for _ in range(n)]
        if loop == "asyncio":
            await asyncio.gather(*(f.coroutine() for f in futures))
        else:
            async with trio.open_nursery() as nursery:
                for f in futures:
                    nursery.start_soon(f.coroutine)
        return
    if loop == "asyncio":
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(one())
    else:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)


def sample_round(
    c: Clients, samples: int, warm: int, flip: bool, out: dict[str, list[Any]]
) -> None:
    kinds = samplers(c)
    names = sorted(kinds, reverse=flip)

    async def body(loop: str) -> None:
        for name in names:  # warm: this loop's pools (and the portal's) open their connections
            await fan_out(loop, warm, kinds[name], c)
        for name in names:
            gc.collect()  # each variant starts from a clean heap (it pays for its own garbage)
            wall, cpu, sys_ = time.perf_counter(), time.process_time(), _sys_time()
            await fan_out(loop, samples, kinds[name], c)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            sys_ = _sys_time() - sys_
            out[f"sample/{loop}/{name}"].append((wall, cpu / samples, sys_ / samples))

    asyncio.run(body("asyncio"))
    trio.run(body, "trio")


# ---------------------------------------------------------------------------- RL batch


def batch_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [
        {
            "tokens": rng.integers(1, 1000, TOKENS),
            "target_tokens": rng.integers(1, 1000, TOKENS),
            "logprobs": -rng.random(TOKENS, dtype=np.float32) * 5,
            "advantages": rng.standard_normal(TOKENS, dtype=np.float32),
        }
        for _ in range(DATUMS)
    ]


LOSS_KEYS = ("target_tokens", "logprobs", "advantages")


def core_batch(c: Clients, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(CPU to build, CPU to submit both and wait) for the core."""
    start = time.process_time()
    data = [
        loops_async.Datum(
            model_input=loops_async.ModelInput.from_ints(row["tokens"]),
            loss_fn_inputs={k: loops_async.TensorData.from_numpy(row[k]) for k in LOSS_KEYS},
        )
        for row in rows
    ]
    built = time.process_time()
    fb = c.core_training.forward_backward(data, "importance_sampling")
    opt = c.core_training.optim_step(CORE_ADAM)
    assert len(fb.result().loss_fn_outputs) == DATUMS
    opt.result()
    return built - start, time.process_time() - built


def layer_batch(c: Clients, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(CPU to build, CPU to submit both and wait) for the layer."""
    start = time.process_time()
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(row["tokens"]),
            loss_fn_inputs={k: row[k] for k in LOSS_KEYS},  # numpy arrays, tinker's rules
        )
        for row in rows
    ]
    built = time.process_time()
    fb = c.layer_training.forward_backward(data, "importance_sampling")
    opt = c.layer_training.optim_step(LAYER_ADAM)
    assert len(fb.result().loss_fn_outputs) == DATUMS
    opt.result()
    return built - start, time.process_time() - built


BATCH = {"core": core_batch, "layer": layer_batch}


def batch_round(
    c: Clients, rows: list[dict[str, Any]], batches: int, flip: bool, out: dict[str, list[Any]]
) -> None:
    for name in sorted(BATCH, reverse=flip):
        for _ in range(batches):
            gc.collect()
            out[f"batch/{name}"].append(BATCH[name](c, rows))


# ---------------------------------------------------------------------------- profiling


class ThreadsProfile:
    """cProfile on this thread and on the portal's (a profiler is per thread), timed by each
    thread's own CPU clock: time blocked in ``epoll`` or on a lock does not count."""

    def __init__(self) -> None:
        self.here = cProfile.Profile(time.thread_time)
        self.portal = cProfile.Profile(time.thread_time)

    def __enter__(self) -> ThreadsProfile:
        gc.collect()
        gc.disable()  # a collector pass would be charged to whatever function allocated
        _portal.get_portal().call(self.portal.enable)
        self.here.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.here.disable()
        _portal.get_portal().call(self.portal.disable)
        gc.enable()

    def stats(self) -> dict[tuple[str, int, str], tuple[int, float]]:
        """(calls, own seconds) per function, both threads added."""
        merged = pstats.Stats(self.here)
        merged.add(self.portal)
        raw: dict[Any, Any] = merged.stats  # type: ignore[attr-defined]
        return {key: (nc, tt) for key, (_, nc, tt, _, _) in raw.items()}


def _file(path: str) -> str:
    """``path`` from the package or the library root (``anyio/_core/_tasks.py``)."""
    parts = Path(path).parts
    for anchor in ("loops_async", "benchmarks", "site-packages", "python3.11"):
        if anchor in parts:
            keep = anchor in ("loops_async", "benchmarks")
            return "/".join(parts[parts.index(anchor) + (not keep) :])
    return path


def _label(key: tuple[str, int, str]) -> str:
    path, line, func = key
    return f"{_file(path)}:{line}({func})" if line else func


def profile_pair(
    title: str,
    ops: int,
    core: Callable[[ThreadsProfile], Any],
    layer: Callable[[ThreadsProfile], Any],
    top: int,
) -> None:
    """Profile ``core`` and ``layer`` (each warms up, then does ``ops`` operations inside the
    profile it is given); print the layer's top functions by own CPU time, and the functions
    whose own time grows most over the core's."""
    runs = {}
    for name, fn in (("core", core), ("layer", layer)):
        prof = ThreadsProfile()
        fn(prof)
        runs[name] = prof.stats()
    total = {n: sum(tt for _, tt in s.values()) / ops * 1e6 for n, s in runs.items()}
    print(
        f"  {title}: {total['layer']:.0f} us/op layer, {total['core']:.0f} us/op core "
        "(thread CPU under cProfile, which inflates both)"
    )
    layer_stats, core_stats = runs["layer"], runs["core"]
    print(f"    layer, top {top} by own time (us/op, calls/op):")
    for key, (nc, tt) in sorted(layer_stats.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"      {tt / ops * 1e6:7.1f} us  {nc / ops:6.1f}  {_label(key)}")
    grow = {
        key: (tt - core_stats.get(key, (0, 0.0))[1], nc - core_stats.get(key, (0, 0.0))[0])
        for key, (nc, tt) in layer_stats.items()
    }
    print(f"    layer minus core, top {top} (us/op, calls/op):")
    for key, (dt, dn) in sorted(grow.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"      {dt / ops * 1e6:+7.1f} us  {dn / ops:+6.1f}  {_label(key)}")
    files: dict[str, float] = defaultdict(float)
    for key in layer_stats.keys() | core_stats.keys():
        name = _file(key[0]) if key[1] else "C functions"
        files[name] += layer_stats.get(key, (0, 0.0))[1] - core_stats.get(key, (0, 0.0))[1]
    shown = sorted(files.items(), key=lambda kv: -abs(kv[1]))[:top]
    cells = ", ".join(f"{name} {dt / ops * 1e6:+.0f}" for name, dt in shown)
    print(f"    layer minus core by file, top {top} (us/op): {cells}")


def _profiled_roundtrips(
    run: Callable[[Clients, int], None], c: Clients, ops: int
) -> Callable[[ThreadsProfile], None]:
    def go(prof: ThreadsProfile) -> None:
        run(c, 10)
        with prof:
            run(c, ops)

    return go


def _profiled_fan_out(
    one: Sample | None, c: Clients, samples: int, warm: int
) -> Callable[[ThreadsProfile], None]:
    async def body(prof: ThreadsProfile) -> None:
        await fan_out("asyncio", warm, one, c)  # this loop's pool (and the portal's) warm
        with prof:
            await fan_out("asyncio", samples, one, c)

    return lambda prof: asyncio.run(body(prof))


def micro(label: str, fn: Callable[[], Any], n: int, per: int = 1) -> None:
    """Time ``fn()`` ``n`` times; print per call divided by ``per`` (operations per call)."""
    fn()
    wall, cpu = _timed(lambda: [fn() for _ in range(n)])
    n *= per
    print(f"    {label:<60} {wall / n * 1e6:7.1f} us wall  {cpu / n * 1e6:7.1f} us CPU")


def profile(c: Clients, args: argparse.Namespace) -> None:
    from loops_async.tinker import _futures
    from loops_async.tinker._sampling import _check_sample
    from loops_async.tinker.types import SampleResponse, to_core_data

    ops, samples, top = max(args.ops // 2, 20), min(args.samples, 1000), args.top
    print("cProfile, the caller's thread and the portal's (null backend, own process):")
    if "roundtrip" in args.only:
        profile_pair(
            "sync forward_backward + optim_step round trip",
            ops,
            _profiled_roundtrips(core_roundtrips, c, ops),
            _profiled_roundtrips(layer_roundtrips, c, ops),
            top,
        )
    kinds = samplers(c)
    for name in ("layer async", "layer sync futures") if "sample" in args.only else ():
        profile_pair(
            f"{samples} concurrent samples, asyncio, {name} vs core async",
            samples,
            _profiled_fan_out(kinds["core async"], c, samples, args.warm),
            _profiled_fan_out(kinds[name], c, samples, args.warm),
            top,
        )

    print("  pieces of the layer (one at a time, no I/O):")
    response = c.core_sampler.sample(PROMPT, 1, PARAMS)
    ids = [f"{uuid.uuid4().hex}:0"]

    async def noop() -> None:
        return None

    async def awaited(n: int) -> None:
        futures = [_futures.spawn(noop) for _ in range(n)]
        await asyncio.gather(*(f.coroutine() for f in futures))

    def from_core() -> Any:
        return SampleResponse.from_core(response, ids)

    def sequence_ids() -> Any:
        return [f"{uuid.uuid4().hex}:{i}" for i in range(1)]

    def checks() -> Any:
        return _check_sample(0, None, 0, None, False)

    def datum_to_core() -> Any:
        return to_core_data([LAYER_DATUM])

    def spawn_hop() -> Any:
        return _futures.spawn(noop).result()

    def run_hop() -> Any:
        return _portal.run(noop, twin="x")

    def gathered() -> Any:
        return asyncio.run(awaited(1000))

    micro("SampleResponse.from_core (1 sequence, 16 tokens)", from_core, 20000)
    micro("uuid.uuid4().hex + sequence ids (1 sequence)", sequence_ids, 20000)
    micro("_check_sample (argument checks)", checks, 20000)
    micro("to_core_data([tinker.Datum]) (64 tokens)", datum_to_core, 20000)
    micro("AwaitableConcurrentFuture() + set_result + result", _done_future, 20000)
    micro("portal hop: spawn(noop).result() (tinker futures)", spawn_hop, 2000)
    micro("portal hop: _portal.run(noop) (core sync API)", run_hop, 2000)
    micro("spawn(noop) x1000, f.coroutine() gathered (asyncio), per future", gathered, 5, 1000)


def _done_future() -> Any:
    from loops_async.tinker._futures import AwaitableConcurrentFuture

    f: AwaitableConcurrentFuture[int] = AwaitableConcurrentFuture()
    f.set_result(1)
    return f.result()


# ---------------------------------------------------------------------------- report


def report(args: argparse.Namespace, out: dict[str, list[Any]]) -> None:
    print(
        f"tinker layer vs core (null backend in its own process, {args.rounds} rounds "
        "interleaved, medians; CPU = process_time of the client process, all its threads)"
    )
    if "roundtrip" in args.only:
        print(
            "  sync forward_backward(...).result() + optim_step(...).result() "
            f"({args.ops} per round):"
        )
        med = {}
        for name in ROUNDTRIP:
            values = out[f"roundtrip/{name}"]
            med[name] = (
                statistics.median(w for w, _ in values),
                statistics.median(c for _, c in values),
            )
            wall, cpu = med[name]
            print(
                f"    {name:>5}: {wall * 1e3:7.3f} ms wall   {cpu * 1e3:7.3f} ms CPU per round trip"
            )
        (lw, lc), (cw, cc) = med["layer"], med["core"]
        print(f"    layer/core: wall {lw / cw:.2f}, CPU {lc / cc:.2f}")
    if "sample" in args.only:
        print(f"  {args.samples} concurrent samples (32-token prompt, 16 new tokens):")
        for loop in ("asyncio", "trio"):
            base = None
            for name in ("core async", "layer async", "layer sync futures"):
                values = out[f"sample/{loop}/{name}"]
                wall = statistics.median(w for w, _, _ in values)
                cpu = statistics.median(c for _, c, _ in values)
                sys_ = statistics.median(s for _, _, s in values)
                base = cpu if base is None else base
                print(
                    f"    {loop:>7} {name:<19}: {cpu * 1e6:6.1f} us CPU per sample "
                    f"(sys {sys_ * 1e6:5.1f}) {args.samples / wall:6.0f} samples/s   "
                    f"CPU layer/core {cpu / base:.2f}"
                )
    if "batch" in args.only:
        print(
            f"  {DATUMS} x {TOKENS}-token RL batch: built, forward_backward + optim_step "
            f"submitted back to back, both awaited ({args.batches} per round):"
        )
        totals = {}
        for name in BATCH:
            values = out[f"batch/{name}"]
            build = statistics.median(b for b, _ in values)
            submit = statistics.median(s for _, s in values)
            totals[name] = statistics.median(b + s for b, s in values)
            print(
                f"    {name:>5}: {totals[name] * 1e3:7.1f} ms CPU per batch "
                f"(build {build * 1e3:6.1f}, submit + wait {submit * 1e3:6.1f})"
            )
        print(f"    layer/core: CPU {totals['layer'] / totals['core']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=100, help="round trips per variant per round")
    parser.add_argument("--samples", type=int, default=2000, help="concurrent samples")
    parser.add_argument("--warm", type=int, default=200, help="samples to warm each loop's pool")
    parser.add_argument("--batches", type=int, default=3, help="RL batches per variant per round")
    parser.add_argument("--only", default="roundtrip,sample,batch")
    parser.add_argument("--profile", action="store_true", help="cProfile the layer paths too")
    parser.add_argument("--top", type=int, default=5, help="lines per profile table")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.ops, args.samples = 3, 50, 1000
        args.warm, args.batches = 100, 2
    args.only = args.only.split(",")

    logging.getLogger("loops_async").setLevel(logging.ERROR)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling import free_port, start_server

    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, list[Any]] = defaultdict(list)
    started = time.perf_counter()
    try:
        c = Clients(url)
        rows = batch_rows()
        core_roundtrips(c, 10)  # warm: the portal's connections, imports, caches
        layer_roundtrips(c, 10)
        if "batch" in args.only:
            core_batch(c, rows)
            layer_batch(c, rows)
        for r in range(args.rounds):
            flip = bool(r % 2)
            if "roundtrip" in args.only:
                roundtrip_round(c, args.ops, flip, out)
            if "sample" in args.only:
                sample_round(c, args.samples, args.warm, flip, out)
            if "batch" in args.only:
                batch_round(c, rows, args.batches, flip, out)
        report(args, out)
        if args.profile:
            profile(c, args)
        c.close()
    finally:
        server.terminate()
        server.wait(10)
    print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
