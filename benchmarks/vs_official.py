"""Client CPU of ``loops_async`` against the official SDK (``baseten-loops`` 0.32), side by side.

The official SDK needs Python >= 3.12: it is installed once into ``.bench/official-venv`` (git
ignores it) with a ``python3.12`` found on ``PATH`` or under pyenv; when none is found or the
install fails, its contenders are skipped with the reason printed. The ``null`` backend runs in
its own process (``loops-async serve --backend null``); every contender runs in a subprocess
of its own, round by round, interleaved, so that machine noise hits them alike. Client CPU is
``time.process_time()`` (every thread of the client process) around the measured section only.

- ``roundtrip``  sync ``training.forward_backward([datum]).result()`` (64 tokens,
  ``cross_entropy``), CPU per round trip: official vs ours;
- ``sample``     N concurrent ``sample_async`` (32-token prompt, 16 new tokens), CPU per
  sample: official on asyncio (``asyncio.gather``) vs ours on asyncio (``asyncio.gather``) and
  on trio (a nursery). Both clients keep their own default connection limits;
- ``batch``      a 64 x 1,000-token RL batch (``importance_sampling``: ``target_tokens``,
  ``logprobs``, ``advantages`` from numpy arrays) built, submitted, and its result decoded,
  CPU per batch: official (``.tolist()`` into its pydantic types) vs ours
  (``TensorData.from_numpy``).

Prints medians, the ratios official/ours and trio/asyncio.

    python benchmarks/vs_official.py [--rounds 3] [--ops 300] [--samples 2000] [--batches 5]
                                     [--only roundtrip,sample,batch]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "loops-local/tiny-chat"
OFFICIAL = "baseten-loops==0.32.0"
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench" / "official-venv"
PYENV_312 = "/root/.pyenv/versions/3.12.1/bin/python3.12"
DATUMS, TOKENS = 64, 1000


# ---------------------------------------------------------------------------- the official venv


def _is_312(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def _venv_ready(python: Path) -> bool:
    if not python.exists():
        return False
    check = (
        "import importlib.metadata as m, numpy, baseten.loops; print(m.version('baseten-loops'))"
    )
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120)
    return out.returncode == 0 and out.stdout.strip() == OFFICIAL.split("==")[1]


def official_python() -> tuple[str | None, str]:
    """The official venv's interpreter (built on first use), or ``None`` and why not."""
    python = VENV / "bin" / "python"
    if _venv_ready(python):
        return str(python), "cached"
    candidates = [c for c in (shutil.which("python3.12"), PYENV_312) if c]
    base = next((c for c in candidates if _is_312(c)), None)
    if base is None:
        return None, "no python3.12 found (PATH, pyenv)"
    print(f"building {VENV} with {base} ({OFFICIAL}) ...", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [base, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", OFFICIAL, "numpy"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"{' '.join(step[:4])} failed: {' | '.join(tail)}"
    if not _venv_ready(python):
        return None, f"{OFFICIAL} installed but does not import"
    return str(python), "built"


# ---------------------------------------------------------------------------- workers
# Each runs in its own process (the official one on Python 3.12 without loops_async), prints
# one JSON line {"unit": [cpu seconds per op, ...], "wall": [...]} and exits.


def _arrays() -> list[dict[str, Any]]:
    import numpy as np

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


def _official_batch(rows: list[dict[str, Any]]) -> list[Any]:
    from baseten.loops import Datum, ModelInput, TensorData

    def tensor(array: Any, dtype: str) -> Any:
        return TensorData(data=array.tolist(), dtype=dtype, shape=list(array.shape))

    return [
        Datum(
            model_input=ModelInput.from_ints(row["tokens"].tolist()),
            loss_fn_inputs={
                "target_tokens": tensor(row["target_tokens"], "int64"),
                "logprobs": tensor(row["logprobs"], "float32"),
                "advantages": tensor(row["advantages"], "float32"),
            },
        )
        for row in rows
    ]


def _ours_batch(rows: list[dict[str, Any]]) -> list[Any]:
    from loops_async import Datum, ModelInput, TensorData

    return [
        Datum(
            model_input=ModelInput.from_ints(row["tokens"]),
            loss_fn_inputs={
                name: TensorData.from_numpy(row[name])
                for name in ("target_tokens", "logprobs", "advantages")
            },
        )
        for row in rows
    ]


def _service(side: str, url: str) -> Any:
    if side == "official":
        import logging

        logging.getLogger("baseten.loops").setLevel(logging.ERROR)
        from baseten.loops import ServiceClient as Official

        return Official(base_url=url, api_key="bench")
    from loops_async import ServiceClient

    return ServiceClient(base_url=url, api_key="bench")


def _timed(fn: Any, count: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.process_time() - cpu) / count, time.perf_counter() - wall


def work_roundtrip(side: str, url: str, ops: int) -> dict[str, Any]:
    if side == "official":
        from baseten.loops import Datum, ModelInput, TensorData
    else:
        from loops_async import Datum, ModelInput, TensorData
    datum = Datum(
        model_input=ModelInput.from_ints(list(range(1, 65))),
        loss_fn_inputs={
            "target_tokens": TensorData(data=list(range(2, 66)), dtype="int64", shape=[64])
        },
    )
    service = _service(side, url)
    training = service.create_lora_training_client(MODEL, rank=8)

    def run(n: int) -> None:
        for _ in range(n):
            training.forward_backward([datum]).result()

    run(20)
    cpu, wall = _timed(lambda: run(ops), ops)
    return {"unit": [cpu], "wall": [wall / ops]}


def work_sample(side: str, url: str, samples: int, loop: str) -> dict[str, Any]:
    if side == "official":
        from baseten.loops import ModelInput, SamplingParams
    else:
        from loops_async import ModelInput, SamplingParams
    prompt = ModelInput.from_ints(list(range(1, 33)))
    params = SamplingParams(max_tokens=16, temperature=1.0)
    service = _service(side, url)
    sampler = service.create_sampling_client(base_model=MODEL)

    async def one() -> None:
        await sampler.sample_async(prompt, 1, params)

    async def warm_and_measure(fan_out: Any) -> dict[str, Any]:
        await fan_out()  # warm: the loop's pool opens its connections
        wall, cpu = time.perf_counter(), time.process_time()
        await fan_out()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {"unit": [cpu / samples], "wall": [wall]}

    if loop == "trio":
        import trio

        async def nursery() -> None:
            async with trio.open_nursery() as tasks:
                for _ in range(samples):
                    tasks.start_soon(one)

        out: dict[str, Any] = trio.run(warm_and_measure, nursery)
        return out
    import asyncio

    async def gather() -> None:
        await asyncio.gather(*(one() for _ in range(samples)))

    out = asyncio.run(warm_and_measure(gather))
    return out


def work_batch(side: str, url: str, batches: int) -> dict[str, Any]:
    rows = _arrays()
    build = _official_batch if side == "official" else _ours_batch
    service = _service(side, url)
    training = service.create_lora_training_client(MODEL, rank=8)

    def one() -> None:
        out = training.forward_backward(build(rows), "importance_sampling").result()
        assert len(out.loss_fn_outputs) == DATUMS

    one()
    units, walls = [], []
    for _ in range(batches):
        cpu, wall = _timed(one, 1)
        units.append(cpu)
        walls.append(wall)
    return {"unit": units, "wall": walls}


def worker(argv: list[str]) -> None:
    kind, side, url, *rest = argv
    if kind == "roundtrip":
        out = work_roundtrip(side, url, int(rest[0]))
    elif kind == "sample":
        out = work_sample(side, url, int(rest[0]), rest[1])
    else:
        out = work_batch(side, url, int(rest[0]))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (and the clients' exit hooks): measured already


# ---------------------------------------------------------------------------- the driver


def run_worker(python: str, args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [python, __file__, "--worker", *args], capture_output=True, text=True, timeout=900
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker {args} failed ({done.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", type=int, default=300, help="round trips per contender round")
    parser.add_argument("--samples", type=int, default=2000, help="concurrent samples")
    parser.add_argument("--batches", type=int, default=5, help="64x1000 batches per round")
    parser.add_argument("--only", default="roundtrip,sample,batch")
    args = parser.parse_args()
    kinds = args.only.split(",")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling import free_port, start_server

    official, why = official_python()
    ours = sys.executable
    if official is None:
        print(f"official SDK skipped: {why}")
    contenders: dict[str, list[tuple[str, str, list[str]]]] = {
        "roundtrip": [
            ("official sync", "official", [str(args.ops)]),
            ("ours sync", "ours", [str(args.ops)]),
        ],
        "sample": [
            ("official asyncio", "official", [str(args.samples), "asyncio"]),
            ("ours asyncio", "ours", [str(args.samples), "asyncio"]),
            ("ours trio", "ours", [str(args.samples), "trio"]),
        ],
        "batch": [
            ("official", "official", [str(args.batches)]),
            ("ours", "ours", [str(args.batches)]),
        ],
    }
    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(args.rounds):
            for kind in kinds:
                for name, side, extra in contenders[kind]:
                    if side == "official" and official is None:
                        continue
                    python = official if side == "official" else ours
                    assert python is not None
                    out = run_worker(python, [kind, side, url, *extra])
                    slot = results.setdefault(f"{kind}/{name}", {"unit": [], "wall": []})
                    slot["unit"] += out["unit"]
                    slot["wall"] += out["wall"]
    finally:
        server.terminate()
        server.wait(10)

    med = {key: statistics.median(value["unit"]) for key, value in results.items()}
    print(
        f"loops_async vs {OFFICIAL} (official on Python 3.12, ours on "
        f"{sys.version.split()[0]}), null backend in its own process, {args.rounds} rounds, "
        "client CPU (process_time), medians"
    )
    if "roundtrip" in kinds:
        print(f"  sync forward_backward(...).result() round trip ({args.ops} per round):")
        for name, _, _ in contenders["roundtrip"]:
            if f"roundtrip/{name}" in med:
                print(f"    {name:>17}: {med[f'roundtrip/{name}'] * 1e3:7.3f} ms CPU per op")
        if "roundtrip/official sync" in med:
            ratio = med["roundtrip/official sync"] / med["roundtrip/ours sync"]
            print(f"    official/ours = {ratio:.2f}  (goal >= 2)")
    if "sample" in kinds:
        print(f"  {args.samples} concurrent sample_async (32-token prompt, 16 new tokens):")
        for name, _, _ in contenders["sample"]:
            key = f"sample/{name}"
            if key in med:
                wall = statistics.median(results[key]["wall"])
                print(
                    f"    {name:>17}: {med[key] * 1e3:7.3f} ms CPU per sample   "
                    f"{args.samples / wall:7.0f} samples/s"
                )
        for loop in ("asyncio", "trio"):
            if "sample/official asyncio" in med:
                ratio = med["sample/official asyncio"] / med[f"sample/ours {loop}"]
                print(f"    official(asyncio)/ours({loop}) = {ratio:.2f}  (goal >= 2)")
        ratio = med["sample/ours trio"] / med["sample/ours asyncio"]
        print(f"    ours trio/asyncio = {ratio:.2f}  (goal <= 1.10)")
    if "batch" in kinds:
        print(f"  {DATUMS} x {TOKENS}-token RL batch built, submitted, result decoded:")
        for name, _, _ in contenders["batch"]:
            if f"batch/{name}" in med:
                print(f"    {name:>17}: {med[f'batch/{name}'] * 1e3:7.1f} ms CPU per batch")
        if "batch/official" in med:
            ratio = med["batch/official"] / med["batch/ours"]
            print(f"    official/ours = {ratio:.1f}  (goal >= 10)")


if __name__ == "__main__":
    main()
