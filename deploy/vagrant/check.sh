#!/usr/bin/env bash
# Check the Vagrant lab end to end: a container on every host VM, then every
# container pings the container of every other host through the overlay the
# agents built (Docker's FORWARD policy is DROP: the agent's rules must hold).
# Run where vagrant runs (deploy/vagrant/lab.sh check runs it in libvirtd's
# namespace), after `vagrant up`. Exit 0 only if everything holds; else one
# line per failure naming the host, the step and what the VM said.
#
#   deploy/vagrant/check.sh [--backend vxlan|host-gw|wireguard] [--capture] [--keep]
#     --backend   switch the network config to this backend first (leasectl config
#                 set on host1) and wait until every host's lease and device has it
#     --capture   tcpdump on the underlay bridge (this machine) during the pings:
#                 with wireguard, fail on any plaintext overlay packet (outer address
#                 in the overlay network, ICMP, or VXLAN) and on no WireGuard packet
#     --keep      leave the containers running
set -euo pipefail
cd "$(dirname "$0")/.."  # where the Vagrantfile is

usage="usage: check.sh [--backend vxlan|host-gw|wireguard] [--capture] [--keep]"
backend=""
capture=0
keep=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --backend) [ "$#" -ge 2 ] || { echo "$usage" >&2; exit 2; }; backend="$2"; shift 2 ;;
        --capture) capture=1; shift ;;
        --keep) keep=1; shift ;;
        *) echo "check: unknown argument $1; $usage" >&2; exit 2 ;;
    esac
done
case "$backend" in
    ""|vxlan|host-gw|wireguard) ;;
    *) echo "check: --backend $backend: vxlan, host-gw or wireguard" >&2; exit 2 ;;
esac

count="${LEASEAGENT_HOSTS:-3}"
etcd="http://192.168.56.10:2379"
hosts=()
for i in $(seq 1 "$count"); do
    hosts+=("host$i")
done

tmp="$(mktemp -d)"
tcpdump_pid=""
cleanup() {
    local status=$?
    if [ -n "$tcpdump_pid" ]; then
        kill "$tcpdump_pid" 2>/dev/null || true
        wait "$tcpdump_pid" 2>/dev/null || true
    fi
    if [ "$keep" = 0 ] && [ -f "$tmp/ssh_config" ]; then
        for h in "${hosts[@]}"; do
            ssh -F "$tmp/ssh_config" "$h" "sudo docker rm -f lacheck" >/dev/null 2>&1 || true
        done
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT

fail() {
    echo "check: FAILED: $*" >&2
    exit 1
}

command -v vagrant >/dev/null || fail "vagrant not found on this machine"
# One `vagrant ssh-config`, then plain ssh: a vagrant process per command costs seconds.
if ! vagrant ssh-config "${hosts[@]}" >"$tmp/ssh_config" 2>"$tmp/err"; then
    fail "vagrant ssh-config ${hosts[*]}: $(tr '\n' ' ' <"$tmp/err") (is the lab up? vagrant status)"
fi

# in_vm HOST WHAT CMD: CMD's output, or exit 1 with one line naming HOST, WHAT,
# the exit status and what the VM said (stdout and stderr).
in_vm() {
    local h="$1" what="$2" cmd="$3" rc=0
    ssh -F "$tmp/ssh_config" "$h" "$cmd" >"$tmp/out" 2>"$tmp/err" || rc=$?
    if [ "$rc" != 0 ]; then
        fail "$h: $what (exit $rc): $(cat "$tmp/out" "$tmp/err" | tr -d '\r' | tr '\n' ' ' | cut -c 1-600)"
    fi
    tr -d '\r' <"$tmp/out"
}

ctl="leasectl --etcd-endpoints $etcd"
for h in "${hosts[@]}"; do
    in_vm "$h" "leaseagent.service is not active" "systemctl is-active leaseagent.service" >/dev/null
    in_vm "$h" "docker.service is not active" "systemctl is-active docker.service" >/dev/null
done

config="$(in_vm host1 "reading the network config" "$ctl config get")"
network="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["Network"])' "$config")"
current="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("Backend", {}).get("Type", "udp"))' "$config")"
if [ -n "$backend" ] && [ "$backend" != "$current" ]; then
    new="$(python3 -c 'import json, sys; c = json.loads(sys.argv[1]); c["Backend"] = {"Type": sys.argv[2]}; print(json.dumps(c))' "$config" "$backend")"
    echo "check: switching the network config from $current to $backend"
    in_vm host1 "leasectl config set ($backend)" "f=\$(mktemp) && echo '$new' >\"\$f\" && $ctl config set \"\$f\"; rc=\$?; rm -f \"\$f\"; exit \$rc" >/dev/null
fi
backend="${backend:-$current}"

# Every lease says the backend, and every host's device is the backend's (the kernel's).
case "$backend" in
    vxlan) device="flannel.1"; kind="vxlan" ;;
    wireguard) device="flannel-wg"; kind="wireguard" ;;
    host-gw) device=""; kind="" ;;
