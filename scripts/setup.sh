#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, then a virtualenv in .venv
# with torch pinned through constraints.txt (an unpinned dependency would otherwise pull a
# newer torch with gigabytes of CUDA packages). Sourced by run.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PQSU_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
# libfaketime: the tests run an agent whose wall clock is hours off, as on a board without a real-time clock
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)
# chromium: the dashboard's browser test drives it headless over the DevTools protocol (no download at test time)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp="$VENV/.pqsu-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ] || [ "$ROOT/constraints.txt" -nt "$stamp" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]" 2>&1 | grep -v '^WARNING: Location' || true
  # the sensor data sets are files inside the sktime wheel ([sensors], part of [dev]): found, not imported
  "$VENV/bin/python" -c 'import torch, onnxruntime, torch_pruning, paho.mqtt, pqsu.tools.cli
from pqsu.export.sensors import sensor_folder; sensor_folder("italy-power")' \
    || { echo "setup: the virtualenv is incomplete (see pip output above)" >&2; exit 1; }
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
