"""Build and encode a large RL ``forward_backward`` request: loops_async vs pydantic + json.

The request: 64 datums x 2048 tokens, each with ``target_tokens`` (int64), ``weights``,
``logprobs`` and ``advantages`` (float32), starting from numpy arrays as an RL loop has them.

- ``loops_async``: ``Datum`` / ``TensorData.from_numpy`` (msgspec structs), then the client's own
  request path (each datum encoded once, sized for chunking on those bytes, spliced into the
  body);
- ``pydantic``: the same shapes as pydantic models (what the official SDK's types are), then
  ``model_dump()`` + ``json.dumps``: once, and — as a client that splits large batches by
  size must — with each datum dumped first to measure it.

Both bodies are checked to decode to the same JSON. Prints the median times and the speed-up
(target >= 10x).

    python benchmarks/encode.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Literal

import msgspec
import numpy as np
from pydantic import BaseModel

from loops_async import Datum, ModelInput, TensorData
from loops_async.training import _ForwardPlan

DATUMS, TOKENS = 64, 2048


class PTensorData(BaseModel):
    data: list[int] | list[float]
    dtype: str
    shape: list[int] | None = None


class PChunk(BaseModel):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]


class PModelInput(BaseModel):
    chunks: list[PChunk]


class PDatum(BaseModel):
    model_input: PModelInput
    loss_fn_inputs: dict[str, PTensorData]
    routed_experts_ref: Any = None


class PRequest(BaseModel):
    seq_id: int
    run_id: str | None
    model: str
    data: list[PDatum]
    loss_fn: str
    loss_fn_config: dict[str, Any] | None = None
    top_k_logprobs: int = 0


def arrays(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "tokens": rng.integers(0, 100_000, TOKENS),
            "target_tokens": rng.integers(0, 100_000, TOKENS),
            "weights": np.ones(TOKENS, dtype=np.float32),
            "logprobs": -rng.random(TOKENS, dtype=np.float32) * 5,
            "advantages": rng.standard_normal(TOKENS, dtype=np.float32),
        }
        for _ in range(DATUMS)
    ]


class _Fields:
    """The few fields the request plan takes from its training client."""

    def _op_fields(self, seq: int) -> dict[str, Any]:
        return {"seq_id": seq, "run_id": "run-1", "model": "some/model"}


def with_loops_async(rows: list[dict[str, np.ndarray]]) -> bytes:
    data = [
        Datum(
            model_input=ModelInput.from_ints(row["tokens"]),
            loss_fn_inputs={
                name: TensorData.from_numpy(row[name])
                for name in ("target_tokens", "weights", "logprobs", "advantages")
            },
        )
        for row in rows
    ]
    plan = _ForwardPlan(_Fields(), data, "ppo", None, 0, limit=1 << 40)  # type: ignore[arg-type]
    (body,) = plan.bodies(7)
    return body


def with_pydantic(rows: list[dict[str, np.ndarray]], *, size_datums: bool = False) -> bytes:
    def tensor(arr: np.ndarray, dtype: str) -> PTensorData:
        return PTensorData(data=arr.tolist(), dtype=dtype, shape=list(arr.shape))

    request = PRequest(
        seq_id=7,
        run_id="run-1",
        model="some/model",
        loss_fn="ppo",
        data=[
            PDatum(
                model_input=PModelInput(chunks=[PChunk(tokens=row["tokens"].tolist())]),
                loss_fn_inputs={
                    "target_tokens": tensor(row["target_tokens"], "int64"),
                    "weights": tensor(row["weights"], "float32"),
                    "logprobs": tensor(row["logprobs"], "float32"),
                    "advantages": tensor(row["advantages"], "float32"),
                },
            )
            for row in rows
        ],
    )
    if size_datums:  # how a client that chunks by size measures each datum first
        sum(len(json.dumps(datum.model_dump())) for datum in request.data)
    return json.dumps(request.model_dump()).encode()


def with_pydantic_sized(rows: list[dict[str, np.ndarray]]) -> bytes:
    return with_pydantic(rows, size_datums=True)


def same_request(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """The same request: float32 values may be written with fewer digits (the shortest text
    that reads back as the same float32), so tensors are compared as arrays of their dtype."""
    ours_data, theirs_data = ours.pop("data"), theirs.pop("data")
    assert ours == theirs, "different request fields"
    assert len(ours_data) == len(theirs_data)
    for a, b in zip(ours_data, theirs_data, strict=True):
        assert a["model_input"] == b["model_input"]
        for name, tensor in a["loss_fn_inputs"].items():
            other = b["loss_fn_inputs"][name]
            assert (tensor["dtype"], tensor["shape"]) == (other["dtype"], other["shape"])
            dtype = np.dtype(tensor["dtype"])
            assert np.array_equal(
                np.asarray(tensor["data"], dtype), np.asarray(other["data"], dtype)
            )
    return True


def timed(fn: Any, rows: list[dict[str, np.ndarray]]) -> tuple[float, bytes]:
    start = time.perf_counter()
    body = fn(rows)
    return time.perf_counter() - start, body


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rows = arrays()
    ours_body = with_loops_async(rows)
    theirs_body = with_pydantic(rows)
    assert same_request(msgspec.json.decode(ours_body), json.loads(theirs_body))

    ours: list[float] = []
    theirs: list[float] = []
    sized: list[float] = []
    for _ in range(args.repeat):  # interleaved, so noise hits all alike
        ours.append(timed(with_loops_async, rows)[0])
        theirs.append(timed(with_pydantic, rows)[0])
        sized.append(timed(with_pydantic_sized, rows)[0])
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(sized)
    size = len(ours_body) / 2**20
    print(f"forward_backward request: {DATUMS} datums x {TOKENS} tokens, 4 tensors each")
    print(f"  body: {size:.1f} MiB (the same request every way)")
    print(f"  loops_async (msgspec, sized for chunking)     : {a * 1e3:7.1f} ms")
    print(f"  pydantic + json.dumps (one dump)              : {b * 1e3:7.1f} ms  ({b / a:.1f}x)")
    print(f"  pydantic + json.dumps (sized, then dumped)    : {c * 1e3:7.1f} ms  ({c / a:.1f}x)")
    print("  target: >= 10x")


if __name__ == "__main__":
    main()
