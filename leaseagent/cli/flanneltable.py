"""docs/flannel.md: every flanneld setting, flannel's meaning, ours, and the test that says so.

Rendered from the code: the config fields are leaseagent.core.network's
CONFIG_FIELDS, the backend fields each backend type's `option_keys`
(leaseagent.core.profiles), the flags and variables leaseagent.config's
FLANNEL_FLAGS. The rows below add what each means; a unit test
(tests/unit/test_flannel_doc.py) fails when a field, option or flag has no
row, a row names a test that does not exist, or the committed docs/flannel.md
is not what `python -m leaseagent.cli.flanneltable` prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from leaseagent.config import FLANNEL_FLAGS, flannel_env_name
from leaseagent.core.profiles import alloc, hostgw, vxlan, wireguard


@dataclass(frozen=True)
class Row:
    name: str
    flannel: str  # flanneld's meaning (its type, default)
    ours: str  # leaseagent's, or the refusal
    test: str  # file::test proving it


CF = "tests/unit/test_flannel_config.py"
KERNEL = "tests/e2e/test_dataplane_kernel.py"

CONFIG_ROWS = (
    Row("Network", "ip.IP4Net, CIDR text; required; null or a bad CIDR stop flanneld",
        "the same; a CIDR with host bits set is refused (flanneld masks them off)",
        f"{CF}::test_a_network_with_host_bits_is_refused"),
    Row("SubnetLen", "uint; 0/absent/null: 24 for a /22 or larger, else prefix+2; <= 30, "
        ">= prefix+2", "the same; a string, fraction or negative refused as Go refuses it",
        f"{CF}::test_a_value_of_the_wrong_json_type_is_refused_as_go_refuses_it"),
    Row("SubnetMin", "ip.IP4; absent or 0.0.0.0: the second subnet; \"\" and null are errors",
        "the same; also refused when above SubnetMax (flanneld then finds no subnet)",
        f"{CF}::test_the_zero_address_means_the_default"),
    Row("SubnetMax", "ip.IP4; absent or 0.0.0.0: the last subnet; \"\" and null are errors",
        "the same", f"{CF}::test_empty_string_address_is_refused"),
    Row("EnableIPv4", "bool, default true", "the same; false is refused (IPv6-only is not "
        "run over etcd here)", f"{CF}::test_null_enable_ipv4_stays_true"),
    Row("EnableIPv6", "bool, default false", "the same",
        f"{CF}::test_null_leaves_a_plain_field_at_its_default"),
    Row("EnableNFTables", "bool, default false: nftables instead of iptables", "the same",
        f"{CF}::test_null_leaves_a_plain_field_at_its_default"),
    Row("IPv6Network", "ip.IP6Net; decoded (and checked) even without EnableIPv6",
        "the same", f"{CF}::test_ipv6_network_without_enable_ipv6_is_decoded_and_checked_but_unused"),
    Row("IPv6SubnetLen", "uint; 64 for a /62 or larger, else prefix+2; <= 126", "the same",
        "tests/unit/test_network.py::test_ipv6_defaults_are_flannels"),
    Row("IPv6SubnetMin", "*ip.IP6; null, absent or :: the default; \"\" an error", "the same",
        f"{CF}::test_ipv6_bounds_null_or_zero_mean_the_default_and_empty_is_refused"),
    Row("IPv6SubnetMax", "*ip.IP6; as IPv6SubnetMin", "the same",
        f"{CF}::test_ipv6_bounds_null_or_zero_mean_the_default_and_empty_is_refused"),
    Row("Backend", "json.RawMessage; absent: udp (its docs say vxlan); null or without "
        "Type: \"unknown backend type\"", "absent: vxlan (udp is not implemented); null, "
        "no Type or an empty one refused as by flanneld",
        "tests/unit/test_network.py::test_backend_type_defaults_to_vxlan_only_without_a_backend"),
)

BACKEND_ROWS = {
    vxlan.NAME: (
        Row("Type", "\"vxlan\", any case", "the same",
            f"{CF}::test_backend_keys_and_type_value_ignore_case"),
        Row("VNI", "int, default 1 (absent/null); 0 is VNI 0, device flannel.0", "the same",
            f"{CF}::test_vxlan_vni_0_is_vni_0_and_null_is_the_default"),
        Row("Port", "int; 0: the kernel's 8472", "the same; above 65535 refused (flanneld "
            "truncates it to 16 bits)", f"{CF}::test_vxlan_port_0_is_the_kernels_default_8472"),
        Row("MTU", "int, default the underlay's: the path MTU; device and FLANNEL_MTU get "
            "MTU-50", "the same (was read as the device's MTU); the IPv6 device gets MTU-70, "
            "not -50 (flannel-io/flannel#1781); below 118 refused (flanneld writes "
            "FLANNEL_MTU=-50 for 0)",
            f"{CF}::test_vxlan_mtu_is_the_path_mtu_and_the_device_gets_50_less"),
        Row("GBP", "bool: the device's Group Based Policy extension", "the same "
            "(IFLA_VXLAN_GBP), kept and repaired",
            f"{KERNEL}::test_flannel_vxlan_options_gbp_learning_and_mtu_reach_the_device"),
        Row("Learning", "bool: the device learns source MACs", "the same (IFLA_VXLAN_LEARNING)",
            f"{KERNEL}::test_flannel_vxlan_options_gbp_learning_and_mtu_reach_the_device"),
        Row("DirectRouting", "bool: a peer on the same L2 gets a plain route", "the same",
            f"{KERNEL}::test_direct_routing_uses_underlay_route_for_same_segment"),
    ),
    hostgw.NAME: (
        Row("Type", "\"host-gw\": one route per peer via its PublicIP", "the same",
            f"{KERNEL}::test_host_gw_routes_and_refusal"),
    ),
    wireguard.NAME: (
        Row("Type", "\"wireguard\"", "the same", "tests/e2e/test_wireguard.py::"
            "test_containers_reach_each_other_and_the_underlay_carries_only_wireguard"),
        Row("ListenPort", "int, default 51820", "the same; 0 refused (flanneld would publish "
            "port 0)", "tests/unit/test_wireguard_units.py::"
            "test_bad_options_are_refused_naming_the_field"),
        Row("ListenPortV6", "int, default 51821", "the same", "tests/unit/test_wireguard_units.py"
            "::test_bad_options_are_refused_naming_the_field"),
        Row("MTU", "int, default the underlay's: the path MTU; devices get MTU-80",
            "the same path MTU; devices get MTU-60 over IPv4, -80 over IPv6 (what WireGuard "
            "adds)", "tests/unit/test_wireguard_units.py::test_bad_options_are_refused_naming_the_field"),
        Row("PSK", "string, base64 preshared key; \"\" none", "the same; shown only as a "
            "fingerprint", f"{CF}::test_wireguard_nulls_are_the_defaults"),
        Row("PersistentKeepaliveInterval", "time.Duration, a JSON number of seconds",
            "the same", f"{CF}::test_go_folds_the_kelvin_sign_and_long_s_like_k_and_s"),
        Row("Mode", "separate (default), auto, ipv4, ipv6", "the same on IPv4-only networks; "
            "dual-stack runs only separate (refused otherwise)",
            "tests/unit/test_wireguard_units.py::test_bad_options_are_refused_naming_the_field"),
    ),
    alloc.NAME: (
        Row("Type", "\"alloc\": a lease, no data path", "the same",
            "tests/unit/test_backends.py::test_every_backend_type_has_an_implementation_and_the_reverse"),
    ),
}

# flanneld's other backend types: refused by name (core.profiles.backend_type).
REFUSED_TYPES = ("udp", "ipip", "ipsec", "extension", "tencent-vpc")

MK_DOCKER_OPTS_ROWS = (
    Row("-f FILE", "subnet.env to read, default /run/flannel/subnet.env (dash: a relative "
        "path is searched in $PATH)", "`leasectl docker-opts -f`, default "
        "/run/leaseagent/subnet.env", "tests/unit/test_dockeropts.py::"
        "test_leasectl_docker_opts_as_a_process"),
    Row("-d FILE", "where to write, default /run/docker_opts.env", "the same; `-` for "
        "standard output; written atomically",
        "tests/unit/test_dockeropts.py::test_leasectl_docker_opts_as_a_process"),
    Row("-i", "only the DOCKER_OPT_* variables, in name order", "the same bytes",
        "tests/unit/test_dockeropts.py::test_individual_only"),
    Row("-c", "only the combined variable: its existing value and a space, then \" <opt>\" "
        "each", "the same bytes", "tests/unit/test_dockeropts.py::"
        "test_combined_only_with_own_key_and_existing_value"),
    Row("-k KEY", "the combined variable's name, default DOCKER_OPTS", "the same",
        "tests/unit/test_dockeropts.py::test_combined_only_with_own_key_and_existing_value"),
    Row("-m", "no --ip-masq option (nor its check)", "the same",
        "tests/unit/test_dockeropts.py::test_no_ipmasq_flag_drops_it"),
    Row("FLANNEL_IPMASQ", "true: --ip-masq=false; false: --ip-masq=true; else an error "
        "(exit 1)", "the same", "tests/unit/test_dockeropts.py::"
        "test_an_ipmasq_value_other_than_true_or_false_is_the_scripts_error_unless_m"),
    Row("FLANNEL_IPV6_SUBNET", "ignored", "adds --ipv6 and --fixed-cidr-v6 (ours: Docker "
        "needs them for IPv6)", "tests/unit/test_dockeropts.py::"
        "test_ipv6_adds_ipv6_and_fixed_cidr_v6_in_name_order"),
    Row("routing check", "after writing, exit 1 when `ip route` already routes the subnet "
        "via a gateway (a grep, so 110.5.34.0/24 matches 10.5.34.0/24 too)", "the same, "
        "for exactly that subnet (`leasectl docker-opts`; the agent's own file is not "
        "checked)", "tests/e2e/test_flanneld_host.py::"
        "test_docker_opts_refuses_a_subnet_the_host_routes_via_a_gateway"),
)

# flannel bugs that hurt users: the meaning kept, the bug not.
BUG_ROWS = (
    Row("reservations (a lease key without TTL)", "ignored with etcd v3 "
        "(flannel-io/flannel#1329)", "honoured: handed only to the PublicIP it names",
        "tests/integration/test_agent.py::test_a_reservation_is_honoured_and_keeps_no_ttl_after_restart"),
    Row("a host's subnet over time", "renumbered after a lost renewal "
        "(flannel-io/flannel#621, #813)", "kept: renewals fence on the lease; a lost key "
        "is taken back with create-if-absent",
        "tests/integration/test_agent.py::test_a_revoked_lease_is_taken_back"),
    Row("reuse by PublicIP", "a blind overwrite of the key (flannel-io/flannel#1289)",
        "a transaction on the key's revision", "tests/unit/test_leasing.py::"
        "test_takeover_is_fenced_on_mod_revision"),
    Row("flanneld's routes on a host switching over", "-", "replaced as each peer is "
        "programmed; stale ones removed by `leasectl cleanup --flannel`",
        "tests/e2e/test_flanneld_migration.py::"
        "test_flanneld_host_switched_to_leaseagent_loses_nothing"),
    Row("Docker on a host switching over", "dockerd runs on the file `mk-docker-opts.sh -k "
        "DOCKER_NETWORK_OPTIONS` wrote", "--docker-opts-file at that file rewrites it byte "
        "for byte (no dockerd restart): the same dockerd and containers run on; Docker's "
        "FORWARD, DOCKER-USER, DOCKER and DOCKER-ISOLATION chains stay as dockerd made them",
        "tests/e2e/test_flanneld_migration.py::"
        "test_a_docker_host_switched_from_flanneld_keeps_its_containers_and_loses_nothing"),
    Row("FORWARD order", "its FLANNEL-FWD jump appended", "our jump right after Docker's "
        "DOCKER-USER: the operator's rules there keep their effect",
        "tests/e2e/test_traffic_rules.py::test_an_operators_docker_user_rule_keeps_its_effect"),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _test(ref: str) -> str:
    return "-" if ref == "-" else f"`{ref}`"


def render() -> str:
    lines = [
        "# flanneld settings in leaseagent",
        "",
        "Generated by `python -m leaseagent.cli.flanneltable > docs/flannel.md` from the",
        "code (a unit test keeps them equal). Every field of flannel's network config and",
        "backend configs, every flanneld flag and FLANNELD_* variable, every",
        "mk-docker-opts.sh option: flannel's meaning (read from its sources), leaseagent's,",
        "and the test that shows it. The migration guide is in the README.",
        "",
        "## The network config (`<prefix>/config`)",
        "",
        "Read as flanneld's Go decoder reads it: a key names a field ignoring case (Go's",
        "per-rune fold), the last of a repeated key counts, unknown keys are ignored, JSON",
        "null leaves a plain field at its default, a number given as a string (or a",
        "fraction for an integer) is an error that stops flanneld and is refused here in",
        "one line; `leasectl config set` and the agent use the one validator",
        "(`leaseagent.core.network.parse_network_config`).",
        "",
        *_table(("field", "flannel", "leaseagent", "test"),
                [(f"`{r.name}`", r.flannel, r.ours, _test(r.test)) for r in CONFIG_ROWS]),
        "",
        "## Backend fields",
        "",
        *_table(("backend", "field", "flannel", "leaseagent", "test"),
                [(kind, f"`{r.name}`", r.flannel, r.ours, _test(r.test))
                 for kind, rows in BACKEND_ROWS.items() for r in rows]),
        "",
        "Backend types flanneld has and leaseagent refuses in one line naming the",
        f"supported ones: {', '.join(f'`{t}`' for t in REFUSED_TYPES)}.",
        "",
        "## flanneld's flags and FLANNELD_* variables",
        "",
        "Go's flag syntax: `-flag` or `--flag`, `-flag=value` or `-flag value`, booleans",
        "as `-flag` or `-flag=false` (strconv.ParseBool's words). A FLANNELD_<NAME>",
        "variable sets a flag the command line does not (LEASEAGENT_<NAME> first); a bad",
        "value is refused naming the variable (flanneld logs it and goes on without it).",
        "",
        *_table(("flag", "variable", "type, flanneld's default", "flannel", "leaseagent",
                 "test"),
                [(f"`--{f.name}`", f"`{flannel_env_name(f.name)}`",
                  f"{f.go_type}, `{f.default}`" if f.default else f.go_type,
                  f.meaning, f.ours,
                  _test(f.test if "::" in f.test
                        else f"tests/unit/test_flanneld_flags.py::{f.test}"))
                 for f in FLANNEL_FLAGS]),
        "",
        "## mk-docker-opts.sh (`leasectl docker-opts`, the agent's --docker-opts-file)",
        "",
        *_table(("option", "flannel's mk-docker-opts.sh", "leaseagent", "test"),
                [(f"`{r.name}`", r.flannel, r.ours, _test(r.test))
                 for r in MK_DOCKER_OPTS_ROWS]),
        "",
        "## flannel's bugs: the meaning kept, the bug not",
        "",
        *_table(("what", "flannel", "leaseagent", "test"),
                [(r.name, r.flannel, r.ours, _test(r.test)) for r in BUG_ROWS]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
