"""Server memory and responsiveness while it decodes two large ``forward_backward`` bodies.

The local server runs in its own process (``loops-async serve --backend null``, body cap raised
to fit) on a base model directory with a 151,936-token vocabulary and a 32,768-token context
(the null backend reads only ``config.json``). The script:

1. measures the server's idle RSS after a warm-up (one small ``forward_backward``), and resets
   its peak (``VmHWM``, via ``/proc/<pid>/clear_refs`` where allowed);
2. sends two ~46 MiB ``ppo`` bodies at once (64 datums of ~7,000 tokens each, a quarter of
   them prompt with ``target_tokens`` -100, ``logprobs`` null and ``advantages`` 0; encoded
   by the client's own encoder), waits for both results, while a third thread sends
   ``GET /`` every 50 ms and records how long each takes;
3. prints the peak RSS over idle (``VmHWM`` - idle), the RSS still held a second after the
   results came back, and the small requests' latencies.

``--mode both`` (the default) runs it twice, on a fresh server each time: ``before`` is the
server as it was before numpy decoding (patched back in the child process: bodies decoded by
``msgspec`` into lists of Python objects, every body fingerprint reformatted into a second
copy, every datum's validation arrays held at once) and ``after`` the server as it is
(:mod:`loops_async.server.decode`). Goal: ``after`` peaks at most 250 MB over idle and no
small request takes over 0.5 s.

    python benchmarks/server_memory.py [--mode both|before|after] [--mib 46] [--datums 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loops_async import Datum, ModelInput, TensorData
from loops_async._codec import encode
from loops_async._wire import ForwardBackwardRequest

VOCAB, CONTEXT = 151_936, 32_768
MB = 1e6

_BOOT = """
import sys
from loops_async.cli import main
if sys.argv[1] == "before":
    import hashlib
    import msgspec
    import loops_async.server.null_backend as null_backend
    import loops_async.server.trainer_routes as routes
    from loops_async.server.http import _decode
    from loops_async.server.validation import prepare_forward_request

    def body_fingerprint(body):  # always reformatted: a second copy of the body
        try:
            canonical = msgspec.json.format(body, indent=-1)
        except (msgspec.MsgspecError, RecursionError, ValueError):
            canonical = bytes(body)
        return hashlib.blake2b(canonical, digest_size=16).hexdigest()

    def validate_forward_request(req, spec):  # every datum's arrays held at once
        prepare_forward_request(req, spec)

    routes.decode_request = _decode  # lists of Python objects
    routes.body_fingerprint = body_fingerprint
    routes.validate_forward_request = validate_forward_request
    null_backend.validate_forward_request = validate_forward_request
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in bytes (Linux ``/proc``)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def rss(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        return proc_status(pid)["VmRSS"]
    return int(psutil.Process(pid).memory_info().rss)


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def make_body(run_id: str, model: str, seq_id: int, datums: int, tokens: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(datums):
        ids = rng.integers(0, VOCAB, tokens, dtype=np.int64)
        prompt = tokens // 4
        targets = np.empty(tokens, dtype=np.int64)
        targets[:-1] = ids[1:]
        targets[-1] = -100
        targets[:prompt] = -100
        logprobs = -rng.exponential(1.0, tokens).astype(np.float32)
        logprobs[:prompt] = np.nan  # null on the wire
        advantages = rng.normal(0.0, 1.0, tokens).astype(np.float32)
        advantages[:prompt] = 0.0
        data.append(
            Datum(
                model_input=ModelInput.from_ints(ids),
                loss_fn_inputs={
                    "target_tokens": TensorData.from_numpy(targets),
                    "logprobs": TensorData.from_numpy(logprobs),
                    "advantages": TensorData.from_numpy(advantages),
                },
            )
        )
    req = ForwardBackwardRequest(
        seq_id=seq_id, run_id=run_id, model=model, data=data, loss_fn="ppo"
    )
    return encode(req)


def tokens_for(mib: float, datums: int, run_id: str, model: str) -> int:
    """Tokens per datum that make a body of about ``mib`` MiB."""
    probe = 4096
    size = len(make_body(run_id, model, 1, 2, probe, 0)) / (2 * probe)
    return max(16, min(CONTEXT, int(mib * 2**20 / (datums * size))))


class Server:
    def __init__(self, mode: str, data_dir: Path, max_body: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LOOPS_ASYNC_LOG_LEVEL": "warning",
            "LOOPS_ASYNC_MAX_BODY_BYTES": str(max_body),
            "LOOPS_ASYNC_DATA_DIR": str(data_dir),
        }
        cmd = [sys.executable, "-c", _BOOT, mode, "serve", "--backend", "null"]
        cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("the server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def submit(client: httpx.Client, run: dict[str, Any], op: str, body: bytes) -> str:
    r = client.post(
        f"{run['base_url']}/{op}",
        content=body,
        headers={
            "content-type": "application/json",
            "X-Run-Id": run["id"],
            "Idempotency-Key": uuid.uuid4().hex,
        },
    )
    assert r.status_code == 202, (r.status_code, r.text[:500])
    return str(r.json()["operation_id"])


def wait_result(client: httpx.Client, run: dict[str, Any], op_id: str) -> None:
    while True:
        r = client.get(f"{run['base_url']}/operations/{op_id}", headers={"X-Run-Id": run["id"]})
        if r.status_code == 408:
            continue
        assert r.status_code == 200, (r.status_code, r.text[:500])
        head = r.content[:64]
        assert b'"status":"done"' in head, r.text[:500]
        return


def measure(mode: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(mode, Path(data_dir), max_body=64 * 2**20)
        try:
            return _measure(server, args, str(model_dir))
        finally:
            server.close()


def _measure(server: Server, args: argparse.Namespace, model: str) -> dict[str, Any]:
    pid = server.proc.pid
    client = httpx.Client(base_url=server.url, timeout=120)
    session = client.post("/v1/loops/sessions").json()["session"]["id"]
    r = client.post(
        "/v1/loops/trainers", json={"session_id": session, "base_model": model, "lora_rank": 8}
    )
    assert r.status_code == 200, r.text
    run: dict[str, Any] = r.json()["run"]
    while client.get(f"{run['base_url']}/health").status_code != 200:
        time.sleep(0.05)
    init = json.dumps(
        {"seq_id": 1, "run_id": run["id"], "model": model, "lora_rank": 8, "base_model": model}
    ).encode()
    wait_result(client, run, submit(client, run, "init_trainer_server", init))

    tokens = tokens_for(args.mib, args.datums, run["id"], model)
    bodies = [
        make_body(run["id"], model, 3 + i, args.datums, tokens, seed=i) for i in range(args.bodies)
    ]
    # Warm up every code path on a small body, then settle.
    small = make_body(run["id"], model, 2, 2, 64, seed=99)
    wait_result(client, run, submit(client, run, "forward_backward", small))
    time.sleep(1.0)
    idle = rss(pid)
    peak_reset = reset_peak(pid)

    latencies: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                start = time.perf_counter()
                c.get("/")
                latencies.append(time.perf_counter() - start)
                stop.wait(args.interval)

    def big(body: bytes, out: list[float]) -> None:
        with httpx.Client(timeout=300) as c:
            start = time.perf_counter()
            op_id = submit(c, run, "forward_backward", body)
            out.append(time.perf_counter() - start)
            wait_result(c, run, op_id)
            out.append(time.perf_counter() - start)

    pinger = threading.Thread(target=ping)
    pinger.start()
    time.sleep(0.3)
    timings: list[list[float]] = [[] for _ in bodies]
    workers = [
        threading.Thread(target=big, args=(b, t)) for b, t in zip(bodies, timings, strict=True)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(1.0)
    stop.set()
    pinger.join()
    status = proc_status(pid)
    held = rss(pid) - idle
    client.close()
    assert all(len(t) == 2 for t in timings), "a big request failed"
    return {
        "body_mib": [len(b) / 2**20 for b in bodies],
        "datums": args.datums,
        "tokens": tokens,
        "idle": idle,
        "peak": status["VmHWM"] - idle,
        "peak_reset": peak_reset,
        "held": held,
        "accepted": [t[0] for t in timings],
        "done": [t[1] for t in timings],
        "latencies": latencies,
    }


def report(mode: str, res: dict[str, Any]) -> None:
    lat = sorted(res["latencies"])
    p50 = statistics.median(lat)
    print(
        f"  {mode:>6}: idle RSS {res['idle'] / MB:7.1f} MB | peak over idle "
        f"{res['peak'] / MB:7.1f} MB | held 1 s after {res['held'] / MB:7.1f} MB | "
        f"GET / max {max(lat) * 1e3:7.1f} ms, p50 {p50 * 1e3:5.1f} ms ({len(lat)}) | "
        f"202 after {', '.join(f'{t:.2f}' for t in res['accepted'])} s, "
        f"done after {', '.join(f'{t:.2f}' for t in res['done'])} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=["both", "before", "after"], default="both")
    parser.add_argument("--mib", type=float, default=46.0, help="size of each body (MiB)")
    parser.add_argument("--datums", type=int, default=64)
    parser.add_argument("--bodies", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between GET /")
    args = parser.parse_args()
    modes = ["before", "after"] if args.mode == "both" else [args.mode]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        config = {"model_type": "llama", "vocab_size": VOCAB, "max_position_embeddings": CONTEXT}
        (model_dir / "config.json").write_text(json.dumps(config))
        for mode in modes:
            results[mode] = measure(mode, args, model_dir)
    first = next(iter(results.values()))
    sizes = ", ".join(f"{s:.1f}" for s in first["body_mib"])
    print(
        f"{args.bodies} concurrent forward_backward bodies of {sizes} MiB ({first['datums']} "
        f"datums x {first['tokens']} tokens, ppo), null backend in its own process, "
        f"GET / every {args.interval * 1e3:.0f} ms"
        + ("" if first["peak_reset"] else " (VmHWM could not be reset: peak includes startup)")
    )
    for mode, res in results.items():
        report(mode, res)
    if "after" in results:
        res = results["after"]
        ok = res["peak"] <= 250 * MB and max(res["latencies"]) <= 0.5
        print(
            f"  goal (after: peak <= 250 MB over idle, GET / <= 0.5 s): {'met' if ok else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
