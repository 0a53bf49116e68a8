"""Fixtures for the security checks: a TLS etcd (client certificates required) with auth on.

etcd runs from the harness in tests/etcd_cluster.py (one member here) on
https://127.0.0.1:PORT with --client-cert-auth. Auth: a root user, and a user
`leaseagent` whose role may only readwrite the prefix /coreos.com/network/.
`short_token_etcd`: the same with --auth-token-ttl 1 (tokens expire between uses).
Passwords go to etcdctl on stdin, never on a command line. Everything is
stopped by PID and removed afterwards, also when a test fails.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, TlsFiles
from pki import Pki, make_pki


@dataclass
class SecureEtcd:
    cluster: EtcdCluster
    pki: Pki
    dir: Path
    password: str
    password_file: Path

    @property
    def url(self) -> str:
        return self.cluster.members[0].url

    def tls_flags(self) -> list[str]:
        return ["--etcd-cafile", str(self.pki.ca), "--etcd-certfile", str(self.pki.client[0]),
                "--etcd-keyfile", str(self.pki.client[1])]

    def auth_flags(self) -> list[str]:
        return ["--etcd-username", "leaseagent", "--etcd-password-file", str(self.password_file)]


def _secure_etcd(extra_args: list[str]) -> Iterator[SecureEtcd]:
    d = Path(tempfile.mkdtemp(prefix="leaseagent-pki-"))
    pki = make_pki(d)
    tls = TlsFiles(ca=pki.ca, cert=pki.server[0], key=pki.server[1],
                   client_cert=pki.root[0], client_key=pki.root[1])
    cluster = EtcdCluster(1, tls=tls, extra_args=extra_args)
    try:
        cluster.start()
        password = secrets.token_urlsafe(18)
        password_file = d / "etcd-password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        root_password = secrets.token_urlsafe(18)
        ctl = cluster.etcdctl
        ctl("user", "add", "root", "--interactive=true", input=f"{root_password}\n{root_password}\n".encode())
        ctl("role", "add", "leaseagent")
        ctl("role", "grant-permission", "leaseagent", "--prefix=true", "readwrite",
            "/coreos.com/network/")
        ctl("user", "add", "leaseagent", "--interactive=true", input=f"{password}\n{password}\n".encode())
        ctl("user", "grant-role", "leaseagent", "leaseagent")
        ctl("auth", "enable")
        yield SecureEtcd(cluster, pki, d, password, password_file)
    finally:
        cluster.close()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def secure_etcd() -> Iterator[SecureEtcd]:
    yield from _secure_etcd([])


# Simple tokens unused this long expire (etcd's default is 300 s): shorter than the
# agents' renewal interval, so every renewal finds its token gone.
TOKEN_TTL = 1


@pytest.fixture
def short_token_etcd() -> Iterator[SecureEtcd]:
    """secure_etcd with --auth-token-ttl TOKEN_TTL."""
    yield from _secure_etcd(["--auth-token-ttl", str(TOKEN_TTL)])
