"""Soak: 10,000 mixed operations through a fake service that injects faults of every kind.

4,000 trainer submits and 4,000 result retrievals (four training clients pipelining
``forward_backward`` + ``optim_step``), 2,000 samples in flight at once, 300 control-plane
reads and heartbeats every 10 ms, while about 6 % of requests fail: refused connections,
connections dropped after the server did the work, corrupt gzip bodies, 502 bursts, 503 +
``Retry-After`` where 503 is retried, and slow answers. Nothing may be lost or run twice, no
task or socket may leak, and the portal must survive.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.to_thread
import pytest

from loops_async import AdamParams, Datum, ModelInput, ServiceClient, TensorData, _http, _portal
from loops_async.training import TrainingClient

from ._fake_loops import BASE, FakeLoops, Faults

pytestmark = pytest.mark.anyio

CLIENTS = 4
STEPS = 500  # per client: a forward_backward and an optim_step each
SAMPLES = 2_000
CONTROL_READS = 300
DATUM = Datum(
    model_input=ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": TensorData(data=[2, 3, 4], dtype="int64", shape=[3])},
)


def _open_sockets() -> set[str]:
    """The sockets this process holds open (Linux; elsewhere nothing is checked)."""
    if sys.platform != "linux":
        return set()
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:"):
            found.add(target)
    return found


async def _train(training: TrainingClient, losses: list[float], steps: list[int]) -> None:
    adam = AdamParams(learning_rate=1e-3)
    for _ in range(STEPS // 10):
        pending = []
        for _ in range(10):  # ten steps queued back to back, then read
            fb = await training.forward_backward_async([DATUM])
            opt = await training.optim_step_async(adam)
            pending.append((fb, opt))
        for fb, opt in pending:
            losses.append((await fb).loss)
            steps.append(int((await opt).metrics["step"]))


async def test_soak_nothing_lost_nothing_twice_nothing_leaked(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "RETRY_TIME_SCALE", 0.01)
    faults = Faults(rate=0.0, seed=42)
    fake = FakeLoops(faults=faults, sample_delay=0.05)
    portal_before = _portal._portal_thread()
    tasks_before = len(anyio.get_running_tasks())
    sockets_before = _open_sockets()

    # No ``async with``: the heartbeats run on the portal's loop, under the same faults.
    service = ServiceClient(
        BASE,
        http_transport=fake.transport(),
        heartbeat_interval=0.01,
        ready_timeout=60.0,
        max_connections=64,
        max_sampling_connections=512,
    )
    trainers = [await service.create_lora_training_client_async("m", rank=4) for _ in range(4)]
    samplers = [
        await (await t.save_weights_and_get_sampling_client_async(f"p{i}"))
        for i, t in enumerate(trainers)
    ]
    faults.rate = 0.01  # per kind, six kinds: about 6 % of requests fail from here on

    losses: list[list[float]] = [[] for _ in trainers]
    steps: list[list[int]] = [[] for _ in trainers]
    sampled: dict[int, int] = {}

    async def sample(i: int) -> None:
        out = await samplers[i % len(samplers)].sample_async(ModelInput.from_ints([7, i]))
        sampled[i] = out.sequences[0].tokens[0]

    async def control_reads() -> None:
        for _ in range(CONTROL_READS):
            caps = await service.get_server_capabilities_async()
            assert caps.supported_models[0].model_name == "m"

    with anyio.fail_after(240):
        async with anyio.create_task_group() as group:
            group.start_soon(control_reads)
            for i in range(SAMPLES):
                group.start_soon(sample, i)
            for training, loss, step in zip(trainers, losses, steps, strict=True):
                group.start_soon(_train, training, loss, step)

    faults.rate = 0.0
    assert sum(faults.injected.values()) > 500, faults.injected
    assert set(faults.injected) == {
        "connect",
        "read_after",
        "gzip_after",
        "status_502",
        "status_503",
        "slow",
    }

    # Nothing lost: every call got its own answer, in order.
    for loss, step in zip(losses, steps, strict=True):
        assert step == list(range(1, STEPS + 1))
        assert loss == sorted(loss)
        assert len(set(loss)) == STEPS
    assert sampled == {i: i for i in range(SAMPLES)}
    # Nothing twice: the server ran each idempotency key once.
    assert set(fake.executed.values()) == {1}
    trainer_ops = sum(1 for op in fake.ops.values() if op["op"] != "init_trainer_server")
    assert trainer_ops == CLIENTS * STEPS * 2 + CLIENTS  # + one publish each
    assert len(fake.samples) == SAMPLES
    assert fake.health_checks > CLIENTS

    # The portal survived the heartbeats' faults, and a sync call still works.
    assert _portal._portal_thread() is portal_before
    assert service.statistics()["background_running"] == CLIENTS
    assert service.statistics()["background_failed"] == 0

    def sync_call() -> str:
        return trainers[0].save_state("after-soak").result(timeout=30).path

    assert (await anyio.to_thread.run_sync(sync_call)).endswith("/after-soak")

    await service.aclose()
    stats = service.statistics()
    assert stats["background_running"] == 0
    assert stats["http_loops"] == 0
    await anyio.sleep(0.05)
    assert len(anyio.get_running_tasks()) == tasks_before, "no task left behind"
    assert _open_sockets() <= sockets_before, "no socket left open"
