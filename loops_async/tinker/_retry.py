"""tinker's ``RetryConfig`` (``tinker.lib.retry_handler``), accepted for compatibility.

The layer retries with the core's one request policy (:mod:`loops_async._http`: per-route
status tables, backoff with jitter, ``Retry-After``); a ``RetryConfig`` given to
``create_sampling_client`` is accepted and does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from ._errors import APIConnectionError

__all__ = ["RetryConfig"]


@dataclass
class RetryConfig:
    """tinker's retry settings (accepted; the core's retry policy applies)."""

    max_connections: int | None = 1000
    progress_timeout: float = 7200
    retry_delay_base: float = 0.5
    retry_delay_max: float = 10.0
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True
    enable_stuck_detection: bool = True
    retryable_exceptions: tuple[type[Exception], ...] = field(
        default=(TimeoutError, APIConnectionError, httpx.TimeoutException)
    )
