"""Scenario 6: hostile etcd data. The agent never crashes and never programs an invalid lease.

Property-based (hypothesis) against the in-memory store (leaseagent/store/
memory.py, checked against a real etcd by tests/contract) with an in-process
agent whose data plane is a recording backend injected through
`Agent(backends=...)`: every peer it is ever handed is checked by an oracle
written here, independently of leaseagent.core.leases. Keys and values are
generated to be invalid JSON, huge, deeply nested, wrongly typed, misaligned
or overlapping subnets, outside the network, aliases of this host's own key,
PublicIPs that are ours or unusable, duplicate VtepMACs, key names that do
not parse; with an IPv4-only and with a dual-stack network config, so the
same goes for IPv6 parts (outside the IPv6 network, our own IPv6 subnet
under another key, a missing or unusable PublicIPv6, a bad BackendV6Data);
and the network config with each field wrong in turn.

Then once against a real etcd with a fixed set: `leasectl list --json`
shows each as invalid, with the reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from faultkit import FULL, PREFIX, SUBNETS, put_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import InProcAgent, make_agent, wait_all
from leasectl_run import leasectl

from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.plan import BackendSpec
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings, DataPlaneStatus
from leaseagent.dataplane.vxlan import VxlanBackend
from leaseagent.store.memory import MemoryStore

NETWORK = IPv4Network("10.5.0.0/16")
OWN_IP = "10.200.0.1"
CONFIG = {"Network": str(NETWORK), "SubnetLen": 24, "SubnetMin": "10.5.1.0",
          "SubnetMax": "10.5.20.0", "Backend": {"Type": "vxlan", "VNI": 1}}
NETWORK6 = IPv6Network("fd00:5::/48")
DUAL_CONFIG = {**CONFIG, "EnableIPv6": True, "IPv6Network": str(NETWORK6)}
BAD_IPS = {"0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", OWN_IP}
MACS = ["0a:00:00:00:00:01", "0a:00:00:00:00:01", "0A:00:00:00:00:02", "01:00:5e:00:00:01",
        "00:00:00:00:00:00", "zz:zz:zz:zz:zz:zz", "0a:00:00:00:00:03\n", "", None, 7]


def _mac_ok(mac: object) -> bool:
    if not isinstance(mac, str) or len(mac) != 17 or mac.lower() == "00:00:00:00:00:00":
        return False
    try:
        octets = [int(x, 16) for x in mac.split(":")]
    except ValueError:
        return False
    return len(octets) == 6 and all(len(x) == 2 for x in mac.split(":")) and not octets[0] & 1


def oracle(key: str, raw: bytes, dual: bool = False
           ) -> tuple[IPv4Network, str, str | None, IPv6Network | None] | None:
    """(subnet, PublicIP, VtepMAC, IPv6 subnet served) if this lease may be programmed,
    else None."""
    # flannel's key expression (pkg/subnet/subnet.go), anchored at both ends; each part a
    # network; Go's \d is ASCII.
    m = re.fullmatch(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?", key[len(SUBNETS):],
                     re.ASCII)
    if m is None:
        return None
    try:
        subnet = IPv4Network(f"{m[1]}/{int(m[2])}")
        subnet6 = IPv6Network(f"{m[3]}/{int(m[4])}") if m[3] is not None else None
    except ValueError:
        return None
    if subnet.prefixlen != 24:
        return None
    if len(raw) > 64 * 1024:
        return None
    if not subnet.subnet_of(NETWORK):
        return None
    try:
        doc = json.loads(raw)
        ip = IPv4Address(doc["PublicIP"] if isinstance(doc["PublicIP"], str) else "x")
    except Exception:
        return None
    if (not isinstance(doc, dict) or str(ip) in BAD_IPS or ip.is_loopback or ip.is_multicast
            or ip.is_reserved or ip.is_link_local or ip.is_unspecified or ip in NETWORK):
        return None  # a PublicIP inside the cluster network: the overlay would carry itself
    if doc.get("NodeID") is not None and not isinstance(doc.get("NodeID"), str):
        return None
    if not isinstance(doc.get("BackendData") or {}, dict):
        return None
    if not doc.get("BackendData") and doc.get("NodeID") is None:
        return None  # keys here carry no etcd lease: an unclaimed reservation, nobody there yet
    v6 = doc.get("PublicIPv6")
    if v6 is not None:
        try:
            IPv6Address(v6 if isinstance(v6, str) else "x")
        except ValueError:
            return None
    if not isinstance(doc.get("BackendV6Data") or {}, dict):
        return None
    if doc.get("BackendType") not in ("vxlan", "alloc", "host-gw"):
        return None
    vxlan = doc.get("BackendType") == "vxlan"
    data = doc.get("BackendData")
    mac = data.get("VtepMAC") if isinstance(data, dict) else None
    if vxlan and not _mac_ok(mac):
        return None
    if not dual or subnet6 is None:
        return subnet, str(ip), mac.lower() if vxlan else None, None  # type: ignore[union-attr]
    # A dual-stack network and key: the IPv6 part must be right too, or the lease goes.
    if (subnet6.prefixlen != 64 or not subnet6.subnet_of(NETWORK6) or v6 is None
            or IPv6Address(v6).is_link_local or IPv6Address(v6).is_loopback
            or IPv6Address(v6).is_multicast or IPv6Address(v6).is_unspecified
            or IPv6Address(v6).is_reserved or IPv6Address(v6) in NETWORK6):
        return None
    data6 = doc.get("BackendV6Data") or {}
    if vxlan and not _mac_ok(data6.get("VtepMAC")):
        return None
    return subnet, str(ip), mac.lower() if vxlan else None, subnet6  # type: ignore[union-attr]


class RecordingDataPlane:
    """A DataPlane that records (and checks) every peer the agent hands it."""

    instances: list[RecordingDataPlane] = []

    def __init__(self, settings: DataPlaneSettings) -> None:
        self.settings = settings
        self.peers: dict[IPv4Network, Peer] = {}
        self.handed: list[Peer] = []
        self.own: IPv4Network | None = None
        self.own6: IPv6Network | None = None
        self.status = DataPlaneStatus()
        RecordingDataPlane.instances.append(self)

    async def clear_the_way(self) -> None:
        return None

    async def take_over(self, in_use: object) -> None:
        return None

    def spec(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
             own_ipv6: IPv6Network | None = None) -> BackendSpec:
        """What the vxlan backend it stands for wants (pure: the peer filter's port)."""
        return VxlanBackend(self.settings).spec(own_subnet, peers, own_ipv6=own_ipv6)

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        return BackendAttrs(backend_type="vxlan", mtu=1450,
                            backend_data={"VNI": 1, "VtepMAC": "0a:00:00:00:00:ff"},
                            backend_v6_data={"VNI": 1, "VtepMAC": "0a:00:00:00:06:ff"})

    async def start(self, own_subnet: IPv4Network, *, own_ipv6: IPv6Network | None = None
                    ) -> None:
        self.own = own_subnet
        self.own6 = own_ipv6

    async def sync(self, peers: Mapping[IPv4Network, Peer], *,
                   ready: Awaitable[object] | None = None) -> None:
        if ready is not None:
            await ready
        self.handed.extend(peers.values())
        self.peers = dict(peers)
        self.status.in_sync = True

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer], *,
                     ready: Awaitable[object] | None = None) -> None:
        if ready is not None:
            await ready
        self.handed.extend(changes.added + changes.changed)
        self.peers = dict(peers)

    async def run(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


def dumps(doc: object) -> bytes:
    return json.dumps(doc).encode()


ips = st.sampled_from([*sorted(BAD_IPS), "10.200.0.2", "10.200.0.3", "192.168.1.1", "1.2.3",
                       "", "10.200.0.2 ", "10.5.9.9"]) | st.integers() | st.none()
values = st.one_of(
    st.builds(lambda ip, bt, mac, node: dumps({"PublicIP": ip, "BackendType": bt,
                                               "BackendData": {"VNI": 1, "VtepMAC": mac},
                                               "NodeID": node}),
              ips, st.sampled_from(["vxlan", "vxlan", "alloc", "host-gw", "udp", "", None, 3]),
              st.sampled_from(MACS), st.sampled_from(["n1", None, 5, ["x"]])),
    st.builds(lambda ip, data: dumps({"PublicIP": ip, "BackendType": "vxlan", "BackendData": data}),
              ips, st.sampled_from([None, [], "x", 1, {"VtepMAC": ["0a:00:00:00:00:01"]}])),
    st.builds(lambda ip, v6, bt, mac6: dumps({"PublicIP": ip, "PublicIPv6": v6, "BackendType": bt,
                                              "BackendData": {"VNI": 1,
                                                              "VtepMAC": "0a:00:00:00:00:05"},
                                              "BackendV6Data": {"VNI": 1, "VtepMAC": mac6},
                                              "NodeID": "n6"}),
              ips, st.sampled_from(["fd00:250::5", "fd00:250::6", "fe80::5", "::1", "ff02::1",
                                    "10.200.0.5", "", None, 6, "fd00:250::5 ", "fd00:5::9"]),
              st.sampled_from(["vxlan", "vxlan", "host-gw"]), st.sampled_from(MACS)),
    st.builds(lambda ip, data6: dumps({"PublicIP": ip, "PublicIPv6": "fd00:250::8",
                                       "BackendType": "vxlan",
                                       "BackendData": {"VtepMAC": "0a:00:00:00:00:08"},
                                       "BackendV6Data": data6}),
              ips, st.sampled_from([None, [], "x", 1, {}, {"VtepMAC": "0a:00:00:00:06:08"}])),
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b"\"str\"", b"{", b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
                     b"{" + b" " * 70000 + b"}",
                     dumps({"PublicIP": "10.200.0.9", "BackendType": "vxlan",
                            "BackendData": {"VtepMAC": "0a:00:00:00:00:09"}, "Pad": "x" * 70000})]),
)
key_names = st.one_of(
    st.integers(0, 40).map(lambda n: f"10.5.{n}.0-24"),
    st.sampled_from(["10.5.3.7-24", "10.5.4.0-23", "10.5.0.0-16", "10.6.1.0-24", "10.5.5.0-024",
                     "10.5.6.0-24&fd00::-64", "10.5.7.0-24-1", "garbage", "", "-", "10.5.8.0_24",
                     "10.5.9.0-33", "10.5.10.0/24", "0.0.0.0-0", "10.5.11.0-24\n", "10.05.12.0-24",
                     "10.5.13.0-24&fd00:5:0:13::-64", "10.5.14.0-24&fd00:5:0:13::-64",
                     "10.5.15.0-24&fd00:6:0:15::-64", "10.5.16.0-24&fd00:5:0:16::-80",
                     "10.5.17.0-24&FD00:5::-64", "10.5.18.0-24&fd00:5:0:18::1-64"]),
    st.text(max_size=20),
)
OWN_ALIASES = ["{own}-24&fd00::-64", "{own}-024", "{own}-24&", "10.5.19.0-24&{own6}-64"]
entries = st.lists(st.tuples(key_names, values), max_size=12)


