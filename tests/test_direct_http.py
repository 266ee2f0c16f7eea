"""The direct HTTP/1.1 path (``loops_async._direct``) against a scripted raw-socket server.

Every request of the default transport goes this way (``_http.Transport.request``), so each
framing and failure the HTTP layer can meet is checked here byte for byte, on asyncio and trio:
the headers sent are the ones httpx sends, bodies framed by Content-Length, chunked or close,
``1xx`` skipped, keep-alive reuse and a server's close, errors mapped as before, cookies and
proxies handing over to httpx.
"""

from __future__ import annotations

import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import anyio.streams.tls
import pytest

from loops_async import errors as E
from loops_async._http import CONTROL_READ, CONTROL_WRITE, Lane, Transport

pytestmark = pytest.mark.anyio

Reply = Callable[[int, bytes], bytes | None]
"""(connection index, request head) -> raw bytes to answer (None: close without answering;
``HANG``: never answer)."""
HANG = b""


@dataclass
class RawServer:
    reply: Reply
    url: str = ""
    requests: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    close_after_reply: bool = False

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive()
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append(head)
                self.bodies.append(body)
                answer = self.reply(index, head)
                if answer is None:
                    return
                if answer == HANG:
                    await anyio.sleep_forever()
                await stream.send(answer)
                if self.close_after_reply:
                    return


@asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[RawServer]:
    server = RawServer(reply)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server.url = f"http://127.0.0.1:{port}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def ok(body: bytes = b'{"ok":true}', *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *extra]
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def always(answer: bytes) -> Reply:
    return lambda index, head: answer


def transport(**kw: object) -> Transport:
    return Transport(api_key="secret", timeout=5.0, max_connections=8, **kw)  # type: ignore[arg-type]


def header_map(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.decode().lower()] = value.decode().strip()
    return out


async def test_the_direct_path_sends_what_httpx_sends(anyio_backend: str) -> None:
    """Same request line, headers and body on the direct path and through httpx."""
    async with raw_server(always(ok())) as server:
        t = transport(extra_headers={"X-Extra": "1"})
        try:
            lane = t._lane(Lane.CONTROL)
            assert lane.direct is not None
            for direct in (True, False):
                lane.direct.enabled = direct
                response = await t.request(
                    "POST",
                    f"{server.url}/v1/x%2Fy/op?a=1",
                    content=b'{"n":1}',
                    headers={"Idempotency-Key": "k1", "X-Run-Id": "r"},
                    timeout=3.0,
                )
                assert response.status_code == 200
                assert response.json() == {"ok": True}
                assert response.request.method == "POST"
            fast, slow = server.requests
            assert fast.split(b"\r\n")[0] == slow.split(b"\r\n")[0]
            assert header_map(fast) == header_map(slow)
            assert server.bodies == [b'{"n":1}', b'{"n":1}']
            assert header_map(fast)["authorization"] == "Api-Key secret"
        finally:
            await t.aclose()


async def test_a_request_header_replaces_the_clients(anyio_backend: str) -> None:
    async with raw_server(always(ok())) as server:
        t = transport()
        try:
            await t.request("GET", f"{server.url}/", headers={"user-agent": "mine"})
            (head,) = server.requests
            assert head.lower().count(b"user-agent:") == 1
            assert header_map(head)["user-agent"] == "mine"
        finally:
            await t.aclose()


async def test_keep_alive_reuses_one_connection(anyio_backend: str) -> None:
    async with raw_server(always(ok())) as server:
        t = transport()
        try:
            for _ in range(5):
                assert (await t.request("GET", f"{server.url}/")).status_code == 200
            assert server.connections == 1
            stats = t._lane(Lane.CONTROL).direct.statistics()  # type: ignore[union-attr]
            assert stats == {"connections": 1, "idle": 1}
        finally:
            await t.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"ok\r\n7\r\n":true}\r\n0\r\nX-Trailer: t\r\n\r\n',
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(),
        b"HTTP/1.1 200 OK\nContent-Length: 11\r\nX-Folded: a\r\n  b\n\n" + b'{"ok":true}',
    ],
    ids=["chunked", "100-continue", "bare-LF-and-folding"],
)
async def test_response_framings(anyio_backend: str, answer: bytes) -> None:
    async with raw_server(always(answer)) as server:
        t = transport()
        try:
            for _ in range(2):
                response = await t.request("GET", f"{server.url}/")
                assert response.json() == {"ok": True}
            assert server.connections == 1, "the connection is reused after each framing"
        finally:
            await t.aclose()


