"""The direct path: HTTP/1.1 requests one level below ``httpx.AsyncClient``, for the default
transport only.

:class:`~loops_async._http.Transport` sends every request through here unless the user gave a
custom ``http_transport=`` (tests' ``httpx.MockTransport``), proxies are configured in the
environment, a request has query ``params`` or a URL httpx would rewrite, or a server has set a
cookie: those take the ``httpx.AsyncClient`` path, which behaves exactly as before. httpx's
``INFO`` line per request is logged the same way on both paths.

What it skips, per request (profiled in ``benchmarks/README.md``): httpx's request building
(URL merging, header and cookie handling, auth and redirect machinery, event hooks, response
stream wrappers), httpcore's connection pool (whose bookkeeping scans every connection on each
request and each response, and every idle one against every other: quadratic in idle
connections), and ``h11``'s event machinery. What it keeps: anyio streams (``connect_tcp``,
``TLSStream`` with httpx's SSL context), httpx's request headers, httpx's exception classes
(mapped to :mod:`loops_async.errors` by the one mapping in ``_http``), and an ``httpx.Response``
(bodies decoded by httpx, so ``Content-Encoding`` works as before).

The HTTP/1.1 client side is small: one write per request (head and body together), a response
head parsed as h11 would (status line, headers, obsolete line folding, ``\\n`` or ``\\r\\n``
line ends), bodies framed by ``Content-Length``, ``chunked`` or the connection's close, ``1xx``
answers skipped, ``Connection: close`` and HTTP/1.0 honoured. Header names and values are
checked before anything is written (no CR, LF or NUL can reach the wire).

Connections are kept per origin in a LIFO stack (O(1) per request; the warmest is reused) and
checked for keep-alive expiry and a server-side close only when taken. Their number is bounded
by the callers' in-flight limits (one connection per request in flight). Each request runs its
write and its reads under one cancel scope whose deadline is moved per operation (the write
timeout for the write, the read timeout for each read, as httpx applies them).
"""

from __future__ import annotations

import math
import re
import select
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls
import httpx

__all__ = ["DirectPool", "DirectResponse"]

READ_NUM_BYTES = 64 * 1024
MAX_HEAD_BYTES = 100 * 1024
"""Largest response head accepted (as httpcore's ``h11`` limit)."""
COALESCE_BYTES = 256 * 1024
"""Bodies up to this size go out in the same write as the request head."""
_MAX_TARGETS = 4096
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_HEAD_END = re.compile(rb"\n\r?\n")
_PCHARS = r"(?:[-A-Za-z0-9._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*"
_SAFE_TARGET = re.compile(rf"/{_PCHARS}(?:\?(?:{_PCHARS}|\?)*)?")
"""A request target httpx sends as written (it percent-encodes anything else)."""
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")

_Origin = tuple[bytes, bytes, int]
"""(scheme, host, port)"""


class DirectResponse(httpx.Response):
    """An ``httpx.Response`` whose ``request`` is made only when asked for (error messages,
    cookies): most responses never need one."""

    _method: str
    _url: str

    @property
    def request(self) -> httpx.Request:
        if self._request is None:
            self._request = httpx.Request(self._method, self._url)
        return self._request

    @request.setter
    def request(self, value: httpx.Request) -> None:
        self._request = value


