"""Property-based fuzzing of every route: any body, any path segment, never a 5xx.

Hypothesis draws bodies (junk JSON, invalid JSON, and the route's own fields filled with
junk) and path segments (unicode, traversal, huge numbers, real ids) for every route of the
local server. Whatever it sends, the server answers below 500 and stays healthy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loops_async.server import LocalServer

MODEL = "loops-local/tiny-chat"
EXAMPLES = int(os.environ.get("LOOPS_FUZZ_EXAMPLES", "25"))
"""Examples per route group; set LOOPS_FUZZ_EXAMPLES higher for a deeper run."""

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
segments = (
    st.text(min_size=1, max_size=24)
    | st.sampled_from(["..", ".", "%2e%2e", "a/../b", "\x00", "~", "run-" + "9" * 40])
    | st.integers(min_value=-(2**64), max_value=2**64).map(str)
)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """The route's own field names, each holding a plausible value or junk."""
    return st.fixed_dictionaries({}, optional={name: s | junk for name, s in fields.items()})


def body_of(value: Any, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    return json.dumps(value, allow_nan=True).encode()


def tensor() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"data": st.lists(st.integers(-5, 70_000) | st.floats(), max_size=6), "dtype": junk},
        optional={"shape": st.lists(st.integers(-3, 10**12), max_size=3)},
    )


DATUM = st.fixed_dictionaries(
    {
        "model_input": st.fixed_dictionaries(
            {
                "chunks": st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["encoded_text", "image", "x"]), "tokens": junk}
                    ),
                    max_size=2,
                )
            }
        ),
        "loss_fn_inputs": st.dictionaries(
            st.sampled_from(["target_tokens", "weights", "logprobs", "advantages", "x"]),
            tensor(),
            max_size=3,
        ),
    }
)
OP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "seq_id": st.integers(-5, 2**64),
    "run_id": junk,
    "model": st.just(MODEL),
    "data": st.lists(DATUM, max_size=3),
    "loss_fn": st.sampled_from(["cross_entropy", "ppo", "dpo", "nope"]),
    "loss_fn_config": junk,
    "adam_params": st.dictionaries(st.sampled_from(["learning_rate", "eps", "beta1"]), scalars),
    "name": segments,
    "path": segments,
    "lora_rank": st.integers(-3, 10**6),
    "bump_version": junk,
}
RAW = st.none() | st.sampled_from(
    [b"", b"{", b"nul", b"[1,2", b'{"a": NaN}', b"\xff\xfe", b"[" * 5000, b'"x"']
)


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, str]]:
    """A server with one session, run, sampler, operation and checkpoint to aim at."""
    with LocalServer(backend="null", poll_hold=0.2, seq_gap_timeout=0.5) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        session = client.post("/v1/loops/sessions", json={}).json()["session"]["id"]
        run = client.post(
            "/v1/loops/trainers",
            json={"session_id": session, "base_model": MODEL, "lora_rank": 4},
        ).json()["run"]
        sampler = client.post(
            "/v1/loops/samplers", json={"session_id": session, "run_id": run["id"]}
        ).json()["sampler"]
        base = run["base_url"].removeprefix(server.url)
        fields = {"run_id": run["id"], "model": MODEL}
        client.post(f"{base}/init_trainer_server", json={"seq_id": 1, "lora_rank": 4, **fields})
        accepted = client.post(
            f"{base}/save_state",
            json={"seq_id": 2, "name": "fuzz", **fields},
            headers={"Idempotency-Key": "k2"},
        ).json()
        client.get(f"{base}/operations/{accepted['operation_id']}")
        checkpoints = client.get("/v1/loops/checkpoints", params={"run_id": run["id"]}).json()
        yield {
            "url": server.url,
            "session": session,
            "run": run["id"],
            "trainer": base,
            "sampler": sampler["base_url"].removeprefix(server.url),
            "sampler_id": sampler["id"],
            "model_id": sampler.get("model_id") or "m",
            "deployment": sampler.get("deployment_id") or "d",
            "op": accepted["operation_id"],
            "checkpoint": checkpoints["checkpoints"][0]["id"]
            if checkpoints["checkpoints"]
            else "c",
        }
        client.close()


