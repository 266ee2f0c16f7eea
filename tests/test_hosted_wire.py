"""The hosted service's wire behaviours (PROTOCOL §8), one at a time, on ``MockTransport``.

The same behaviours run end to end against ``loops-async serve --profile hosted`` in
``test_e2e_profiles.py``.
"""

from __future__ import annotations

import httpx
import msgspec
import pytest

from loops_async import ModelInput, SamplingParams, ServiceClient, _http
from loops_async import errors as E

from ._fake_loops import BASE, FakeLoops

pytestmark = pytest.mark.anyio


class Recorder:
    """Wraps a FakeLoops and lets a test rewrite answers by path."""

    def __init__(self, fake: FakeLoops) -> None:
        self.fake = fake
        self.requests: list[httpx.Request] = []
        self.overrides: dict[str, list[httpx.Response]] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queued = self.overrides.get(request.url.path)
        if queued:
            return queued.pop(0)
        return await self.fake(request)

    def to(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == path]


def service(recorder: Recorder, **options: object) -> ServiceClient:
    settings: dict[str, object] = {"heartbeat_interval": 0, "ready_timeout": 10.0}
    settings.update(options)
    return ServiceClient(
        BASE, api_key="k", http_transport=httpx.MockTransport(recorder), **settings
    )  # type: ignore[arg-type]


async def test_trainers_always_carry_replicas_and_availability(anyio_backend: str) -> None:
    recorder = Recorder(FakeLoops())
    async with service(recorder) as client:
        await client.create_lora_training_client_async("m", 4)
    (create,) = recorder.to("/v1/loops/trainers")
    body = msgspec.json.decode(create.content)
    assert body["replicas"] == 1
    assert body["availability_model"] == "dedicated"
    assert create.extensions["timeout"]["read"] == 300.0, "provisioning may take minutes"


async def test_scope_and_backend_version_use_the_debug_routes(anyio_backend: str) -> None:
    recorder = Recorder(FakeLoops())
    async with service(recorder, internal_backend_version="v9") as client:
        with pytest.raises(E.NotFoundError):  # the fake has no debug route: we see the URL
            await client.create_lora_training_client_async("m", 4, scope="serverless")
    (create,) = recorder.to("/v1/loops/debug/trainers")
    body = msgspec.json.decode(create.content)
    assert body["scope"] == "serverless"
    assert body["debug_version"] == "v9"
    with pytest.raises(E.ValidationError, match="scope"):
        await service(recorder).create_lora_training_client_async("m", 4, scope="galaxy")


async def test_wake_is_beside_sync_and_a_status_4xx_skips_the_gate(anyio_backend: str) -> None:
    recorder = Recorder(FakeLoops())
    status = "/v1/models/model-1/deployments/dep-base"
    recorder.overrides[status] = [
        httpx.Response(200, json={"status": "SCALED_TO_ZERO"}),
        httpx.Response(200, json={"status": "ACTIVE"}),
    ]

    async def sync_sampler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/loops/samplers":
            return httpx.Response(
                200,
                json={
                    "sampler": {
                        "id": "s1",
                        "base_url": f"{BASE}/sampler/base/sync",
                        "model_id": "model-1",
                        "deployment_id": "dep-base",
                    }
                },
            )
        return await recorder(request)

    async with ServiceClient(
        BASE, http_transport=httpx.MockTransport(sync_sampler), heartbeat_interval=0
    ) as client:
        await client.create_sampling_client_async("m")
        assert recorder.to("/sampler/base/wake"), "woken beside /sync"
        assert not recorder.to("/sampler/base/sync/wake")
        recorder.overrides[status] = [httpx.Response(404, json={"detail": "no status here"})]
        sampler = await client.create_sampling_client_async("m")  # skips, does not fail
        await sampler.ensure_ready_async()
        recorder.overrides[status] = [httpx.Response(200, json={"status": "BUILD_FAILED"})]
        with pytest.raises(E.SamplerTerminatedError) as caught:
            await client.create_sampling_client_async("m")
        assert caught.value.status == "BUILD_FAILED"
        assert isinstance(caught.value, RuntimeError)