def _readable(sock: Any) -> bool:
    """Whether the socket has data (or EOF) to read now, without reading it (as httpcore's
    ``is_socket_readable``): an idle keep-alive connection that is readable was closed by the
    server."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _header_bytes(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode("ascii"), value.encode("ascii").strip(b" \t")
    if _TOKEN.fullmatch(raw_name) is None:
        raise httpx.LocalProtocolError(f"Illegal header name {raw_name!r}")
    if _BAD_VALUE.search(raw_value) is not None:
        raise httpx.LocalProtocolError(f"Illegal header value {raw_value!r}")
    return b"%s: %s\r\n" % (raw_name, raw_value)


class _Head:
    """A parsed response head."""

    __slots__ = ("headers", "keep_alive", "reason", "status", "version")

    def __init__(self, raw: bytes) -> None:
        lines = raw.split(b"\n")
        status_line = lines[0].rstrip(b"\r")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
            raise httpx.RemoteProtocolError(f"malformed status line {status_line[:100]!r}")
        try:
            self.status = int(parts[1])
        except ValueError:
            raise httpx.RemoteProtocolError(
                f"malformed status line {status_line[:100]!r}"
            ) from None
        self.version = parts[0]
        self.reason = parts[2] if len(parts) == 3 else b""
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            if line[:1] in (b" ", b"\t"):  # obsolete line folding: continues the last value
                if not headers:
                    raise httpx.RemoteProtocolError("malformed response head")
                name, value = headers[-1]
                headers[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" "))
                continue
            name, sep, value = line.partition(b":")
            if not sep or _TOKEN.fullmatch(name) is None:
                raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}")
            headers.append((name, value.strip(b" \t")))
        self.headers = headers
        self.keep_alive = self.version == b"HTTP/1.1"

    def values(self, lower_name: bytes) -> list[bytes]:
        return [value for name, value in self.headers if name.lower() == lower_name]


class _Connection:
    """One HTTP/1.1 connection: an anyio byte stream, the raw socket under it (for the
    readability check) and the bytes read past the last response."""

    __slots__ = ("buffer", "clock", "expire_at", "rearm", "sock", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, sock: Any, clock: Callable[[], float]):
        self.stream = stream
        self.sock = sock
        self.clock = clock
        self.buffer = bytearray()
        self.expire_at = 0.0
        self.rearm = False

    def reusable(self, now: float) -> bool:
        """Idle within its keep-alive, and not closed by the server."""
        return now < self.expire_at and not self.buffer and not _readable(self.sock)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except Exception:  # closing a broken socket must not mask anything
                pass

    async def _fill(self, scope: anyio.CancelScope, timeout: float | None) -> bool:
        """Read more into the buffer; False at EOF. Each read has ``timeout`` (the first
        one's deadline was set when the read phase began)."""
        if timeout is not None and self.rearm:
            scope.deadline = self.clock() + timeout
        self.rearm = True
        try:
            data = await self.stream.receive(READ_NUM_BYTES)
        except anyio.EndOfStream:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        self.buffer += data
        return True

    async def _read_head(self, scope: anyio.CancelScope, timeout: float | None) -> _Head:
        searched = 0
        while True:
            found = _HEAD_END.search(self.buffer, max(0, searched - 3))
            if found is not None:
                raw = bytes(self.buffer[: found.start()])
                del self.buffer[: found.end()]
                return _Head(raw)
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("the response head is too large")
            searched = len(self.buffer)
            if not await self._fill(scope, timeout):
                if self.buffer:
                    raise httpx.RemoteProtocolError("the server closed inside a response head")
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    async def _read_exact(self, scope: anyio.CancelScope, timeout: float | None, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill(scope, timeout):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _read_line(self, scope: anyio.CancelScope, timeout: float | None) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end]).rstrip(b"\r")
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("a chunk header line is too long")
            if not await self._fill(scope, timeout):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )

    async def _read_chunked(self, scope: anyio.CancelScope, timeout: float | None) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = await self._read_line(scope, timeout)
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if _CHUNK_SIZE.fullmatch(size_text) is None:
                raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                while await self._read_line(scope, timeout):  # trailers, ignored as by httpx
                    pass
                return b"".join(chunks)
            chunks.append(await self._read_exact(scope, timeout, size))
            if await self._read_line(scope, timeout):
                raise httpx.RemoteProtocolError("a chunk is not followed by a line end")

    async def _read_to_close(self, scope: anyio.CancelScope, timeout: float | None) -> bytes:
        while await self._fill(scope, timeout):
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def round_trip(
        self,
        head: bytes,
        body: bytes | None,
        no_body: bool,
        timeouts: Mapping[str, float | None],
    ) -> tuple[_Head, bytes]:
        """Send a request (``head`` already serialised) and read its whole response. On return
        ``head.keep_alive`` says whether the connection may carry another request."""
        write_timeout, read_timeout = timeouts.get("write"), timeouts.get("read")
        phase = "write"
        clock = self.clock
        deadline = math.inf if write_timeout is None else clock() + write_timeout
        with anyio.CancelScope(deadline=deadline) as scope:
            try:
                if body is None:
                    await self.stream.send(head)
                elif len(body) <= COALESCE_BYTES:
                    await self.stream.send(head + body)
                else:
                    await self.stream.send(head)
                    await self.stream.send(body)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                # As httpcore: a server may close the request early and still answer.
                pass
            phase = "read"
            scope.deadline = math.inf if read_timeout is None else clock() + read_timeout
            self.rearm = False
            while True:
                response = await self._read_head(scope, read_timeout)
                if response.status >= 200:
                    break
                if response.status == 101:
                    raise httpx.RemoteProtocolError("unexpected protocol switch (101)")
                # 100 Continue and other informational answers: the final one follows.
            if no_body or response.status in (204, 304):
                content = b""
            else:
                content = await self._read_body(response, scope, read_timeout)
        if scope.cancelled_caught:
            if phase == "write":
                raise httpx.WriteTimeout("timed out writing the request")
            raise httpx.ReadTimeout("timed out reading the response")
        if response.keep_alive:
            for value in response.values(b"connection"):
                if b"close" in value.lower():
                    response.keep_alive = False
        return response, content

    async def _read_body(
        self, response: _Head, scope: anyio.CancelScope, timeout: float | None
    ) -> bytes:
        encodings = response.values(b"transfer-encoding")
        if encodings:
            if encodings[-1].lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                return await self._read_chunked(scope, timeout)
            response.keep_alive = False
            return await self._read_to_close(scope, timeout)
        lengths = response.values(b"content-length")
        if lengths:
            sizes = {value.strip() for text in lengths for value in text.split(b",")}
            if len(sizes) != 1 or not next(iter(sizes)).isdigit():
                raise httpx.RemoteProtocolError(f"bad Content-Length {lengths!r}")
            return await self._read_exact(scope, timeout, int(next(iter(sizes))))
        response.keep_alive = False
        return await self._read_to_close(scope, timeout)


