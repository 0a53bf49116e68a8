#!/usr/bin/env bash
# Set up a fresh Debian 12 / Ubuntu 24.04 machine (as root) to run leaseagent,
# its lab and its tests: Debian packages (no recommends) and a venv at .venv
# with the package and the exact versions of deploy/constraints.txt.
# Idempotent: a second run only checks. `--test` adds what only the test suite
# needs (promtool, systemd-analyze, shellcheck, openssl, wg, tcpdump, iperf3, and
# debootstrap and systemd-nspawn for the systemd lab);
# `--docker` what the Docker lab needs (docker.io, busybox-static). Flags combine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and the lab needs namespaces)" >&2
    exit 1
fi

pkgs=(etcd-server etcd-client iproute2 iputils-ping python3 python3-venv ca-certificates
      iptables ipset nftables wireguard-go)
for flag in "$@"; do
    case "$flag" in
        --test) pkgs+=(prometheus systemd shellcheck openssl wireguard-tools tcpdump iperf3
                       debootstrap systemd-container) ;;
        --docker) pkgs+=(docker.io busybox-static) ;;
        *) echo "setup.sh: unknown argument: $flag (--test, --docker)" >&2; exit 2 ;;
    esac
done
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py=python3
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: leaseagent needs Python 3.11 or newer; $($py --version) found" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c deploy/constraints.txt -e '.[test]'
echo "setup.sh: ready (venv at $(pwd)/.venv)"
