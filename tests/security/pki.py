"""A throw-away PKI made with openssl for the TLS tests: a CA, a server certificate for
127.0.0.1, client certificates, and a second CA that etcd does not trust."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return crt, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=d)
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""
    ext.write_text(f"{san}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext), cwd=d)
    key.chmod(0o600)
    return crt, key


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    root: tuple[Path, Path]  # CN=root: etcdctl as the etcd root user
    client: tuple[Path, Path]  # the agent's client certificate (CN is no etcd user)
    other_ca: Path  # a CA etcd does not trust
    other_client: tuple[Path, Path]  # signed by other_ca


def make_pki(d: Path) -> Pki:
    ca = _ca(d, "ca")
    other = _ca(d, "other-ca")
    return Pki(ca=ca[0], server=_leaf(d, "server", ca, server=True),
               root=_leaf(d, "root", ca, server=False),
               client=_leaf(d, "agent-host", ca, server=False),
               other_ca=other[0], other_client=_leaf(d, "other-client", other, server=False))
