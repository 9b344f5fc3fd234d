#!/usr/bin/env bash
# The Python test suite (tests/python) under a current PyTorch from PyPI, by hand: CI runs it
# under Debian's python3-torch, which is 1.13. Torch 2.x takes other paths in celo2.torch
# (register_post_accumulate_grad_hook for overlap_grad_reduce, from 2.1) and users' habits
# change with it (torch.load(weights_only=True) by default from 2.6; the tests load that way).
#   scripts/test_torch2.sh [TORCH_VERSION]     (default 2.5.1)
# Needs PyPI: the wheel and its CUDA libraries are about 3 GB in a venv under the build
# directory (CELO2_TORCH2_VENV to put it elsewhere), made once and reused. The venv runs the
# interpreter the build's extension was compiled for (/usr/bin/python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
version="${1:-2.5.1}"
venv="${CELO2_TORCH2_VENV:-$BUILD_DIR/venv-torch-$version}"
python="$(sed -n 's/^CELO2_PYTHON_EXECUTABLE=//p' "$BUILD_DIR/celo2-build.env" 2>/dev/null || true)"
if [ -z "$python" ] || ! ls "$BUILD_DIR"/python/celo2/_celo2*.so >/dev/null 2>&1; then
  echo "test_torch2: no Python extension in $BUILD_DIR; run scripts/setup.sh first" >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "torch==$version" numpy msgpack pytest
"$venv/bin/python" - <<'PY'
import torch
print(f"test_torch2: torch {torch.__version__}")
assert hasattr(torch.Tensor, "register_post_accumulate_grad_hook"), "torch < 2.1: not the path this script is for"
PY
export PYTHONPATH="$BUILD_DIR/python:$here/tests/python" OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[ -x "$BUILD_DIR/client/celo2ctl" ] && export CELO2_CTL="$BUILD_DIR/client/celo2ctl"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here/tests/python"