async def scenario(before: list[tuple[str, bytes]], after: list[tuple[str, bytes]],
                   own_alias: int | None, delete_some: int, dual: bool = False) -> dict[str, int]:
    store = MemoryStore()
    await store.put(f"{PREFIX}/config", dumps(DUAL_CONFIG if dual else CONFIG))
    for name, value in before:
        await store.put(SUBNETS + name, value)
    with tempfile.TemporaryDirectory(prefix="leaseagent-hostile-") as d:
        # No hold-down: deleted keys leave the data plane at once, so what it holds is
        # exactly the valid leases (the property under test).
        ia: InProcAgent = await make_agent(Path(d), "me", OWN_IP, endpoints="http://127.0.0.1:1",
                                           store=store, backends={"vxlan": RecordingDataPlane},
                                           extra=["--peer-hold-time", "0"],
                                           public_ipv6="fd00:250::1")
        ia.start()
        try:
            await wait_all([ia], lambda a: a.ready, timeout=10, what="agent ready")
            own = ia.agent.own
            assert own is not None
            own6 = own.ipv6_subnet
            assert (own6 is not None) == dual
            if own_alias is not None:
                alias = OWN_ALIASES[own_alias].format(
                    own=own.subnet.network_address, own6=own6.network_address if own6 else "x")
                after = [*after, (alias, dumps({"PublicIP": "10.200.0.7", "BackendType": "vxlan",
                                                "BackendData": {"VtepMAC": "0a:00:00:00:00:07"}}))]
            for name, value in after:
                if SUBNETS + name != own.key:
                    await store.put(SUBNETS + name, value)
            for kv in (await store.list_prefix(SUBNETS)).items[:delete_some]:
                if kv.key != own.key:
                    await store.delete(kv.key)
            for _ in range(50):
                await asyncio.sleep(0)
            assert ia.agent.watcher is not None
            ia.agent.watcher.request_relist("test")
            for _ in range(50):
                await asyncio.sleep(0)
            assert ia.task is not None and not ia.task.done(), "the agent stopped"
            dp = ia.agent.backend
            assert isinstance(dp, RecordingDataPlane)
            for peer in dp.handed:
                assert peer.subnet != own.subnet, f"our own subnet programmed as a peer: {peer}"
                assert peer.ipv6_subnet is None or (dual and peer.ipv6_subnet != own6), peer
                assert str(peer.public_ip) not in BAD_IPS, peer
                assert peer.subnet.subnet_of(NETWORK) and peer.subnet.prefixlen == 24, peer
            listing = (await store.list_prefix(SUBNETS)).items
            want = {}
            # Of two keys naming one subnet, the oldest (create revision, then key) wins.
            for kv in sorted(listing, key=lambda kv: (kv.create_revision, kv.key)):
                if kv.key == own.key:
                    continue
                ok = oracle(kv.key, kv.value, dual)
                named6 = re.search(r"&([a-f\d:]+)-(\d+)$", kv.key)
                ours6 = (own6 is not None and named6 is not None
                         and named6[0] == f"&{own6.network_address}-{own6.prefixlen}")
                if ok is not None and ok[0] != own.subnet and not ours6:
                    want.setdefault(ok[0], ok)
            got = {s: (s, str(p.public_ip),
                       p.data.vtep_mac if isinstance(p.data, VxlanLeaseData) else None,
                       p.ipv6_subnet)
                   for s, p in dp.peers.items()}
            assert got == want, f"data plane {got} != valid leases {want}"
            sample = ia.agent.metrics.registry.get_sample_value
            skipped = {}
            for metric in ia.agent.metrics.registry.collect():
                if metric.name == "leaseagent_invalid_leases_skipped":
                    for s in metric.samples:
                        if s.name.endswith("_total"):
                            skipped[s.labels["reason"]] = int(s.value)
            assert sample("leaseagent_lease_held") == 1
            return skipped
        finally:
            await ia.close()


