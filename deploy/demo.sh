#!/usr/bin/env bash
# The main job: set everything up (deploy/setup.sh), then bring up the
# namespace lab -- etcd, 3 hosts each running leaseagent and a real dockerd on
# the agent's options, 2 Docker containers per host -- show the leases and the
# cross-host ping matrix (from `docker exec`), and tear it all down again.
# If dockerd cannot run here, it says why in one line and uses namespace
# containers instead. `--keep` leaves the lab running (then: deploy/lab status,
# deploy/lab down). Extra arguments go to `lab up` (e.g. --backend host-gw --hosts 4).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
args=()
for a in "$@"; do
    if [ "$a" = "--keep" ]; then keep=1; else args+=("$a"); fi
done
bash deploy/setup.sh --docker
export LEASEAGENT_PYTHON="$PWD/.venv/bin/python"
deploy/lab down --name demo >/dev/null 2>&1 || true
if [ "$keep" = 0 ]; then
    trap 'deploy/lab down --name demo' EXIT
fi
# `up` prints the leases (leasectl list) and the cross-host ping matrix; it
# exits non-zero unless every pair reaches.
# --docker-fallback: if dockerd cannot run here, one line says why and the lab
# uses namespace containers instead.
deploy/lab up --name demo --hosts 3 --containers 2 --docker --docker-fallback "${args[@]}"
if [ "$keep" = 1 ]; then
    echo "lab 'demo' left running: deploy/lab status --name demo; deploy/lab down --name demo"
fi
