#!/usr/bin/env bash
# Provision one VM of the Vagrant lab (deploy/Vagrantfile); runs as root in the VM.
#   provision.sh etcd IP            etcd-server listening on IP:2379
#   provision.sh host IP ETCD_IP    leaseagent (install.sh --docker) and docker.io
# Idempotent: `vagrant provision` may run it again.
set -euo pipefail

role="${1:?usage: provision.sh etcd IP | host IP ETCD_IP}"
ip="${2:?usage: provision.sh etcd IP | host IP ETCD_IP}"
export DEBIAN_FRONTEND=noninteractive

apt_install() {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

provision_etcd() {
    apt_install etcd-server etcd-client
    # Debian's etcd.service reads /etc/default/etcd; one member, clients on the lab network.
    cat >/etc/default/etcd <<CONF
ETCD_NAME=etcd
ETCD_LISTEN_CLIENT_URLS=http://${ip}:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://${ip}:2379
CONF
    systemctl enable etcd
    systemctl restart etcd
    echo "provision: etcd on http://${ip}:2379"
}

provision_host() {
    local etcd_ip="${3:?usage: provision.sh host IP ETCD_IP}"
    local endpoints="http://${etcd_ip}:2379"
    apt_install python3 python3-venv ca-certificates docker.io iptables ipset busybox-static
    bash /leaseagent/deploy/install.sh --docker --source /leaseagent

    # The interface by its address: VirtualBox and libvirt name the private NIC differently.
    cat >/etc/default/leaseagent <<CONF
# Written by deploy/vagrant/provision.sh
LEASEAGENT_ETCD_ENDPOINTS=${endpoints}
LEASEAGENT_IFACE=${ip}
CONF
    # The first host to get here writes the network config; the others find it.
    if ! leasectl --etcd-endpoints "$endpoints" config get >/dev/null 2>&1; then
        leasectl --etcd-endpoints "$endpoints" config set /leaseagent/deploy/network-config.json
    fi
    # Docker's FORWARD policy is DROP: the agent's LEASEAGENT-FORWARD chain
    # (--iptables-forward-rules, on by default) lets the cluster network through.
    rm -f /etc/systemd/system/docker.service.d/zz-vagrant-lab.conf
    systemctl daemon-reload
    systemctl enable leaseagent.service docker.service
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
    echo "provision: $(hostname) $(grep FLANNEL_SUBNET /run/leaseagent/subnet.env)"
}

case "$role" in
    etcd) provision_etcd ;;
    host) provision_host "$@" ;;
    *) echo "provision.sh: unknown role $role (etcd or host)" >&2; exit 2 ;;
esac
