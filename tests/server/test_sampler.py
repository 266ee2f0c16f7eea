"""Samplers of the local server over raw HTTP: control plane, generation semantics (seeds,
batching, stops, logprobs equal to the trainer's), routing headers and hot-swap, concurrency,
checkpoint files, and input validation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import numpy as np
import pytest

from loops_async._codec import encode
from loops_async.server import LocalServer
from loops_async.server.sampler import DEFAULT_MAX_TOKENS, MAX_N
from loops_async.tokenizer import load_tokenizer

from .._data import EXAMPLES, chat_tokens, sft_batch
from ._http import MODEL, Trainer, assert_422, datum

EOS = 2
FAST = {"learning_rate": 3e-3}


# --------------------------------------------------------------------------- helpers


def prompt_of(question: str) -> list[int]:
    tokens, n_prompt = chat_tokens(question, "")
    return tokens[:n_prompt]


def body(prompt: list[int], **fields: Any) -> dict[str, Any]:
    """A /sample body as the client sends it."""
    out: dict[str, Any] = {
        "prompt": prompt,
        "n": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    out.update(fields)
    return out


def token_ids(choice: dict[str, Any]) -> list[int]:
    """The completion's ids, read from ``logprobs.tokens`` (``"token_id:<n>"``)."""
    ids = [int(str(t).removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert ids == choice["token_ids"]
    return ids


def create_sampler(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """POST /samplers and wait until its deployment is ACTIVE."""
    if "session_id" not in fields:
        fields["session_id"] = client.post("/v1/loops/sessions").json()["session"]["id"]
    r = client.post("/v1/loops/samplers", json=fields)
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()["sampler"]
    url = f"/v1/models/{info['model_id']}/deployments/{info['deployment_id']}"
    for _ in range(600):
        status = client.get(url).json()["status"]
        if status != "DEPLOYING":
            break
        time.sleep(0.05)
    assert status == "ACTIVE"
    return info


class Sampler:
    """A sampler driven with a sync httpx client."""

    def __init__(self, client: httpx.Client, info: dict[str, Any], run_id: str | None = None):
        self.client = client
        self.info = info
        self.base_url: str = info["base_url"]
        self.headers = {"X-Run-Id": run_id} if run_id else {"X-Sampler-Id": info["id"]}

    def post(self, json: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.base_url}/sample", json=json, headers={**self.headers, **(headers or {})}
        )

    def sample(self, prompt: list[int], headers: dict[str, str] | None = None, **fields: Any):
        r = self.post(body(prompt, **fields), headers)
        assert r.status_code == 200, r.text
        return r

    def choices(self, prompt: list[int], **fields: Any) -> list[dict[str, Any]]:
        return list(self.sample(prompt, **fields).json()["choices"])

    def version(self) -> int:
        r = self.client.get(f"{self.base_url}/trainers_policy_version", headers=self.headers)
        assert r.status_code == 200, r.text
        return int(r.json()["policy_version"])


def forward_logprobs(trainer: Trainer, prompt: list[int], completion: list[int]) -> np.ndarray:
    """The trainer's ``forward`` logprobs of ``completion`` after ``prompt``."""
    full = prompt + completion
    out = trainer.run_op("forward", data=[datum(full[:-1], full[1:])], loss_fn="cross_entropy")
    lps = np.array(out["loss_fn_outputs"][0]["logprobs"]["data"], dtype=np.float64)
    return lps[len(prompt) - 1 :]


def assert_matches_trainer(trainer: Trainer, prompt: list[int], choices: list[dict[str, Any]]):
    for choice in choices:
        ids = token_ids(choice)
        assert ids
        expected = forward_logprobs(trainer, prompt, ids)
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], expected, atol=1e-4)


