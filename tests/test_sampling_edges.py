"""SamplingClient protocol edges (PROTOCOL §6) against ``httpx.MockTransport``.

End-to-end sampling against the real local server is in ``test_e2e_sampling.py``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import anyio
import httpx
import msgspec
import pytest

from loops_async import ModelInput, SamplingClient, SamplingParams
from loops_async import errors as E
from loops_async._http import Transport

pytestmark = pytest.mark.anyio

URL = "http://sampler.test/samplers/s1"
PROMPT = ModelInput.from_ints([5, 6, 7])

Handler = Callable[[httpx.Request], httpx.Response]


def answer(
    tokens: list[object],
    logprobs: list[float | None],
    *,
    finish: str = "length",
    version: int | None = 3,
    prompt_logprobs: object = None,
) -> httpx.Response:
    choice: dict[str, object] = {
        "logprobs": {"tokens": tokens, "token_logprobs": logprobs},
        "text": "xyz",
        "finish_reason": finish,
    }
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs
    headers = {} if version is None else {"x-trainers-policy-version": str(version)}
    return httpx.Response(200, json={"choices": [choice, choice]}, headers=headers)


class Script:
    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handlers.pop(0)(request)


def client(script: Script, **headers: str) -> SamplingClient:
    transport = Transport(
        api_key="k", timeout=10, max_connections=10, transport=httpx.MockTransport(script)
    )
    return SamplingClient(
        transport=transport,
        owns_transport=True,
        base_url=URL,
        base_model="loops-local/tiny-chat",
        headers=headers or {"X-Run-Id": "run-1", "X-Min-Policy-Version": "3"},
        ready_timeout=5,
        sample_timeout=5,
    )


async def test_request_body_headers_and_parsing(anyio_backend: str) -> None:
    script = Script(lambda r: answer(["token_id:11", 12], [-0.5, None], finish="stop"))
    async with client(script) as sampler:
        out = await sampler.sample_async(
            PROMPT,
            num_samples=2,
            sampling_params=SamplingParams(
                max_tokens=4, temperature=0.7, top_p=0.9, top_k=5, stop=["\n", 2], seed=9
            ),
        )
    body = msgspec.json.decode(script.requests[0].content)
    assert body == {
        "prompt": [5, 6, 7],
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "max_tokens": 4,
        "seed": 9,
        "top_k": 5,
        "stop": ["\n"],
        "stop_token_ids": [2],
    }
    headers = script.requests[0].headers
    assert headers["x-run-id"] == "run-1"
    assert headers["x-min-policy-version"] == "3"
    assert len(headers["x-baseten-session-id"]) == 32, "a fresh affinity key per call"
    assert headers["idempotency-key"]
    assert headers["authorization"] == "Api-Key k"
    assert "x-sampler-id" not in headers
    assert len(out.sequences) == 2
    seq = out.sequences[0]
    assert seq.tokens == [11, 12]
    assert seq.logprobs is not None
    assert seq.logprobs[0] == -0.5
    assert math.isnan(seq.logprobs[1])
    assert seq.stop_reason == "stop"
    assert seq.text == "xyz"
    assert out.policy_version == 3
    assert out.prompt_logprobs is None


async def test_greedy_defaults_omit_optional_fields(anyio_backend: str) -> None:
    script = Script(lambda r: answer([1], [-1.0]))
    async with client(script) as sampler:
        await sampler.sample_async(PROMPT, sampling_params=SamplingParams(temperature=0.0))
    body = msgspec.json.decode(script.requests[0].content)
    assert body == {
        "prompt": [5, 6, 7],
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }


async def test_version_gate_and_transient_errors_are_retried_with_one_key(
    anyio_backend: str,
) -> None:
    script = Script(
        lambda r: httpx.Response(408, json={"detail": "behind"}),
        lambda r: httpx.Response(502, text="bad gateway"),
        lambda r: answer([1], [-1.0]),
    )
    async with client(script) as sampler:
        out = await sampler.sample_async(PROMPT)
    assert out.sequences[0].tokens == [1]
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(script.requests) == 3
    assert len(keys) == 1


async def test_permanent_rejection_is_not_retried(anyio_backend: str) -> None:
    script = Script(lambda r: httpx.Response(422, json={"detail": "max_tokens: beyond context"}))
    async with client(script) as sampler:
        with pytest.raises(E.UnprocessableEntityError, match="max_tokens"):
            await sampler.sample_async(PROMPT)
    assert len(script.requests) == 1


async def test_read_timeout_is_a_sample_timeout(anyio_backend: str) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with client(Script(slow)) as sampler:
        with pytest.raises(E.SampleTimeoutError) as info:
            await sampler.sample_async(PROMPT)
    assert isinstance(info.value, TimeoutError)


async def test_prompt_logprobs_and_topk(anyio_backend: str) -> None:
    prompt_lps = [
        None,
        {"6": {"logprob": -1.5, "rank": 3}, "9": {"logprob": -0.2, "rank": 1}},
        {
            "token_id:7": {"logprob": -0.1, "rank": 1},
            "token_id:8": {"logprob": -3.0, "rank": 2},
        },
    ]
    script = Script(lambda r: answer([1], [-1.0], prompt_logprobs=prompt_lps))
    async with client(script) as sampler:
        out = await sampler.sample_async(PROMPT, topk_prompt_logprobs=2)
    assert msgspec.json.decode(script.requests[0].content)["prompt_logprobs"] == 2
    assert out.prompt_logprobs == [None, -1.5, -0.1]
    assert out.topk_prompt_logprobs == [None, [(9, -0.2)], [(7, -0.1), (8, -3.0)]]


async def test_compute_logprobs(anyio_backend: str) -> None:
    prompt_lps = [None, {"6": {"logprob": -1.0, "rank": 1}}, {"7": {"logprob": -2.0, "rank": 4}}]
    script = Script(lambda r: answer([1], [-1.0], prompt_logprobs=prompt_lps))
    async with client(script) as sampler:
        assert await sampler.compute_logprobs_async(PROMPT) == [None, -1.0, -2.0]
    body = msgspec.json.decode(script.requests[0].content)
    assert (body["prompt_logprobs"], body["max_tokens"]) == (0, 1)


async def test_echoed_prompt_is_stripped(anyio_backend: str) -> None:
    script = Script(lambda r: answer([5, 6, 7, 40, 41], [-1, -1, -1, -0.5, -0.25]))
    async with client(script) as sampler:
        out = await sampler.sample_async(PROMPT)
    assert out.sequences[0].tokens == [40, 41]
    assert out.sequences[0].logprobs == [-0.5, -0.25]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ModelInput.empty()}, "empty prompt"),
        ({"num_samples": 0}, "num_samples"),
        ({"sampling_params": SamplingParams(temperature=-1)}, "temperature"),
        ({"sampling_params": SamplingParams(top_p=0.0)}, "top_p"),
        ({"sampling_params": SamplingParams(top_p=1.5)}, "top_p"),
        ({"sampling_params": SamplingParams(top_k=0)}, "top_k"),
        ({"sampling_params": SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"topk_prompt_logprobs": 21}, "topk_prompt_logprobs"),
    ],
)
def test_bad_input_raises_before_sending(kwargs: dict[str, object], match: str) -> None:
    script = Script()
    sampler = client(script)
    call: dict[str, object] = {"prompt": PROMPT, **kwargs}
    with pytest.raises(E.ValidationError, match=match):
        sampler.sample(**call)  # type: ignore[arg-type]
    assert script.requests == []
    sampler.close()


def test_sync_sample_and_sync_in_loop_error() -> None:
    script = Script(lambda r: answer([3], [-0.3]))
    sampler = client(script)
    assert sampler.sample(PROMPT).sequences[0].tokens == [3]

    async def inside() -> None:
        with pytest.raises(E.SyncInAsyncContextError, match="sample_async"):
            sampler.sample(PROMPT)

    anyio.run(inside)
    sampler.close()


def test_pickled_copy_keeps_routing_but_not_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "pickle-s3cret-key"
    transport = Transport(
        api_key=secret,
        timeout=10,
        max_connections=10,
        transport=httpx.MockTransport(Script()),
        extra_headers={"authorization": f"Api-Key {secret}", "X-Extra": "1"},
    )
    sampler = SamplingClient(
        transport=transport,
        owns_transport=True,
        base_url=URL,
        base_model="loops-local/tiny-chat",
        headers={"X-Run-Id": "run-9", "X-Checkpoint-Path": "bt://loops:r/x/y"},
        ready_timeout=5,
        sample_timeout=5,
    )
    assert sampler.pickle_api_key is False
    blob = pickle.dumps(sampler)
    assert secret.encode() not in blob
    # The copy takes the key of the environment it is unpickled in.
    monkeypatch.setenv("BASETEN_API_KEY", "env-key")
    copy = pickle.loads(blob)
    assert copy.checkpoint_path == "bt://loops:r/x/y"
    assert copy._headers["X-Run-Id"] == "run-9"
    assert copy._transport._headers["Authorization"] == "Api-Key env-key"
    assert copy._transport._headers["X-Extra"] == "1"
    assert "Api-Key" not in repr(copy)
    assert copy.pickle_api_key is False
    # No key in the environment: no key at all.
    monkeypatch.delenv("BASETEN_API_KEY")
    keyless = pickle.loads(blob)
    assert "Authorization" not in keyless._transport._headers
    # Opting in carries the key (in clear), and the copy carries it on.
    sampler.pickle_api_key = True
    carried_blob = pickle.dumps(sampler)
    assert secret.encode() in carried_blob
    carried = pickle.loads(carried_blob)
    assert carried._transport._headers["Authorization"] == f"Api-Key {secret}"
    assert carried.pickle_api_key is True
    assert secret.encode() in pickle.dumps(carried)
    for c in (copy, keyless, carried, sampler):
        c.close()


def test_a_client_without_a_key_unpickles_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = Transport(
        api_key=None, timeout=10, max_connections=10, transport=httpx.MockTransport(Script())
    )
    sampler = SamplingClient(
        transport=transport,
        owns_transport=True,
        base_url=URL,
        base_model="loops-local/tiny-chat",
        headers={"X-Sampler-Id": "s1"},
        ready_timeout=5,
        sample_timeout=5,
    )
    monkeypatch.setenv("BASETEN_API_KEY", "env-key")
    copy = pickle.loads(pickle.dumps(sampler))
    assert "Authorization" not in copy._transport._headers
    copy.close()
    sampler.close()


# --------------------------------------------------------------------------- shared samplers


def shared_client(script: Script) -> SamplingClient:
    transport = Transport(
        api_key=None, timeout=10, max_connections=10, transport=httpx.MockTransport(script)
    )
    return SamplingClient(
        transport=transport,
        owns_transport=True,
        base_url=URL,
        base_model="loops-local/tiny-chat",
        headers={"X-Sampler-Id": "s1"},
        ready_timeout=5,
        sample_timeout=5,
        shared=True,
        lora="bt://loops:run-1/sampler_weights/v3",
    )


def accepted(request: httpx.Request) -> httpx.Response:
    return httpx.Response(202, json={"operation_id": "op/1", "schema_version": 1})


async def test_shared_sampler_uses_the_operation_protocol(anyio_backend: str) -> None:
    done = {
        "status": "done",
        "result": {
            "choices": [{"logprobs": {"tokens": [4], "token_logprobs": [-0.5]}, "text": "d"}]
        },
    }
    script = Script(
        accepted,
        lambda r: httpx.Response(408, json={"detail": "not yet"}),
        lambda r: httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "0"}),
        lambda r: httpx.Response(200, json=done),
    )
    async with shared_client(script) as sampler:
        out = await sampler.sample_async(PROMPT)
    body = msgspec.json.decode(script.requests[0].content)
    assert body["model"] == "loops-local/tiny-chat"
    assert body["lora"] == "bt://loops:run-1/sampler_weights/v3"
    assert script.requests[1].url.raw_path.endswith(b"/samplers/s1/operations/op%2F1")
    assert all(r.headers["x-sampler-id"] == "s1" for r in script.requests)
    assert out.sequences[0].tokens == [4]
    assert sampler.checkpoint_path == "bt://loops:run-1/sampler_weights/v3"


async def test_shared_sampler_error_and_cancel_on_give_up(anyio_backend: str) -> None:
    failed = {"status": "error", "error": "out of memory", "error_class": "RuntimeError"}
    script = Script(accepted, lambda r: httpx.Response(200, json=failed))
    async with shared_client(script) as sampler:
        with pytest.raises(E.RemoteOpError, match="out of memory"):
            await sampler.sample_async(PROMPT)
    assert not script.requests[-1].url.raw_path.endswith(b"/cancel"), "finished: no cancel"

    async def hold(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(10)
        return httpx.Response(408)

    cancelled: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        cancelled.append(request)
        return httpx.Response(200, json={"operation_id": "op/1", "status": "cancelled"})

    script = Script(accepted, hold, record)  # type: ignore[arg-type]
    async with shared_client(script) as sampler:
        with anyio.move_on_after(0.2):
            await sampler.sample_async(PROMPT)
    assert len(cancelled) == 1
    assert cancelled[0].method == "POST"
