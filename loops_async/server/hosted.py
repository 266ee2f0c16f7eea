"""Cold starts of the hosted profile (``ServerSettings.profile == "hosted"``, PROTOCOL.md §8).

While a hosted deployment starts, the proxy in front of it answers for it: 404 (no replica
routed yet), then 503 with ``Retry-After`` (a replica is starting). Those answers carry no
``error_class``, so a client knows they are not a considered rejection and retries them. The
hosted profile reproduces that with countdowns:

- a new **dedicated sampler** refuses its first ``cold_start_requests`` requests under its
  ``base_url`` (``.../sync/...``) with 404, then the next ``cold_start_requests`` with 503;
- a new **trainer** refuses its first ``cold_start_requests`` ``GET /health`` checks with 503 and,
  independently, its first ``cold_start_requests`` op submits with 404 (those submits are
  neither recorded nor executed).

Shared (serverless) samplers run on warm shared capacity and have no cold start. The local
profile has none at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .settings import ServerSettings

__all__ = ["SamplerColdStart", "TrainerColdStart", "retry_after_header"]


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` for ``seconds`` (``1``, ``0.05``, ``0``; clients read it as a float)."""
    return format(float(seconds), "g")


def _count(settings: ServerSettings) -> int:
    return settings.cold_start_requests if settings.profile == "hosted" else 0


@dataclass
class SamplerColdStart:
    """What a starting dedicated sampler still refuses (hosted profile)."""

    not_found: int = 0
    """Requests left that answer 404."""
    unavailable: int = 0
    """Requests left (after the 404s) that answer 503 with ``Retry-After``."""

    @classmethod
    def for_settings(cls, settings: ServerSettings) -> SamplerColdStart:
        """The cold start of a new dedicated sampler (none in the local profile)."""
        n = _count(settings)
        return cls(not_found=n, unavailable=n)

    def refuse(self) -> Literal[404, 503] | None:
        """Count one request; the status it is refused with, or None once the sampler is up."""
        if self.not_found > 0:
            self.not_found -= 1
            return 404
        if self.unavailable > 0:
            self.unavailable -= 1
            return 503
        return None


@dataclass
class TrainerColdStart:
    """What a starting trainer still refuses (hosted profile)."""

    health: int = 0
    """``GET /health`` checks left that answer 503 with ``Retry-After``."""
    submits: int = 0
    """Op submits left that answer 404 (not recorded, not executed)."""

    @classmethod
    def for_settings(cls, settings: ServerSettings) -> TrainerColdStart:
        """The cold start of a new trainer (none in the local profile)."""
        n = _count(settings)
        return cls(health=n, submits=n)

    def refuse_health(self) -> bool:
        """Count one health check; whether it is refused."""
        if self.health > 0:
            self.health -= 1
            return True
        return False

    def refuse_submit(self) -> bool:
        """Count one op submit; whether it is refused."""
        if self.submits > 0:
            self.submits -= 1
            return True
        return False
