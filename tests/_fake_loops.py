"""An in-process fake of the Loops service for ``httpx.MockTransport``, with fault injection.

It speaks enough of the protocol for the client core's tests (control plane, trainer operations
with idempotency keys, paired samplers, health) and records what ran: every operation and every
sample is executed once per ``Idempotency-Key``, however often the client retries it, so a test
can check that nothing was lost or run twice. Faults (``Faults``) are injected per request, at
random with a seed, before or after the request is processed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx
import msgspec

BASE = "http://loops.test"

FAULT_KINDS = (
    "connect",  # the connection is refused: the request never reached the server
    "read_after",  # the server processed it, then the connection dropped before the answer
    "gzip_after",  # processed, then answered 200 with a corrupt gzip body
    "status_502",  # a proxy burst before processing
    "status_503",  # on routes where 503 means "retry" (control GETs, sampler polls)
    "slow",  # answered after a short pause
)


@dataclass
class Faults:
    """Injects each kind with probability ``rate`` (independently, first match wins)."""

    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def pick(self, request: httpx.Request) -> str | None:
        if self.rate <= 0:
            return None
        path = request.url.path
        for kind in self.kinds:
            if self._random.random() >= self.rate:
                continue
            if kind == "status_503" and not _retries_503(request.method, path):
                continue
            if kind == "slow" and path.endswith("/sample"):
                continue  # samples are slow on their own (see FakeLoops.sample_delay)
            self.injected[kind] += 1
            return kind
        return None


def _retries_503(method: str, path: str) -> bool:
    """Routes whose status table retries 503 (the others treat it as a shutdown)."""
    if method == "GET" and path.startswith("/v1/"):
        return True
    return method == "GET" and path.startswith("/sampler/") and "/operations/" in path


@dataclass
class FakeLoops:
    """The fake service. Call it with a request (an async MockTransport handler)."""

    faults: Faults = field(default_factory=Faults)
    sample_delay: float = 0.0
    sample_gate: anyio.Event | None = None
    """When set, samples wait for it (to hold thousands in flight)."""
    health_status: int = 200
    health_body: Callable[[], httpx.Response] | None = None
    requests: Counter[str] = field(default_factory=Counter)
    executed: Counter[str] = field(default_factory=Counter)
    """Idempotency key -> times the operation or sample actually ran (must stay 1)."""
    ops: dict[str, dict[str, object]] = field(default_factory=dict)
    samples: dict[str, dict[str, object]] = field(default_factory=dict)
    health_checks: int = 0
    on_submit: Callable[[httpx.Request, dict[str, object]], httpx.Response | None] | None = None
    _runs: int = 0
    _steps: Counter[str] = field(default_factory=Counter)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests[_route(request.method, path)] += 1
        fault = self.faults.pick(request)
        if fault == "connect":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        if fault == "status_502":
            return httpx.Response(502, json={"detail": "bad gateway (injected)"})
        if fault == "status_503":
            return httpx.Response(
                503, json={"detail": "unavailable (injected)"}, headers={"Retry-After": "0"}
            )
        if fault == "slow":
            await anyio.sleep(0.02)
        response = await self._handle(request, path)
        if fault == "read_after":
            raise httpx.ReadError("connection reset (injected)", request=request)
        if fault == "gzip_after":
            return httpx.Response(
                200, content=b"\x1f\x8bnot-gzip", headers={"Content-Encoding": "gzip"}
            )
        return response

    # ------------------------------------------------------------------ routes

    async def _handle(self, request: httpx.Request, path: str) -> httpx.Response:
        if path == "/v1/loops/sessions":
            return _json({"session": {"id": "session-1"}})
        if path == "/v1/loops/trainers":
            self._runs += 1
            run = f"run-{self._runs}"
            return _json({"run": {"id": run, "base_model": "m", "base_url": f"{BASE}/t/{run}"}})
        if path == "/v1/loops/samplers":
            body = msgspec.json.decode(request.content)
            run = body.get("run_id") or "base"
            return _json(
                {
                    "sampler": {
                        "id": f"sampler-{run}",
                        "base_url": f"{BASE}/sampler/{run}",
                        "base_model": "m",
                        "model_id": "model-1",
                        "deployment_id": f"dep-{run}",
                    }
                }
            )
        if path == "/v1/loops/capabilities":
            return _json({"supported_models": [{"model_name": "m", "max_context_length": 64}]})
        if path.startswith("/v1/models/"):
            return _json({"status": "ACTIVE"})
        if path.startswith("/t/"):
            return await self._trainer(request, path)
        if path.startswith("/sampler/"):
            return await self._sampler(request, path)
        return httpx.Response(404, json={"detail": f"no route {path}"})

    async def _trainer(self, request: httpx.Request, path: str) -> httpx.Response:
        _, _, run, *rest = path.split("/")
        route = "/".join(rest)
        if route == "health":
            self.health_checks += 1
            if self.health_body is not None:
                return self.health_body()
            return httpx.Response(self.health_status, json={})
        if route.startswith("operations/"):
            op_id = route.removeprefix("operations/")
            op = self.ops.get(op_id)
            if op is None:
                return httpx.Response(404, json={"detail": "unknown operation"})
            return _json({"status": "done", "result": op["result"]})
        key = request.headers["idempotency-key"]
        body = msgspec.json.decode(request.content)
        if key not in self.ops:
            if self.on_submit is not None:
                rejection = self.on_submit(request, body)
                if rejection is not None:
                    return rejection
            self.executed[key] += 1
            self.ops[key] = {"op": route, "body": body, "result": self._run_op(run, route, body)}
        return httpx.Response(202, json={"operation_id": key, "schema_version": 1})

    def _run_op(self, run: str, route: str, body: dict[str, object]) -> dict[str, object]:
        seq = body["seq_id"]
        if route == "init_trainer_server":
            self._steps[run] = 0
            return {"lora_rank": body.get("lora_rank", 4), "step": 0}
        if route == "optim_step":
            self._steps[run] += 1
            return {"metrics": {"step": self._steps[run], "seq": seq}}
        if route in ("forward", "forward_backward"):
            data = body["data"]
            assert isinstance(data, list)
            return {
                "loss": float(seq),  # type: ignore[arg-type]
                "loss_fn_output_type": "cross_entropy",
                "loss_fn_outputs": [
                    {"logprobs": {"data": [-1.0] * 3, "dtype": "float32"}} for _ in data
                ],
                "metrics": {"seq": seq},
            }
        if route == "save_weights_for_sampler":
            return {
                "path": f"bt://loops:{run}/sampler_weights/{body['name']}",
                "version": self._steps[run],
            }
        if route == "save_state":
            return {"path": f"bt://loops:{run}/weights/{body['name']}"}
        return {}

    async def _sampler(self, request: httpx.Request, path: str) -> httpx.Response:
        route = path.rsplit("/", 1)[-1]
        if route == "wake":
            return httpx.Response(202, json={})
        if route == "trainers_policy_version":
            run = path.split("/")[2]
            return _json({"policy_version": self._steps[run]})
        if route != "sample":
            return httpx.Response(404, json={"detail": f"no sampler route {path}"})
        key = request.headers["idempotency-key"]
        body = msgspec.json.decode(request.content)
        if key not in self.samples:
            self.executed[key] += 1
            # The answer echoes the prompt's last token, so a caller can check it got its own.
            self.samples[key] = {"prompt": body["prompt"]}
        if self.sample_gate is not None:
            await self.sample_gate.wait()
        if self.sample_delay:
            await anyio.sleep(self.sample_delay)
        last = body["prompt"][-1]
        choice: dict[str, object] = {
            "logprobs": {"tokens": [last], "token_logprobs": [-0.5]},
            "text": "x",
            "finish_reason": "length",
        }
        if body.get("prompt_logprobs") is not None:
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": -1.0, "rank": 1}} for t in body["prompt"][1:]
            ]
        return httpx.Response(
            200, json={"choices": [choice]}, headers={"x-trainers-policy-version": "0"}
        )


def _route(method: str, path: str) -> str:
    parts = path.split("/")
    if path.startswith("/t/"):
        tail = parts[3] if len(parts) > 3 else ""
        return f"{method} trainer/{tail}"
    if path.startswith("/sampler/"):
        return f"{method} sampler/{parts[-1]}"
    return f"{method} {path}"


def _json(body: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
