#!/usr/bin/env bash
# The rpi4 bundle on an emulated aarch64 board (pqsu.tools.lab.board_check): a Debian arm64 root
# under qemu-user, `pqsu flash --wheelhouse` into it, install.sh offline inside it, `pqsu edge
# doctor`, the agent following a `pqsu run` fleet, /predict compared with the host's onnxruntime.
# Needs root (chroot, unshare). The root is built once (Debian packages only) and cached in
# ~/.cache/pqsu/board-arm64 (PQSU_BOARD_CACHE moves it). Arguments go to board_check
# (--board rpi5, --workdir DIR, --keep). Timings it prints are qemu's, not a Raspberry Pi's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

[ "$(id -u)" = 0 ] || { echo "board_aarch64: error: run as root (chroot, unshare and mount need it)" >&2; exit 2; }
need=()
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  echo "board_aarch64: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cd "$ROOT"
exec nice -n 10 python -m pqsu.tools.lab.board_check "$@"
