#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for the harness and its whole test suite: system packages (Fashion-MNIST
# data; PostgreSQL for the distributed-Optuna test; Chromium for the MLflow UI test) and a virtual environment in
# .venv with the tested versions from constraints.txt (the torch/torchvision pair included) and the harness.
# Safe to rerun. Quiet when it works; when a step fails, it prints that step's output and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

# What the tests need from Debian: tests/datasets/test_fmnist_lt.py (and every end-to-end test) reads the real
# Fashion-MNIST files; tests/studies/test_tune_postgres.py runs initdb/pg_ctl; tests/studies/test_ui_browser.py
# runs `chromium --headless` directly (no driver).
APT_PACKAGES="dataset-fashion-mnist postgresql chromium"

# Runs a command with its output kept aside; shows that output only when the command fails.
quietly() {
  local log status=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || status=$?
  if [ "$status" != 0 ]; then
    cat "$log" >&2
    echo "setup: failed ($status): $*" >&2
  fi
  rm -f "$log"
  return "$status"
}

install_system_packages() {
  local sudo="" missing="" pkg
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  for pkg in $APT_PACKAGES; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
  if [ -z "$missing" ]; then return 0; fi
  echo "setup: apt-get install$missing"
  quietly $sudo apt-get update
  quietly $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
}

install_python_packages() {
  local python="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then quietly "$python" -m venv .venv; fi
  echo "setup: pip install -c constraints.txt -e '.[dev,cluster]' (torch and ray the first time: a few minutes)"
  quietly .venv/bin/pip install --disable-pip-version-check -c constraints.txt -e '.[dev,cluster]'
}

# The Debian packages and the venv do not depend on each other, so both install at once (a minute or more saved on a
# fresh machine) unless sudo may ask for a password, which needs the terminal: then one after the other.
if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  install_system_packages & system_pid=$!
  install_python_packages & python_pid=$!
  status=0
  wait "$system_pid" || status=$?
  wait "$python_pid" || status=$?
  if [ "$status" != 0 ]; then exit "$status"; fi
else
  install_system_packages
  install_python_packages
fi
.venv/bin/python -c "import torch, torchvision, mlflow, optuna, harness; print('setup ok: harness', harness.__version__, 'torch', torch.__version__)"
