"""One protocol edge at a time, against ``httpx.MockTransport`` (PROTOCOL §1-2).

End-to-end behaviour is covered against the real local server in ``test_e2e_*.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import httpx
import msgspec
import pytest

import loops_async
from loops_async import (
    AdamParams,
    Datum,
    ModelInput,
    ServiceClient,
    TensorData,
)
from loops_async import errors as E

pytestmark = pytest.mark.anyio

RUN = "run-1"
BASE = "http://loops.test"
TRAINER = f"{BASE}/trainer"

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeLoops:
    """A scripted Loops server: control plane always works; ops and polls are scripted."""

    submit_script: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    poll_script: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/loops/sessions":
            return httpx.Response(200, json={"session": {"id": "s1"}})
        if path == "/v1/loops/trainers":
            return httpx.Response(
                200,
                json={"run": {"id": RUN, "base_model": "m", "base_url": TRAINER}},
            )
        if path == "/trainer/health":
            return httpx.Response(200, json={})
        if path == "/trainer/init_trainer_server":
            return accepted(request)
        if path == "/trainer/operations/init":
            return done({"lora_rank": 4, "step": 0})
        if path.startswith("/trainer/operations/"):
            return self.poll_script.pop(0)(request)
        return self.submit_script.pop(0)(request)

    def submitted(self, op: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == f"/trainer/{op}"]


def accepted(request: httpx.Request, op_id: str | None = None) -> httpx.Response:
    if request.url.path.endswith("init_trainer_server"):
        op_id = "init"
    return httpx.Response(
        202, json={"operation_id": op_id or request.headers["idempotency-key"], "schema_version": 1}
    )


def done(result: object) -> httpx.Response:
    return httpx.Response(200, json={"status": "done", "result": result})


def status(code: int, body: object | None = None, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(code, json=body or {"detail": "x"}, headers=headers)


def drop(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


DATUM = Datum(
    model_input=ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": TensorData(data=[2, 3, 4], dtype="int64", shape=[3])},
)
FB_RESULT = {
    "loss": 1.25,
    "loss_fn_output_type": "cross_entropy",
    "loss_fn_outputs": [{"logprobs": {"data": [-1.0, -1.5, None], "dtype": "float32"}}],
    "metrics": {"loss": 1.25},
}


async def make_client(
    fake: FakeLoops, **kwargs: object
) -> tuple[ServiceClient, loops_async.TrainingClient]:
    service = ServiceClient(
        BASE,
        api_key="sekrit-key",
        http_transport=httpx.MockTransport(fake),
        heartbeat_interval=0,
        ready_timeout=kwargs.pop("ready_timeout", 5.0),  # type: ignore[arg-type]
    )
    training = await service.create_lora_training_client_async("m", rank=4)
    return service, training


async def test_headers_and_a_full_round_trip(anyio_backend: str) -> None:
    fake = FakeLoops(submit_script=[accepted], poll_script=[lambda r: done(FB_RESULT)])
    service, training = await make_client(fake)
    async with service:
        fut = await training.forward_backward_async([DATUM])
        out = await fut
    assert out.loss == 1.25
    assert out.loss_fn_outputs[0]["logprobs"].data[2] is None
    for req in fake.requests:
        assert req.headers["user-agent"] == f"loops-async/{loops_async.__version__}"
        assert req.headers["x-baseten-accept-error"] == "1"
        assert req.headers["authorization"] == "Api-Key sekrit-key"
        if req.url.path.startswith("/trainer"):
            assert req.headers["x-run-id"] == RUN
        else:
            assert "x-run-id" not in req.headers
    body = msgspec.json.decode(fake.submitted("forward_backward")[0].content)
    assert body["seq_id"] == 2, "init_trainer_server took seq 1"
    assert body["run_id"] == RUN
    assert body["model"] == "m"


async def test_submit_retries_reuse_the_idempotency_key(anyio_backend: str) -> None:
    fake = FakeLoops(
        submit_script=[drop, status(502), status(408), status(404), accepted],
        poll_script=[lambda r: done({"metrics": {"step": 1}})],
    )
    service, training = await make_client(fake)
    async with service:
        fut = await training.optim_step_async(AdamParams())
        await fut
    keys = {r.headers["idempotency-key"] for r in fake.submitted("optim_step")}
    assert len(fake.submitted("optim_step")) == 5
    assert len(keys) == 1
    assert fut.operation_id == keys.pop()


@pytest.mark.parametrize(
    "rejection",
    [
        status(422, {"detail": "data[0]: bad", "error_class": "ValidationError"}),
        status(404, headers={"X-Baseten-Error-Source": "06"}),
        status(400, {"error": {"type": "BadRequestError", "message": "no"}}),
        status(400, {"type": "BadRequestError", "detail": "no"}),
        status(400, headers={"X-Baseten-Error-Source": "01", "X-Baseten-Error-Code": "631"}),
    ],
)
async def test_permanent_rejections_are_not_retried(anyio_backend: str, rejection: Handler) -> None:
    fake = FakeLoops(submit_script=[rejection, accepted])
    service, training = await make_client(fake)
    async with service:
        with pytest.raises(E.APIStatusError) as info:
            await training.forward_backward_async([DATUM])
    assert len(fake.submitted("forward_backward")) == 1
    assert info.value.status_code in (400, 404, 422)
    assert "/trainer/forward_backward" in str(info.value)


async def test_unprocessable_surfaces_the_servers_message(anyio_backend: str) -> None:
    fake = FakeLoops(submit_script=[status(422, {"detail": "data[0].model_input: too long"})])
    service, training = await make_client(fake)
    async with service:
        with pytest.raises(E.UnprocessableEntityError, match="too long"):
            await training.forward_backward_async([DATUM])
        # The gate moved on: the next op is not stuck behind the rejected one.
        fake.submit_script.append(accepted)
        fake.poll_script.append(lambda r: done({"metrics": {"step": 1}}))
        await (await training.optim_step_async(AdamParams()))


async def test_retries_stop_at_the_ready_timeout(anyio_backend: str) -> None:
    fake = FakeLoops(submit_script=[status(502)] * 100)
    service, training = await make_client(fake, ready_timeout=0.6)
    async with service:
        with pytest.raises(E.InternalServerError):
            await training.forward_backward_async([DATUM])
    assert 1 < len(fake.submitted("forward_backward")) < 100


async def test_503_on_submit_is_a_cold_start_unless_it_says_shutdown(anyio_backend: str) -> None:
    """A bare 503 (a trainer still starting, PROTOCOL §8) is retried, honouring Retry-After;
    one that names its error class is final."""
    shutdown = status(503, {"detail": "bye", "error_class": "ServerShutdownError"})
    fake = FakeLoops(
        submit_script=[status(503, headers={"Retry-After": "0"}), accepted, shutdown],
        poll_script=[lambda r: done(FB_RESULT)],
    )
    service, training = await make_client(fake)
    async with service:
        assert (await (await training.forward_backward_async([DATUM]))).loss == 1.25
        with pytest.raises(E.ServerShutdownError):
            await training.forward_backward_async([DATUM])


@pytest.mark.parametrize(
    ("body", "message"),
    [({"schema_version": 1}, "operation_id"), ({"operation_id": "x", "schema_version": 2}, "2")],
)
async def test_malformed_accept_is_a_protocol_error(
    anyio_backend: str, body: dict[str, object], message: str
) -> None:
    fake = FakeLoops(submit_script=[lambda r: httpx.Response(202, json=body)])
    service, training = await make_client(fake)
    async with service:
        with pytest.raises(E.ProtocolError, match=message):
            await training.forward_backward_async([DATUM])


async def test_poll_table(anyio_backend: str) -> None:
    """408 re-polls at once, 502 waits and re-polls, then done; the result is memoised."""
    fake = FakeLoops(
        submit_script=[accepted],
        poll_script=[status(408), status(408), status(502), lambda r: done(FB_RESULT)],
    )
    service, training = await make_client(fake)
    async with service:
        fut = await training.forward_backward_async([DATUM])
        assert not fut.done()
        first = await fut.result_async(timeout=30)
        assert fut.done()
        assert await fut == first
    polls = [r for r in fake.requests if "/operations/" in r.url.path and "init" not in r.url.path]
    assert len(polls) == 4


async def test_poll_errors(anyio_backend: str) -> None:
    fake = FakeLoops(
        submit_script=[accepted, accepted, accepted],
        poll_script=[
            lambda r: httpx.Response(
                200, json={"status": "error", "error": "boom", "error_class": "RuntimeError"}
            ),
            status(404),
            status(503),
        ],
    )
    service, training = await make_client(fake)
    async with service:
        f1 = await training.forward_backward_async([DATUM])
        f2 = await training.forward_backward_async([DATUM])
        f3 = await training.forward_backward_async([DATUM])
        with pytest.raises(E.RemoteOpError) as info:
            await f1
        assert info.value.error_class == "RuntimeError"
        assert info.value.operation_id == f1.operation_id
        with pytest.raises(E.RemoteOpError):
            await f1  # memoised, no new poll
        with pytest.raises(E.UnknownRequestError):
            await f2
        with pytest.raises(E.ServerShutdownError):
            await f3


async def test_operation_ids_are_quoted_in_urls(anyio_backend: str) -> None:
    fake = FakeLoops(
        submit_script=[lambda r: accepted(r, "a/b c")],
        poll_script=[lambda r: done(FB_RESULT)],
    )
    service, training = await make_client(fake)
    async with service:
        await (await training.forward_backward_async([DATUM]))
    poll = [r for r in fake.requests if "/operations/" in r.url.path][-1]
    assert poll.url.raw_path.endswith(b"/operations/a%2Fb%20c")


async def test_result_timeout_leaves_the_future_usable(anyio_backend: str) -> None:
    fake = FakeLoops(submit_script=[accepted])
    service, training = await make_client(fake)
    async with service:
        fut = await training.forward_backward_async([DATUM])

        async def slow_408(request: httpx.Request) -> httpx.Response:
            await anyio.sleep(0.05)
            return httpx.Response(408, json={"detail": "not yet"})

        fake.poll_script = [slow_408] * 1000  # type: ignore[list-item]
        with pytest.raises(E.OperationTimeoutError) as info:
            await fut.result_async(timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        fake.poll_script = [lambda r: done(FB_RESULT)]
        assert (await fut.result_async(timeout=5)).loss == 1.25


def test_api_key_never_in_reprs() -> None:
    service = ServiceClient(BASE, api_key="sekrit-key")
    assert "sekrit" not in repr(service)
    assert "sekrit" not in repr(service._transport)
    service.close()


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPS_BASE_URL", "http://from-env:1")
    monkeypatch.setenv("BASETEN_API_KEY", "env-key")
    service = ServiceClient()
    assert service.base_url == "http://from-env:1"
    assert service._transport._headers["Authorization"] == "Api-Key env-key"
    service.close()
    monkeypatch.delenv("LOOPS_BASE_URL")
    hosted = ServiceClient()
    assert hosted.base_url == "https://api.baseten.co", "the hosted default, as upstream"
    hosted.close()
    with pytest.raises(E.ValidationError, match="base_url"):
        ServiceClient("ftp://nope")


@pytest.mark.anyio
async def test_unreachable_server_fails_fast(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong port is a ConnectError after a short retry window, not a 10-minute hang."""
    import loops_async._control

    monkeypatch.setattr(loops_async._control, "CONTROL_PLANE_RETRY_WINDOW", 0.5)
    async with ServiceClient("http://127.0.0.1:9", heartbeat_interval=0) as service:
        with anyio.fail_after(10), pytest.raises(E.ConnectError, match=r"127\.0\.0\.1:9"):
            await service.create_lora_training_client_async("m")
