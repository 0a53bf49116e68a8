"""Where this agent's /metrics is, published in etcd for `leasectl prometheus-targets`
(leaseagent.core.monitoring): `<prefix>/metrics/<node id>`, no TTL."""

from __future__ import annotations

import contextlib
import logging

from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.config import AgentConfig
from leaseagent.core.leases import KeyLayout
from leaseagent.core.monitoring import MetricsTarget, published_address
from leaseagent.dataplane.base import HostInfo
from leaseagent.errors import StoreError, StoreUnavailable
from leaseagent.retrying import retrying
from leaseagent.store.base import LeaseStore

log = logging.getLogger("leaseagent")


async def publish_metrics_target(store: LeaseStore, layout: KeyLayout, cfg: AgentConfig,
                             host: HostInfo, *, etcd: EtcdHealth) -> None:
    """Say in etcd where this agent's /metrics is, for `leasectl prometheus-targets`
    (leaseagent.core.monitoring): written only when it differs; a stale entry of
    this node is removed when the address is not one another host could scrape."""
    key = layout.metrics_key(cfg.node_id)
    address = (published_address(*cfg.metrics_addr, host.public_ip)
               if cfg.metrics_addr is not None else None)
    value = (MetricsTarget(node_id=cfg.node_id, address=address,
                           public_ip=str(host.public_ip)).encode()
             if address is not None else None)
    try:
        async for attempt in retrying(on_retry=etcd.down):
            with attempt:
                current = await store.get(key)
                if value is not None and (current is None or current.value != value):
                    await store.put(key, value)
                    log.info("metrics address %s published at %s", address, key)
                elif value is None and current is not None:
                    await store.delete(key, mod_revision=current.mod_revision)
                    log.info("metrics address no longer published (%s is not reachable "
                             "from other hosts): %s deleted", "--metrics-addr", key)
    except StoreError as exc:  # e.g. an etcd role that only grants <prefix>/subnets/
        log.warning("metrics address not published at %s: %s (Prometheus discovery "
                    "will not find this host)", key, exc)


async def withdraw_metrics_target(store: LeaseStore, layout: KeyLayout, node_id: str) -> None:
    """This host leaves on purpose (--release-on-exit): it is no longer a target."""
    with contextlib.suppress(StoreUnavailable):
        await store.delete(layout.metrics_key(node_id))
