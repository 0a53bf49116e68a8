"""wireguard-go, driven through its control socket: the cross-platform UAPI text protocol.

Where the kernel has no WireGuard module, the device is wireguard-go's (Debian's
package): a TUN device of the name asked for, and a control socket
`/var/run/wireguard/<device>.sock` speaking the documented text protocol
(https://www.wireguard.com/xplatform/): `get=1` answers `key=value` lines,
`set=1` takes them, both end with `errno=<n>` and an empty line. Keys are hex
there. One connection per request; one `set` carries every peer of a change,
so the agent never runs a program per peer.

The process. The agent starts `wireguard-go <device>` when the device does not
exist, in a session of its own, and lets it daemonize (its default: the
command returns once the TUN device and the socket exist; the daemon is
reparented away). It is not the agent's child, so an agent that stops or is
killed leaves it, its device and the traffic through it running, as the other
backends leave their kernel state; the next agent adopts it by its socket.
The agent never stops it on exit. Its PID is found, when needed, as the
process running `wireguard-go <device>` in this network namespace (/proc:
its command line and its namespace's inode; the socket cannot tell, its
credentials are those of the command that daemonized). It ends:

- when its device is deleted (`ip link del flannel-wg`, `leasectl cleanup`, a
  rebuild onto another backend): wireguard-go notices within about two
  seconds and removes its socket; an agent that re-creates the device sooner
  sends the useless process SIGTERM by that PID first (checked against its
  start time), so the new one can take the socket's path;
- when someone stops it (SIGTERM, SIGKILL): the TUN device goes with it; the
  agent sees the link go and starts a new one.

The socket's directory is fixed by wireguard-go: one host, one directory. The
namespace lab gives each of its hosts its own (a private mount namespace with
the host's directory bound there; leaseagent.lab.agents). No LOG_LEVEL is
passed on: a daemon that logs writes to the standard output of a command that
has exited.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import time
from ipaddress import IPv6Address, ip_address, ip_network
from pathlib import Path

from leaseagent.core.network import Address, Network
from leaseagent.core.plan import Endpoint, WgPeer
from leaseagent.core.profiles.wireguard import USERSPACE_DEVICE_KIND, PresharedKey
from leaseagent.dataplane.wgdevice import (
    DeviceConfig,
    DeviceWrite,
    PeerState,
    PeerUpdate,
    Snapshot,
    endpoint_text,
)
from leaseagent.dataplane.wgkeys import public_key_of
from leaseagent.errors import DataPlaneError
from leaseagent.waiting import within

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")  # wireguard-go's, fixed
WIREGUARD_GO = "wireguard-go"
REQUEST_TIMEOUT = 5.0
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
_ZERO_KEY = "0" * 64
_ENV_DROPPED = ("LOG_LEVEL", "WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")
# The lines of a `get` answer that change with traffic alone.
_COUNTERS = ("last_handshake_time_", "rx_bytes=", "tx_bytes=")


def fingerprint(answer: str) -> bytes:
    """A `get` answer's configuration, hashed: without the lines that change with
    traffic alone, and with the peers' blocks sorted, since wireguard-go lists its
    peers in no fixed order (a Go map's)."""
    body, trailer, _ = answer.rstrip("\n").rpartition("\nerrno=")  # after the last peer
    if not trailer:
        body = answer
    device, *peers = body.split("\npublic_key=")
    digest = hashlib.sha256()
    for block in [device, *sorted(peers)]:
        digest.update(b"\0")
        digest.update("\n".join(line for line in block.split("\n")
                                if not line.startswith(_COUNTERS)).encode())
    return digest.digest()


def key_hex(base64_key: str) -> str:
    return base64.b64decode(base64_key).hex()


def key_base64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


# -- the text protocol ------------------------------------------------------------


def encode_set(change: DeviceWrite) -> bytes:
    """A `set=1` request (without the private key in any log: the caller never logs it)."""
    lines = ["set=1"]
    if change.private_key is not None:
        lines.append(f"private_key={change.private_key.hex()}")
    if change.listen_port is not None:
        lines.append(f"listen_port={change.listen_port}")
    for update in change.peers:
        lines += _peer_lines(update)
    return ("\n".join(lines) + "\n\n").encode()


def _peer_lines(update: PeerUpdate) -> list[str]:
    lines = [f"public_key={key_hex(update.public_key)}"]
    if update.remove:
        return [*lines, "remove=true"]
    peer = update.peer
    if peer is None:
        lines.append("update_only=true")
    else:
        lines.append(f"preshared_key={peer.psk.raw.hex() if peer.psk else _ZERO_KEY}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={endpoint_text(peer.endpoint)}")
        keepalive = update.keepalive if update.keepalive is not None else peer.keepalive
        lines.append(f"persistent_keepalive_interval={keepalive}")
    if update.replace_allowed_ips:
        lines.append("replace_allowed_ips=true")
    lines += [f"allowed_ip={net}" for net in update.allowed_ips]
    return lines


def _endpoint(text: str) -> Endpoint | None:
    host, _, port = text.rpartition(":")
    try:
        ip: Address = ip_address(host.strip("[]"))
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip, int(port)
    except ValueError:
        return None


def parse_get(device: str, text: str) -> DeviceConfig:
    """A `get=1` answer as a DeviceConfig (its private key turned into the public key
    at once, and dropped). DataPlaneError for an errno other than 0."""
    public_key: str | None = None
    listen_port = 0
    peers: list[PeerState] = []
    peer: dict[str, object] | None = None

    def finish() -> None:
        if peer is not None:
            peers.append(_peer_state(device, peer))

    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        if not sep:
            continue
        if name == "public_key":
            finish()
            peer = {"public_key": key_base64(value), "allowed_ips": []}
        elif peer is not None:
            if name == "allowed_ip":
                peer["allowed_ips"].append(ip_network(value))  # type: ignore[attr-defined]
            else:
                peer[name] = value
        elif name == "private_key":
            public_key = public_key_of(bytes.fromhex(value)) if value != _ZERO_KEY else None
        elif name == "listen_port":
            listen_port = int(value)
        elif name == "errno" and value != "0":
            raise DataPlaneError(f"wireguard-go refused to report {device}: errno {value}")
    finish()
    return DeviceConfig(public_key, listen_port, tuple(peers))


def _peer_state(device: str, fields: dict[str, object]) -> PeerState:
    psk = str(fields.get("preshared_key", _ZERO_KEY))
    endpoint = _endpoint(str(fields["endpoint"])) if "endpoint" in fields else None
    peer = WgPeer(device, str(fields["public_key"]), endpoint,
                  PresharedKey(bytes.fromhex(psk)) if psk != _ZERO_KEY else None,
                  int(str(fields.get("persistent_keepalive_interval", 0))))
    seconds = int(str(fields.get("last_handshake_time_sec", 0)))
    nanos = int(str(fields.get("last_handshake_time_nsec", 0)))
    nets: list[Network] = fields["allowed_ips"]  # type: ignore[assignment]
    return PeerState(peer, tuple(nets), seconds + nanos / 1e9 if seconds else 0.0,
                     int(str(fields.get("rx_bytes", 0))), int(str(fields.get("tx_bytes", 0))))


# -- the socket ---------------------------------------------------------------------


class UapiSocket:
    """Requests to one device's control socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def request(self, data: bytes) -> str:
        """Send one request, read its whole answer (up to the empty line)."""
        try:
            reader, writer = await within(
                asyncio.open_unix_connection(str(self.path), limit=1 << 24), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise DataPlaneError(f"wireguard-go control socket {self.path}: "
                                 f"{getattr(exc, 'strerror', None) or exc or 'timed out'}"
                                 ) from None
        try:
            writer.write(data)
            answer = await within(reader.readuntil(b"\n\n"), REQUEST_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            raise DataPlaneError(f"wireguard-go control socket {self.path}: "
                                 f"{type(exc).__name__} {exc}".rstrip()) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return answer.decode(errors="replace")

    def answers(self) -> bool:
        """Whether a process accepts connections on the socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(1)
            sock.connect(str(self.path))
            return True
        except OSError:
            return False
        finally:
            sock.close()


def _netns_inode(netns: str | None) -> tuple[int, int] | None:
    path = "/proc/self/ns/net" if netns is None else (
        netns if netns.startswith("/") else f"/run/netns/{netns}")
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the PID, names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def wireguard_go_processes(device: str, netns: str | None = None) -> list[tuple[int, int]]:
    """(PID, start time) of each `wireguard-go <device>` in the network namespace `netns`
    (None: this process's)."""
    target = _netns_inode(netns)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if len(argv) < 2 or Path(argv[0].decode(errors="replace")).name != WIREGUARD_GO \
                    or argv[-2 if argv[-1] == b"" else -1] != device.encode():
                continue
            st = os.stat(Path(entry.path, "ns", "net"))
        except OSError:
            continue
        start = _start_time(int(entry.name))
        if (st.st_dev, st.st_ino) == target and start is not None:
            found.append((int(entry.name), start))
    return found


class WireguardGo:
    """The `WireguardControl` of wireguard-go devices (leaseagent.dataplane.wgdevice)."""

    name = "wireguard-go"
    link_kind = USERSPACE_DEVICE_KIND

    def __init__(self, *, netns: str | None = None, socket_dir: Path = SOCKET_DIR) -> None:
        self._netns = netns
        self._dir = socket_dir

    def socket(self, device: str) -> UapiSocket:
        return UapiSocket(self._dir / f"{device}.sock")

    async def read(self, device: str) -> DeviceConfig | None:
        snap = await self.snapshot(device)
        return snap.config if snap is not None else None

    async def snapshot(self, device: str) -> Snapshot | None:
        sock = self.socket(device)
        if not sock.path.exists():
            return None
        try:
            answer = await sock.request(b"get=1\n\n")
        except DataPlaneError:
            return None  # a socket left by a process that is gone, or going
        return Snapshot(fingerprint(answer), lambda: parse_get(device, answer))

    async def write(self, device: str, change: DeviceWrite) -> None:
        answer = await self.socket(device).request(encode_set(change))
        code = answer.strip().rpartition("errno=")[2]
        if code != "0":
            peers = len(change.peers)
            raise DataPlaneError(f"wireguard-go refused a change of {device} ({peers} peer "
                                 f"operations): errno {code}")

    async def create(self, device: str) -> None:
        """Start wireguard-go for `device`; returns once its TUN device and socket exist."""
        program = shutil.which(WIREGUARD_GO)
        if program is None:
            raise DataPlaneError(f"no WireGuard kernel module and no {WIREGUARD_GO} on PATH "
                                 "(Debian: apt-get install wireguard-go)")
        await self.dispose(device)
        argv = [program, device]
        if self._netns is not None:
            argv = ["ip", "netns", "exec", self._netns, *argv]
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
            out, _ = await within(proc.communicate(), START_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise DataPlaneError(f"cannot start {WIREGUARD_GO} {device}: {exc}") from None
        if proc.returncode != 0:
            last = _last_line(out.decode(errors="replace"))
            raise DataPlaneError(f"{WIREGUARD_GO} {device} failed (exit status "
                                 f"{proc.returncode}): {last}")
        log.info("started %s for %s: pid %s, control socket %s", WIREGUARD_GO, device,
                 self.pids(device), self.socket(device).path)

    def pids(self, device: str) -> str:
        """The PIDs of `device`'s wireguard-go, for a log line."""
        return ", ".join(str(pid) for pid, _ in wireguard_go_processes(device, self._netns)) \
            or "unknown"

    async def dispose(self, device: str) -> None:
        """Stop any wireguard-go left for `device` (its link is gone: it is on its way
        out, or stuck) by PID, and wait until it is gone and its socket with it."""
        procs = await asyncio.to_thread(wireguard_go_processes, device, self._netns)
        for pid, start in procs:
            log.info("stopping %s pid %d: its device %s is gone", WIREGUARD_GO, pid, device)
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT
        sock = self.socket(device)
        while any(_start_time(pid) == start for pid, start in procs) or \
                await asyncio.to_thread(sock.answers):
            if time.monotonic() > deadline:
                raise DataPlaneError(f"{WIREGUARD_GO} for {device} still running "
                                     f"{EXIT_TIMEOUT:.0f}s after SIGTERM")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        return None


def _last_line(text: str) -> str:
    """The last line of wireguard-go's output that is not its banner's box."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith(("┌", "│", "└"))]
    return lines[-1] if lines else "no output"
