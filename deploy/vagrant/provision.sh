#!/usr/bin/env bash
# Provision one VM of the Vagrant lab (deploy/Vagrantfile); runs as root in the VM.
#   provision.sh etcd IP                     etcd-server listening on IP:2379
#   provision.sh host IP ETCD_IP [BACKEND]   leaseagent (install.sh --docker) and docker.io;
#                                            BACKEND (vxlan) for the network config if none is set
# Offline: every package is in the box (deploy/vagrant/build-box.sh) and
# leaseagent comes from the wheelhouse at /wheelhouse; nothing is fetched.
# Idempotent: `vagrant provision` may run it again.
set -euo pipefail

usage="usage: provision.sh etcd IP | host IP ETCD_IP [vxlan|host-gw|wireguard]"
role="${1:?$usage}"
ip="${2:?$usage}"

die() {
    echo "provision.sh ($(hostname)): $*" >&2
    exit 1
}

need() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null \
            || die "$cmd is not in this box (the VMs have no mirror): rebuild it with deploy/vagrant/build-box.sh"
    done
}

provision_etcd() {
    need etcd etcdctl
    # Debian's etcd.service reads /etc/default/etcd; one member, clients on the lab network.
    cat >/etc/default/etcd <<CONF
ETCD_NAME=etcd
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://${ip}:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://${ip}:2379
CONF
    systemctl enable etcd.service
    systemctl restart etcd.service
    etcdctl --endpoints "http://${ip}:2379" endpoint health \
        || die "etcd does not answer on http://${ip}:2379: journalctl -u etcd"
    echo "provision: etcd on http://${ip}:2379"
}

provision_host() {
    local etcd_ip="${3:?$usage}"
    local backend="${4:-vxlan}"
    local endpoints="http://${etcd_ip}:2379"
    need python3 docker dockerd iptables ipset busybox
    ls /wheelhouse/*.whl >/dev/null 2>&1 \
        || die "no wheels in /wheelhouse (deploy/vagrant/build-box.sh makes them; vagrant rsync copies them)"
    # The README's offline install: pip takes everything from the wheelhouse, builds the source tree.
    bash /leaseagent/deploy/install.sh --docker --source /leaseagent --wheelhouse /wheelhouse

    # The interface by its address: the private NIC's name is the provider's business.
    cat >/etc/default/leaseagent <<CONF
# Written by deploy/vagrant/provision.sh
LEASEAGENT_ETCD_ENDPOINTS=${endpoints}
LEASEAGENT_IFACE=${ip}
CONF
    # The first host to get here writes the network config; the others find it.
    # Only "is not set" means none: any other failure (etcd unreachable) is said.
    local said
    if said="$(leasectl --etcd-endpoints "$endpoints" config get 2>&1 >/dev/null)"; then
        :
    elif ! grep -q "is not set" <<<"$said"; then
        die "leasectl config get: $said"
    else
        local config
        config="$(mktemp)"
        case "$backend" in
            vxlan) cp /leaseagent/deploy/network-config.json "$config" ;;
            host-gw|wireguard)
                printf '{"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "%s"}}\n' "$backend" >"$config" ;;
            *) die "unknown backend $backend (vxlan, host-gw or wireguard)" ;;
        esac
        leasectl --etcd-endpoints "$endpoints" config set "$config"
        rm -f "$config"
    fi
    systemctl daemon-reload
    systemctl enable leaseagent.service docker.service containerd.service
    systemctl restart leaseagent.service
    systemctl restart docker.service

    # A tiny image with ping, made here: no registry is needed.
    if ! docker image inspect leaseagent-lab/busybox >/dev/null 2>&1; then
        local rootfs
        rootfs="$(mktemp -d)"
        mkdir -p "$rootfs/bin"
        cp /bin/busybox "$rootfs/bin/busybox"
        for applet in sh ping sleep ip; do
            ln -s busybox "$rootfs/bin/$applet"
        done
        tar -C "$rootfs" -c . | docker import - leaseagent-lab/busybox >/dev/null
        rm -rf "$rootfs"
    fi
    [ -f /run/leaseagent/subnet.env ] || die "no /run/leaseagent/subnet.env after the agent started: journalctl -u leaseagent"
    echo "provision: $(hostname) $(grep FLANNEL_SUBNET /run/leaseagent/subnet.env)"
}

case "$role" in
    etcd) provision_etcd ;;
    host) provision_host "$@" ;;
    *) echo "provision.sh: unknown role $role (etcd or host)" >&2; exit 2 ;;
esac
