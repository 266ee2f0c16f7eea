"""``SamplingClient``: sample completions, with logprobs, from a Loops sampler."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import msgspec

from . import _portal, _validate, errors
from ._codec import decoder_for, encode
from ._http import (
    CONTROL_READ,
    PROBE,
    SAMPLE,
    SAMPLER_MODELS,
    SAMPLER_POLL,
    Backoff,
    Lane,
    Transport,
    error_for_response,
)
from ._operation import (
    APIFuture,
    accepted_operation_id,
    decode_body,
    idempotency_headers,
    new_key,
    poll_operation,
)
from ._wire import (
    PromptLogprob,
    SampleAnswer,
    SampleChoice,
    SamplerDeploymentStatus,
    SampleRequest,
)
from .types import (
    EncodedTextChunk,
    ModelInput,
    SampledSequence,
    SampleResponse,
    SamplingParams,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SamplerDeployment", "SamplingClient", "wait_deployment_active"]

log = logging.getLogger("loops_async")

MAX_TOP_K_PROMPT_LOGPROBS = 20
_KEY_FROM_ENV = "<from BASETEN_API_KEY>"
"""Stands for the API key in a pickled :class:`SamplingClient`: read from the environment."""
POLICY_VERSION_HEADER = "x-trainers-policy-version"


def _policy_version(response: Any) -> int | None:
    version = response.headers.get(POLICY_VERSION_HEADER)
    return int(version) if version and version.isdigit() else None


def _token_id(value: str | int) -> int:
    if isinstance(value, int):
        return value
    text = value.removeprefix("token_id:")
    try:
        return int(text)
    except ValueError:
        raise errors.ProtocolError(f"sampler returned a non-numeric token {value!r}") from None


def _prompt_logprobs(
    choice: SampleChoice, prompt: list[int], k: int
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    entries = choice.prompt_logprobs or []
    actual: list[float | None] = []
    topk: list[list[tuple[int, float]] | None] = []
    for i, entry in enumerate(entries):
        if entry is None or i >= len(prompt):
            actual.append(None)
            topk.append(None)
            continue
        by_id: dict[int, PromptLogprob] = {_token_id(key): value for key, value in entry.items()}
        mine = by_id.get(prompt[i])
        actual.append(None if mine is None or mine.logprob is None else float(mine.logprob))
        ranked = sorted(
            (
                (v.rank, tid, float(v.logprob))
                for tid, v in by_id.items()
                if v.rank is not None and v.rank <= k and v.logprob is not None
            ),
        )
        topk.append([(tid, lp) for _, tid, lp in ranked])
    return actual, topk


_TERMINAL_SAMPLER_STATES = frozenset(
    {
        "DEPLOY_FAILED",
        "UNHEALTHY",
        "BUILD_FAILED",
        "BUILD_STOPPED",
        "DEACTIVATING",
        "INACTIVE",
        "FAILED",
    }
)


@dataclass(frozen=True, slots=True)
class SamplerDeployment:
    """Where a dedicated sampler's deployment status lives (PROTOCOL §7)."""

    api_base_url: str
    model_id: str
    deployment_id: str
    base_url: str

    @classmethod
    def of(cls, deployment: Any) -> SamplerDeployment:
        """From any object with the four attributes (e.g. the official SDK's deployment)."""
        if isinstance(deployment, SamplerDeployment):
            return deployment
        try:
            return cls(
                api_base_url=str(deployment.api_base_url),
                model_id=str(deployment.model_id),
                deployment_id=str(deployment.deployment_id),
                base_url=str(deployment.base_url),
            )
        except AttributeError as exc:
            raise errors.ValidationError(f"deployment: {exc}") from None

    @property
    def status_url(self) -> str:
        """``GET`` for ``{"status": ...}``."""
        return (
            f"{self.api_base_url.rstrip('/')}/v1/models/{self.model_id}"
            f"/deployments/{self.deployment_id}"
        )

    @property
    def wake_url(self) -> str:
        """The wake route: beside the sampler's routes, without a trailing ``/sync``."""
        return f"{self.base_url.rstrip('/').removesuffix('/sync')}/wake"


