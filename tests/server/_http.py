"""Helpers for driving the local server over raw HTTP in tests."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

MODEL = "loops-local/tiny-chat"


def datum(tokens: list[int], targets: list[int] | None = None) -> dict[str, Any]:
    """A cross-entropy datum as JSON."""
    targets = targets if targets is not None else [*tokens[1:], 0]
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}
        },
    }


class Trainer:
    """One run on a server, driven with a sync httpx client."""

    def __init__(self, client: httpx.Client, *, lora_rank: int = 8, **extra: Any) -> None:
        self.client = client
        session = client.post("/v1/loops/sessions")
        assert session.status_code == 200, session.text
        self.session_id = session.json()["session"]["id"]
        body = {"session_id": self.session_id, "base_model": MODEL, "lora_rank": lora_rank}
        body.update(extra)
        r = client.post("/v1/loops/trainers", json=body)
        assert r.status_code == 200, r.text
        self.run: dict[str, Any] = r.json()["run"]
        self.id: str = self.run["id"]
        self.base_url: str = self.run["base_url"]
        self.lora_rank = lora_rank
        self.seq = 0

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def post(
        self, op: str, body: dict[str, Any], *, key: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {"X-Run-Id": self.id, **kw.pop("headers", {})}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.client.post(self.url(op), json=body, headers=headers, **kw)

    def body(self, seq_id: int | None = None, **fields: Any) -> dict[str, Any]:
        if seq_id is None:
            self.seq += 1
            seq_id = self.seq
        return {"seq_id": seq_id, "run_id": self.id, "model": MODEL, **fields}

    def submit(
        self, op: str, *, key: str | None = None, seq_id: int | None = None, **fields: Any
    ) -> str:
        r = self.post(op, self.body(seq_id, **fields), key=key or uuid.uuid4().hex)
        assert r.status_code == 202, r.text
        data = r.json()
        assert data["schema_version"] == 1
        assert r.headers["location"] == f"/operations/{data['operation_id']}"
        return str(data["operation_id"])

    def poll(self, op_id: str, **kw: Any) -> httpx.Response:
        return self.client.get(self.url(f"operations/{op_id}"), headers={"X-Run-Id": self.id}, **kw)

    def result(self, op_id: str) -> dict[str, Any]:
        """Poll until done (re-polling on 408); returns the 200 envelope."""
        for _ in range(100):
            r = self.poll(op_id)
            if r.status_code == 408:
                continue
            assert r.status_code == 200, r.text
            return dict(r.json())
        raise AssertionError("operation never finished")

    def run_op(self, op: str, **fields: Any) -> dict[str, Any]:
        """Submit and wait; asserts success and returns ``result``."""
        env = self.result(self.submit(op, **fields))
        assert env["status"] == "done", env
        return dict(env["result"])

    def init(self) -> dict[str, Any]:
        return self.run_op("init_trainer_server", lora_rank=self.lora_rank, base_model=MODEL)


def assert_422(r: httpx.Response, *needles: str) -> None:
    """A 422 ValidationError whose detail mentions every needle."""
    assert r.status_code == 422, (r.status_code, r.text)
    body = r.json()
    assert body["error_class"] == "ValidationError", body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
