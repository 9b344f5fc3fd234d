#!/usr/bin/env bash
# The README's main command: build, then train the 8×8 Fashion-MNIST MLP with Celo2 and the
# project's default weights. Extra arguments go to celo2-train (e.g. --steps 3000).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
export BUILD_DIR
"$here/scripts/setup.sh"
exec "$BUILD_DIR/client/celo2-train" --eval "$@"