async def test_gzip_bodies_are_decoded_as_httpx_does(anyio_backend: str) -> None:
    body = gzip.compress(b'{"ok":true}')
    async with raw_server(always(ok(body, b"Content-Encoding: gzip"))) as server:
        t = transport()
        try:
            assert (await t.request("GET", f"{server.url}/")).json() == {"ok": True}
        finally:
            await t.aclose()


async def test_a_corrupt_gzip_body_is_a_transport_error(anyio_backend: str) -> None:
    answer = ok(b"\x1f\x8bgarbage", b"Content-Encoding: gzip")
    async with raw_server(always(answer)) as server:
        t = transport()
        try:
            with pytest.raises(E.TransportError, match="decoded"):
                await t.request("GET", f"{server.url}/")
        finally:
            await t.aclose()


async def test_close_delimited_and_connection_close_are_not_reused(anyio_backend: str) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n" + b'{"ok":true}',
        b"HTTP/1.0 200 OK\r\n\r\n" + b'{"ok":true}',
    ]
    for answer in answers:

        def reply(index: int, head: bytes, answer: bytes = answer) -> bytes:
            return answer

        async with raw_server(reply) as server:
            server.close_after_reply = True
            t = transport()
            try:
                for _ in range(3):
                    assert (await t.request("GET", f"{server.url}/")).json() == {"ok": True}
                assert server.connections == 3
                stats = t._lane(Lane.CONTROL).direct.statistics()  # type: ignore[union-attr]
                assert stats == {"connections": 0, "idle": 0}
            finally:
                await t.aclose()


async def test_an_idle_connection_closed_by_the_server_is_replaced(anyio_backend: str) -> None:
    async with raw_server(always(ok())) as server:
        server.close_after_reply = True  # closes every connection after answering
        t = transport()
        try:
            for _ in range(3):
                await t.request("GET", f"{server.url}/")
                await anyio.sleep(0.05)  # let the close arrive
            assert server.connections == 3
        finally:
            await t.aclose()


async def test_no_answer_is_a_transport_error_retried_when_safe(anyio_backend: str) -> None:
    def reply(index: int, head: bytes) -> bytes | None:
        return None if index == 0 else ok()

    async with raw_server(reply) as server:
        t = transport()
        try:
            with pytest.raises(E.TransportError, match="disconnected"):
                await t.send("POST", f"{server.url}/w", CONTROL_WRITE, window=5, content=b"{}")
            response = await t.send("GET", f"{server.url}/r", CONTROL_READ, window=5)
            assert response.status_code == 200
        finally:
            await t.aclose()


async def test_a_slow_answer_is_a_read_timeout(anyio_backend: str) -> None:
    async with raw_server(lambda index, head: b"HTTP/1.1 200 OK\r\n") as server:
        t = transport()
        try:
            with pytest.raises(E.ReadTimeoutError):
                await t.request("GET", f"{server.url}/", timeout=0.2)
        finally:
            await t.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nabcdef",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    ],
    ids=["status", "header", "content-length", "chunk-size", "cut-body"],
)
async def test_malformed_answers_are_transport_errors(anyio_backend: str, answer: bytes) -> None:
    def reply(index: int, head: bytes) -> bytes:
        return answer

    async with raw_server(reply) as server:
        server.close_after_reply = True
        t = transport()
        try:
            with pytest.raises(E.TransportError):
                await t.request("GET", f"{server.url}/")
        finally:
            await t.aclose()


