"""sd_notify: tell systemd we are ready, or alive (watchdog), without libsystemd.

A datagram to $NOTIFY_SOCKET; a leading '@' means an abstract socket. With
no NOTIFY_SOCKET (not under systemd) it does nothing.
"""

from __future__ import annotations

import os
import socket


def sd_notify(message: str, *, socket_path: str | None = None) -> bool:
    """Send `message` (e.g. "READY=1"); True if it was sent."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