async def wait_deployment_active(
    transport: Transport, deployment: SamplerDeployment, window: float
) -> None:
    """Poll a dedicated sampler's deployment until ACTIVE, waking a scaled-to-zero one. A
    terminal status raises :class:`~loops_async.errors.SamplerTerminatedError`; a 4xx from the
    status route means "no status here" (PROTOCOL §8): return, and let requests wait out the
    cold start themselves."""
    backoff = Backoff(window, base=0.1, cap=2.0)
    decoder = decoder_for(SamplerDeploymentStatus)
    status = "UNKNOWN"
    while True:
        try:
            response = await transport.send(
                "GET", deployment.status_url, CONTROL_READ, window=min(window, 20.0)
            )
        except errors.APIStatusError as exc:
            if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403):
                log.debug("sampler %s has no deployment status: %s", deployment.model_id, exc)
                return
            raise
        status = decode_body(decoder, response, deployment.status_url).status.upper()
        if status == "ACTIVE":
            return
        if status in _TERMINAL_SAMPLER_STATES:
            raise errors.SamplerTerminatedError(deployment.deployment_id, status)
        if status == "SCALED_TO_ZERO":
            woke = await transport.send(
                "POST", deployment.wake_url, PROBE, window=0.0, content=b"{}"
            )
            if woke.status_code not in (200, 202):
                raise error_for_response(woke)
        if not await backoff.wait():
            raise errors.OperationTimeoutError(
                f"sampler deployment {deployment.deployment_id} not ACTIVE after "
                f"{window:g} s ({status})"
            )


