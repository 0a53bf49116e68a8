"""The wireguard backend's pure parts: flannel's config and lease bytes, the plan, the
writes a diff becomes, wireguard-go's text protocol, the kernel's genetlink messages
(checked against pyroute2's own reading of them), the key file, doctor's lines."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest

from leaseagent.core.diagnosis import object_problems, stalled_peer_problems, wireguard_key_problems
from leaseagent.core.leases import LeaseValue, Peer, decode_lease_value, validate_peer
from leaseagent.core.network import parse_network_config
from leaseagent.core.plan import (
    SET_WIREGUARD,
    AllowedIP,
    DeviceSpec,
    DeviceState,
    WgPeer,
    WireguardAttrs,
    compare,
    compare_device,
    diff,
)
from leaseagent.core.profiles.wireguard import (
    PresharedKey,
    WireguardLeaseData,
    WireguardOptions,
    wireguard_lease_data,
)
from leaseagent.core.profiles.wireguard import plan_peer as plan_wireguard_peer
from leaseagent.dataplane.wgdevice import (
    DeviceConfig,
    DeviceWrite,
    PeerState,
    PeerUpdate,
    restore_keepalive,
    updates,
)
from leaseagent.dataplane.wgkeys import KEY_FILE, PrivateKey, load_or_create_private_key, load_private_key
from leaseagent.dataplane.wguapi import encode_set, fingerprint, parse_get
from leaseagent.errors import ConfigError, InvalidLease, NetworkConfigError

KEY1 = PrivateKey(bytes([0x48] * 32))
KEY2 = PrivateKey(bytes([0x50] * 32))
PUB1, PUB2 = KEY1.public_key, KEY2.public_key
PSK_TEXT = base64.b64encode(bytes(range(32))).decode()
PSK = PresharedKey(bytes(range(32)))
DEV, DEV6 = "flannel-wg", "flannel-wg-v6"


def config(backend: dict[str, object], **top: object) -> object:
    doc = {"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", **backend}, **top}
    return parse_network_config(json.dumps(doc))


def options(**backend: object) -> WireguardOptions:
    opts = config(backend).options  # type: ignore[attr-defined]
    assert isinstance(opts, WireguardOptions)
    return opts


# -- the network config (flannel's names and defaults) -------------------------------


def test_defaults_are_flannels() -> None:
    opts = options()
    assert (opts.listen_port, opts.listen_port_v6, opts.psk, opts.keepalive, opts.mtu,
            opts.mode) == (51820, 51821, None, 0, None, "separate")


def test_every_option_of_flannels_documentation() -> None:
    opts = options(ListenPort=5000, ListenPortV6=5001, PSK=PSK_TEXT,
                   PersistentKeepaliveInterval=25, MTU=1400, Mode="auto")
    assert (opts.listen_port, opts.listen_port_v6, opts.psk, opts.keepalive, opts.mtu,
            opts.mode) == (5000, 5001, PSK, 25, 1400, "auto")


@pytest.mark.parametrize(("backend", "message"), [
    ({"PSK": "not-a-key"}, "Backend.PSK: must be a WireGuard key"),
    ({"PSK": base64.b64encode(b"x" * 31).decode()}, "Backend.PSK: must be a WireGuard key"),
    ({"ListenPort": 0}, "Backend.ListenPort=0: must be a whole JSON number in 1..65535"),
    ({"ListenPortV6": 70000}, "Backend.ListenPortV6=70000"),
    ({"PersistentKeepaliveInterval": 2.5}, "Backend.PersistentKeepaliveInterval=2.5"),
    ({"Mode": "both"}, 'Backend.Mode="both": must be one of separate, auto, ipv4, ipv6'),
    ({"MTU": 100}, "Backend.MTU=100: must be at least 148"),
    ({"Mode": "ipv6"}, 'Backend.Mode="ipv6" needs "EnableIPv6": true'),
])
def test_bad_options_are_refused_naming_the_field(backend: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        config(backend)
    assert message in str(err.value)


def test_a_bad_psk_is_never_echoed() -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I"  # 43 chars: not a key
    with pytest.raises(NetworkConfigError) as err:
        config({"PSK": secret})
    assert secret not in str(err.value)


def test_a_psk_shows_only_as_its_fingerprint() -> None:
    opts = options(PSK=PSK_TEXT)
    assert PSK_TEXT not in repr(opts) and PSK_TEXT not in str(opts.psk)
    assert str(opts.psk).startswith("psk:") and len(str(opts.psk)) == 12


@pytest.mark.parametrize("mode", ["auto", "ipv4", "ipv6"])
def test_single_device_modes_are_refused_on_a_dual_stack_network(mode: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        config({"Mode": mode}, EnableIPv6=True, IPv6Network="fd00:5::/48")
    assert 'runs only Mode "separate" on a dual-stack network' in str(err.value)


@pytest.mark.parametrize("mode", ["separate", "auto", "ipv4"])
def test_ipv4_modes_run_on_an_ipv4_network(mode: str) -> None:
    assert options(Mode=mode).mode == mode


def test_mtu_from_the_underlay_family_and_wireguards_overhead() -> None:
    opts = options()
    assert opts.mtu_for(1500) == 1440 and opts.mtu_for(1500, ipv6=True) == 1420
    # flannel's MTU is the path's, before the overhead (pkg/backend/wireguard/device.go).
    assert options(MTU=1400).mtu_for(1500) == 1340


# -- lease values: flanneld's bytes ---------------------------------------------------

# What flanneld (pkg/backend/wireguard: json.Marshal of LeaseAttrs with BackendData
# a json.Marshal of wireguardLeaseAttrs) writes for an IPv4-only host, and for a
# dual-stack one (Mode separate: the IPv6 device's port in BackendV6Data).
FLANNELD = (b'{"PublicIP":"10.250.0.12","PublicIPv6":null,"BackendType":"wireguard",'
            b'"BackendData":{"PublicKey":"' + PUB2.encode() + b'","Port":51820}}')
FLANNELD_DUAL = (b'{"PublicIP":"10.250.0.12","PublicIPv6":"fd00:250::12",'
                 b'"BackendType":"wireguard","BackendData":{"PublicKey":"' + PUB2.encode()
                 + b'","Port":51820},"BackendV6Data":{"PublicKey":"' + PUB2.encode()
                 + b'","Port":51821}}')
SUBNET = IPv4Network("10.5.3.0/24")
SUBNET6 = IPv6Network("fd00:5:0:3::/64")


def test_our_lease_value_is_flanneld_s_bytes() -> None:
    ours = LeaseValue(public_ip=IPv4Address("10.250.0.12"), backend_type="wireguard",
                      backend_data={"PublicKey": PUB2, "Port": 51820})
    assert ours.encode() == FLANNELD
    dual = LeaseValue(public_ip=IPv4Address("10.250.0.12"), backend_type="wireguard",
                      backend_data={"PublicKey": PUB2, "Port": 51820},
                      public_ipv6=IPv6Address("fd00:250::12"),
                      backend_v6_data={"PublicKey": PUB2, "Port": 51821})
    assert dual.encode() == FLANNELD_DUAL


def test_a_flanneld_lease_is_a_peer_with_its_key_and_port() -> None:
    network = config({})
    peer = validate_peer(SUBNET, decode_lease_value(FLANNELD), network=network,  # type: ignore[arg-type]
                         own_public_ip=IPv4Address("10.250.0.11"))
    assert peer.data == WireguardLeaseData(PUB2, 51820)


def test_a_dual_stack_flanneld_lease_has_both_parts() -> None:
    network = config({}, EnableIPv6=True, IPv6Network="fd00:5::/48")
    peer = validate_peer(SUBNET, decode_lease_value(FLANNELD_DUAL), network=network,  # type: ignore[arg-type]
                         own_public_ip=IPv4Address("10.250.0.11"), ipv6_subnet=SUBNET6)
    assert peer.data6 == WireguardLeaseData(PUB2, 51821)


@pytest.mark.parametrize("data", [{"PublicKey": PUB2}, {"PublicKey": PUB2, "Port": 0},
                                  {"PublicKey": PUB2, "Port": None}])
def test_a_missing_or_zero_port_means_our_listen_port(data: dict[str, object]) -> None:
    assert wireguard_lease_data(data).port == 0
    peer = Peer(SUBNET, IPv4Address("10.250.0.12"), "wireguard", wireguard_lease_data(data))
    planned = plan_wireguard_peer(peer, options(ListenPort=5555))
    assert WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 5555)) in planned


@pytest.mark.parametrize("data", [{}, {"PublicKey": "abc"}, {"PublicKey": PUB2[:-1] + "!"},
                                  {"PublicKey": base64.b64encode(b"k" * 31).decode()},
                                  {"PublicKey": PUB2, "Port": 70000},
                                  {"PublicKey": PUB2, "Port": "51820"},
                                  {"PublicKey": PUB2, "Port": True}])
def test_bad_lease_data_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(InvalidLease) as err:
        wireguard_lease_data(data)
    assert err.value.reason == "bad_backend_data"


# -- the plan ---------------------------------------------------------------------------


def wg_peer(public_ip: str = "10.250.0.12", key: str = PUB2, subnet: IPv4Network = SUBNET,
            port: int = 51820, v6: bool = False) -> Peer:
    return Peer(subnet, IPv4Address(public_ip), "wireguard", WireguardLeaseData(key, port),
                ipv6_subnet=SUBNET6 if v6 else None,
                public_ipv6=IPv6Address("fd00:250::12") if v6 else None,
                data6=WireguardLeaseData(key, 0) if v6 else None)


def test_a_peer_is_its_key_endpoint_psk_keepalive_and_its_subnet() -> None:
    opts = options(PSK=PSK_TEXT, PersistentKeepaliveInterval=25)
    assert plan_wireguard_peer(wg_peer(), opts) == {
        WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 51820), PSK, 25),
        AllowedIP(DEV, SUBNET, PUB2),
    }


def test_a_dual_stack_peer_on_both_devices() -> None:
    planned = plan_wireguard_peer(wg_peer(v6=True), options(), ipv6=True)
    assert WgPeer(DEV6, PUB2, (IPv6Address("fd00:250::12"), 51821)) in planned
    assert AllowedIP(DEV6, SUBNET6, PUB2) in planned
    assert len(planned) == 4
    # No IPv6 device here: the IPv4 part only.
    assert len(plan_wireguard_peer(wg_peer(v6=True), options())) == 2


def test_a_peer_of_another_backend_gets_nothing() -> None:
    vxlan = Peer(SUBNET, IPv4Address("10.250.0.12"), "vxlan", WireguardLeaseData(PUB2, 0))
    assert plan_wireguard_peer(vxlan, options()) == frozenset()


def test_a_new_key_is_a_new_peer_and_the_subnet_moves_to_it() -> None:
    before = plan_wireguard_peer(wg_peer(key=PUB1), options())
    after = plan_wireguard_peer(wg_peer(key=PUB2), options())
    to_add, to_remove = diff(after, before)
    assert {o.kind for o in to_add} == {"peer", "allowed-ip"}
    assert to_remove == (WgPeer(DEV, PUB1, (IPv4Address("10.250.0.12"), 51820)),)


def test_a_new_endpoint_or_psk_is_the_same_peer_set_in_place() -> None:
    before = plan_wireguard_peer(wg_peer(), options())
    moved = plan_wireguard_peer(wg_peer(public_ip="10.250.0.99"), options(PSK=PSK_TEXT))
    to_add, to_remove = diff(moved, before)
    assert [o.kind for o in to_add] == ["peer"] and to_remove == ()


def test_two_leases_with_one_key_share_the_peer() -> None:
    first = plan_wireguard_peer(wg_peer(), options())
    second = plan_wireguard_peer(wg_peer(subnet=IPv4Network("10.5.4.0/24")), options())
    assert len(first | second) == 3  # one peer, two allowed IPs


# -- a diff as the writes of a device ------------------------------------------------


def test_writes_add_before_they_remove_and_prime_a_replaced_key() -> None:
    before = plan_wireguard_peer(wg_peer(key=PUB1), options())
    after = plan_wireguard_peer(wg_peer(key=PUB2), options())
    to_add, to_remove = diff(after, before)
    ops = updates(to_add, to_remove, prime=frozenset({PUB2}))
    assert [(u.public_key, u.remove) for u in ops] == [(PUB2, False), (PUB1, True)]
    assert ops[0].allowed_ips == (SUBNET,) and ops[0].keepalive == 1
    assert [u.keepalive for u in restore_keepalive(ops)] == [None]


def test_an_allowed_ip_leaving_a_peer_that_stays_replaces_its_list() -> None:
    other = IPv4Network("10.5.4.0/24")
    peer = WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 51820))
    current = DeviceConfig(PUB1, 51820, (PeerState(peer, (SUBNET, other)),))
    ops = updates([], [AllowedIP(DEV, other, PUB2)], current=current)
    assert ops == [PeerUpdate(PUB2, None, (SUBNET,), replace_allowed_ips=True)]


# -- wireguard-go's text protocol ---------------------------------------------------


def test_a_set_request_in_wireguard_go_s_protocol() -> None:
    peer = WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 51820), PSK, 25)
    text = encode_set(DeviceWrite(private_key=KEY1.raw, listen_port=51820, peers=(
        PeerUpdate(PUB2, peer, (SUBNET,)),
        PeerUpdate(PUB1, remove=True),
        PeerUpdate(PUB1, None, (SUBNET6,), replace_allowed_ips=True),
    ))).decode()
    hex2, hex1 = base64.b64decode(PUB2).hex(), base64.b64decode(PUB1).hex()
    assert text == (
        f"set=1\nprivate_key={KEY1.hex}\nlisten_port=51820\n"
        f"public_key={hex2}\npreshared_key={PSK.raw.hex()}\nendpoint=10.250.0.12:51820\n"
        f"persistent_keepalive_interval=25\nallowed_ip=10.5.3.0/24\n"
        f"public_key={hex1}\nremove=true\n"
        f"public_key={hex1}\nupdate_only=true\nreplace_allowed_ips=true\n"
        f"allowed_ip=fd00:5:0:3::/64\n\n")


def test_a_get_answer_is_read_and_the_private_key_dropped() -> None:
    hex2 = base64.b64decode(PUB2).hex()
    answer = (f"private_key={KEY1.hex}\nlisten_port=51820\npublic_key={hex2}\n"
              f"preshared_key={'0' * 64}\nprotocol_version=1\nendpoint=[fd00:250::12]:51821\n"
              "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
              "tx_bytes=296\nrx_bytes=92\npersistent_keepalive_interval=0\n"
              "allowed_ip=fd00:5:0:3::/64\nallowed_ip=10.5.9.0/24\nerrno=0\n\n")
    got = parse_get(DEV, answer)
    assert got.public_key == PUB1 and got.listen_port == 51820
    (state,) = got.peers
    assert state.peer == WgPeer(DEV, PUB2, (IPv6Address("fd00:250::12"), 51821))
    assert state.allowed_ips == (SUBNET6, IPv4Network("10.5.9.0/24"))
    assert (state.last_handshake, state.tx_bytes, state.rx_bytes) == (1700000000.5, 296, 92)
    assert KEY1.hex not in repr(got)


# -- the kernel's genetlink messages, read back by pyroute2 ---------------------------


def pyroute2_reads(body: bytes) -> object:
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg(struct.pack("=IHHII", 16 + len(body), 30, 5, 1, 0) + body)
    msg.decode()
    return msg


def test_a_set_device_message_as_pyroute2_reads_it() -> None:
    from leaseagent.dataplane.wgnetlink import encode_set as genl_set

    peer = WgPeer(DEV6, PUB2, (IPv6Address("fd00:250::12"), 51821), PSK, 25)
    (body,) = genl_set(DEV6, DeviceWrite(private_key=KEY1.raw, listen_port=51821, peers=(
        PeerUpdate(PUB2, peer, (SUBNET6,), replace_allowed_ips=True, keepalive=1),
        PeerUpdate(PUB1, remove=True))))
    msg = pyroute2_reads(body)
    assert (msg["cmd"], msg["version"]) == (1, 1)  # type: ignore[index]
    assert msg.get_attr("WGDEVICE_A_IFNAME") == DEV6  # type: ignore[attr-defined]
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") == base64.b64encode(KEY1.raw)  # type: ignore[attr-defined]
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51821  # type: ignore[attr-defined]
    first, second = msg.get_attr("WGDEVICE_A_PEERS")  # type: ignore[attr-defined]
    attrs = dict(first["attrs"])
    assert attrs["WGPEER_A_PUBLIC_KEY"] == PUB2.encode()
    assert attrs["WGPEER_A_PRESHARED_KEY"] == base64.b64encode(PSK.raw)
    assert attrs["WGPEER_A_FLAGS"] == 0x2  # WGPEER_F_REPLACE_ALLOWEDIPS
    endpoint = attrs["WGPEER_A_ENDPOINT"]
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (10, "fd00:250::12", 51821)
    assert attrs["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 1  # primed
    assert [a["addr"] for a in attrs["WGPEER_A_ALLOWEDIPS"]] == ["fd00:5:0:3::/64"]
    assert dict(second["attrs"]) == {"WGPEER_A_PUBLIC_KEY": PUB1.encode(), "WGPEER_A_FLAGS": 0x1}


def test_many_peers_are_split_and_only_the_first_message_sets_the_device() -> None:
    from leaseagent.dataplane.wgnetlink import PEERS_PER_MESSAGE
    from leaseagent.dataplane.wgnetlink import encode_set as genl_set

    keys = [base64.b64encode(i.to_bytes(32, "big")).decode() for i in range(1, 251)]
    bodies = genl_set(DEV, DeviceWrite(private_key=KEY1.raw, peers=tuple(
        PeerUpdate(k, remove=True) for k in keys)))
    assert len(bodies) == 3
    read = [pyroute2_reads(b) for b in bodies]
    assert [m.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None for m in read] == [  # type: ignore[attr-defined]
        True, False, False]
    assert [len(m.get_attr("WGDEVICE_A_PEERS")) for m in read] == [  # type: ignore[attr-defined]
        PEERS_PER_MESSAGE, PEERS_PER_MESSAGE, 50]


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """An attribute as the kernel lays it out (a test's own packing, not the module's)."""
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind | (0x8000 if nested else 0)) + payload + \
        b"\0" * (-n & 3)


def test_a_get_device_dump_as_the_kernel_sends_it_is_read() -> None:
    from leaseagent.dataplane.wgnetlink import decode_device

    def dump_part(allowed: list[str]) -> bytes:
        # include/uapi/linux/wireguard.h: WGDEVICE_A_PRIVATE_KEY 3, LISTEN_PORT 6, PEERS 8;
        # WGPEER_A_PUBLIC_KEY 1, ENDPOINT 4 (a sockaddr_in), LAST_HANDSHAKE_TIME 6,
        # TX_BYTES 8, ALLOWEDIPS 9; WGALLOWEDIP_A_FAMILY 1, IPADDR 2, CIDR_MASK 3.
        ips = b"".join(nla(0, nla(1, struct.pack("=H", 2))
                           + nla(2, ip_address(a.split("/")[0]).packed)
                           + nla(3, bytes([int(a.split("/")[1])])), nested=True)
                       for a in allowed)
        sockaddr = struct.pack("=H", 2) + (51820).to_bytes(2, "big") + bytes([10, 250, 0, 12]) \
            + bytes(8)
        peer = (nla(1, base64.b64decode(PUB2)) + nla(4, sockaddr)
                + nla(6, struct.pack("=qq", 1700000000, 0)) + nla(8, struct.pack("=Q", 500))
                + nla(9, ips, nested=True))
        return (struct.pack("=BBH", 0, 1, 0) + nla(2, DEV.encode() + b"\0")
                + nla(3, KEY1.raw) + nla(6, struct.pack("=H", 51820))
                + nla(8, nla(0, peer, nested=True), nested=True))

    # The kernel continues a peer's allowed IPs in the next message under its key.
    got = decode_device(DEV, [dump_part(["10.5.3.0/24"]), dump_part(["10.5.4.0/24"])])
    assert got.public_key == PUB1 and got.listen_port == 51820
    (state,) = got.peers
    assert state.peer == WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 51820))
    assert state.allowed_ips == (ip_network("10.5.3.0/24"), ip_network("10.5.4.0/24"))
    assert (state.last_handshake, state.tx_bytes) == (1700000000.0, 500)


# -- the key file ------------------------------------------------------------------------


def test_the_key_is_made_once_kept_0600_and_the_same_after(tmp_path: Path) -> None:
    key = load_or_create_private_key(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_private_key(tmp_path).public_key == key.public_key
    assert key.public_key not in path.read_text() and base64.b64encode(key.raw).decode() \
        in path.read_text()
    assert base64.b64encode(key.raw).decode() not in repr(key) + str(key)


@pytest.mark.skipif(shutil.which("wg") is None, reason="needs wg (wireguard-tools)")
def test_the_public_key_is_the_one_wg_derives(tmp_path: Path) -> None:
    key = load_or_create_private_key(tmp_path)
    out = subprocess.run(["wg", "pubkey"], input=(tmp_path / KEY_FILE).read_text(),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == key.public_key


def test_a_symlink_at_the_key_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text(base64.b64encode(KEY1.raw).decode() + "\n")
    (tmp_path / KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"):
        load_or_create_private_key(tmp_path)


def test_a_key_file_that_holds_no_key_is_an_error_not_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("garbage\n")
    with pytest.raises(ConfigError, match="holds no WireGuard private key"):
        load_or_create_private_key(tmp_path)
    assert (tmp_path / KEY_FILE).read_text() == "garbage\n"


def test_a_key_others_may_read_is_made_0600(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / KEY_FILE
    path.write_text(base64.b64encode(KEY1.raw).decode() + "\n")
    os.chmod(path, 0o644)
    assert load_private_key(tmp_path) == KEY1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "consider rotating" in caplog.text and KEY1.hex not in caplog.text


# -- the device, and doctor's lines ----------------------------------------------------


def test_a_device_with_another_key_or_port_is_set_in_place() -> None:
    spec = DeviceSpec(DEV, "tun", 1440, wireguard=WireguardAttrs(51820, PUB1))
    state = DeviceState(DEV, 7, "tun", True, None, 1440,
                        wireguard=WireguardAttrs(1234, PUB2))
    found = compare_device(spec, state)
    assert [(d.what, d.fix) for d in found] == [("listen port", SET_WIREGUARD),
                                                ("public key", SET_WIREGUARD)]
    silent = DeviceState(DEV, 7, "tun", True, None, 1440)  # nothing answers for it
    assert [d.fix for d in compare_device(spec, silent)] == ["recreate"]


def test_doctor_says_a_peer_s_psk_is_not_the_configs() -> None:
    planned = {SUBNET: plan_wireguard_peer(wg_peer(), options(PSK=PSK_TEXT))}
    other = PresharedKey(b"\x01" * 32)
    current = {WgPeer(DEV, PUB2, (IPv4Address("10.250.0.12"), 51820), other),
               AllowedIP(DEV, SUBNET, PUB2)}
    from leaseagent.core.plan import BackendSpec, Observation

    comparison = compare(BackendSpec(objects=planned), Observation(objects=frozenset(current)))
    (found,) = object_problems(comparison.objects, plan=planned, current=current,
                               peers={SUBNET: wg_peer()}, names={})
    assert found.kind == "wrong"
    assert found.text == (f"wrong peer {PUB2} dev flannel-wg (preshared key {other} is not the "
                          f"network config's PSK ({PSK}); peer 10.250.0.12)")
    assert PSK_TEXT not in found.text


def test_doctor_names_a_peer_never_shaken_hands_with() -> None:
    owners = {PUB2: wg_peer()}
    found = stalled_peer_problems([(DEV, PUB2, 0.0, 0, 444), (DEV, PUB1, 0.0, 0, 148),
                                   (DEV, PUB1, 1700000000.0, 92, 9000)], owners)
    assert [p.text for p in found] == [
        f"peer {PUB2} dev flannel-wg (peer 10.250.0.12): no handshake completed though 444 "
        "bytes were sent: its public key, the PSK or its endpoint do not match the other side"]


def test_doctor_checks_the_public_key_three_ways() -> None:
    found = wireguard_key_problems(device=DEV, device_key=PUB1,
                                   lease_data=WireguardLeaseData(PUB2, 51820),
                                   stored_key=PUB1, state_file="/var/lib/leaseagent/wireguard-key")
    assert [p.text for p in found] == [
        f"device flannel-wg public key {PUB1} but the lease's PublicKey is {PUB2}"]
    assert wireguard_key_problems(device=DEV, device_key=PUB1, lease_data=None, stored_key=None,
                                  state_file="k")[0].text.startswith("state k missing")


def _get_answer(peers: list[tuple[str, str, int]]) -> str:
    """A wireguard-go `get` answer: (public key hex, endpoint, rx bytes) per peer."""
    lines = ["private_key=" + "11" * 32, "listen_port=51820"]
    for key, endpoint, rx in peers:
        lines += [f"public_key={key}", "preshared_key=" + "00" * 32, "protocol_version=1",
                  f"endpoint={endpoint}", f"last_handshake_time_sec={rx // 7}",
                  "last_handshake_time_nsec=0", f"tx_bytes={rx * 2}", f"rx_bytes={rx}",
                  "persistent_keepalive_interval=0", "allowed_ip=10.5.1.0/24"]
    return "\n".join([*lines, "errno=0"]) + "\n\n"


def test_the_fingerprint_ignores_peer_order_and_counters_but_not_the_configuration() -> None:
    a, b = "aa" * 32, "bb" * 32
    one = _get_answer([(a, "192.0.2.1:51820", 0), (b, "192.0.2.2:51820", 0)])
    # wireguard-go lists its peers in no fixed order; traffic moves the counters
    other_order = _get_answer([(b, "192.0.2.2:51820", 900), (a, "192.0.2.1:51820", 70)])
    moved = _get_answer([(a, "192.0.2.1:51820", 0), (b, "192.0.2.3:51820", 0)])
    swapped = _get_answer([(a, "192.0.2.2:51820", 0), (b, "192.0.2.1:51820", 0)])
    assert fingerprint(one) == fingerprint(other_order)
    assert fingerprint(one) != fingerprint(moved)
    assert fingerprint(one) != fingerprint(swapped)


def test_the_family_is_asked_for_by_name_not_dumped() -> None:
    """CTRL_CMD_GETFAMILY with the name "wireguard", a plain request: the form that makes the
    kernel load an installed but unloaded module (a dump loads nothing). The bytes as sent,
    and as pyroute2's reading of the controller's messages has them."""
    import socket as sockets

    from pyroute2.netlink.generic import ctrlmsg

    from leaseagent.dataplane.rtnl import NLM_F_DUMP, NLM_F_REQUEST, RtnlSocket
    from leaseagent.dataplane.wgnetlink import GENL_ID_CTRL, encode_family_request

    body = encode_family_request("wireguard")
    assert body == (bytes([3, 1, 0, 0])  # cmd CTRL_CMD_GETFAMILY, version 1, reserved
                    + struct.pack("=HH", 4 + 10, 2) + b"wireguard\0" + b"\0\0")  # padded to 4
    a, b = sockets.socketpair(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    try:
        seq, message = RtnlSocket(a).request_message(GENL_ID_CTRL, body)
        length, kind, flags, sent_seq, pid = struct.unpack_from("=IHHII", message)
        assert (length, kind, sent_seq, pid) == (len(message), GENL_ID_CTRL, seq, 0)
        assert flags == NLM_F_REQUEST and not flags & NLM_F_DUMP
    finally:
        a.close()
        b.close()
    msg = ctrlmsg(message)
    msg.decode()
    assert msg["cmd"] == 3 and msg.get_attr("CTRL_ATTR_FAMILY_NAME") == "wireguard"  # type: ignore[index, attr-defined]


def test_the_controllers_answer_gives_the_family_id_of_that_name_only() -> None:
    from leaseagent.dataplane.wgnetlink import family_id

    def answer(name: bytes, ident: int) -> bytes:
        return (bytes([1, 2, 0, 0]) + struct.pack("=HHH2x", 6, 1, ident)
                + struct.pack("=HH", 4 + len(name), 2) + name + b"\0" * (-len(name) % 4))

    assert family_id(answer(b"wireguard\0", 33)) == 33
    assert family_id(answer(b"nlctrl\0", 16)) is None
    assert family_id(answer(b"nlctrl\0", 16), "nlctrl") == 16
