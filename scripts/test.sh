#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
set +e  # setup.sh runs with -e; here pytest's exit code must reach the checks below
cd "$ROOT"
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
