"""Settings of the local reference server.

:class:`ServerSettings` is a frozen dataclass; the CLI and :class:`~loops_async.server.LocalServer`
build one from keyword overrides and, for the CLI, from ``LOOPS_ASYNC_*`` environment variables
(:meth:`ServerSettings.from_env`). The API key is never shown in ``repr``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = ["DEFAULT_DATA_DIR", "LOG_LEVELS", "BackendName", "ProfileName", "ServerSettings"]

BackendName = Literal["torch", "null"]
"""The training backends the server can run: ``torch`` (real training) or ``null`` (instant
synthetic results of the right shapes, for client benchmarks)."""

ProfileName = Literal["local", "hosted"]
"""How the server behaves at the edges: ``local`` (the reference behaviour) or ``hosted`` (the
rough edges of the hosted service a client must survive, PROTOCOL.md §8: sampler URLs under
``/sync``, cold starts, presigned storage on another origin)."""

DEFAULT_DATA_DIR = Path(".loops-data")
"""Where ``loops-async serve`` keeps runs and checkpoints unless told otherwise."""

_ENV_PREFIX = "LOOPS_ASYNC_"

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""The accepted ``log_level`` names (uvicorn's)."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything the local server can be configured with.

    Attributes are validated on construction (``ValueError`` naming the field).
    """

    host: str = "127.0.0.1"
    """Interface to bind. The default accepts local connections only."""
    port: int = 8700
    """TCP port; 0 picks a free one."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Root of ``runs/<run_id>/weights|sampler_weights/<name>/`` checkpoint directories."""
    backend: BackendName = "torch"
    """``torch`` trains for real; ``null`` answers instantly (protocol only)."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every request must carry ``Authorization: Api-Key <key>`` (never shown)."""
    poll_hold: float = 30.0
    """Seconds a retrieve (long-poll) is held before it answers 408."""
    result_ttl: float = 3600.0
    """Seconds an operation's result is kept after it finished; later retrieves get 404."""
    seq_gap_timeout: float = 5.0
    """Seconds the run executor waits for a missing ``seq_id`` before skipping it."""
    max_seq_ahead: int = 1_000_000
    """How far beyond a run's next expected ``seq_id`` a submit's ``seq_id`` may be; one further
    ahead gets 422 (so one absurd ``seq_id`` cannot leave every real one behind)."""
    max_queued_ops: int = 1000
    """How many operations a run may hold accepted but not started; more get 429 with
    ``Retry-After`` (the client backs off), so queued bodies cannot pile up without bound."""
    max_results_per_run: int = 10_000
    """How many finished operation results a run keeps; beyond it the oldest are forgotten
    (a retrieve then gets 404, as after ``result_ttl``)."""
    max_result_bytes_per_run: int = 256 * 1024 * 1024
    """Bytes of finished operation results a run keeps; beyond it the oldest are forgotten
    (the newest is always kept). Unfinished operations are never forgotten."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body accepted; larger ones get 413 without being read. The default
    leaves headroom above the client's 24 MiB request chunks."""
    allowed_hosts: tuple[str, ...] = ()
    """Names a request's ``Host`` header may carry besides loopback (``127.0.0.1``,
    ``localhost``, ``[::1]``) and the bound ``host``: ``name`` (any port), ``name:port``, or
    ``*`` (any host). A string is read as a comma-separated list. Others get 400."""
    max_concurrent_decodes: int = 2
    """How many large request bodies (over 1 MiB) are read and decoded at once; the others
    wait their turn (bounded memory)."""
    max_sessions: int = 1000
    """Most sessions kept; ``POST /sessions`` beyond it answers 429 (idle ones are forgotten
    first)."""
    max_runs: int = 64
    """Most live runs; ``POST /trainers`` beyond it answers 429 (``DELETE /v1/loops/runs/<id>``
    frees a slot)."""
    seed: int = 0
    """Default seed of new trainers (a ``POST /trainers`` body may override it)."""
    null_delay: float = 0.0
    """Test knob: seconds every ``null``-backend operation takes (0 = instant)."""
    null_sample_delay: float = 0.0
    """Test knob: seconds every ``null``-backend sampling batch takes (0 = instant), to hold
    many samples in flight the way a real model does (benchmarks)."""
    log_level: str = "info"
    """Log level of the server's loggers (uvicorn's names: debug, info, warning, ...)."""
    profile: ProfileName = "local"
    """``local``: the reference behaviour. ``hosted``: reproduce the hosted service's rough
    edges (PROTOCOL.md §8; see ``docs/local-server.md``, "Hosted profile")."""
    cold_start_requests: int = 2
    """Hosted profile: how many requests a new deployment refuses in each cold-start phase (a
    dedicated sampler: this many 404s, then this many 503s; a trainer: this many ``/health``
    503s and this many op-submit 404s). 0 = no cold starts. Ignored by the local profile."""
    cold_start_retry_after: float = 1.0
    """Hosted profile: the ``Retry-After`` seconds of a cold-start 503."""
    storage_port: int = 0
    """Hosted profile: TCP port of the presigned-storage listener (0 = any free port)."""
    shared_samplers: bool = False
    """Make every sampler shared (serverless: ``model_id`` null, the operation protocol), as
    ``"scope": "serverless"`` does for one. Both profiles."""
    omit_result_paths: bool = False
    """Answer ``save_state`` / ``save_weights_for_sampler`` without ``path`` (as older hosted
    trainers do). Both profiles."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.backend not in get_args(BackendName):
            raise ValueError(
                f"backend: must be one of {get_args(BackendName)}, got {self.backend!r}"
            )
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be an integer in 0..65535, got {self.port!r}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must not be empty (use None for no key)")
        for name in ("poll_hold", "result_ttl", "seq_gap_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")
        for name in ("null_delay", "null_sample_delay"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be >= 0 seconds, got {value!r}")
        if self.profile not in get_args(ProfileName):
            raise ValueError(
                f"profile: must be one of {get_args(ProfileName)}, got {self.profile!r}"
            )
        if (
            isinstance(self.cold_start_requests, bool)
            or not isinstance(self.cold_start_requests, int)
            or self.cold_start_requests < 0
        ):
            raise ValueError(
                f"cold_start_requests: must be an integer >= 0, got {self.cold_start_requests!r}"
            )
        value = self.cold_start_retry_after
        if not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise ValueError(f"cold_start_retry_after: must be in 0..3600 seconds, got {value!r}")
        if not isinstance(self.storage_port, int) or not 0 <= self.storage_port <= 65535:
            raise ValueError(
                f"storage_port: must be an integer in 0..65535, got {self.storage_port!r}"
            )
        for name in ("shared_samplers", "omit_result_paths"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(  # noqa: TRY004 (every settings error is a ValueError)
                    f"{name}: must be true or false, got {getattr(self, name)!r}"
                )
        hosts: Any = self.allowed_hosts
        if isinstance(hosts, str):
            hosts = hosts.split(",")
        if not isinstance(hosts, list | tuple) or not all(isinstance(h, str) for h in hosts):
            raise ValueError(f"allowed_hosts: must be a list of host names, got {hosts!r}")
        hosts = tuple(h.strip().lower() for h in hosts if h.strip())
        for h in hosts:
            if any(c.isspace() or c in "/@\\?#," for c in h):
                raise ValueError(f"allowed_hosts: not a host name or host:port: {h!r}")
        object.__setattr__(self, "allowed_hosts", hosts)
        for name in ("max_concurrent_decodes", "max_sessions", "max_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.api_key is None:
            import ipaddress

            bind = self.host.strip().strip("[]").lower()
            try:
                loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"host: {self.host!r} is not a loopback address, so anyone who can reach "
                    "the port could drive the server: set an API key (LOOPS_ASYNC_API_KEY or "
                    "--api-key) to listen there, or bind 127.0.0.1"
                )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level: must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(
                f"max_body_bytes: must be a positive integer, got {self.max_body_bytes!r}"
            )
        for name in (
            "max_seq_ahead",
            "max_queued_ops",
            "max_results_per_run",
            "max_result_bytes_per_run",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")

    def replace(self, **changes: Any) -> ServerSettings:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ``LOOPS_ASYNC_<FIELD>`` variables (``LOOPS_ASYNC_PORT``,
        ``LOOPS_ASYNC_API_KEY``, ...), then ``overrides`` (None values are ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse_env(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_INT_FIELDS = frozenset(
    {
        "port",
        "max_body_bytes",
        "seed",
        "cold_start_requests",
        "storage_port",
        "max_seq_ahead",
        "max_queued_ops",
        "max_results_per_run",
        "max_result_bytes_per_run",
        "max_concurrent_decodes",
        "max_sessions",
        "max_runs",
    }
)
_FLOAT_FIELDS = frozenset(
    {
        "poll_hold",
        "result_ttl",
        "seq_gap_timeout",
        "null_delay",
        "null_sample_delay",
        "cold_start_retry_after",
    }
)
_BOOL_FIELDS = frozenset({"shared_samplers", "omit_result_paths"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_env(name: str, raw: str) -> Any:
    var = _ENV_PREFIX + name.upper()
    try:
        if name in _INT_FIELDS:
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
    except ValueError:
        raise ValueError(f"{var}: not a number: {raw!r}") from None
    if name in _BOOL_FIELDS:
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{var}: not a boolean (1/0, true/false, yes/no, on/off): {raw!r}")
    if name == "data_dir":
        return Path(raw).expanduser()
    return raw
