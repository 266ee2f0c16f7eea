"""The hosted profile's stand-in for presigned object storage: a small ASGI app on its own port.

In the hosted profile ``GET /v1/loops/checkpoints/<id>/files`` answers URLs on this listener
(``http://127.0.0.1:<storage port>/files/<token>``), another origin than the API, as S3
presigned URLs are. It serves the same HMAC-signed tokens as the API's own ``/files/`` route
(:mod:`~loops_async.server.file_links`) and, like S3, refuses a request that carries an
``Authorization`` header besides the URL's own signature: 400 ``{"detail": "InvalidArgument:
Only one auth mechanism allowed; ...", "error_class": "InvalidArgument"}``. A client must
therefore send none of its default headers to a URL on another origin (PROTOCOL.md §8).

:class:`~loops_async.server.LocalServer` and ``loops-async serve`` start it with the API (a
second uvicorn server on the same event loop) and stop it with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .http import (
    HTTPError,
    _error_body,
    _on_http_error,
    _on_internal,
    _on_starlette_http,
    _send_json,
)

if TYPE_CHECKING:
    from .runs import ServerState

__all__ = ["ONE_AUTH_MECHANISM", "create_storage_app"]

ONE_AUTH_MECHANISM = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature "
    "query string parameter or the Authorization header should be specified"
)
"""S3's message for a presigned URL fetched with an ``Authorization`` header."""


class _RefuseAuthorization:
    """Answer 400 to any request with an ``Authorization`` header (the URL is its own
    credential, as a presigned URL is), before any route runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            name.lower() == b"authorization" for name, _ in scope["headers"]
        ):
            body = _error_body(f"InvalidArgument: {ONE_AUTH_MECHANISM}", "InvalidArgument")
            await _send_json(send, 400, body)
            return
        await self.app(scope, receive, send)


def create_storage_app(state: ServerState) -> Starlette:
    """The presigned-storage app of ``state``'s checkpoint files (``GET /files/<token>``)."""
    from .sampler_routes import file_response

    async def download(request: Request) -> Response:
        """``GET /files/<token>``: the file's bytes; 404 for an invalid or expired link."""
        return file_response(state, request.path_params["token"])

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPError: _on_http_error,
        HTTPException: _on_starlette_http,
        Exception: _on_internal,
    }
    return Starlette(
        routes=[Route("/files/{token}", download, methods=["GET"])],
        middleware=[Middleware(_RefuseAuthorization)],
        exception_handlers=cast(Any, handlers),
    )
