"""The guard in front of every route of the local server's API (:class:`GuardMiddleware`).

Web pages must not be able to drive the server: a page that a browser on this machine opens
can send requests to ``127.0.0.1`` (cross-site request forgery), and a name that an attacker's
DNS points at ``127.0.0.1`` makes the browser treat the server as the attacker's own origin
(DNS rebinding). So, in this order:

1. **Trusted hosts.** The ``Host`` header must name a loopback host (``127.0.0.1``,
   ``localhost``, ``[::1]``, any port), the interface the server is bound to, or a name of
   ``allowed_hosts`` (``*`` allows any); else 400 ``UntrustedHostError``. A rebinding page
   always sends its own name.
2. **Origins.** A request with an ``Origin`` header (browsers send one on cross-origin requests
   and on every POST) must come from this server's own origin (the ``Host`` it was sent to) or a
   loopback origin on this server's port; else 403 ``ForbiddenOriginError``. Programs (httpx,
   the SDK) send no ``Origin``.
3. **API key** (when configured): 401 without ``Authorization: Api-Key <key>``
   (``Bearer`` works too; constant-time comparison). ``/files/<token>`` links are their own
   credential, as presigned URLs are.
4. **Writes are JSON.** A POST, PUT, PATCH or DELETE with a body must say
   ``Content-Type: application/json`` (parameters such as ``charset`` are fine): form posts,
   ``text/plain`` and multipart — what a page can send without a CORS preflight — get 415
   ``UnsupportedMediaTypeError``. A write without a body needs no content type.
5. **Body cap.** A body over ``max_body_bytes`` gets 413: at once when ``Content-Length`` says
   so (nothing is read), else as soon as the streamed body crosses the limit.

Every rejection is JSON ``{"detail", "error_class"}``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http import _error_body, _send_json

__all__ = ["GuardMiddleware", "TrustedHosts", "is_loopback", "split_authority"]

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON = b"application/json"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 without brackets) is this machine's
    loopback: ``localhost``, ``127.0.0.0/8`` or ``::1``."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_authority(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a ``Host`` header; IPv6 in brackets) as ``(host, port)``, the host
    lower-cased and without brackets; None when malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:
        return None  # a bare IPv6 address is not a valid Host header
    else:
        host, sep, port_text_or_empty = value.partition(":")
        port_text = port_text_or_empty if sep else None
    if not host or any(c.isspace() or c in "/@\\" for c in host):
        return None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    port = int(port_text)
    return (host, port) if port <= 65535 else None


class TrustedHosts:
    """The hosts a ``Host`` header may name: loopback names (any port), the interface the
    server is bound to (unless it is a wildcard such as ``0.0.0.0``) and ``allowed`` entries
    (``name`` = any port, ``name:port`` = that port only, ``*`` = any host at all)."""

    def __init__(self, allowed: Iterable[str] = (), *, bound_host: str | None = None) -> None:
        self.any_host = False
        self._names: set[str] = set()
        self._exact: set[tuple[str, int]] = set()
        entries = list(allowed)
        if bound_host is not None and bound_host.lower() not in _WILDCARD_BINDS:
            entries.append(f"[{bound_host}]" if bound_host.count(":") > 1 else bound_host)
        for entry in entries:
            if entry.strip() == "*":
                self.any_host = True
                continue
            parsed = split_authority(
                f"[{entry}]" if entry.count(":") > 1 and "[" not in entry else entry
            )
            if parsed is None:
                raise ValueError(f"allowed_hosts: not a host name or host:port: {entry!r}")
            host, port = parsed
            if port is None:
                self._names.add(host)
            else:
                self._exact.add((host, port))

    def __repr__(self) -> str:
        exact = [f"{h}:{p}" for h, p in sorted(self._exact)]
        shown = ["*"] if self.any_host else sorted(self._names) + exact
        return f"TrustedHosts(loopback + {shown})"

    def trusts(self, host: str, port: int | None) -> bool:
        """Whether a ``Host`` header naming ``host`` (and ``port``) is accepted."""
        if self.any_host or is_loopback(host) or host in self._names:
            return True
        return port is not None and (host, port) in self._exact


def _origin_allowed(origin: str, host: tuple[str, int | None], server_port: int | None) -> bool:
    """Whether an ``Origin`` is this server's: the origin the request was addressed to (its
    ``Host``), or a loopback origin on the port the server listens on."""
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        return False  # "null" (sandboxed pages, file://) and anything that is not an origin
    origin_host = parts.hostname.lower()
    origin_port = origin_port or _DEFAULT_PORTS[parts.scheme]
    host_name, host_port = host
    # A Host without a port was addressed to the default port of the origin's scheme (behind
    # a TLS proxy the server itself sees plain http).
    if origin_host == host_name and origin_port == (host_port or _DEFAULT_PORTS[parts.scheme]):
        return True
    return is_loopback(origin_host) and server_port is not None and origin_port == server_port


def _needs_json_type(method: str, headers: dict[bytes, bytes]) -> bool:
    """Whether a request's content type is refused: a write whose body is not declared JSON."""
    if method not in _WRITE_METHODS:
        return False
    ctype = headers.get(b"content-type")
    if ctype is None:
        # No content type is fine only without a body.
        if b"transfer-encoding" in headers:
            return True
        length = headers.get(b"content-length")
        return length is not None and length.strip() not in (b"0", b"")
    media = ctype.split(b";", 1)[0].strip().lower()
    return media != _JSON


