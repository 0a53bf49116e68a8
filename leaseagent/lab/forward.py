"""A TCP forwarder from 127.0.0.1 on this machine into one of the lab's namespaces.

    python3 -m leaseagent.lab.forward --netns la-lab-prom --to 10.250.0.3:9090 \\
        --port-file /run/leaseagent-lab/lab/prometheus/port

The lab adds nothing to the root namespace, so its Prometheus (in a namespace
of its own, on the lab's underlay) is out of reach of a browser or a test on
this machine. This process listens on 127.0.0.1 at a free port in the root
namespace, then moves itself into the lab namespace: the listening socket
stays where it was made, and every connection it accepts is relayed to a
socket made inside the lab namespace, to the one address it was told. The port
is written (atomically) to --port-file once it accepts. Started and stopped by
PID by leaseagent.lab.prometheus; bare python3, standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from leaseagent.files import write_atomic

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts a namespace


def enter_netns(name: str) -> None:
    """Move this thread (the only one yet) into network namespace `name`; threads made
    later inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listener: socket.socket, host: str, port: int) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(relay, sock=listener)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m leaseagent.lab.forward")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--to", required=True, metavar="IP:PORT")
    parser.add_argument("--port-file", required=True, type=Path)
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        enter_netns(args.netns)
    except OSError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 1
    write_atomic(args.port_file, f"{listener.getsockname()[1]}\n".encode())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listener, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
