"""A real etcd for tests (Debian's etcd-server): one member on 127.0.0.1, free ports, a temp dir.

Used by the fixtures in tests/conftest.py. Launched by the project's one etcd
launcher (leaseagent.lab.etcd): stopped by PID (SIGCONT, SIGTERM, then
SIGKILL) and its data dir removed, whatever the test did.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from leaseagent.core.leases import DEFAULT_PREFIX, KeyLayout
from leaseagent.lab.etcd import Etcd


class EtcdServer(Etcd):
    """One member; `stop` and `start` again keep its ports and data."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, 1)
        self.data_dir = data_dir

    def start(self, timeout: float = 20.0, attempts: int = 3) -> EtcdServer:
        super().start(timeout, attempts)
        return self

    def stop(self) -> None:
        self.stop_all()


def make_etcd() -> EtcdServer:
    return EtcdServer(Path(tempfile.mkdtemp(prefix="leaseagent-etcd-")))


def remove(server: EtcdServer) -> None:
    server.close()


PREFIX = DEFAULT_PREFIX


def put_config(etcd: Etcd, config: dict[str, object], prefix: str = PREFIX) -> None:
    etcd.etcdctl("put", KeyLayout(prefix).config_key, json.dumps(config))
