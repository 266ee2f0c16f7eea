"""The local server's ASGI app: a Starlette app speaking the Loops protocol (PROTOCOL.md).

:func:`create_app` assembles it from the route modules:

- :mod:`~loops_async.server.control_routes`: ``GET /``, teams, sessions, trainers (and their
  debug routes), deployments, checkpoints (list, ``DELETE``), ``DELETE /v1/loops/runs/<id>``,
  capabilities;
- :mod:`~loops_async.server.trainer_routes`: ``/runs/<run_id>/...`` (submit, long-poll,
  cancel, health, policy version);
- :mod:`~loops_async.server.sampler_routes`: samplers, checkpoint files and ``GET
  /files/<token>``;

behind :class:`~loops_async.server.middleware.GuardMiddleware` (trusted ``Host``, no foreign
``Origin``, API key, JSON writes, body cap), with the error handlers of
:mod:`~loops_async.server.http`: every rejection has a JSON body with ``detail`` and
``error_class``; every invalid request is a 422 ``ValidationError`` whose ``detail`` names the
field. Large bodies are decoded a few at a time on worker threads (:func:`get_body_gate`).

The hosted profile (``ServerSettings.profile``) adds the hosted service's cold starts
(:mod:`~loops_async.server.hosted`: a new run's first health checks answer 503 and its first
submits 404, without ``error_class``), sampler routes under ``/sync`` and presigned storage on a
second port (:mod:`~loops_async.server.storage_app`, :func:`get_storage_app`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from .control_routes import ControlHandlers, control_routes
from .http import BodyGate, HTTPError, cold_start_error, exception_handlers
from .middleware import GuardMiddleware, TrustedHosts
from .runs import ServerState
from .sampler_routes import SamplingHandlers, sampler_routes
from .settings import ServerSettings
from .trainer_routes import TrainerHandlers, trainer_routes

__all__ = [
    "HTTPError",
    "cold_start_error",
    "create_app",
    "get_body_gate",
    "get_state",
    "get_storage_app",
]

logger = logging.getLogger("loops_async.server")


def create_app(settings: ServerSettings) -> Starlette:
    """Build the ASGI app for ``settings``.

    The app's lifespan owns an anyio task group in which every run builds its backend and
    executes its operations; leaving the lifespan wakes pending long-polls (503) and cancels
    them. The live :class:`~loops_async.server.runs.ServerState` is ``get_state(app)``.
    """
    state = ServerState(settings)
    gate = BodyGate(settings.max_concurrent_decodes)
    control = ControlHandlers(state, gate)
    sampling = SamplingHandlers(state, gate)
    routes: list[BaseRoute] = [
        *control_routes(control, sampling),
        *trainer_routes(TrainerHandlers(state, gate)),
        *sampler_routes(sampling),
    ]

    shared_cache = state.samplers.shared_cache_root

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.storage.sweep)  # logs what it removed
        await anyio.to_thread.run_sync(shutil.rmtree, shared_cache, True)
        try:
            async with anyio.create_task_group() as tg:
                state.attach(tg)
                tg.start_soon(state.sweep_forever, min(60.0, settings.result_ttl / 2))
                try:
                    yield
                finally:
                    state.begin_shutdown()
                    state.attach(None)
                    tg.cancel_scope.cancel()
        finally:
            shutil.rmtree(shared_cache, ignore_errors=True)  # shared samplers' adapter copies

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                GuardMiddleware,
                api_key=settings.api_key,
                max_body_bytes=settings.max_body_bytes,
                trusted_hosts=TrustedHosts(settings.allowed_hosts, bound_host=settings.host),
            )
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.state.loops = state
    app.state.loops_body_gate = gate
    storage_app: Starlette | None = None
    if settings.profile == "hosted":
        from .storage_app import create_storage_app

        storage_app = create_storage_app(state)
    app.state.loops_storage = storage_app
    return app


def get_state(app: Starlette) -> ServerState:
    """The live state of an app made by :func:`create_app`."""
    return cast(ServerState, app.state.loops)


def get_body_gate(app: Starlette) -> BodyGate:
    """The :class:`~loops_async.server.http.BodyGate` of an app made by :func:`create_app`
    (how many large bodies are being decoded, the most at once, ...)."""
    return cast(BodyGate, app.state.loops_body_gate)


def get_storage_app(app: Starlette) -> Starlette | None:
    """The hosted profile's presigned-storage app that goes with an app made by
    :func:`create_app` (None in the local profile). Whoever serves it on its own port sets
    ``get_state(app).storage_url`` so that file links point there."""
    return cast("Starlette | None", app.state.loops_storage)
