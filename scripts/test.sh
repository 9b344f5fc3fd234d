#!/usr/bin/env bash
# The README's test command: installs, builds and runs every test (CTest: GoogleTest units,
# golden files, multi-rank MPI runs, tool smoke tests).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
export BUILD_DIR
"$here/scripts/setup.sh"
# Open MPI refuses root without these (CI runs as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The sanitizer configuration first (ASan/UBSan unit tests + a short fuzz run).
if [ "${SANITIZE:-1}" != 0 ]; then
  "$here/scripts/sanitize.sh"
fi
cd "$BUILD_DIR"
ctest --output-on-failure -j "${CTEST_JOBS:-2}" "$@"