def train(trainer: Trainer, steps: int) -> None:
    """``steps`` x (forward_backward on the SFT batch + optim_step), pipelined."""
    batch = msgspec.json.decode(encode(list(sft_batch(4))))
    last = ""
    for _ in range(steps):
        trainer.submit("forward_backward", data=batch, loss_fn="cross_entropy")
        last = trainer.submit("optim_step", adam_params=FAST)
    assert trainer.result(last)["status"] == "done"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(torch_server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=torch_server.url, timeout=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def base(client: httpx.Client) -> Sampler:
    """A standalone sampler on the base model."""
    return Sampler(client, create_sampler(client, availability_model="dedicated", base_model=MODEL))


@pytest.fixture(scope="module")
def base_trainer(client: httpx.Client) -> Trainer:
    """A run whose adapter is fresh (B = 0), i.e. the base model, for reference logprobs."""
    trainer = Trainer(client, lora_rank=4, seed=3)
    trainer.init()
    return trainer


# --------------------------------------------------------------------------- control plane


def test_control_plane(null_server: LocalServer) -> None:
    with httpx.Client(base_url=null_server.url, timeout=30.0) as c:
        trainer = Trainer(c)
        trainer.init()
        paired = create_sampler(c, session_id=trainer.session_id, run_id=trainer.id)
        assert paired["base_url"] == f"{null_server.url}/samplers/{paired['id']}"
        assert paired["base_model"] == MODEL
        assert paired["model_id"]
        assert paired["deployment_id"]
        assert paired["created_at"]
        again = c.post(
            "/v1/teams/local/loops/samplers",
            json={"session_id": trainer.session_id, "run_id": trainer.id, "num_replicas": 1},
        )
        assert again.json()["sampler"] == paired, "one paired sampler per run"
        standalone = create_sampler(c, availability_model="dedicated", base_model=MODEL)
        assert standalone["id"] != paired["id"]
        dep = c.get(f"/v1/models/{paired['model_id']}/deployments/nope")
        assert dep.status_code == 404
        assert "detail" in dep.json()

        path = trainer.run_op("save_weights_for_sampler", name="s1", bump_version=False)["path"]
        from_path = create_sampler(c, availability_model="dedicated", model_path=path)
        assert from_path["base_model"] == MODEL
        models = c.get(f"{from_path['base_url']}/v1/models").json()["data"]
        assert models == [{"id": MODEL, "parent": None}, {"id": path, "parent": MODEL}]

        session = trainer.session_id
        for bad, needle in [
            ({"session_id": "nope", "base_model": MODEL}, "session_id"),
            ({"session_id": session, "run_id": "run-nope"}, "run_id"),
            ({"session_id": session}, "base_model"),
            ({"session_id": session, "base_model": "no/such-model"}, "base_model"),
            ({"session_id": session, "model_path": "/etc/passwd"}, "model_path"),
            ({"session_id": session, "model_path": path + "x"}, "model_path"),
            ({"session_id": session, "base_model": MODEL, "max_seq_length": 0}, "max_seq_length"),
            ({"session_id": session, "base_model": MODEL, "num_replicas": 0}, "num_replicas"),
            ({"session_id": session, "run_id": trainer.id, "base_model": "x"}, "base_model"),
            ({"session_id": session, "base_model": MODEL, "model_path": path[:-1]}, "model_path"),
            ({"session_id": 5}, "session_id"),
        ]:
            assert_422(c.post("/v1/loops/samplers", json=bad), needle)
        assert c.post("/v1/teams/other/loops/samplers", json={}).status_code == 404
        wake = c.post(f"{paired['base_url']}/wake")
        assert wake.status_code == 200
        assert c.get(f"{paired['base_url']}/health").json()["status"] == "ok"
        assert c.get(f"{null_server.url}/samplers/nope/health").status_code == 404


def test_null_sampler_answers_right_shapes(null_server: LocalServer) -> None:
    with httpx.Client(base_url=null_server.url, timeout=30.0) as c:
        sampler = Sampler(c, create_sampler(c, availability_model="x", base_model=MODEL))
        r = sampler.sample([1, 2, 3], n=3, max_tokens=5, prompt_logprobs=0)
        assert r.headers["x-trainers-policy-version"] == "0"
        choices = r.json()["choices"]
        assert len(choices) == 3
        for choice in choices:
            assert len(token_ids(choice)) == 5
            assert choice["logprobs"]["token_logprobs"] == [0.0] * 5
            assert choice["finish_reason"] == "length"
            assert choice["prompt_logprobs"][0] is None
            assert len(choice["prompt_logprobs"]) == 3
        default = sampler.choices([1, 2, 3])[0]
        assert len(default["token_ids"]) == DEFAULT_MAX_TOKENS
        assert_422(sampler.post(body([])), "prompt")


# --------------------------------------------------------------------------- logprobs, publish


def test_logprobs_match_the_trainer_and_publish_hot_swaps(client: httpx.Client) -> None:
    trainer = Trainer(client, lora_rank=8, seed=11)
    trainer.init()
    sampler = Sampler(
        client, create_sampler(client, session_id=trainer.session_id, run_id=trainer.id), trainer.id
    )
    prompt = prompt_of("What is 12+7?")
    assert sampler.version() == 0
    r = sampler.sample(prompt, n=3, max_tokens=8, seed=5)
    assert r.headers["x-trainers-policy-version"] == "0"
    assert_matches_trainer(trainer, prompt, r.json()["choices"])

    train(trainer, 20)
    # Trained but not published: the sampler still serves version 0 (the base model).
    assert sampler.version() == 0
    assert sampler.sample(prompt, max_tokens=2).headers["x-trainers-policy-version"] == "0"
    published = trainer.run_op("save_weights_for_sampler", name="v20", bump_version=True)
    assert published["version"] == 20
    assert sampler.version() == 20
    r = sampler.sample(prompt, n=3, max_tokens=8, seed=5)
    assert r.headers["x-trainers-policy-version"] == "20"
    assert_matches_trainer(trainer, prompt, r.json()["choices"])
    models = client.get(f"{sampler.base_url}/v1/models").json()["data"]
    assert {"id": published["path"], "parent": MODEL} in models

    # The trained adapter answers the training examples greedily and stops at EOS.
    tok = load_tokenizer(MODEL)
    for question, answer in EXAMPLES[:4]:
        choice = sampler.choices(prompt_of(question), temperature=0.0, max_tokens=8)[0]
        ids = token_ids(choice)
        assert ids[-1] == EOS
        assert choice["finish_reason"] == "stop"
        assert "stop_reason" not in choice
        assert choice["text"] == answer == tok.decode(ids[:-1])

    # A mismatched X-Run-Id is refused.
    r = sampler.post(body(prompt), {"X-Run-Id": "run-other"})
    assert_422(r, "X-Run-Id")


def test_prompt_logprobs(base: Sampler, base_trainer: Trainer) -> None:
    prompt = prompt_of("Reverse the word dog.")
    choice = base.choices(prompt, max_tokens=1, prompt_logprobs=3)[0]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(prompt)
    assert plp[0] is None
    expected = forward_logprobs(base_trainer, prompt[:1], prompt[1:])
    tok = load_tokenizer(MODEL)
    for i, entry in enumerate(plp[1:], start=1):
        actual = entry[str(prompt[i])]
        assert actual["logprob"] == pytest.approx(expected[i - 1], abs=1e-4)
        assert actual["decoded_token"] == tok.decode([prompt[i]])
        top = sorted(
            (v for k, v in entry.items() if k != str(prompt[i]) or v["rank"] <= 3),
            key=lambda v: v["rank"],
        )
        assert [v["rank"] for v in top][:3] == [1, 2, 3]
        values = [v["logprob"] for v in top[:3]]
        assert values == sorted(values, reverse=True)
        assert actual["logprob"] <= values[0] + 1e-6
        assert actual["rank"] >= 1
        assert len(entry) <= 4
    only_actual = base.choices(prompt, max_tokens=1, prompt_logprobs=0)[0]["prompt_logprobs"]
    assert [list(e) for e in only_actual[1:]] == [[str(t)] for t in prompt[1:]]


# --------------------------------------------------------------------------- routing headers


def test_routing_headers(client: httpx.Client) -> None:
    trainer = Trainer(client, lora_rank=8, seed=21)
    trainer.init()
    sampler = Sampler(
        client, create_sampler(client, session_id=trainer.session_id, run_id=trainer.id), trainer.id
    )
    prompt = prompt_of("What is 8+5?")

    def served(headers: dict[str, str]) -> tuple[str, list[int], list[float]]:
        r = sampler.sample(prompt, headers, temperature=0.0, max_tokens=6)
        choice = r.json()["choices"][0]
        return (
            r.headers["x-trainers-policy-version"],
            token_ids(choice),
            choice["logprobs"]["token_logprobs"],
        )

    v0 = trainer.run_op("save_weights_for_sampler", name="v0", bump_version=True)["path"]
    assert served({}) == served({"X-Checkpoint-Path": v0})
    train(trainer, 3)
    p3 = trainer.run_op("save_weights_for_sampler", name="v3", bump_version=True)["path"]
    w3 = trainer.run_op("save_state", name="w3")["path"]
    at3 = served({})
    assert at3[0] == "3"

    # The floor: met, then behind (408, the client retries).
    assert served({"X-Min-Policy-Version": "3"}) == at3
    behind = sampler.post(body(prompt), {"X-Min-Policy-Version": "4"})
    assert behind.status_code == 408
    assert behind.headers["x-trainers-policy-version"] == "3"
    assert "detail" in behind.json()

    train(trainer, 2)
    p5 = trainer.run_op("save_weights_for_sampler", name="v5", bump_version=True)["path"]
    at5 = served({})
    assert at5[0] == "5"
    # Saving without bump_version publishes nothing: the sampler keeps serving version 5.
    train(trainer, 1)
    trainer.run_op("save_weights_for_sampler", name="quiet", bump_version=False)
    assert served({}) == at5
    assert at5 != at3
    assert sampler.version() == 5

    # A checkpoint path pins that adapter (sampler or trainer checkpoint), with its version.
    assert served({"X-Checkpoint-Path": p3}) == at3
    assert served({"X-Checkpoint-Path": w3}) == at3
    assert served({"X-Checkpoint-Path": v0})[0] == "0"
    # Both headers: the checkpoint until the live adapter reaches the floor, never a 408.
    assert served({"X-Checkpoint-Path": p3, "X-Min-Policy-Version": "6"}) == at3
    assert served({"X-Checkpoint-Path": p3, "X-Min-Policy-Version": "5"}) == at5
    assert served({"X-Checkpoint-Path": p5}) == at5

    # Another run's checkpoint on the same base model works too; unknown ones are a 422.
    for bad in (p3 + "-nope", "bt://loops:run-nope/weights/x", "s3://bucket/x", "../../etc"):
        assert_422(sampler.post(body(prompt), {"X-Checkpoint-Path": bad}), "X-Checkpoint-Path")
    for bad in ("-1", "x", "1.5", "1_0", "0x1"):
        r = sampler.post(body(prompt), {"X-Min-Policy-Version": bad})
        assert_422(r, "X-Min-Policy-Version")

    # A standalone sampler on the base model can pin this run's checkpoint.
    other = Sampler(client, create_sampler(client, availability_model="d", base_model=MODEL))
    r = other.sample(prompt, {"X-Checkpoint-Path": p5}, temperature=0.0, max_tokens=6)
    assert r.headers["x-trainers-policy-version"] == "5"
    assert token_ids(r.json()["choices"][0]) == at5[1]


# --------------------------------------------------------------------------- seeds, batching


def test_seeds_and_greedy(base: Sampler) -> None:
    prompt = prompt_of("Say hello.")

    def ids(**fields: Any) -> list[list[int]]:
        fields.setdefault("max_tokens", 12)
        return [token_ids(c) for c in base.choices(prompt, **fields)]

    assert ids(temperature=0.0) == ids(temperature=0.0)
    assert ids(temperature=0.0, seed=1) == ids(temperature=0.0, seed=2)
    assert ids(seed=7) == ids(seed=7)
    assert ids(seed=7) != ids(seed=8)
    four = ids(seed=7, n=4)
    assert len({tuple(c) for c in four}) == 4, "the n completions are distinct draws"
    assert four[0] == ids(seed=7)[0], "completion i of a seeded request does not depend on n"
    assert ids(seed=7, top_k=1) == ids(temperature=0.0), "top_k=1 is greedy"
    assert ids(seed=3, top_p=1e-6) == ids(temperature=0.0), "a tiny nucleus is greedy"
    assert ids(seed=3, temperature=1e-7) == ids(temperature=0.0)
    few = ids(seed=9, n=16, top_k=2, max_tokens=1)
    greedy_top2 = base.choices(prompt, temperature=0.0, max_tokens=1, logprobs=2)[0]
    allowed = {int(k.removeprefix("token_id:")) for k in greedy_top2["logprobs"]["top_logprobs"][0]}
    assert {c[0] for c in few} <= allowed


@pytest.mark.anyio
async def test_batching_does_not_change_a_seeded_result(
    anyio_backend: str, torch_server: LocalServer, base: Sampler
) -> None:
    prompt = prompt_of("What is 30+45?")
    request = body(prompt, seed=1234, max_tokens=16)
    workers = torch_server.state.samplers.workers
    async with httpx.AsyncClient(timeout=120.0) as c:
        url = f"{base.base_url}/sample"
        alone = (await c.post(url, json=request)).json()["choices"]
        batches_before = sum(w.batches for w in workers.values())
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            if i == 10:
                results[i] = (await c.post(url, json=request)).json()["choices"]
                return
            other = body(prompt_of(EXAMPLES[i % 8][0]), seed=i, n=1 + i % 3, max_tokens=4 + i)
            r = await c.post(url, json=other)
            assert r.status_code == 200, r.text

        async with anyio.create_task_group() as tg:
            for i in range(21):
                tg.start_soon(one, i)
        assert sum(w.batches for w in workers.values()) - batches_before < 21, "some batching"
    # Identical tokens; logprobs equal up to float rounding (batch shapes change the kernels).
    assert [c["token_ids"] for c in results[10]] == [c["token_ids"] for c in alone]
    assert [c["text"] for c in results[10]] == [c["text"] for c in alone]
    np.testing.assert_allclose(
        results[10][0]["logprobs"]["token_logprobs"],
        alone[0]["logprobs"]["token_logprobs"],
        atol=1e-5,
    )


@pytest.mark.anyio
async def test_a_thousand_concurrent_requests(
    anyio_backend: str, base: Sampler, capsys: pytest.CaptureFixture[str]
) -> None:
    """1000 requests in flight at once, all answered. They go through 10 clients of 100
    connections: httpcore assigns queued requests to connections in O(queued x connections)
    Python work per event, so a single pool of 1000 spends ~6 s of CPU on bookkeeping alone
    (and, in this process, starves the server's engine thread of the GIL)."""
    prompts = [prompt_of(q) for q, _ in EXAMPLES]
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    clients = [httpx.AsyncClient(timeout=120.0, limits=limits) for _ in range(10)]
    url = f"{base.base_url}/sample"

    async def one(i: int) -> None:
        r = await clients[i % 10].post(url, json=body(prompts[i % 8], seed=i, max_tokens=4))
        statuses.append(r.status_code)
        assert 1 <= len(r.json()["choices"][0]["token_ids"]) <= 4

    try:
        start = time.perf_counter()
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(one, i)
        elapsed = time.perf_counter() - start
    finally:
        for c in clients:
            await c.aclose()
    assert statuses == [200] * 1000
    with capsys.disabled():
        print(f"\n1000 concurrent /sample requests ({anyio_backend}): {elapsed:.2f} s")
    assert elapsed < 60


# --------------------------------------------------------------------------- stopping


def test_stop_conditions(base: Sampler) -> None:
    tok = load_tokenizer(MODEL)
    prompt = prompt_of("Name a color.")
    free = base.choices(prompt, temperature=0.0, max_tokens=12)[0]
    ids = token_ids(free)
    assert free["finish_reason"] == "length"
    assert len(ids) == 12
    assert free["text"] == tok.decode(ids, skip_special_tokens=True)
    assert "stop_reason" not in free

    # max_tokens
    short = base.choices(prompt, temperature=0.0, max_tokens=3)[0]
    assert token_ids(short) == ids[:3]
    assert short["finish_reason"] == "length"

    # stop_token_ids: the token is kept in the ids, its text is not in the text.
    stop_id = ids[4]
    k = ids.index(stop_id) + 1
    out = base.choices(prompt, temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])[0]
    assert token_ids(out) == ids[:k]
    assert out["finish_reason"] == "stop"
    assert out["stop_reason"] == stop_id
    assert out["text"] == tok.decode(ids[: k - 1], skip_special_tokens=True)

    # stop strings: the text is cut before the stop string; tokens run up to the one that
    # completed it.
    text = free["text"]
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if text[i : i + 2].strip() == text[i : i + 2]
    )
    cut = text.index(stop)
    k = next(j for j in range(1, 13) if stop in tok.decode(ids[:j], skip_special_tokens=True))
    for stops in (stop, [stop], ["\x00never", stop]):
        out = base.choices(prompt, temperature=0.0, max_tokens=12, stop=stops)[0]
        assert out["finish_reason"] == "stop"
        assert out["stop_reason"] == stop
        assert out["text"] == text[:cut]
        assert token_ids(out) == ids[:k]

    # A stop string that never appears changes nothing.
    out = base.choices(prompt, temperature=0.0, max_tokens=12, stop=["\x00never"])[0]
    assert token_ids(out) == ids
    assert out["finish_reason"] == "length"

    # Defaults: max_tokens absent = min(256, context - prompt); return_tokens_as_token_ids
    # false = token texts.
    r = base.post({"prompt": prompt, "temperature": 0.0, "stop_token_ids": [ids[0]]})
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == ids[:1]
    assert choice["logprobs"]["tokens"] == [tok.decode([ids[0]])]


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_422_and_the_sampler_keeps_serving(base: Sampler) -> None:
    prompt = [1, 3, 40]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 5000]}, "prompt[1]"),
        ({"prompt": [-1]}, "prompt[0]"),
        ({"prompt": [1] * 1024}, "prompt"),
        ({"prompt": "hello"}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"n": "2"}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1022}, "max_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop[0]"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [1024]}, "stop_token_ids[0]"),
        ({"seed": 2**64}, "seed"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs"),
        ({"include_routed_experts": True}, "include_routed_experts"),
        ({"prompt": [], "model_input_chunks": [{"type": "image"}]}, "model_input_chunks"),
        ({"stream": True}, "stream"),
    ]
    for fields, needle in cases:
        assert_422(base.post({**body(prompt), **fields}), needle)
    r = base.client.post(
        f"{base.base_url}/sample",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert_422(r, "JSON")
    assert_422(base.post(body(prompt), {"X-Sampler-Id": "sampler-other"}), "X-Sampler-Id")
    assert base.client.post(f"{base.base_url}x/sample", json=body(prompt)).status_code == 404
    ok = base.sample(prompt, max_tokens=1021, temperature=0.0, stop_token_ids=list(range(1024)))
    assert ok.json()["choices"][0]["finish_reason"] == "stop"
    assert base.client.get(f"{base.base_url}/health").status_code == 200
    assert base.sample(prompt, max_tokens=2).status_code == 200


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_files_listing_download_and_validate(
    client: httpx.Client, torch_server: LocalServer
) -> None:
    trainer = Trainer(client, lora_rank=4, seed=5)
    trainer.init()
    train(trainer, 1)
    weights = trainer.run_op("save_state", name="w1")["path"]
    published = trainer.run_op("save_weights_for_sampler", name="s1", bump_version=False)["path"]
    listed = client.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
    by_target = {c["target"]: c for c in listed["checkpoints"]}
    assert by_target["trainer"]["checkpoint_type"] == "training"
    assert by_target["sampler"]["checkpoint_type"] == "sampler"
    assert by_target["trainer"]["lora_adapter_config"] == {"r": 4}

    for checkpoint, uri in ((by_target["trainer"], weights), (by_target["sampler"], published)):
        cid = checkpoint["id"]
        assert client.get(f"/v1/loops/checkpoints/{cid}/source").json() == {
            "source": {"kind": "s3"}
        }
        files = client.get(f"/v1/loops/checkpoints/{cid}/files").json()
        assert files["next_page_token"] is None
        assert files["total_count"] == len(files["presigned_urls"])
        names = [f["relative_file_name"] for f in files["presigned_urls"]]
        assert "adapter_model.safetensors" in names
        assert "adapter_config.json" in names
        assert ("optimizer.safetensors" in names) == (checkpoint["target"] == "trainer")
        for f in files["presigned_urls"]:
            assert f["url"].startswith(f"{torch_server.url}/files/")
            assert f["node_rank"] == 0
            assert f["last_modified"]
            with httpx.Client() as plain:  # no API key, no base URL: a presigned URL
                r = plain.get(f["url"])
            assert r.status_code == 200
            assert len(r.content) == f["size_bytes"]
            kind = "weights" if checkpoint["target"] == "trainer" else "sampler_weights"
            assert uri.endswith(f"/{kind}/{checkpoint['checkpoint_id']}")
            on_disk: Path = torch_server.data_dir / "runs" / trainer.id / kind
            on_disk = on_disk / checkpoint["checkpoint_id"] / f["relative_file_name"]
            assert r.content == on_disk.read_bytes()
        # Paging one file at a time gives the same files.
        token: str | None = "0"
        paged: list[str] = []
        while token is not None:
            page = client.get(
                f"/v1/loops/checkpoints/{cid}/files", params={"page_size": 1, "page_token": token}
            ).json()
            paged += [f["relative_file_name"] for f in page["presigned_urls"]]
            token = page["next_page_token"]
        assert paged == names
        for params, needle in (
            ({"page_size": 0}, "page_size"),
            ({"page_size": 1001}, "page_size"),
            ({"page_token": "x"}, "page_token"),
            ({"page_token": -1}, "page_token"),
        ):
            assert_422(client.get(f"/v1/loops/checkpoints/{cid}/files", params=params), needle)
        ok = client.post(
            "/v1/loops/checkpoints/validate", json={"checkpoint_path": uri, "run_id": trainer.id}
        )
        assert ok.status_code == 200
        assert ok.json()["valid"] is True
    assert client.get("/v1/loops/checkpoints/ckpt-nope/files").status_code == 404
    assert client.get("/v1/loops/checkpoints/ckpt-nope/source").status_code == 404
    for bad, needle in (
        ({"checkpoint_path": weights + "x", "run_id": trainer.id}, "checkpoint_path"),
        ({"checkpoint_path": "/etc/passwd", "run_id": None}, "checkpoint_path"),
        ({"checkpoint_path": weights, "run_id": "run-nope"}, "run_id"),
        ({"run_id": trainer.id}, "checkpoint_path"),
    ):
        assert_422(client.post("/v1/loops/checkpoints/validate", json=bad), needle)


def test_file_bytes_equal_disk_and_links_cannot_escape() -> None:
    with (
        LocalServer(backend="null", api_key="k3y") as srv,
        httpx.Client(base_url=srv.url, timeout=30.0, headers={"Authorization": "Api-Key k3y"}) as c,
    ):
        trainer = Trainer(c, lora_rank=4)
        trainer.init()
        trainer.run_op("save_state", name="w")
        record = c.get("/v1/loops/checkpoints", params={"run_id": trainer.id}).json()
        cid = record["checkpoints"][0]["id"]
        assert httpx.get(f"{srv.url}/v1/loops/checkpoints/{cid}/files").status_code == 401
        files = c.get(f"/v1/loops/checkpoints/{cid}/files").json()["presigned_urls"]
        directory = srv.data_dir / "runs" / trainer.id / "weights" / "w"
        on_disk = sorted(p.name for p in directory.iterdir() if p.name != "checkpoint.json")
        assert sorted(f["relative_file_name"] for f in files) == on_disk
        for f in files:
            r = httpx.get(f["url"])  # presigned: no API key needed
            assert r.status_code == 200
            assert r.content == (directory / f["relative_file_name"]).read_bytes()
        url = files[0]["url"]
        token = url.rsplit("/", 1)[1]
        payload, sig = token.split(".")
        flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
        (srv.data_dir / "secret.txt").write_text("secret")
        for path in (
            f"/files/{flipped}.{sig}",
            f"/files/{payload}.{sig[:-2]}",
            f"/files/{payload}",
            "/files/..%2F..%2Fsecret.txt",
            "/files/%2e%2e/%2e%2e/secret.txt",
            "/files/..",
            f"/files/{token}/../../secret.txt",
            "/files/",
        ):
            # Sent as is (httpx would resolve dot segments); 401 = a normalised path, no file.
            raw = httpx.URL(srv.url).copy_with(raw_path=path.encode())
            r = httpx.get(raw)
            assert r.status_code in (401, 404, 422), (path, r.status_code)
            assert r.content != b"secret"
        # A checkpoint saved again under the same name: the old links die.
        trainer.run_op("save_state", name="w")
        assert httpx.get(url).status_code == 404
        assert c.get(f"/v1/loops/checkpoints/{cid}/files").status_code == 404


# ------------------------------------------------------------------------ trainer from checkpoint


def test_trainer_from_another_runs_weights(client: httpx.Client) -> None:
    source = Trainer(client, lora_rank=4, seed=8)
    source.init()
    train(source, 2)
    path = source.run_op("save_state", name="src")["path"]
    found = client.get("/v1/loops/checkpoints", params={"checkpoint_path": path}).json()
    assert found["checkpoints"][0]["lora_adapter_config"]["r"] == 4
    assert found["checkpoints"][0]["target"] == "trainer"
    copy = Trainer(client, lora_rank=4, path=path)
    copy.init()
    tokens = prompt_of("What is 21+21?")
    np.testing.assert_allclose(
        forward_logprobs(copy, tokens[:2], tokens[2:]),
        forward_logprobs(source, tokens[:2], tokens[2:]),
        atol=1e-6,
    )


def test_a_model_that_fails_to_load(client: httpx.Client, tmp_path: Path) -> None:
    from loops_async.server.models import BUILTIN_MODELS

    broken = tmp_path / "broken-model"
    broken.mkdir()
    config = dict(BUILTIN_MODELS[MODEL].config)
    (broken / "config.json").write_text(msgspec.json.encode(config).decode())  # no weights
    session = client.post("/v1/loops/sessions").json()["session"]["id"]
    r = client.post(
        "/v1/loops/samplers",
        json={"session_id": session, "availability_model": "dedicated", "base_model": str(broken)},
    )
    assert r.status_code == 200, r.text
    info = r.json()["sampler"]
    url = f"/v1/models/{info['model_id']}/deployments/{info['deployment_id']}"
    for _ in range(600):
        status = client.get(url).json()
        if status["status"] != "DEPLOYING":
            break
        time.sleep(0.05)
    assert status["status"] == "DEPLOY_FAILED"
    assert status["detail"]
    sampler = Sampler(client, info)
    assert sampler.post(body([1, 2])).status_code == 503
    assert client.get(f"{sampler.base_url}/health").status_code == 503
