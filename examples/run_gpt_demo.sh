#!/usr/bin/env bash
# The main job: build celo2 (scripts/setup.sh installs Debian's packages, including
# python3-torch and the `fortunes` corpus), then pretrain a small GPT on 2 local ranks with
# the sharded Celo2 engine (control plane on loopback) and an AdamW baseline, and report.
#
#   examples/run_gpt_demo.sh                      # ~4 minutes on 2 cores
#   examples/run_gpt_demo.sh --steps 2000 --width 256 --layers 6     # longer, larger
#   examples/run_gpt_demo.sh --theta ../shared/weights/celo2/theta.state   # published weights
#   NP=4 examples/run_gpt_demo.sh --device cuda   # 4 ranks, one GPU each (model on GPU)
#   SKIP_BUILD=1 ...                              # use an existing build
# Extra arguments go to examples/gpt_demo.py (--help lists them).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
export BUILD_DIR
NP="${NP:-2}"
if [ -z "${SKIP_BUILD:-}" ]; then
  "$here/scripts/setup.sh"
fi
if [ ! -d "$BUILD_DIR/python/celo2" ]; then
  echo "run_gpt_demo: no Python package in $BUILD_DIR/python (pybind11-dev and python3-dev needed)" >&2
  exit 1
fi
PYTHON="${PYTHON:-/usr/bin/python3}"  # Debian's python3-torch lives there
export PYTHONPATH="$BUILD_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
tty_flag=()
[ -t 1 ] && tty_flag=(--tty)
mpi=(mpirun -np "$NP" --bind-to none)
[ "$NP" -gt "$(nproc)" ] && mpi+=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && mpi+=(--allow-run-as-root)
cd "$here"
# Outputs (report, PNG, checkpoints, control token) go under the build directory unless
# --out says otherwise (a later --out wins).
exec "${mpi[@]}" -x PYTHONPATH -x OMP_NUM_THREADS "$PYTHON" "$here/examples/gpt_demo.py" \
  --out "$BUILD_DIR/gpt-demo" "${tty_flag[@]}" "$@"