async def test_a_starting_sampler_is_waited_out(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "RETRY_TIME_SCALE", 0.01)
    recorder = Recorder(FakeLoops())
    async with service(recorder) as client:
        training = await client.create_lora_training_client_async("m", 4)
        sampler = await training.save_weights_and_get_sampling_client_async()
        recorder.overrides["/sampler/run-1/sample"] = [
            httpx.Response(404, text="not found"),
            httpx.Response(400, json={"detail": "starting"}),
            httpx.Response(503, json={"detail": "cold"}, headers={"Retry-After": "1"}),
        ]
        out = await sampler.sample_async(ModelInput.from_ints([3]), 1, SamplingParams())
        assert out.sequences[0].tokens == [3]
        keys = {r.headers["idempotency-key"] for r in recorder.to("/sampler/run-1/sample")}
        assert len(keys) == 1, "every retry reuses the idempotency key"
        recorder.overrides["/sampler/run-1/sample"] = [
            httpx.Response(503, json={"detail": "bye", "error_class": "ServerShutdownError"})
        ]
        with pytest.raises(E.ServerShutdownError):
            await sampler.sample_async(ModelInput.from_ints([3]))


async def test_affinity_key_per_call_or_given(anyio_backend: str) -> None:
    recorder = Recorder(FakeLoops())
    async with service(recorder) as client:
        training = await client.create_lora_training_client_async("m", 4)
        sampler = await training.save_weights_and_get_sampling_client_async()
        for _ in range(2):
            await sampler.sample_async(ModelInput.from_ints([1]))
        await sampler.sample_async(ModelInput.from_ints([1]), affinity_key="group-7")
        await sampler.compute_logprobs_async(ModelInput.from_ints([1, 2]), affinity_key="g")
        keys = [r.headers["x-baseten-session-id"] for r in recorder.to("/sampler/run-1/sample")]
        assert keys[0] != keys[1], "one key per call by default"
        assert keys[2:] == ["group-7", "g"]
        with pytest.raises(E.ValidationError, match="affinity_key"):
            await sampler.sample_async(ModelInput.from_ints([1]), affinity_key="")


async def test_presigned_links_on_another_origin_get_no_default_headers(
    anyio_backend: str, tmp_path: object
) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.endswith("/source"):
            return httpx.Response(200, json={"source": {"kind": "s3"}})
        if path.endswith("/files"):
            files = [
                {"url": "https://storage.test/bucket/a?sig=1", "relative_file_name": "a"},
                {"url": f"{BASE}/files/b", "relative_file_name": "b"},
            ]
            return httpx.Response(200, json={"presigned_urls": files, "total_count": 2})
        return httpx.Response(200, content=b"bytes")

    transport = httpx.MockTransport(handler)
    async with ServiceClient(BASE, api_key="secret", http_transport=transport) as client:
        done = await client.download_checkpoint_async("ckpt-1", dest_dir=f"{tmp_path}/out")
    assert done.file_count == 2
    assert done.bytes_written == 10
    foreign = next(r for r in seen if r.url.host == "storage.test")
    assert "authorization" not in foreign.headers
    assert "x-baseten-accept-error" not in foreign.headers
    same = next(r for r in seen if r.url.path == "/files/b")
    assert same.headers["authorization"] == "Api-Key secret", "our own origin keeps the key"


async def test_volume_checkpoints_say_where_they_are(anyio_backend: str, tmp_path: object) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"source": {"kind": "volume", "volume_ref": "vol-9", "path": "ckpt/a"}}
        )

    async with ServiceClient(BASE, http_transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(E.CheckpointSourceError, match="vol-9"):
            await client.download_checkpoint_async("c", dest_dir=f"{tmp_path}/x")


async def test_an_unexpected_200_is_re_polled_after_a_pause(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    monkeypatch.setattr(_http, "RETRY_TIME_SCALE", 0.1)
    recorder = Recorder(FakeLoops())
    async with service(recorder) as client:
        training = await client.create_lora_training_client_async("m", 4)
        future = await training.save_state_async("s")
        path = f"/t/run-1/operations/{future.operation_id}"
        recorder.overrides[path] = [httpx.Response(200, json={"status": "running"})]
        started = anyio.current_time()
        assert (await future).path == "bt://loops:run-1/weights/s"
        assert anyio.current_time() - started >= 0.1, "1 s (scaled) before the next poll"
