"""The agent's own HTTP answers (/metrics, /healthz, /readyz) over a real socket."""

from __future__ import annotations

import asyncio
import socket

import pytest

from leaseagent.agent import http
from leaseagent.agent.http import serve_metrics
from leaseagent.metrics import Metrics


class _Agent:
    def __init__(self, reason: str | None) -> None:
        self.metrics = Metrics()
        self.reason = reason

    def not_ready_reason(self) -> str | None:
        return self.reason


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # to the server's close
    writer.close()
    await writer.wait_closed()
    return answer


def _split(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


async def test_get_and_head_answer_alike_but_head_without_the_body() -> None:
    server = await serve_metrics(_Agent("no lease yet"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for path, status in [("/metrics", "200 OK"), ("/healthz", "200 OK"),
                             ("/readyz", "503 Service Unavailable"),
                             ("/nothing", "404 Not Found")]:
            got, got_headers, body = _split(await _ask(port, f"GET {path} HTTP/1.1\r\n\r\n".encode()))
            assert got == f"HTTP/1.1 {status}", path
            assert int(got_headers["Content-Length"]) == len(body) > 0, path
            head, head_headers, nothing = _split(
                await _ask(port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
            assert head == got and nothing == b"", path
            assert head_headers["Content-Type"] == got_headers["Content-Type"], path
            if path != "/metrics":  # a scrape's text changes between two asks
                assert head_headers["Content-Length"] == got_headers["Content-Length"], path
        assert b"no lease yet" in _split(await _ask(port, b"GET /readyz HTTP/1.0\r\n\r\n"))[2]
        status, _, _ = _split(await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n"))
        assert status == "HTTP/1.1 405 Method Not Allowed"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_that_never_reads_does_not_keep_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer nobody reads (a scraper that hung) is dropped after the handler's 5 s
    bound, not kept for ever with its task and transport."""
    monkeypatch.setattr(http, "generate_latest", lambda registry: b"#" * (16 << 20))
    server = await serve_metrics(_Agent(None), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    idle = len(asyncio.all_tasks())
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, b"GET /metrics HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.5)
        assert len(asyncio.all_tasks()) == idle + 1  # the handler, stuck on the full socket
        for _ in range(80):
            await asyncio.sleep(0.1)
            if len(asyncio.all_tasks()) == idle:
                break
        assert len(asyncio.all_tasks()) == idle
    finally:
        client.close()
        server.close()
        await server.wait_closed()
