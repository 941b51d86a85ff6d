#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
set +e  # setup.sh runs with -e; here pytest's exit code must reach the checks below
cd "$ROOT"
# Two workers, one test file each at a time (a file's module fixtures, e.g. one fleet run, stay in one
# worker). PQSU_TEST_WORKERS=0 runs in this process, as plain pytest does.
python -m pytest -q -p no:cacheprovider -n "${PQSU_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
