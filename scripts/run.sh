#!/usr/bin/env bash
# The main job: set up, then run a federated training on one machine (`pqsu run`: an embedded
# Mosquitto, the coordinator and 10 edge agents as processes). Extra arguments are passed on.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec pqsu run "$@"