async def test_header_injection_never_reaches_the_wire(anyio_backend: str) -> None:
    async with raw_server(always(ok())) as server:
        t = transport()
        try:
            with pytest.raises(E.TransportError, match="Illegal header"):
                await t.request("GET", f"{server.url}/", headers={"X-A": "v\r\nX-Evil: 1"})
            assert server.requests == []
        finally:
            await t.aclose()


async def test_a_cookie_hands_the_loop_over_to_httpx(anyio_backend: str) -> None:
    def reply(index: int, head: bytes) -> bytes:
        return ok(b"{}", b"Set-Cookie: lb=abc; Path=/")

    async with raw_server(reply) as server:
        t = transport()
        try:
            await t.request("GET", f"{server.url}/")
            assert t._lane(Lane.CONTROL).direct.enabled is False  # type: ignore[union-attr]
            await t.request("GET", f"{server.url}/")
            assert header_map(server.requests[1])["cookie"] == "lb=abc"
        finally:
            await t.aclose()


async def test_cancelled_mid_request_closes_the_connection(anyio_backend: str) -> None:
    release = anyio.Event()

    def reply(index: int, head: bytes) -> bytes:
        return ok()

    async with raw_server(reply) as server:
        t = transport()
        try:
            with anyio.move_on_after(0.2):
                # The server never answers this one: its reply comes only for the next.
                server.reply = lambda index, head: ok() if release.is_set() else HANG
                await t.request("GET", f"{server.url}/slow")
            stats = t._lane(Lane.CONTROL).direct.statistics()  # type: ignore[union-attr]
            assert stats == {"connections": 0, "idle": 0}
            release.set()
            assert (await t.request("GET", f"{server.url}/")).status_code == 200
        finally:
            await t.aclose()


async def test_unreachable_is_a_connect_error(anyio_backend: str) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    t = transport()
    try:
        with pytest.raises(E.ConnectError):
            await t.request("GET", f"http://127.0.0.1:{port}/")
    finally:
        await t.aclose()


async def test_proxies_and_custom_transports_keep_httpx(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    t = transport(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
    try:
        assert t._lane(Lane.CONTROL).direct is None
        assert (await t.request("GET", "http://loops.test/")).status_code == 204
    finally:
        await t.aclose()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    t = transport()
    try:
        assert t._lane(Lane.CONTROL).direct is None
    finally:
        await t.aclose()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
        *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


async def test_https_with_the_trust_store_httpx_uses(
    anyio_backend: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS on the direct path: httpx's SSL context (here trusting ``SSL_CERT_FILE``), SNI and
    hostname checks, keep-alive over TLS."""
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    server = RawServer(always(ok()))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    tls = anyio.streams.tls.TLSListener(listener, server_context, standard_compatible=False)
    async with tls, anyio.create_task_group() as tg:
        tg.start_soon(tls.serve, server.handle)  # type: ignore[arg-type]
        t = transport()
        try:
            for _ in range(3):
                response = await t.request("GET", f"https://127.0.0.1:{port}/x")
                assert response.json() == {"ok": True}
            assert server.connections == 1
            assert t._lane(Lane.CONTROL).direct.statistics()["idle"] == 1  # type: ignore[union-attr]
            monkeypatch.delenv("SSL_CERT_FILE")
            other = transport()  # trusts only the system store: the certificate is refused
            try:
                with pytest.raises(E.ConnectError):
                    await other.request("GET", f"https://127.0.0.1:{port}/x")
            finally:
                await other.aclose()
        finally:
            await t.aclose()
            tg.cancel_scope.cancel()


async def test_httpx_request_log_line_is_kept(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with raw_server(always(ok())) as server:
        t = transport()
        try:
            with caplog.at_level("INFO", logger="httpx"):
                await t.request("GET", f"{server.url}/logged")
            assert t._lane(Lane.CONTROL).direct.enabled  # type: ignore[union-attr]
            assert f'HTTP Request: GET {server.url}/logged "HTTP/1.1 200 OK"' in caplog.text
        finally:
            await t.aclose()
