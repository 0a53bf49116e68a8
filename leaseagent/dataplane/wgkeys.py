"""This host's WireGuard private key: made once, kept in the state dir, never shown.

flannel keeps its key in /run/flannel/wgkey, a tmpfs: every reboot makes a
new key, and every peer must learn it again from the lease (and until it has,
the two cannot talk). Here the key lives in `<state-dir>/wireguard-key`
(/var/lib/leaseagent), so the public key is the same across restarts and
reboots, and a peer's configuration stays valid.

- Made with `cryptography`'s X25519 (the curve WireGuard uses), clamped as
  `wg genkey` clamps it, written as `wg genkey` writes it (base64 and a
  newline), atomically (leaseagent.files) with mode 0600 from the start; a
  symlink at the path is refused, for reading as for writing.
- A key file that others may read is taken, its mode set to 0600, and a
  warning says to consider rotating it. A file that holds no key is an error
  (ConfigError, one line): replacing it silently would change this host's
  identity behind the operator's back.
- The private key never leaves this module as text: `PrivateKey` holds the
  bytes, its repr shows the public key only, and what the device needs is
  asked for by name (`hex`, for wireguard-go's control socket; `raw`, for
  genetlink). Nothing logs it; `/metrics` and leasectl only ever see public
  keys.

Rotation (README, "WireGuard"): stop the agent, remove the file, start it;
the new key is set on the devices, then published in the lease, and the
peers switch to it.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from leaseagent.core.profiles.wireguard import wireguard_key
from leaseagent.errors import ConfigError
from leaseagent.files import refuse_non_regular, write_atomic

log = logging.getLogger(__name__)

KEY_FILE = "wireguard-key"  # in the state dir
KEY_MODE = 0o600


def _clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` (and the device, on setting it) does."""
    key = bytearray(raw)
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key_of(raw: bytes) -> str:
    """The base64 public key of a raw private key."""
    public = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True)
class PrivateKey:
    """A WireGuard private key; only its public key is ever shown."""

    raw: bytes = field(repr=False)
    public_key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", public_key_of(self.raw))

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(_clamp(raw))

    @property
    def hex(self) -> str:
        """For wireguard-go's control socket (it takes keys in hex)."""
        return self.raw.hex()

    def __str__(self) -> str:
        return f"private key of {self.public_key}"


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def load_private_key(state_dir: Path) -> PrivateKey | None:
    """The key kept in the state dir, or None if there is none. ConfigError for a
    symlink or a file that holds no key; a file others may read is made 0600."""
    path = key_path(state_dir)
    refuse_non_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the WireGuard key {path}: {exc.strerror}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, KEY_MODE)
            log.warning("%s was readable by others (mode %04o); mode set to %04o: consider "
                        "rotating the key (README, \"WireGuard\")", path, mode, KEY_MODE)
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(200).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    raw = wireguard_key(text)
    if raw is None:
        raise ConfigError(f"{path} holds no WireGuard private key (base64 of 32 bytes); "
                          "remove it to make a new key (peers learn it from the lease)")
    return PrivateKey(_clamp(raw))


def load_or_create_private_key(state_dir: Path) -> PrivateKey:
    """The kept key, or a new one written to the state dir (mode 0600) first."""
    key = load_private_key(state_dir)
    if key is not None:
        return key
    key = PrivateKey.generate()
    path = key_path(state_dir)
    try:
        write_atomic(path, base64.b64encode(key.raw) + b"\n", mode=KEY_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot store the WireGuard key in {path}: {exc}") from None
    log.info("new WireGuard key in %s, public key %s", path, key.public_key)
    return key
