#!/usr/bin/env bash
# Set everything up (deploy/setup.sh), then run the whole test suite:
# ruff, mypy, import-linter, and pytest (unit, contract, integration against a real etcd,
# end-to-end in network namespaces). Run as root on Debian 12 / Ubuntu 24.04.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh --test --docker
echo "== ruff"
.venv/bin/ruff check leaseagent tests bench
echo "== mypy"
.venv/bin/mypy
echo "== import-linter (layering)"
.venv/bin/lint-imports --no-cache
echo "== pytest"
# Two workers (pytest-xdist): the tests that run agents, Docker or systemd hosts in network
# namespaces one at a time in one, the other modules beside them module by module
# (tests/conftest.py, SERIAL_PATHS). Most tests wait on etcd, agents and timers more than
# they compute.
# LEASEAGENT_TEST_WORKERS=0 runs everything in this one process, one test at a time.
workers="${LEASEAGENT_TEST_WORKERS:-2}"
# -rfEs: each failure, error and skip (with its reason) in the summary
.venv/bin/pytest -q -rfEs --durations=15 -p no:cacheprovider -n "$workers" --dist loadfile "$@"