class _Target:
    __slots__ = ("origin", "prefix")

    def __init__(self, origin: _Origin, prefix: bytes) -> None:
        self.origin = origin
        self.prefix = prefix
        """``Host: ...\\r\\n`` for this origin."""


class DirectPool:
    """One event loop's connections and request building for the direct path.

    ``default_headers`` are the ``httpx.AsyncClient``'s (``Accept``, ``Accept-Encoding``,
    ``Connection``, ``User-Agent``, and the transport's own); ``clock`` is the loop's
    ``current_time`` (its backend's, looked up once rather than per read).
    """

    def __init__(
        self,
        *,
        default_headers: list[tuple[bytes, bytes]],
        keepalive_expiry: float,
        clock: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._default_pairs = default_headers
        self._default_names = frozenset(k.decode("latin-1").lower() for k, _ in default_headers)
        self._defaults = b"".join(
            _header_bytes(k.decode("latin-1"), v.decode("latin-1")) for k, v in default_headers
        )
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._live: set[_Connection] = set()
        self._origins: dict[str, _Target | None] = {}
        self._ssl_context: ssl.SSLContext | None = None
        self._closed = False
        self.enabled = True
        """False once a server set a cookie: requests then go through httpx, which keeps and
        sends cookies."""

    def statistics(self) -> dict[str, int]:
        """Open and idle connections (tests, debugging)."""
        return {
            "connections": len(self._live),
            "idle": sum(len(stack) for stack in self._idle.values()),
        }

    def _split(self, url: str) -> tuple[_Target, bytes] | None:
        """(origin, request target) of ``url``, or None when httpx should handle it."""
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end > 0 else -1
        if path_start < 0:
            return None
        base, path = url[:path_start], url[path_start:]
        if _SAFE_TARGET.fullmatch(path) is None:
            return None  # httpx percent-encodes it
        if base in self._origins:
            target = self._origins[base]
        else:
            target = self._parse_origin(base)
            if len(self._origins) >= _MAX_TARGETS:
                self._origins.clear()
            self._origins[base] = target
        if target is None:
            return None
        return target, path.encode("ascii")

    @staticmethod
    def _parse_origin(base: str) -> _Target | None:
        try:
            parsed = httpx.URL(base + "/")
        except httpx.InvalidURL:
            return None
        scheme = parsed.raw_scheme
        if scheme not in _DEFAULT_PORTS or not parsed.raw_host or parsed.userinfo:
            return None
        if str(parsed) != base + "/":
            return None  # httpx normalises it (case, IDNA, default port): let httpx send it
        origin = (scheme, parsed.raw_host, parsed.port or _DEFAULT_PORTS[scheme])
        return _Target(origin, b"Host: %s\r\n" % parsed.netloc)

    def accepts(self, url: str) -> bool:
        """Whether ``url`` can go the direct way (an http or https URL that httpx would send
        as it is written)."""
        return self.enabled and not self._closed and self._split(url) is not None

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    async def _connect(self, origin: _Origin, timeout: float | None) -> _Connection:
        scheme, raw_host, port = origin
        host = raw_host.decode("ascii")
        try:
            with anyio.fail_after(timeout):
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(host, port)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except (OSError, anyio.BrokenResourceError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if scheme == b"https":
            try:
                with anyio.fail_after(timeout):
                    stream = await anyio.streams.tls.TLSStream.wrap(
                        stream,
                        hostname=host,
                        ssl_context=self._ssl(),
                        standard_compatible=False,
                    )
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                if isinstance(exc, TimeoutError):
                    raise httpx.ConnectTimeout(f"timed out in TLS with {host}:{port}") from exc
                if isinstance(exc, OSError | anyio.BrokenResourceError | anyio.EndOfStream):
                    raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
                raise
        return _Connection(stream, sock, self._clock)

    async def _checkout(self, origin: _Origin, timeouts: Mapping[str, float | None]) -> _Connection:
        stack = self._idle.get(origin)
        if stack:
            now = time.monotonic()
            while stack:
                conn = stack.pop()
                if conn.reusable(now):
                    return conn
                self._live.discard(conn)
                await conn.aclose()
        conn = await self._connect(origin, timeouts.get("connect"))
        self._live.add(conn)
        return conn

    def _head(
        self,
        method: str,
        target: _Target,
        path: bytes,
        headers: Mapping[str, str] | None,
        content: bytes | None,
    ) -> bytes:
        parts = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), path), target.prefix]
        if headers and not self._default_names.isdisjoint(name.lower() for name in headers):
            merged = httpx.Headers(self._default_pairs)  # a request header replaces the client's
            merged.update(headers)
            parts += [_header_bytes(k, v) for k, v in merged.items()]
        else:
            parts.append(self._defaults)
            if headers:
                parts += [_header_bytes(k, v) for k, v in headers.items()]
        if content is not None:
            if not headers or "Content-Type" not in headers:
                parts.append(b"Content-Type: application/json\r\n")
            parts.append(b"Content-Length: %d\r\n" % len(content))
        parts.append(b"\r\n")
        return b"".join(parts)

    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeouts: Mapping[str, float | None],
    ) -> httpx.Response:
        """Send one request and return its response, read in full. Failures raise the httpx
        exception httpx would raise."""
        split = self._split(url)
        assert split is not None  # checked by accepts()
        target, path = split
        if _TOKEN.fullmatch(method.encode("ascii")) is None:
            raise httpx.LocalProtocolError(f"Illegal method {method!r}")
        head = self._head(method, target, path, headers, content)
        conn = await self._checkout(target.origin, timeouts)
        try:
            response, body = await conn.round_trip(head, content, method == "HEAD", timeouts)
        except BaseException:
            self._live.discard(conn)
            await conn.aclose()
            raise
        if response.keep_alive and not self._closed:
            conn.expire_at = time.monotonic() + self._keepalive_expiry
            self._idle.setdefault(target.origin, []).append(conn)
        else:
            self._live.discard(conn)
            await conn.aclose()
        result = DirectResponse(
            response.status,
            headers=response.headers,
            content=body,
            extensions={"http_version": response.version, "reason_phrase": response.reason},
        )
        result._method = method
        result._url = url
        result.is_closed = True
        return result

    async def aclose(self) -> None:
        """Close every connection (idle or in use); later requests take the httpx path."""
        self._closed = True
        conns, self._live = list(self._live), set()
        self._idle.clear()
        for conn in conns:
            await conn.aclose()
