#!/usr/bin/env bash
# Sets up the environment (idempotent), runs the linters and the type checker, then the
# whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # over pd/ and scripts/, configured in pyproject.toml
.venv/bin/python -m pytest -p no:cacheprovider "$@"
