#!/usr/bin/env bash
# `pip install` of the Python package from a fresh copy of the source tree, offline, into a
# venv that sees Debian's torch/numpy (--system-site-packages); then, from a directory
# outside any source or build tree: import celo2 from the venv, check the extension's shared
# libraries resolve, run real Celo2 steps on a small torch model, uninstall.
#   pip_install_test.sh SOURCE_DIR PYTHON [BUILD_DIR]
# By default pip configures and compiles the extension from scratch in a temporary copy of
# the tree, as `pip install ./` does on a fresh checkout (JOBS=N compile jobs, default 2):
# about 3 CPU-minutes, 2-5 minutes on 2 cores with other load. With
# CELO2_PIP_TEST_REUSE_BUILD=1 the wheel's extension comes from BUILD_DIR instead
# (CELO2_PREBUILT_DIR: `cmake --build BUILD_DIR --target _celo2`, a no-op once that build is
# done): about 20 seconds.
set -euo pipefail
src="$(cd "$1" && pwd)"; python="$2"; prebuilt="${3:-}"
work="$(mktemp -d "${TMPDIR:-/tmp}/celo2-pip-test.XXXXXX")"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH CELO2_PYTHONPATH PIP_REQUIRE_VIRTUALENV
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 OMP_NUM_THREADS=1
t0=$SECONDS
phase() { echo "== [$((SECONDS - t0)) s] $*"; }

phase "fresh source tree: copy of $src without build trees, .git or caches"
mkdir "$work/src"
tar -C "$src" --exclude=./.git --exclude='./build*' --exclude='*/__pycache__' \
    --exclude='./*.egg-info' -cf - . | tar -C "$work/src" -xf -

phase "venv: $python -m venv --system-site-packages"
"$python" -m venv --system-site-packages "$work/venv"
vpy="$work/venv/bin/python"

if [ -n "$prebuilt" ] && [ "${CELO2_PIP_TEST_REUSE_BUILD:-0}" = 1 ]; then
  export CELO2_PREBUILT_DIR="$prebuilt"
  phase "pip install (extension from CELO2_PREBUILT_DIR=$prebuilt)"
else
  unset CELO2_PREBUILT_DIR
  unset CELO2_CMAKE_BUILD_DIR          # the default: build/pip/cmake in the (copied) tree
  export JOBS="${JOBS:-2}"
  phase "pip install (CMake configure + build of _celo2 from scratch, JOBS=$JOBS)"
fi
"$vpy" -m pip install -v --no-build-isolation --no-index "$work/src" > "$work/pip.log" 2>&1 || {
  tail -n 60 "$work/pip.log"; echo "FAIL: pip install"; exit 1; }
grep -E "Successfully installed|setup.py: .*-> " "$work/pip.log" || true
# setuptools' scratch space stays under build/pip (no egg-info beside the sources).
stray="$(find "$work/src" -name '*.egg-info' -not -path "$work/src/build/*")"
[ -z "$stray" ] || { echo "FAIL: egg-info outside build/pip: $stray"; exit 1; }

phase "the installed extension's shared libraries"
ext="$(find "$work/venv/lib" -path '*/site-packages/celo2/_celo2*.so' | head -1)"
[ -n "$ext" ] || { echo "FAIL: no celo2/_celo2*.so in the venv"; exit 1; }
if ldd "$ext" | grep -q "not found"; then ldd "$ext"; echo "FAIL: unresolved libraries"; exit 1; fi
rpath="$(readelf -d "$ext" | grep -E 'R(UN)?PATH' || true)"
echo "rpath: ${rpath:-none}"
case "$rpath" in *"$work"*|*"$src"*|*"${CELO2_PREBUILT_DIR:-/nonexistent}"*)
  echo "FAIL: the extension's RPATH names a source or build tree"; exit 1 ;; esac

phase "import and train from outside the source tree"
mkdir "$work/elsewhere"
(cd "$work/elsewhere" && CELO2_VENV="$work/venv" "$vpy" - <<'EOF'
import os
import sys

import celo2
import celo2.torch
import torch

venv = os.path.realpath(os.environ["CELO2_VENV"])
for mod in (celo2, celo2._celo2, celo2.torch):
    path = os.path.realpath(mod.__file__)
    assert path.startswith(venv + os.sep), f"{mod.__name__} from {path}, not the venv {venv}"
print("celo2", celo2.__version__, "from", os.path.dirname(celo2.__file__))

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
before = [p.detach().clone() for p in model.parameters()]
opt = celo2.torch.Celo2(model.named_parameters(), lr=1e-2, communicator="local")
x, y = torch.randn(32, 8), torch.randn(32, 4)
losses = []
for _ in range(5):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step(loss=loss)
    losses.append(loss.item())
for b, p in zip(before, model.parameters()):
    assert torch.isfinite(p).all(), "non-finite parameter after the step"
    assert not torch.equal(b, p.detach()), "a parameter did not change"
assert all(map(lambda v: v == v, losses)), losses
print("5 Celo2 steps: loss %.4f -> %.4f" % (losses[0], losses[-1]))
EOF
) || { echo "FAIL: import/train from the venv"; exit 1; }

phase "pip uninstall"
"$vpy" -m pip uninstall -y celo2 >/dev/null
if (cd "$work/elsewhere" && "$vpy" -c "import celo2" 2>/dev/null); then
  echo "FAIL: celo2 still importable after uninstall"; exit 1
fi
[ -z "$(find "$work/venv/lib" -path '*/site-packages/celo2*' -print -quit)" ] || {
  echo "FAIL: files left in site-packages"; find "$work/venv/lib" -path '*/site-packages/celo2*'; exit 1; }
phase "pip install test passed"