esac
deadline=$(( $(date +%s) + 180 ))
while :; do
    leases="$(in_vm host1 "leasectl list" "$ctl list -o json")"
    have="$(python3 -c 'import json, sys; print(sum(1 for r in json.loads(sys.argv[1]) if r["backend"] == sys.argv[2] and r["valid"]))' "$leases" "$backend")"
    [ "$have" -ge "$count" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || fail "after 180 s only $have of $count leases are valid $backend leases: $(in_vm host1 "leasectl list" "$ctl list")"
    sleep 3
done
if [ -n "$device" ]; then
    for h in "${hosts[@]}"; do
        deadline=$(( $(date +%s) + 60 ))
        until in_vm "$h" "ip link" "ip -d -o link show $device 2>/dev/null || true" | grep -qw "$kind"; do
            [ "$(date +%s)" -lt "$deadline" ] \
                || fail "$h: no $kind device $device after 60 s: $(in_vm "$h" "ip link" "ip -d -o link show | cut -c 1-160")"
            sleep 2
        done
        if [ "$backend" = wireguard ]; then
            # The kernel module, not wireguard-go (whose device is a tun).
            in_vm "$h" "wireguard module" "lsmod | grep -qw '^wireguard'" >/dev/null
            peers="$(in_vm "$h" "wg show $device peers" "sudo wg show $device peers" | grep -c . || true)"
            [ "$peers" -eq $((count - 1)) ] || fail "$h: $device has $peers WireGuard peers, expected $((count - 1))"
        fi
    done
fi
echo "check: $count hosts on $backend (${device:+$device, }the kernel's), network $network"

declare -A ips
for h in "${hosts[@]}"; do
    in_vm "$h" "docker rm" "sudo docker rm -f lacheck >/dev/null 2>&1; true" >/dev/null
    in_vm "$h" "docker run" "sudo docker run -d --name lacheck leaseagent-lab/busybox /bin/sleep 3600" >/dev/null
    ips[$h]="$(in_vm "$h" "docker inspect" "sudo docker inspect -f '{{.NetworkSettings.IPAddress}}' lacheck")"
    [ -n "${ips[$h]}" ] || fail "$h: container lacheck has no address (docker's bridge has no subnet? sudo cat /run/leaseagent/subnet.env)"
    echo "$h: container lacheck at ${ips[$h]}"
done

if [ "$capture" = 1 ]; then
    command -v tcpdump >/dev/null || fail "--capture needs tcpdump on this machine"
    bridge="$(virsh -c qemu:///system net-info leaseagent-lab 2>/dev/null | awk '$1 == "Bridge:" {print $2}')"
    [ -n "$bridge" ] || fail "--capture: no bridge for the libvirt network leaseagent-lab here (run in libvirtd's namespace: lab.sh check)"
    # Promiscuous (no -p): frames the bridge forwards between two VMs are not its own.
    tcpdump -i "$bridge" -nn -U -w "$tmp/underlay.pcap" 2>"$tmp/tcpdump.err" &
    tcpdump_pid=$!
    for _ in $(seq 1 50); do
        grep -q "listening on" "$tmp/tcpdump.err" && break
        kill -0 "$tcpdump_pid" 2>/dev/null || fail "tcpdump on $bridge: $(cat "$tmp/tcpdump.err")"
        sleep 0.1
    done
fi

failed=0
pings=0
for src in "${hosts[@]}"; do
    for dst in "${hosts[@]}"; do
        [ "$src" = "$dst" ] && continue
        pings=$((pings + 3))
        if out="$(ssh -F "$tmp/ssh_config" "$src" "sudo docker exec lacheck ping -c 3 -W 2 ${ips[$dst]}" 2>&1)"; then
            echo "ok    $src -> $dst (${ips[$dst]})"
        else
            echo "FAIL  $src -> $dst (${ips[$dst]}): $(echo "$out" | tr -d '\r' | tail -n 2 | tr '\n' ' ')"
            failed=$((failed + 1))
        fi
    done
done

if [ "$capture" = 1 ]; then
    kill -INT "$tcpdump_pid"
    wait "$tcpdump_pid" 2>/dev/null || true
    tcpdump_pid=""
    count_of() {
        tcpdump -r "$tmp/underlay.pcap" -nn "$1" 2>/dev/null | wc -l
    }
    total="$(count_of "")"
    plain="$(count_of "net $network or icmp or udp port 8472")"
    wg="$(count_of "udp port 51820")"
    echo "capture on $bridge: $total packets, $wg WireGuard (udp 51820), $plain plaintext overlay (net $network, ICMP or VXLAN) for $pings pings"
    if [ "$backend" = wireguard ]; then
        [ "$plain" -eq 0 ] || fail "$plain plaintext overlay packets on the underlay: $(tcpdump -r "$tmp/underlay.pcap" -nn "net $network or icmp or udp port 8472" 2>/dev/null | head -n 3 | tr '\n' ' ')"
        [ "$wg" -ge "$pings" ] || fail "only $wg WireGuard packets on the underlay for $pings pings: the pings did not cross it encrypted"
    fi
fi

echo
in_vm host1 "leasectl list" "$ctl list"
echo
if [ "$failed" -gt 0 ]; then
    fail "$failed pairs unreachable on $backend; on a host: sudo sh -c 'set -a; . /etc/default/leaseagent; leasectl doctor'"
fi
echo "check: all pairs reachable on $backend"
