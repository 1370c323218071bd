#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for the harness: system packages (Fashion-MNIST data, PostgreSQL for the
# distributed-Optuna test, Chromium for the UI check) and a virtual environment in .venv with the pinned
# torch/torchvision pair and the harness. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_PACKAGES="dataset-fashion-mnist ${HARNESS_EXTRA_APT:-}"
missing=""
for pkg in $APT_PACKAGES; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
# torch and torchvision are pinned as a pair: the registry's torchvision is a CUDA build that needs its torch.
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, mlflow, optuna; print('setup ok: torch', torch.__version__)"