def _send(world: dict[str, str], method: str, path: str, content: bytes | None = None) -> None:
    with httpx.Client(base_url=world["url"], timeout=30) as client:
        headers = {"Content-Type": "application/json"} if content is not None else {}
        response = client.request(method, path, content=content, headers=headers)
        assert response.status_code < 500, (method, path, response.status_code, response.text)
        health = client.get(f"{world['trainer']}/health", params={"base_model": MODEL})
        assert health.status_code < 500


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(
    route=st.sampled_from(
        [
            "/v1/loops/sessions",
            "/v1/loops/trainers",
            "/v1/loops/debug/trainers",
            "/v1/loops/samplers",
            "/v1/loops/debug/samplers",
            "/v1/loops/checkpoints/validate",
        ]
    ),
    value=shaped(
        {
            "session_id": segments,
            "base_model": st.sampled_from([MODEL, "/etc", "../../x", ""]) | segments,
            "lora_rank": st.integers(-3, 10**9),
            "run_id": segments,
            "replicas": st.integers(-2, 10**9),
            "availability_model": st.sampled_from(["dedicated", "spot", "x"]),
            "max_seq_len": st.integers(-2, 2**64),
            "seed": st.integers(-(2**70), 2**70),
            "path": segments,
            "model_path": segments,
            "checkpoint_path": segments,
            "scope": st.sampled_from(["serverless", "default", "x"]),
            "num_replicas": st.integers(-2, 10**9),
        }
    ),
    raw=RAW,
)
def test_control_plane_writes(
    world: dict[str, str], route: str, value: Any, raw: bytes | None
) -> None:
    if "session_id" in (value or {}) and value["session_id"] == "real":
        value["session_id"] = world["session"]
    _send(world, "POST", route, body_of(value, raw))


@FUZZ
@given(
    template=st.sampled_from(
        [
            "/v1/loops/deployments/{x}",
            "/v1/loops/checkpoints?run_id={x}",
            "/v1/loops/checkpoints?checkpoint_path={x}",
            "/v1/loops/checkpoints/{x}/source",
            "/v1/loops/checkpoints/{x}/files?page_size={x}&page_token={x}",
            "/v1/models/{x}/deployments/{x}",
            "/runs/{x}/operations/{x}",
            "/runs/{x}/health?base_model={x}",
            "/runs/{x}/policy_version",
            "/samplers/{x}/v1/models",
            "/samplers/{x}/trainers_policy_version",
            "/files/{x}",
            "/v1/teams",
            "/",
        ]
    ),
    segment=segments,
    real=st.booleans(),
)
def test_reads(world: dict[str, str], template: str, segment: str, real: bool) -> None:
    value = quote(segment, safe="")
    if real:  # aim at something that exists, with the junk elsewhere
        for name in ("run", "checkpoint", "op", "sampler_id"):
            template = template.replace("{x}", world[name], 1) if name in template else template
    _send(world, "GET", template.replace("{x}", value))


@FUZZ
@given(
    op=st.sampled_from(
        [
            "forward",
            "forward_backward",
            "optim_step",
            "save_state",
            "save_weights_for_sampler",
            "load_state",
            "load_state_with_optimizer",
            "init_trainer_server",
            "no_such_op",
        ]
    ),
    value=shaped(OP_FIELDS),
    raw=RAW,
    real_run=st.booleans(),
)
def test_trainer_ops(
    world: dict[str, str], op: str, value: Any, raw: bytes | None, real_run: bool
) -> None:
    base = world["trainer"] if real_run else f"/runs/{quote('run-x', safe='')}"
    _send(world, "POST", f"{base}/{op}", body_of(value, raw))


@FUZZ
@given(
    value=shaped(
        {
            "prompt": st.lists(st.integers(-(2**40), 2**40), max_size=8),
            "n": st.integers(-3, 10**6),
            "temperature": st.floats(allow_nan=True, allow_infinity=True),
            "top_p": st.floats(allow_nan=True),
            "top_k": st.integers(-3, 10**9),
            "max_tokens": st.integers(-3, 10**9),
            "logprobs": st.integers(-3, 100),
            "prompt_logprobs": st.integers(-3, 100),
            "stop": junk,
            "stop_token_ids": st.lists(st.integers(-(2**40), 2**40), max_size=4),
            "seed": st.integers(-(2**70), 2**70),
            "model": junk,
            "lora": segments,
        }
    ),
    raw=RAW,
    route=st.sampled_from(["sample", "wake", "operations/x/cancel"]),
)
def test_sampler_writes(world: dict[str, str], value: Any, raw: bytes | None, route: str) -> None:
    if isinstance(value, dict) and isinstance(value.get("max_tokens"), int):
        value["max_tokens"] = min(value["max_tokens"], 8)  # keep null samples small
    if isinstance(value, dict) and isinstance(value.get("n"), int) and value["n"] > 4:
        value["n"] = 4
    _send(world, "POST", f"{world['sampler']}/{route}", body_of(value, raw))


def test_the_server_is_still_healthy(world: dict[str, str]) -> None:
    with httpx.Client(base_url=world["url"], timeout=30) as client:
        assert client.get("/").status_code == 200
        assert not math.isnan(0.0)
