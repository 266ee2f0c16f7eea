"""forward_backward_custom: a client-side torch loss replayed on the server (PROTOCOL §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loops_async import (
    AdamParams,
    Datum,
    ServiceClient,
    ValidationError,
)
from loops_async.server import LocalServer

from ._data import MODEL, sft_batch
from .test_e2e_training import adapter_of

FAST = AdamParams(learning_rate=2e-3)


def ce_as_custom(
    data: list[Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy with weights, normalised per active token — what the server computes."""
    total = torch.zeros(())
    active = 0
    for datum, lp in zip(data, logprobs, strict=True):
        w = torch.from_numpy(datum.loss_fn_inputs["weights"].to_numpy())
        total = total - (w * torch.nan_to_num(lp)).sum()
        active += int((w != 0).sum())
    return total / active, {"active_tokens_seen": float(active)}


def test_a_custom_cross_entropy_reproduces_the_builtin_update(torch_server: LocalServer) -> None:
    batch = list(sft_batch(4))
    with ServiceClient(torch_server.url) as service:
        builtin = service.create_lora_training_client(MODEL, rank=4, seed=21)
        expected = builtin.forward_backward(batch).result(timeout=600)
        builtin.optim_step(FAST).result(timeout=600)
        a = adapter_of(torch_server, builtin.save_state("builtin").result(timeout=600).path)

        custom = service.create_lora_training_client(MODEL, rank=4, seed=21)
        out = custom.forward_backward_custom(batch, ce_as_custom).result(timeout=600)
        custom.optim_step(FAST).result(timeout=600)
        b = adapter_of(torch_server, custom.save_state("custom").result(timeout=600).path)

    assert out.loss == pytest.approx(expected.loss, rel=1e-5)
    assert out.metrics["active_tokens_seen"] > 0, "the user's metrics are merged in"
    assert out.metrics["skip_token_normalization"] == 1.0
    assert len(out.loss_fn_outputs) == 4
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.anyio
async def test_custom_loss_async(anyio_backend: str, torch_server: LocalServer) -> None:
    def sharpen(
        data: list[Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # push the answer tokens' probability up: -mean(exp(lp)) over weighted positions
        terms = [
            -(
                torch.exp(torch.nan_to_num(lp, nan=-1e9))
                * torch.from_numpy(d.loss_fn_inputs["weights"].to_numpy())
            ).sum()
            for d, lp in zip(data, logprobs, strict=True)
        ]
        return torch.stack(terms).mean(), {}

    async with ServiceClient(torch_server.url) as service:
        training = await service.create_lora_training_client_async(MODEL, rank=4)
        batch = list(sft_batch(2))
        first = await (await training.forward_backward_custom_async(batch, sharpen))
        await (await training.optim_step_async(FAST))
        for _ in range(4):
            await (await training.forward_backward_custom_async(batch, sharpen))
            await (await training.optim_step_async(FAST))
        last = await (await training.forward_backward_custom_async(batch, sharpen))
        assert last.loss < first.loss


def test_custom_loss_input_errors(null_server: LocalServer) -> None:
    batch = list(sft_batch(1))
    with ServiceClient(null_server.url) as service:
        training = service.create_lora_training_client(MODEL, rank=4)
        with pytest.raises(ValidationError, match="callable"):
            training.forward_backward_custom(batch, "not a function")  # type: ignore[arg-type]
        no_targets = [Datum(model_input=batch[0].model_input, loss_fn_inputs={})]
        with pytest.raises(ValidationError, match="target_tokens"):
            training.forward_backward_custom(no_targets, ce_as_custom)
        with pytest.raises(ValidationError, match="scalar tensor"):
            training.forward_backward_custom(batch, lambda d, lp: (torch.tensor(1.0), {}))
