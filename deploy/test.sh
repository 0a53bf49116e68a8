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
.venv/bin/pytest -q -rfEs --durations=15 -p no:cacheprovider "$@"   # -rfEs: each failure, error and skip (with its reason) in the summary
