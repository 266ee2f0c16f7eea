"""tinker's ``SamplingClient`` over :class:`loops_async.SamplingClient`.

``sample()`` and ``compute_logprobs()`` return a future at once (the request runs on the
portal); ``sample_async()`` and ``compute_logprobs_async()`` run the core's coroutine on the
caller's own event loop, asyncio or trio, with no thread hop. A client returned before its
sampler (or its weights) is ready is usable at once: requests wait for it.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors
from .. import sampling as core_sampling
from .. import types as core_types
from .._operation import new_key
from ._errors import translating
from ._futures import AwaitableConcurrentFuture, SelfFuture, done_future, spawn
from .types import SampleResponse

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ._service import ServiceClient

__all__ = ["SamplingClient"]


class SamplingClient(SelfFuture["SamplingClient"]):
    """Samples from one adapter (or base model), as tinker's ``SamplingClient``.

    Usable at once and a future of itself: ``.result()`` / ``await`` wait until its sampler
    serves the weights it was made for. ``sample()`` returns an
    :class:`~loops_async.tinker.APIFuture` that is also a
    :class:`concurrent.futures.Future`; cancelling it (or an ``await`` of it) cancels the
    request. Picklable (without the API key, which the unpickled client reads from the
    environment), for rollout workers.
    """

    _ready: AwaitableConcurrentFuture[core_sampling.SamplingClient]

    def __init__(
        self,
        ready: AwaitableConcurrentFuture[core_sampling.SamplingClient],
        *,
        service: ServiceClient | None = None,
    ) -> None:
        self._ready = ready
        self._service = service
        self._core: core_sampling.SamplingClient | None = None
        ready.add_done_callback(self._provisioned)

    def _provisioned(self, ready: concurrent.futures.Future[core_sampling.SamplingClient]) -> None:
        if not ready.cancelled() and ready.exception() is None:
            self._core = ready.result()

    def __repr__(self) -> str:
        if self._core is None:
            state = "failed" if self._ready.done() else "pending"
            return f"<tinker SamplingClient {state}>"
        return f"<tinker SamplingClient base_model={self._core.get_base_model()!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._core_now(),))

    def _core_now(self) -> core_sampling.SamplingClient:
        if self._core is None:
            return self._ready.result()
        return self._core

    async def _core_async(self) -> core_sampling.SamplingClient:
        if self._core is not None:
            return self._core
        return await self._ready.result_async()

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        prompt: core_types.ModelInput,
        num_samples: int,
        sampling_params: core_types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: Any = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> AwaitableConcurrentFuture[SampleResponse]:
        """Sample ``num_samples`` completions of ``prompt``; the future's
        :class:`~loops_async.tinker.types.SampleResponse` has each sequence's tokens and
        logprobs (and the prompt's logprobs when ``include_prompt_logprobs``)."""
        _check_sample(
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
            include_prompt_logprobs,
        )
        return spawn(
            self._sample,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            prompt_logprobs_last_n,
            cancel_on_abandon=True,
        )

    async def sample_async(
        self,
        prompt: core_types.ModelInput,
        num_samples: int,
        sampling_params: core_types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: Any = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> SampleResponse:
        """Like :meth:`sample`, on the running event loop (asyncio or trio); returns the
        response."""
        _check_sample(
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
            include_prompt_logprobs,
        )
        with translating():
            return await self._sample(
                prompt,
                num_samples,
                sampling_params,
                include_prompt_logprobs,
                topk_prompt_logprobs,
                prompt_logprobs_last_n,
            )

    async def _sample(
        self,
        prompt: core_types.ModelInput,
        num_samples: int,
        sampling_params: core_types.SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        prompt_logprobs_last_n: int | None,
    ) -> SampleResponse:
        core = await self._core_async()
        response = await core.sample_async(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs
        )
        request = new_key()
        ids = [f"{request}:{i}" for i in range(len(response.sequences))]
        converted = SampleResponse.from_core(response, ids)
        if prompt_logprobs_last_n is not None and converted.prompt_logprobs_np is not None:
            converted = _keep_last(converted, prompt_logprobs_last_n)
        return converted

    def compute_logprobs(
        self, prompt: core_types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> AwaitableConcurrentFuture[list[float | None]]:
        """The logprob of each prompt token given the ones before it (``None`` first)."""
        _check_last_n(prompt_logprobs_last_n, True)
        return spawn(self._logprobs, prompt, prompt_logprobs_last_n, cancel_on_abandon=True)

    async def compute_logprobs_async(
        self, prompt: core_types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        """Like :meth:`compute_logprobs`, on the running event loop; returns the list."""
        _check_last_n(prompt_logprobs_last_n, True)
        with translating():
            return await self._logprobs(prompt, prompt_logprobs_last_n)

    async def _logprobs(
        self, prompt: core_types.ModelInput, last_n: int | None
    ) -> list[float | None]:
        core = await self._core_async()
        values = await core.compute_logprobs_async(prompt)
        if last_n is not None:
            cut = max(0, len(values) - last_n)
            values = [None if i < cut else v for i, v in enumerate(values)]
        return values

    # ------------------------------------------------------------------ identity

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (waits until the client is ready)."""
        return self._core_now().get_tokenizer()

    def get_base_model(self) -> str:
        """The base model's name (waits until the client is ready)."""
        return self._core_now().get_base_model()

    async def get_base_model_async(self) -> str:
        """The base model's name, awaited."""
        return (await self._core_async()).get_base_model()

    @property
    def loops_client(self) -> core_sampling.SamplingClient:
        """The underlying :class:`loops_async.SamplingClient` (waits until ready)."""
        return self._core_now()


def _restore(core: core_sampling.SamplingClient) -> SamplingClient:
    return SamplingClient(done_future(core))


def _check_last_n(last_n: int | None, include_prompt_logprobs: bool) -> None:
    if last_n is None:
        return
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
        raise errors.ValidationError(
            f"prompt_logprobs_last_n: expected an integer >= 1, got {last_n!r}"
        )
    if not include_prompt_logprobs:
        raise errors.ValidationError("prompt_logprobs_last_n needs include_prompt_logprobs=True")


def _check_sample(
    topk_sample_logprobs: int,
    target_prompt_logprobs: Any,
    prompt_alt_tokens_k: int,
    prompt_logprobs_last_n: int | None,
    include_prompt_logprobs: bool,
) -> None:
    """Reject, before anything is sent, what the Loops sampler cannot do."""
    if topk_sample_logprobs:
        raise errors.ValidationError(
            "topk_sample_logprobs: top-k logprobs of sampled tokens are not supported by "
            "Loops (topk_prompt_logprobs is)"
        )
    if target_prompt_logprobs is not None:
        raise errors.ValidationError(
            "target_prompt_logprobs: not supported by Loops (use include_prompt_logprobs or "
            "topk_prompt_logprobs)"
        )
    if prompt_alt_tokens_k:
        raise errors.ValidationError("prompt_alt_tokens_k: not supported by Loops")
    _check_last_n(prompt_logprobs_last_n, include_prompt_logprobs)


def _keep_last(response: SampleResponse, last_n: int) -> SampleResponse:
    """Only the last ``last_n`` prompt logprobs (the others become missing)."""
    import dataclasses

    values = np.array(response.prompt_logprobs_np, dtype=np.float32, copy=True)
    values[: max(0, len(values) - last_n)] = np.nan
    return dataclasses.replace(response, prompt_logprobs_np=values)
