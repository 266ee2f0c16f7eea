"""Experiment tracking: every op's metrics reach the sinks, with their step; W&B offline."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from loops_async import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    ServiceClient,
    TensorData,
    WandbConfig,
    loops_log_kl_sample_train,
)
from loops_async import errors as E
from loops_async.server import LocalServer

MODEL = "loops-local/tiny-chat"
DATUM = Datum(
    model_input=ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": TensorData(data=[2, 3, 4], dtype="int64", shape=[3])},
)


class ListSink:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.closed = 0
        self._lock = threading.Lock()

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        with self._lock:
            self.rows.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed += 1


@pytest.mark.anyio
async def test_every_op_is_logged_with_its_step(
    anyio_backend: str, null_server: LocalServer
) -> None:
    sink = ListSink()
    async with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, 4)
        training.add_metrics_sink(sink)
        read = []
        for _ in range(3):
            fb = await training.forward_backward_async([DATUM])
            await training.optim_step_async(AdamParams(learning_rate=1e-3))  # never read
            read.append(fb)
        await training.forward_async([DATUM])  # never read
        assert (await read[0]).loss >= 0
        await training.aclose()  # retrieves and logs what nobody read, then closes the sink
    assert sink.closed == 1
    train = [step for step, row in sink.rows if "train/loss" in row]
    optim = [step for step, row in sink.rows if "optim/step" in row]
    evals = [step for step, row in sink.rows if "eval/loss" in row]
    assert sorted(train) == [1, 2, 3], "each forward_backward at the step it trains"
    assert sorted(optim) == [1, 2, 3]
    assert evals == [4]
    assert all(int(row["optim/step"]) == step for step, row in sink.rows if "optim/step" in row)


def test_a_bad_sink_is_refused(null_server: LocalServer) -> None:
    with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = service.create_lora_training_client(MODEL, 4)
        with pytest.raises(E.ValidationError, match="sink"):
            training.add_metrics_sink(object())  # type: ignore[arg-type]


def test_wandb_offline_run_gets_the_metrics(
    null_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = service.create_lora_training_client(
            MODEL, 4, wandb_config=WandbConfig(project="loops-async-test", name="offline")
        )
        for _ in range(3):
            training.forward_backward([DATUM])
            training.optim_step(AdamParams(learning_rate=1e-3))
        training.close()  # finishes the W&B run
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
    # The offline run file holds the history records (protobuf): the keys appear verbatim.
    data = runs[0].read_bytes()
    for key in (b"train/loss", b"optim/step", b"optim/learning_rate", b"loops-async-test"):
        assert key in data, key


def test_kl_between_sampler_and_trainer_logprobs() -> None:
    logged: list[tuple[dict[str, object], int]] = []

    class Run:
        def log(self, payload: dict[str, object], step: int) -> None:
            logged.append((payload, step))

    datum = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": TensorData(data=[2, 3, 4], dtype="int64"),
            "logprobs": TensorData(data=[-1.0, -2.0, -3.0], dtype="float32"),
            "weights": TensorData(data=[0.0, 1.0, 1.0], dtype="float32"),
        },
    )
    out = ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": TensorData(data=[-1.5, -2.0, -2.5], dtype="float32")}]
    )
    metrics = loops_log_kl_sample_train(
        Run(), 7, [datum], out, log_histogram=False, log_worst_tokens=False
    )
    prefix = "optim/train-sample-div/"
    assert metrics[f"{prefix}tokens"] == 2.0, "the masked position does not count"
    assert metrics[f"{prefix}k1"] == pytest.approx(-0.25)
    assert metrics[f"{prefix}max_abs_diff"] == pytest.approx(0.5)
    assert logged[0][1] == 7
    with pytest.raises(E.ValidationError):
        loops_log_kl_sample_train(Run(), 1, [datum])