_Refusal = tuple[int, str, str, list[tuple[bytes, bytes]]]
"""``(status, detail, error_class, extra headers)``."""


async def _reject(send: Send, refusal: _Refusal) -> None:
    status, detail, error_class, extra = refusal
    await _send_json(send, status, _error_body(detail, error_class), extra=extra)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Trusted hosts, origins, API key, JSON writes and the body cap, in front of every route
    (see the module docstring for the rules and their order).

    Args:
        app: the ASGI app behind the guard.
        api_key: the key every request must carry (None: no key).
        max_body_bytes: the largest request body accepted.
        trusted_hosts: what a ``Host`` header may name (default: loopback only).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        trusted_hosts: TrustedHosts | None = None,
    ) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode()
        self._max = max_body_bytes
        self._hosts = trusted_hosts if trusted_hosts is not None else TrustedHosts()

    def __repr__(self) -> str:
        return (
            f"GuardMiddleware(api_key={'set' if self._key else None}, max={self._max}, "
            f"{self._hosts!r})"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _reject(send, refusal)
            return
        total = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self._max:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _reject(send, self._too_large())

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> _Refusal | None:
        """Why the request is refused before any route runs: ``(status, detail, error_class,
        extra headers)``, or None to let it through."""
        raw_host = headers.get(b"host")
        host = None if raw_host is None else split_authority(raw_host.decode("latin-1"))
        if host is None or not self._hosts.trusts(*host):
            shown = "(none)" if raw_host is None else repr(raw_host.decode("latin-1")[:100])
            return (
                400,
                f"Host header {shown} is not trusted: this server answers requests addressed to "
                "127.0.0.1, localhost or [::1] (add other names with --allowed-host or "
                "LOOPS_ASYNC_ALLOWED_HOSTS)",
                "UntrustedHostError",
                [],
            )
        origin = headers.get(b"origin")
        if origin is not None:
            server = scope.get("server")
            server_port = server[1] if isinstance(server, tuple | list) and server else None
            text = origin.decode("latin-1")
            if not _origin_allowed(text, host, server_port):
                return (
                    403,
                    "requests from web pages of another origin are refused "
                    f"(Origin {text[:100]!r})",
                    "ForbiddenOriginError",
                    [],
                )
        if (
            self._key is not None
            and not str(scope.get("path", "")).startswith("/files/")
            and not self._authorized(headers.get(b"authorization"))
        ):
            return (
                401,
                "missing or invalid API key (Authorization: Api-Key <key>)",
                "AuthenticationError",
                [(b"www-authenticate", b"Api-Key")],
            )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self._max
            except ValueError:
                return 400, "invalid Content-Length header", "BadRequestError", []
            if too_large:
                return self._too_large()
        method = str(scope.get("method", "GET")).upper()
        if _needs_json_type(method, headers):
            ctype = headers.get(b"content-type")
            shown = "none" if ctype is None else repr(ctype.decode("latin-1")[:100])
            return (
                415,
                f"Content-Type: {method} bodies must be application/json (got {shown})",
                "UnsupportedMediaTypeError",
                [],
            )
        return None

    def _authorized(self, header: bytes | None) -> bool:
        assert self._key is not None
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() not in (b"api-key", b"bearer"):
            return False
        return hmac.compare_digest(token.strip(), self._key)

    def _too_large(self) -> _Refusal:
        return (
            413,
            f"request body exceeds the server's limit of {self._max} bytes",
            "RequestTooLargeError",
            [(b"connection", b"close")],
        )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}
