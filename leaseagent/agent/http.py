"""/metrics, /healthz and /readyz, served from the agent's own event loop.

Served by asyncio itself (not prometheus-client's thread server) on purpose:
an answer from /healthz then proves the event loop is turning, which a
server thread would not. /readyz is 200 only while the lease is held,
subnet.env is written and the data plane is in sync; otherwise 503 with the
reason in the body.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from leaseagent.metrics import Metrics
from leaseagent.waiting import within

MAX_REQUEST_LINE = 8192
TEXT = "text/plain; charset=utf-8"


class ServedAgent(Protocol):
    metrics: Metrics

    def not_ready_reason(self) -> str | None: ...


def _response(status: str, body: bytes, content_type: str = TEXT, *,
              head: bool = False) -> bytes:
    """The whole answer; to a HEAD request (`head`) the same headers and no body."""
    lines = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return lines.encode() if head else lines.encode() + body


async def _handle(agent: ServedAgent, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    try:
        line = await within(reader.readline(), 5)
        parts = line.decode("latin-1").split()
        # Drain headers so the client sees a clean close.
        while True:
            header = await within(reader.readline(), 5)
            if header in (b"\r\n", b"\n", b""):
                break
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed", b"only GET\n"))
            return
        path = parts[1].split("?", 1)[0]
        content_type = TEXT
        if path == "/metrics":
            status, body = "200 OK", generate_latest(agent.metrics.registry)
            content_type = CONTENT_TYPE_LATEST
        elif path == "/healthz":
            status, body = "200 OK", b"ok\n"
        elif path == "/readyz":
            reason = agent.not_ready_reason()
            status, body = (("200 OK", b"ready\n") if reason is None
                            else ("503 Service Unavailable", f"{reason}\n".encode()))
        else:
            status, body = "404 Not Found", b"not found\n"
        writer.write(_response(status, body, content_type, head=parts[0] == "HEAD"))
    except (TimeoutError, ConnectionError, UnicodeDecodeError):
        return
    finally:
        # The answer sent and the transport released now (not at a gc pass), or, from a
        # client that does not read it, dropped after the same 5 s.
        try:
            await within(writer.drain(), 5)
            writer.close()
            await within(writer.wait_closed(), 5)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()


async def serve_metrics(agent: ServedAgent, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(
        lambda r, w: _handle(agent, r, w), host, port, limit=MAX_REQUEST_LINE)
