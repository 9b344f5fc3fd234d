#!/usr/bin/env bash
# The README's main command: install and build, then pretrain a small GPT on 2 local ranks
# with the sharded Celo2 engine (control plane on loopback) against an AdamW baseline, and
# report (examples/run_gpt_demo.sh; extra arguments go to examples/gpt_demo.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
export BUILD_DIR
"$here/scripts/setup.sh"
SKIP_BUILD=1 exec "$here/examples/run_gpt_demo.sh" "$@"
