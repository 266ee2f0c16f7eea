"""A tinker-style flow against the local server's profiles: ``local``, ``hosted`` (cold starts,
``/sync`` sampler URLs, results without paths) and ``hosted-shared`` (shared samplers that pin
adapters by path). The layer must hide all of it, as the core does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import loops_async.tinker as tinker
from loops_async.server import LocalServer

from ..test_e2e_profiles import PROFILES

MODEL = "loops-local/tiny-chat"
KEY = "tinker-profile-key"


@pytest.fixture(scope="module", params=sorted(PROFILES))
def server(request: pytest.FixtureRequest) -> Iterator[LocalServer]:
    with LocalServer(
        backend="null", api_key=KEY, seq_gap_timeout=1.0, **PROFILES[request.param]
    ) as srv:
        yield srv


def test_tinker_flow(server: LocalServer) -> None:
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1, 1, 1, 1]},
    )
    prompt = tinker.ModelInput.from_ints([3, 4, 5])
    params = tinker.SamplingParams(max_tokens=3)
    with tinker.ServiceClient(base_url=server.url, api_key=KEY, heartbeat_interval=0) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        pending = []
        for _ in range(3):
            pending.append(training.forward_backward([datum], "cross_entropy"))
            pending.append(training.optim_step(tinker.AdamParams(learning_rate=1e-3)))
        steps = [f.result(timeout=60).metrics["step"] for f in pending[1::2]]
        assert steps == [1.0, 2.0, 3.0]

        saved = training.save_state("ckpt").result(timeout=60)
        assert saved.path == f"tinker://{training.model_id}/weights/ckpt"
        for _ in range(2):  # every publish gives a client of exactly those weights
            sampler = training.save_weights_and_get_sampling_client()
            futures = [sampler.sample(prompt, 2, params) for _ in range(5)]
            assert all(len(f.result(timeout=60).sequences) == 2 for f in futures)
            training.forward_backward([datum], "cross_entropy")
            training.optim_step(tinker.AdamParams(learning_rate=1e-3))

        published = training.save_weights_for_sampler("serve").result(timeout=60)
        assert published.path == f"tinker://{training.model_id}/sampler_weights/serve"
        by_path = service.create_sampling_client(model_path=published.path)
        assert by_path.sample(prompt, 1, params).result(timeout=60).sequences
        resumed = service.create_training_client_from_state_with_optimizer(saved.path)
        assert resumed.forward([datum], "cross_entropy").result(timeout=60).loss_fn_outputs

        rest = service.create_rest_client()
        kinds = {
            c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result(60).checkpoints
        }
        assert {"weights/ckpt", "sampler_weights/serve"} <= kinds