TOTALS: dict[str, int] = {"examples": 0}


@settings(max_examples=600 if FULL else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=entries, after=entries,
       own_alias=st.none() | st.integers(0, len(OWN_ALIASES) - 1), delete_some=st.integers(0, 3),
       dual=st.booleans())
def test_hostile_leases_never_crash_and_never_reach_the_data_plane(before, after, own_alias,
                                                                   delete_some, dual):
    skipped = asyncio.run(scenario(before, after, own_alias, delete_some, dual))
    TOTALS["examples"] += 1
    for reason, n in skipped.items():
        TOTALS[reason] = TOTALS.get(reason, 0) + n


def test_print_hostile_totals():
    print(f"\nscenario 6: {TOTALS.get('examples', 0)} generated examples, invalid leases "
          f"skipped by reason: {dict(sorted((k, v) for k, v in TOTALS.items() if k != 'examples'))}")


WRONG_CONFIG_FIELDS = {
    "Network": ["", "10.5.0.0/33", "10.5.0.1/16", 5, None, "fd00::/64", "10.5.0.0"],
    "SubnetLen": [-1, 15, 31, 33, "24", 24.5],  # 0 and null mean "default", as in flannel
    "SubnetMin": ["10.6.1.0", "10.5.1.7", "x", 3],
    "SubnetMax": ["10.4.0.0", "10.5.1.7", [], "10.5.0.0"],
    # (VNI, Port and the like are checked by the real vxlan backend: tests/unit, tests/e2e.)
    "Backend": ["vxlan", [], {"Type": "udp"}, {"Type": 5}, {"Type": ""}],
    "EnableIPv6": [True, "yes"],
    "EnableIPv4": [False, "no"],
}


