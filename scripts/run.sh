#!/usr/bin/env bash
# The main job: set up, then run the pipeline with its defaults. Extra arguments are passed on.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec pqsu export "$@"
