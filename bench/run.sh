#!/usr/bin/env bash
# The full benchmark suite (root): bash bench/run.sh [--json FILE] [--peers N] ...
# Uses the repository's .venv (deploy/setup.sh) unless PYTHON is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m bench "$@"