async def test_every_config_field_wrong_in_turn_waits_and_never_crashes(tmp_path):
    """Each bad <prefix>/config keeps the agent waiting (no lease, no crash, reason logged);
    the agent goes on as soon as a valid config appears."""
    tried = 0
    for field_name, bads in WRONG_CONFIG_FIELDS.items():
        for bad in bads:
            store = MemoryStore()
            await store.put(f"{PREFIX}/config", dumps({**CONFIG, field_name: bad}))
            ia = await make_agent(tmp_path, f"c{tried}", OWN_IP, endpoints="http://127.0.0.1:1",
                                  store=store, backends={"vxlan": RecordingDataPlane})
            ia.start()
            try:
                await asyncio.sleep(0.05)
                assert ia.task is not None and not ia.task.done(), (field_name, bad)
                assert ia.agent.own is None, f"{field_name}={bad!r} was accepted"
                await store.put(f"{PREFIX}/config", dumps(CONFIG))
                await wait_all([ia], lambda a: a.ready, timeout=10, what="ready after the fix")
            finally:
                await ia.close()
            tried += 1
    print(f"\nscenario 6: {tried} bad network configs (each field wrong in turn): the agent "
          f"waited on every one and started once the config was fixed")


def test_leasectl_list_shows_hostile_leases_as_invalid_with_the_reason(etcd):
    """A fixed hostile set in a real etcd: `leasectl list --json` marks each invalid, says why."""
    put_config(etcd, CONFIG)
    mac = {"VNI": 1, "VtepMAC": "0a:00:00:00:00:01"}
    fixed = {
        "10.5.1.0-24": (b"{not json", "not valid JSON"),
        "10.5.2.0-24": (dumps({"PublicIP": "0.0.0.0", "BackendType": "vxlan", "BackendData": mac}),
                        "unspecified"),
        "10.5.3.0-24": (dumps({"PublicIP": "127.0.0.1", "BackendType": "vxlan",
                               "BackendData": mac}), "loopback"),
        "10.5.4.0-24": (dumps({"PublicIP": "224.0.0.1", "BackendType": "vxlan",
                               "BackendData": mac}), "multicast"),
        "10.5.5.0-24": (dumps({"PublicIP": "255.255.255.255", "BackendType": "vxlan",
                               "BackendData": mac}), "broadcast"),
        "10.5.6.0-24": (dumps({"PublicIP": 7, "BackendType": "vxlan"}), "not a string"),
        "10.5.7.0-24": (dumps({"PublicIP": "10.200.0.7", "BackendType": "udp", "NodeID": "n7"}),
                        "unknown"),
        "10.5.8.0-24": (dumps({"PublicIP": "10.200.0.8", "BackendType": "vxlan",
                               "BackendData": {"VtepMAC": "01:00:5e:00:00:01"}}), "multicast"),
        "10.5.20.0-23": (dumps({"PublicIP": "10.200.0.9", "BackendType": "vxlan",
                               "BackendData": mac}), "not a /24"),
        "10.9.1.0-24": (dumps({"PublicIP": "10.200.0.10", "BackendType": "vxlan",
                               "BackendData": mac}), "outside the network"),
        "10.5.10.7-24": (dumps({"PublicIP": "10.200.0.11", "BackendType": "vxlan"}),
                         "host bits set"),
        "garbage": (dumps({"PublicIP": "10.200.0.12", "BackendType": "vxlan"}), "ADDR-LEN"),
        "10.5.11.0-24": (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        "10.5.12.0-24": (b"x" * 70000, "limit"),
    }
    for name, (value, _) in fixed.items():
        # The value on stdin: binary and 70 kB values do not fit an argument.
        subprocess.run(["etcdctl", "--endpoints", etcd.url, "put", SUBNETS + name], input=value,
                       check=True, capture_output=True, env={"ETCDCTL_API": "3"})
    result = leasectl(etcd, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["subnet"]: row for row in json.loads(result.stdout)}
    assert len(rows) == len(fixed)
    shown = 0
    for row in rows.values():
        assert row["valid"] is False, row
        assert row["error"], row
    for name, (_, why) in fixed.items():
        matching = [r for r in rows.values() if why in (r["error"] or "")]
        assert matching, f"{name}: no row says {why!r}: {[r['error'] for r in rows.values()]}"
        shown += 1
    print(f"\nscenario 6: leasectl list --json marked all {shown} fixed hostile leases invalid, "
          f"each with its reason")
