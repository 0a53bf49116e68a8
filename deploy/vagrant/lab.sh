#!/usr/bin/env bash
# Run the Vagrant lab (deploy/Vagrantfile) with libvirtd in a network namespace
# of its own, so the VMs' networks (bridges, dnsmasq, NAT rules) never touch
# this machine's: every packet stays inside the namespace. As root.
#
#   deploy/vagrant/lab.sh up         namespace, virtlogd + libvirtd in it, `vagrant up` (timed)
#   deploy/vagrant/lab.sh check      check.sh: vxlan pings, then wireguard (kernel) pings
#                                    with a capture on the underlay bridge (timed)
#   deploy/vagrant/lab.sh down       `vagrant destroy -f`, libvirtd and virtlogd stopped
#                                    (by their PIDs), the namespace deleted
#   deploy/vagrant/lab.sh vagrant ARGS...   any vagrant command, in the namespace
#   deploy/vagrant/lab.sh all        up, check, down (down also when up or check fails)
#
# Needs (Debian): vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86
# (apt-get install --no-install-recommends), and the box: deploy/vagrant/build-box.sh.
# LEASEAGENT_HOSTS, LEASEAGENT_LIBVIRT_DRIVER, LEASEAGENT_VAGRANT_DIR: see the Vagrantfile.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(dirname "$here")"
ns="${LEASEAGENT_VAGRANT_NETNS:-leaseagent-vagrant}"
out="${LEASEAGENT_VAGRANT_DIR:-/var/tmp/leaseagent-vagrant}"
pool_dir="$out/pool"
export LEASEAGENT_VAGRANT_DIR="$out"

die() {
    echo "lab.sh: $*" >&2
    exit 1
}

in_ns() {
    ip netns exec "$ns" "$@"
}

# The PID in FILE if that process still runs, else nothing.
live_pid() {
    local pid
    [ -f "$1" ] || return 0
    pid="$(cat "$1")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

# A PID's network namespace, as the inode ip netns identifies it by.
same_netns() {
    [ "$(stat -L -c %i "/proc/$1/ns/net" 2>/dev/null)" = "$(stat -L -c %i "/run/netns/$ns" 2>/dev/null)" ]
}

start_daemons() {
    [ "$(id -u)" = 0 ] || die "run as root (network namespaces, libvirtd)"
    local tool
    for tool in vagrant libvirtd virtlogd virsh qemu-system-x86_64; do
        command -v "$tool" >/dev/null \
            || die "$tool not found: apt-get install --no-install-recommends vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86"
    done
    [ -f "$out/vmlinuz" ] || die "no box built: run deploy/vagrant/build-box.sh first"
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns add "$ns"
    fi
    in_ns ip link set lo up
    local pid
    pid="$(live_pid /run/virtlogd.pid)"
    if [ -z "$pid" ]; then
        in_ns virtlogd -d
    elif ! same_netns "$pid"; then
        die "a virtlogd (PID $pid) runs outside namespace $ns: stop it first"
    fi
    pid="$(live_pid /run/libvirtd.pid)"
    if [ -z "$pid" ]; then
        in_ns libvirtd -d
    elif ! same_netns "$pid"; then
        die "a libvirtd (PID $pid) runs outside namespace $ns: the lab's VMs would be on this machine's network; stop it first"
    fi
    for _ in $(seq 1 50); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.2
    done
    virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer on qemu:///system"
    if ! virsh -c qemu:///system pool-info leaseagent >/dev/null 2>&1; then
        mkdir -p "$pool_dir"
        virsh -c qemu:///system pool-define-as leaseagent dir --target "$pool_dir" >/dev/null
    fi
    # (Read whole: grep -q closing the pipe early would fail the test under pipefail.)
    if ! grep -q '^State: *running' <<<"$(virsh -c qemu:///system pool-info leaseagent)"; then
        virsh -c qemu:///system pool-start leaseagent >/dev/null
    fi
}

stop_daemons() {
    local pid name
    for name in libvirtd virtlogd; do
        pid="$(live_pid "/run/$name.pid")"
        [ -n "$pid" ] || continue
        if ! same_netns "$pid"; then
            echo "lab.sh: $name (PID $pid) is not ours (not in namespace $ns): left running" >&2
            continue
        fi
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    done
    if [ -e "/run/netns/$ns" ]; then
        # Any qemu left (a VM vagrant did not destroy) goes with its PID.
        for pid in $(ip netns pids "$ns"); do
            echo "lab.sh: PID $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) still in $ns: stopping it" >&2
            kill "$pid" 2>/dev/null || true
        done
        sleep 1
        ip netns del "$ns"
    fi
}

vagrant_in_ns() {
    (cd "$deploy" && in_ns vagrant "$@")
}

up() {
    start_daemons
    local start
    start=$(date +%s)
    # --no-parallel: one VM at a time on a 2-core machine (in parallel, no host VM had
    # started after 2.5 min here; each vagrant-libvirt step takes ~16 s of libvirt calls
    # under TCG load, so it may only have been slow). One after another was measured.
    vagrant_in_ns up --provider=libvirt --no-parallel
    echo "lab.sh: vagrant up took $(( $(date +%s) - start )) s"
}

check() {
    [ -e "/run/netns/$ns" ] || die "no namespace $ns: lab.sh up first"
    local start
    start=$(date +%s)
    (cd "$deploy" && in_ns bash "$here/check.sh" --backend vxlan)
    (cd "$deploy" && in_ns bash "$here/check.sh" --backend wireguard --capture)
    echo "lab.sh: check took $(( $(date +%s) - start )) s"
}

down() {
    if [ -e "/run/netns/$ns" ] && [ -n "$(live_pid /run/libvirtd.pid)" ]; then
        vagrant_in_ns destroy -f || echo "lab.sh: vagrant destroy failed; stopping what is left by PID" >&2
        # Domains vagrant no longer knows (a `vagrant up` killed half-way leaves them
        # defined, without network interfaces): the Vagrantfile's names only.
        local dom net
        for dom in $(virsh -c qemu:///system list --all --name | grep -E '^deploy_(etcd|host[0-9]+)$' || true); do
            echo "lab.sh: removing leftover domain $dom" >&2
            virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
            virsh -c qemu:///system undefine "$dom" --remove-all-storage >/dev/null 2>&1 || true
        done
        for net in leaseagent-lab leaseagent-mgmt; do
            virsh -c qemu:///system net-destroy "$net" >/dev/null 2>&1 || true
            virsh -c qemu:///system net-undefine "$net" >/dev/null 2>&1 || true
        done
    fi
    stop_daemons
    echo "lab.sh: down"
}

case "${1:-}" in
    up) up ;;
    check) check ;;
    down) down ;;
    vagrant) shift; start_daemons; vagrant_in_ns "$@" ;;
    all)
        trap down EXIT
        up
        check
        ;;
    *) echo "usage: lab.sh up | check | down | all | vagrant ARGS..." >&2; exit 2 ;;
esac
