"""The main flows against the local server in both profiles, on asyncio and trio.

The ``hosted`` profile plays the hosted service's rough edges (PROTOCOL §8): sampler URLs under
``/sync`` with wake beside them, cold starts (404 then 503 + ``Retry-After`` from a starting
sampler, 503 from a starting trainer's health checks, 404 from its first submits), a
deployment-status route that answers 404, checkpoint files on another origin that refuses an
``Authorization`` header, shared samplers that cache adapters by name, and results without
``path``. Code that passes here passes against the local server too: the tests stop flattering
us.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    SamplingParams,
    ServiceClient,
    TensorData,
)
from loops_async.server import LocalServer

pytestmark = pytest.mark.anyio

MODEL = "loops-local/tiny-chat"
KEY = "profile-test-key"
DATUM = Datum(
    model_input=ModelInput.from_ints([1, 2, 3, 4]),
    loss_fn_inputs={"target_tokens": TensorData(data=[2, 3, 4, 5], dtype="int64", shape=[4])},
)
PROFILES = {
    "local": {},
    "hosted": {"profile": "hosted", "cold_start_requests": 2, "cold_start_retry_after": 0.05},
    "hosted-shared": {
        "profile": "hosted",
        "cold_start_requests": 1,
        "cold_start_retry_after": 0.05,
        "shared_samplers": True,
        "omit_result_paths": True,
    },
}


@pytest.fixture(scope="module", params=sorted(PROFILES))
def server(request: pytest.FixtureRequest) -> Iterator[LocalServer]:
    settings = PROFILES[request.param]
    with LocalServer(backend="null", api_key=KEY, seq_gap_timeout=1.0, **settings) as srv:
        yield srv


async def test_train_sample_checkpoint(
    anyio_backend: str, server: LocalServer, tmp_path: Path
) -> None:
    async with ServiceClient(server.url, api_key=KEY, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, 4)
        await training.health_async()

        # Pipelined training: both submitted before either is read.
        futures = []
        for _ in range(3):
            fb = await training.forward_backward_async([DATUM])
            opt = await training.optim_step_async(AdamParams(learning_rate=1e-3))
            futures.append((fb, opt))
        steps = [int((await opt).metrics["step"]) for _, opt in futures]
        assert steps == [1, 2, 3]
        assert training.policy_version == 3

        # Checkpoints (a path is derived when the trainer leaves it out).
        saved = await (await training.save_state_async("ckpt"))
        assert saved.path == f"bt://loops:{training.run_id}/weights/ckpt"
        loaded = await (await training.load_state_with_optimizer_async(saved.path))
        assert loaded.step == 3

        # Publish and sample: usable at once, and a future of itself.
        sampler = await training.save_weights_and_get_sampling_client_async()
        out = await sampler.sample_async(
            ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=3, seed=1)
        )
        assert len(out.sequences) == 2
        assert (await sampler) is sampler
        assert sampler.done()
        if sampler._shared:
            first = sampler.checkpoint_path
            again = await training.save_weights_and_get_sampling_client_async()
            assert again.checkpoint_path != first, "shared samplers cache by name: unique names"
            assert (await again.sample_async(ModelInput.from_ints([1]))).sequences
        else:
            assert sampler.min_policy_version == 3

        # Download: presigned links (another origin in the hosted profile) get no API key.
        page = await training.get_checkpoint_archive_url_async(name="ckpt", target="trainer")
        assert page.presigned_urls
        done = await training.download_checkpoint_async(
            name="ckpt", target="trainer", dest_dir=tmp_path / "ckpt"
        )
        assert done.file_count == len(page.presigned_urls)
        assert done.bytes_written > 0
        assert await anyio.Path(done.dest_dir / "adapter_config.json").exists()


async def test_standalone_sampler_and_resume(anyio_backend: str, server: LocalServer) -> None:
    async with ServiceClient(server.url, api_key=KEY, heartbeat_interval=0) as service:
        base = await service.create_sampling_client_async(MODEL)
        assert (await base.sample_async(ModelInput.from_ints([5, 6]))).sequences
        training = await service.create_lora_training_client_async(MODEL, 4)
        await training.forward_backward_async([DATUM])
        await (await training.optim_step_async(AdamParams(learning_rate=1e-3)))
        saved = await (await training.save_state_async("resume"))
        resumed = await service.create_training_client_from_state_with_optimizer_async(saved.path)
        assert resumed.policy_version == 1
        step = await (await resumed.optim_step_async(AdamParams(learning_rate=1e-3)))
        assert step.metrics["step"] == 2


def test_service_client_local_talks_to_given_urls(null_server: LocalServer) -> None:
    """``ServiceClient.local``: nothing provisioned, the trainer and sampler URLs used as is."""
    with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = service.create_lora_training_client(MODEL, 4)
        sampler = training.save_weights_and_get_sampling_client()
        trainer_url, sampler_url = training.get_info().base_url, sampler._base_url
    assert trainer_url is not None
    with ServiceClient.local(
        trainer_url=trainer_url, sampler_url=sampler_url, heartbeat_interval=0
    ) as local:
        assert local.session_id == "local"
        again = local.create_lora_training_client(MODEL, 4)
        assert again.run_id == training.run_id, "the run id comes from the trainer URL"
        assert again.forward_backward([DATUM]).result(timeout=60).loss >= 0
        client = again.save_weights_and_get_sampling_client()
        params = SamplingParams(max_tokens=2)
        assert client.sample(ModelInput.from_ints([1, 2]), sampling_params=params).sequences
        assert client.result(timeout=60) is client


async def test_load_state_from_local_paths(
    anyio_backend: str, null_server: LocalServer, tmp_path: Path
) -> None:
    """``load_state*`` take ``bt://``, ``file://`` and local directories; ``s3://`` is a clear
    422 on the local server."""
    from loops_async import errors as E

    async with ServiceClient(null_server.url, heartbeat_interval=0) as service:
        training = await service.create_lora_training_client_async(MODEL, 4)
        await training.forward_backward_async([DATUM])
        await training.optim_step_async(AdamParams(learning_rate=1e-3))
        saved = await (await training.save_state_async("local"))
        done = await training.download_checkpoint_async(saved.path, dest_dir=tmp_path / "ck")
        by_path = await (await training.load_state_with_optimizer_async(str(done.dest_dir)))
        assert by_path.step == 1
        url = done.dest_dir.as_uri()
        assert (await (await training.load_state_async(url))).step == 0
        with pytest.raises(E.UnprocessableEntityError, match="s3://"):
            await (await training.load_state_async("s3://bucket/ckpt"))
        with pytest.raises(E.ValidationError, match="scheme"):
            await training.load_state_async("gs://bucket/ckpt")