class SamplingClient:
    """Samples from one sampler: the live adapter of a run, a pinned checkpoint, or a base model.

    Made by :meth:`TrainingClient.save_weights_and_get_sampling_client`,
    :meth:`TrainingClient.create_sampling_client` or :meth:`ServiceClient.create_sampling_client`
    (each with an ``_async`` twin). :meth:`sample` blocks; :meth:`sample_async` awaits on
    asyncio or trio. Thousands of ``sample_async`` calls may be in flight at once.

    A sampling client is picklable: a copy made in another process opens its own connections
    (with the same base URL and routing headers). The API key is not pickled: the copy reads
    ``BASETEN_API_KEY`` from its own environment, unless ``pickle_api_key`` was set to True
    to carry the key in the pickle (in clear).
    """

    def __init__(
        self,
        *,
        transport: Transport,
        base_url: str,
        base_model: str,
        headers: Mapping[str, str],
        ready_timeout: float,
        sample_timeout: float,
        owns_transport: bool = False,
        shared: bool = False,
        lora: str | None = None,
        deployment: SamplerDeployment | None = None,
    ) -> None:
        self._transport = transport
        self._shared = shared
        self._lora = lora
        self._owns_transport = owns_transport
        self._base_url = base_url.rstrip("/")
        self._base_model = base_model
        self._headers = {k: v for k, v in headers.items() if k != "X-Baseten-Session-ID"}
        self._ready_timeout = ready_timeout
        self._sample_timeout = sample_timeout
        self._deployment = deployment
        self._pending: APIFuture[SamplingClient] | None = None
        self._closed = False
        self._pickle_api_key = False

    def __repr__(self) -> str:
        pins = {
            k: v
            for k, v in self._headers.items()
            if k in ("X-Min-Policy-Version", "X-Checkpoint-Path", "X-Run-Id", "X-Sampler-Id")
        }
        return f"<SamplingClient {self._base_url} base_model={self._base_model!r} {pins}>"

    # ------------------------------------------------------------------ pickling

    @property
    def pickle_api_key(self) -> bool:
        """Whether pickled copies carry the API key (in clear); False by default.

        False: a copy reads ``BASETEN_API_KEY`` from the environment of the process that
        unpickles it (and has no key when this client had none). True: the key is written
        into the pickle, readable by anyone who can read the pickle; opt in for workers that
        do not share the environment (``sampler.pickle_api_key = True``)."""
        return self._pickle_api_key

    @pickle_api_key.setter
    def pickle_api_key(self, carry: bool) -> None:
        self._pickle_api_key = bool(carry)

    def __getstate__(self) -> dict[str, Any]:
        transport = self._transport.config()
        if not self._pickle_api_key:
            # Whether there was a key, never the key itself (nor a credential header).
            transport["api_key"] = _KEY_FROM_ENV if transport.get("api_key") else None
            transport["extra_headers"] = {
                k: v
                for k, v in (transport.get("extra_headers") or {}).items()
                if k.lower() != "authorization"
            }
        return {
            "transport": transport,
            "pickle_api_key": self._pickle_api_key,
            "base_url": self._base_url,
            "base_model": self._base_model,
            "headers": dict(self._headers),
            "ready_timeout": self._ready_timeout,
            "sample_timeout": self._sample_timeout,
            "shared": self._shared,
            "lora": self._lora,
            "deployment": self._deployment,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        transport = dict(state["transport"])
        if transport.get("api_key") == _KEY_FROM_ENV:
            transport["api_key"] = os.environ.get("BASETEN_API_KEY") or None
        self.__init__(  # type: ignore[misc]
            transport=Transport(**transport),
            owns_transport=True,
            base_url=state["base_url"],
            base_model=state["base_model"],
            headers=state["headers"],
            ready_timeout=state["ready_timeout"],
            sample_timeout=state["sample_timeout"],
            shared=state["shared"],
            lora=state["lora"],
            deployment=state.get("deployment"),
        )
        self._pickle_api_key = bool(state.get("pickle_api_key", False))

    # ------------------------------------------------------------------ a future of itself

    def _await_before_sampling(self, pending: APIFuture[SamplingClient]) -> None:
        """Made by ``save_weights_and_get_sampling_client``: ``pending`` finishes the publish
        and the version wait; samples wait for its first half (the publish) only when the
        version could not be pinned up front."""
        self._pending = pending

    def _pin_version(self, version: int, path: str) -> None:
        """The publish finished: pin the exact version (or path, on a shared sampler)."""
        if self._shared:
            self._lora = path or self._lora
            if self._lora:
                self._headers["X-Checkpoint-Path"] = self._lora
        elif version > 0:
            self._headers["X-Min-Policy-Version"] = str(version)
        else:
            self._headers.pop("X-Min-Policy-Version", None)

    def done(self) -> bool:
        """Whether :meth:`result` would return at once (no I/O): the publish that made this
        client finished and the sampler reported its version (always true for a client not
        made by ``save_weights_and_get_sampling_client``)."""
        return self._pending is None or self._pending.done()

    async def result_async(self, timeout: float | None = None) -> SamplingClient:
        """Async twin of :meth:`result`."""
        if self._pending is not None:
            await self._pending.result_async(timeout)
        return self

    def result(self, timeout: float | None = None) -> SamplingClient:
        """Wait until the publish that made this client finished and the paired sampler serves
        it, then return this client (``await client`` does the same). Raises the publish's
        error, or :class:`~loops_async.errors.OperationTimeoutError` after ``timeout`` s."""
        pending = self._pending
        if pending is None:
            return self
        if pending.done():
            pending.result()  # the memoised outcome: no I/O
            return self
        return _portal.run(self.result_async, timeout, twin="result_async")

    def __await__(self) -> Generator[Any, None, SamplingClient]:
        return self.result_async().__await__()

    # ------------------------------------------------------------------ properties

    @property
    def min_policy_version(self) -> int | None:
        """The policy-version floor this client samples at (``X-Min-Policy-Version``)."""
        value = self._headers.get("X-Min-Policy-Version")
        return None if value is None else int(value)

    @property
    def checkpoint_path(self) -> str | None:
        """The checkpoint this client is pinned to (``X-Checkpoint-Path``, or the ``lora`` of a
        shared sampler's requests), if any."""
        return self._headers.get("X-Checkpoint-Path") or self._lora

    @property
    def checkpoint_name(self) -> str | None:
        """The name of the pinned checkpoint (the last segment of :attr:`checkpoint_path`)."""
        path = self.checkpoint_path
        return path.rstrip("/").rsplit("/", 1)[-1] if path else None

    def get_base_model(self) -> str:
        """The base model the sampler runs."""
        return self._base_model

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The ``transformers`` tokenizer of the base model (built-in models work offline)."""
        from .tokenizer import load_tokenizer

        tokenizer: PreTrainedTokenizerBase = load_tokenizer(self._base_model)
        return tokenizer

    # ------------------------------------------------------------------ sampling

    def _build(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams | None,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        include_routed_experts: bool | None = None,
    ) -> tuple[bytes, list[int]]:
        if self._closed:
            raise errors.ClientClosedError(f"{self!r} is closed")
        if not isinstance(prompt, ModelInput):
            raise errors.ValidationError(
                f"prompt: expected ModelInput, got {type(prompt).__name__}"
            )
        if any(not isinstance(c, EncodedTextChunk) for c in prompt.chunks):
            raise errors.ValidationError("prompt: image chunks cannot be sampled from here")
        tokens = prompt.to_ints()
        if not tokens:
            raise errors.ValidationError("prompt: empty prompt")
        if min(tokens) < 0:
            raise errors.ValidationError("prompt: token ids must be non-negative")
        n = _validate.check_positive_int(num_samples, "num_samples")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise errors.ValidationError(
                f"sampling_params: expected SamplingParams, got {type(params).__name__}"
            )
        if not (isinstance(params.temperature, int | float) and params.temperature >= 0):
            raise errors.ValidationError(
                f"sampling_params.temperature: must be >= 0, got {params.temperature!r}"
            )
        if not (isinstance(params.top_p, int | float) and 0 < params.top_p <= 1):
            raise errors.ValidationError(
                f"sampling_params.top_p: must be in (0, 1], got {params.top_p!r}"
            )
        if not isinstance(params.top_k, int) or (params.top_k != -1 and params.top_k < 1):
            raise errors.ValidationError(
                f"sampling_params.top_k: must be -1 (off) or >= 1, got {params.top_k!r}"
            )
        if params.max_tokens is not None:
            _validate.check_positive_int(params.max_tokens, "sampling_params.max_tokens")
        if params.seed is not None and (
            isinstance(params.seed, bool) or not isinstance(params.seed, int)
        ):
            raise errors.ValidationError(
                f"sampling_params.seed: expected an int, got {params.seed!r}"
            )
        stop_strings: list[str] = []
        stop_ids: list[int] = []
        stop = params.stop
        for item in [stop] if isinstance(stop, str) else (stop or []):
            if isinstance(item, str) and item:
                stop_strings.append(item)
            elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                stop_ids.append(item)
            else:
                raise errors.ValidationError(
                    f"sampling_params.stop: expected strings or token ids, got {item!r}"
                )
        if (
            isinstance(topk_prompt_logprobs, bool)
            or not isinstance(topk_prompt_logprobs, int)
            or not 0 <= topk_prompt_logprobs <= MAX_TOP_K_PROMPT_LOGPROBS
        ):
            raise errors.ValidationError(
                f"topk_prompt_logprobs: expected 0..{MAX_TOP_K_PROMPT_LOGPROBS}, "
                f"got {topk_prompt_logprobs!r}"
            )
        wants_prompt = bool(include_prompt_logprobs) or topk_prompt_logprobs > 0
        request = SampleRequest(
            prompt=tokens,
            n=n,
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            logprobs=0,
            return_tokens_as_token_ids=True,
            max_tokens=params.max_tokens,
            seed=params.seed,
            top_k=params.top_k if params.top_k > 0 else None,
            stop=stop_strings or None,
            stop_token_ids=stop_ids or None,
            prompt_logprobs=topk_prompt_logprobs if wants_prompt else None,
            model=self._base_model if self._shared else None,
            lora=self._lora if self._shared else None,
            structured_outputs=params.structured_outputs,
            include_routed_experts=include_routed_experts,
        )
        return encode(request), tokens

    async def _post(self, body: bytes, affinity_key: str | None) -> tuple[SampleAnswer, int | None]:
        """``POST {sampler}/sample`` under :data:`~loops_async._http.SAMPLE` (one
        ``Idempotency-Key`` for every retry); a 202 (shared sampler) is long-polled."""
        if self._shared and self._pending is not None and not self._pending.done():
            await self._pending.result_async()  # the pinned adapter must exist first
        headers = idempotency_headers(self._headers)
        headers["X-Baseten-Session-ID"] = affinity_key or new_key()
        response = await self._transport.send(
            "POST",
            f"{self._base_url}/sample",
            SAMPLE,
            window=self._ready_timeout,
            content=body,
            headers=headers,
            timeout=self._sample_timeout,
        )
        if response.status_code == 202:  # a shared sampler: the operation protocol (§2, §6)
            return await self._retrieve(accepted_operation_id(response))
        answer: SampleAnswer = decode_body(decoder_for(SampleAnswer), response, "sample")
        return answer, _policy_version(response)

    async def _retrieve(self, operation_id: str) -> tuple[SampleAnswer, int | None]:
        """Long-poll a shared sampler's operation; a caller that gives up (cancelled, timed
        out, failed) cancels the operation on the sampler, best effort."""
        url = f"{self._base_url}/operations/{quote(operation_id, safe='')}"
        try:
            answer, response = await poll_operation(
                self._transport,
                url,
                operation_id,
                SampleAnswer,
                table=SAMPLER_POLL,
                headers=self._headers,
                window=self._ready_timeout,
                operation="sample",
            )
        except (errors.RemoteOpError, errors.UnknownRequestError, errors.ProtocolError):
            raise  # the operation is over: nothing to cancel
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                try:
                    await self._transport.request(
                        "POST",
                        f"{url}/cancel",
                        lane=Lane.SAMPLING,
                        headers=self._headers,
                        content=b"{}",
                    )
                except Exception:  # best effort: never mask why we gave up
                    log.debug("could not cancel sampling operation %s", operation_id)
            raise
        return answer, _policy_version(response)

    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        affinity_key: str | None = None,
        include_routed_experts: bool | None = None,
    ) -> SampleResponse:
        """Async twin of :meth:`sample`."""
        if affinity_key is not None and (not isinstance(affinity_key, str) or not affinity_key):
            raise errors.ValidationError(
                f"affinity_key: expected a non-empty string, got {affinity_key!r}"
            )
        if include_routed_experts is not None and not isinstance(include_routed_experts, bool):
            raise errors.ValidationError(
                f"include_routed_experts: expected a bool, got {include_routed_experts!r}"
            )
        body, tokens = self._build(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            include_routed_experts,
        )
        answer, version = await self._post(body, affinity_key)
        return self._response(answer, version, tokens, topk_prompt_logprobs)

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        affinity_key: str | None = None,
        include_routed_experts: bool | None = None,
    ) -> SampleResponse:
        """Sample ``num_samples`` completions of ``prompt`` (``POST {sampler}/sample``).

        Each sequence has its tokens, their logprobs under the untempered model, a
        ``stop_reason`` and the decoded text. With ``include_prompt_logprobs`` (or
        ``topk_prompt_logprobs=k``) the response also has the prompt's logprobs (and the top-k
        candidates per position). A sampler behind the policy-version floor answers 408, and
        a starting one 400/404/503; the call retries them (and 502s) with back-off, bounded by
        ``ready_timeout``.

        ``affinity_key`` (``X-Baseten-Session-ID``) groups requests that should share a
        replica's prefix cache, e.g. one rollout group; by default every call gets its own.
        ``include_routed_experts`` asks an MoE sampler where it stored each token's experts.
        """
        return _portal.run(
            self.sample_async,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            affinity_key=affinity_key,
            include_routed_experts=include_routed_experts,
            twin="sample_async",
        )

    def _response(
        self, answer: SampleAnswer, version: int | None, prompt: list[int], k: int
    ) -> SampleResponse:
        sequences = []
        for choice in answer.choices:
            tokens = [_token_id(t) for t in choice.logprobs.tokens]
            logprobs = [
                math.nan if lp is None else float(lp) for lp in choice.logprobs.token_logprobs
            ]
            if len(tokens) > len(prompt) and tokens[: len(prompt)] == prompt:
                # An echoed prompt: keep the completion only.
                tokens = tokens[len(prompt) :]
                logprobs = logprobs[len(prompt) :]
            sequences.append(
                SampledSequence(
                    tokens=tokens,
                    logprobs=logprobs,
                    stop_reason="stop" if choice.finish_reason == "stop" else "length",
                    text=choice.text,
                    routed_experts=choice.routed_experts_ref,
                )
            )
        prompt_lps: list[float | None] | None = None
        topk: list[list[tuple[int, float]] | None] | None = None
        if answer.choices and answer.choices[0].prompt_logprobs is not None:
            prompt_lps, topk_all = _prompt_logprobs(answer.choices[0], prompt, k)
            topk = topk_all if k > 0 else None
        return SampleResponse(
            sequences=sequences,
            prompt_token_ids=answer.choices[0].prompt_token_ids if answer.choices else None,
            prompt_logprobs=prompt_lps,
            topk_prompt_logprobs=topk,
            policy_version=version,
        )

    async def compute_logprobs_async(
        self, prompt: ModelInput, *, affinity_key: str | None = None
    ) -> list[float | None]:
        """Async twin of :meth:`compute_logprobs`."""
        response = await self.sample_async(
            prompt,
            1,
            SamplingParams(max_tokens=1, temperature=0.0),
            include_prompt_logprobs=True,
            affinity_key=affinity_key,
        )
        return self._prompt_lps(response)

    def compute_logprobs(
        self, prompt: ModelInput, *, affinity_key: str | None = None
    ) -> list[float | None]:
        """The logprob of each prompt token given the ones before it (``None`` for the first),
        under the sampler's current weights."""
        return _portal.run(
            self.compute_logprobs_async,
            prompt,
            affinity_key=affinity_key,
            twin="compute_logprobs_async",
        )

    # ------------------------------------------------------------------ readiness & discovery

    async def ensure_ready_async(self, ready_timeout: float | None = None) -> None:
        """Async twin of :meth:`ensure_ready`."""
        if self._deployment is None or self._shared:
            return
        window = self._ready_timeout if ready_timeout is None else float(ready_timeout)
        await wait_deployment_active(self._transport, self._deployment, window)

    def ensure_ready(self, ready_timeout: float | None = None) -> None:
        """Wait until the sampler's deployment is ACTIVE (waking a scaled-to-zero one), at
        most ``ready_timeout`` s (default: the client's). A terminal status raises
        :class:`~loops_async.errors.SamplerTerminatedError`; a deployment-status route that
        answers 4xx means "no status here" and returns at once. Shared samplers are always
        ready."""
        return _portal.run(self.ensure_ready_async, ready_timeout, twin="ensure_ready_async")

    @classmethod
    def ensure_ready_for_deployment(
        cls,
        *,
        base_model: str,
        deployment: Any,
        api_key: str | None = None,
        ready_timeout: float = 3600.0,
    ) -> None:
        """Wait until a sampler deployment is ACTIVE without making a client. ``deployment``
        has ``base_url``, ``model_id``, ``deployment_id`` and ``api_base_url`` attributes (or
        is a :class:`SamplerDeployment`)."""
        target = SamplerDeployment.of(deployment)
        transport = Transport(api_key=api_key, timeout=30.0, max_connections=4)

        async def wait() -> None:
            try:
                await wait_deployment_active(transport, target, float(ready_timeout))
            finally:
                await transport.aclose()

        _portal.run(wait, twin="ensure_ready_async")
        log.debug("sampler for %s is ready", base_model)

    async def _models(self) -> list[dict[str, Any]]:
        response = await self._transport.send(
            "GET",
            f"{self._base_url}/v1/models",
            SAMPLER_MODELS,
            window=self._ready_timeout,
            headers=self._headers,
        )
        body = decode_body(msgspec.json.Decoder(), response, "GET /v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        return [entry for entry in data or [] if isinstance(entry, dict)]

    async def discover_base_model_name_async(self) -> str:
        """Async twin of :meth:`discover_base_model_name`."""
        if self._shared:
            return self._base_model
        for entry in await self._models():
            if entry.get("parent") is None and isinstance(entry.get("id"), str):
                return str(entry["id"])
        return self._base_model

    def discover_base_model_name(self) -> str:
        """The base model's name as the sampler lists it (``GET /v1/models``)."""
        return _portal.run(
            self.discover_base_model_name_async, twin="discover_base_model_name_async"
        )

    async def discover_adapter_name_async(self) -> str | None:
        """Async twin of :meth:`discover_adapter_name`."""
        if self._shared:
            return self.checkpoint_path
        for entry in await self._models():
            if entry.get("parent") is not None and isinstance(entry.get("id"), str):
                return str(entry["id"])
        return None

    def discover_adapter_name(self) -> str | None:
        """The adapter the sampler serves (the first model with a parent in
        ``GET /v1/models``), or ``None`` when it serves the base model only."""
        return _portal.run(self.discover_adapter_name_async, twin="discover_adapter_name_async")

    @staticmethod
    def _prompt_lps(response: SampleResponse) -> list[float | None]:
        if response.prompt_logprobs is None:
            raise errors.ProtocolError("the sampler did not return prompt logprobs")
        return response.prompt_logprobs

    # ------------------------------------------------------------------ lifetime

    async def aclose(self) -> None:
        """Close the client (and its own connections, for an unpickled copy)."""
        self._closed = True
        if self._owns_transport:
            await self._transport.aclose()

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`."""
        self._closed = True
        if self._owns_transport:
            _portal.ensure_sync_context("aclose")
            self._transport.close()

    def __enter__(self) -> SamplingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> SamplingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
