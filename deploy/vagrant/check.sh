#!/usr/bin/env bash
# Check the Vagrant lab end to end: start a container on every host VM, then
# ping each container from the container of every other host (through the
# overlay leaseagent built). Run from the machine running Vagrant, after
# `vagrant up` in deploy/. Exit 0 only if every pair answers.
#   deploy/vagrant/check.sh [--keep]     --keep: leave the containers running
set -euo pipefail
cd "$(dirname "$0")/.."  # where the Vagrantfile is

keep=0
[ "${1:-}" = "--keep" ] && keep=1
count="${LEASEAGENT_HOSTS:-3}"
hosts=()
for i in $(seq 1 "$count"); do
    hosts+=("host$i")
done

in_vm() {
    # vagrant ssh ends lines with CRLF when a tty is involved: strip the CR.
    vagrant ssh "$1" -c "$2" 2>/dev/null | tr -d '\r'
}

cleanup() {
    if [ "$keep" = 0 ]; then
        for h in "${hosts[@]}"; do
            in_vm "$h" "sudo docker rm -f lacheck >/dev/null 2>&1 || true" || true
        done
    fi
}
trap cleanup EXIT

declare -A ips
for h in "${hosts[@]}"; do
    ips[$h]="$(in_vm "$h" "sudo docker rm -f lacheck >/dev/null 2>&1; \
        sudo docker run -d --name lacheck leaseagent-lab/busybox /bin/sleep 3600 >/dev/null && \
        sudo docker inspect -f '{{.NetworkSettings.IPAddress}}' lacheck")"
    if [ -z "${ips[$h]}" ]; then
        echo "check: no container on $h (is leaseagent running? vagrant ssh $h -c 'systemctl status leaseagent docker')" >&2
        exit 1
    fi
    echo "$h: container lacheck at ${ips[$h]}"
done

echo
in_vm "${hosts[0]}" "leasectl --etcd-endpoints http://192.168.56.10:2379 list"
echo

failed=0
for src in "${hosts[@]}"; do
    for dst in "${hosts[@]}"; do
        [ "$src" = "$dst" ] && continue
        if in_vm "$src" "sudo docker exec lacheck ping -c 1 -W 2 ${ips[$dst]} >/dev/null"; then
            echo "ok    $src -> $dst (${ips[$dst]})"
        else
            echo "FAIL  $src -> $dst (${ips[$dst]})"
            failed=$((failed + 1))
        fi
    done
done
if [ "$failed" -gt 0 ]; then
    echo "check: $failed pairs unreachable; on a host: leasectl doctor" >&2
    exit 1
fi
echo "check: all pairs reachable"
