#!/usr/bin/env bash
# The prepared GPU check (issue #6), one call on a machine with an NVIDIA GPU (an H200 in
# the project's device sessions; under 8 minutes there with 16 cores):
#   1. configure + build the CUDA targets (CELO2_CORE_ONLY: kernels, engine, GPU tests,
#      celo2-bench-gpu; no gRPC/client packages needed) in $BUILD_DIR;
#   2. run the GPU tests (rule kernels, NCCL communicator, the engine on its cuda backend) with
#      CELO2_REQUIRE_GPU=1 (a missing device is a failure, not a skip);
#   3. run celo2-bench-gpu over GPT-3 XL's tensors (rule phases, Newton–Schulz in three
#      precisions, fused AdamW, the whole engine step on the cuda backend); JSON/CSV and logs go to $OUT.
# Dependencies: CUDA toolkit (nvcc, cuBLAS), NCCL (toolkit, system, or the nvidia-nccl
# Python wheel, found automatically), CMake, a C++20 compiler and the Debian packages of
# scripts/setup.sh that the core needs (OpenBLAS, msgpack-c, RE2, OpenSSL, Open MPI,
# GoogleTest, CLI11, nlohmann-json, zlib). When configure fails for a missing package this
# script unpacks .gpu-deps/*.deb (made beforehand by tests/gpu/bundle_deps.sh on a machine
# with apt access and carried along) into a private prefix, and otherwise tries apt-get
# (only useful where a package registry is reachable).
# Prebuilt: with .gpu-prebuilt/bundle.tar.xz carried (tests/gpu/prebuild.sh, run beforehand
# on a machine with the packages), nothing is built: the bundle's binaries run with its
# libraries where the system lacks them (and building is the fallback if they cannot load).
# The machine's OS, glibc and toolkit are logged first, for whoever prepares the next call.
# Usage: tests/gpu/run.sh            (env: OUT, BUILD_DIR, JOBS, BENCH_ARGS, PREBUILT=0|1|auto)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$here/gpu-check-out}"
BUILD_DIR="${BUILD_DIR:-/tmp/celo2-build-gpu}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
t0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "repo $here, build $BUILD_DIR, out $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
( . /etc/os-release 2>/dev/null && echo "os: $PRETTY_NAME"; ldd --version 2>/dev/null | head -1
  nvcc --version 2>/dev/null | tail -1; cmake --version 2>/dev/null | head -1; nproc ) | sed 's/^/  /'

# NCCL from the Python wheel when the toolkit has none.
if [ -z "${NCCL_ROOT:-}" ] && ! ls /usr/include/nccl.h /usr/local/cuda/include/nccl.h >/dev/null 2>&1; then
  nccl_py=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
  if [ -n "$nccl_py" ] && [ -f "$nccl_py/include/nccl.h" ]; then
    export NCCL_ROOT="$nccl_py"
    [ -e "$nccl_py/lib/libnccl.so" ] || ln -sf "$nccl_py/lib/libnccl.so.2" "$nccl_py/lib/libnccl.so" 2>/dev/null || true
    export LD_LIBRARY_PATH="$nccl_py/lib:${LD_LIBRARY_PATH:-}"
    stamp "NCCL from the Python wheel: $NCCL_ROOT"
  fi
fi

BIN_DIR=""
PREBUILT="${PREBUILT:-auto}"
bundle="$here/.gpu-prebuilt/bundle.tar.xz"

# The carried binaries: loadable with the system's libraries plus only the missing ones of
# the bundle, or else with all of the bundle's.
use_prebuilt() {
  local pb=/tmp/celo2-prebuilt
  export CELO2_GOLDEN_DIR="$here/tests/golden"  # the tests read it while listing, too
  rm -rf "$pb" && tar -C /tmp -xJf "$bundle" || return 1
  sed 's/^/  bundle: /' "$pb/BUILD_INFO"
  mkdir -p "$pb/need"
  for l in "$pb"/lib/*; do
    ldconfig -p 2>/dev/null | grep -q " $(basename "$l") " || ln -sf "$l" "$pb/need/"
  done
  local cuda_libs="/usr/local/cuda/lib64:/usr/local/cuda/lib"
  for dirs in "$pb/need" "$pb/lib"; do
    export LD_LIBRARY_PATH="$dirs:${LD_LIBRARY_PATH_BASE}:$cuda_libs"
    local ok=1
    for b in rule_gpu_test gpu_engine_test; do
      "$pb/bin/$b" --gtest_list_tests > /dev/null 2>&1 || ok=0
    done
    if [ $ok -eq 1 ]; then
      stamp "prebuilt binaries load with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      BIN_DIR="$pb/bin"
      return 0
    fi
  done
  stamp "prebuilt binaries do not load here:"
  ldd "$pb/bin/gpu_engine_test" | grep -E "not found|version" | head -20
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH_BASE"
  return 1
}
LD_LIBRARY_PATH_BASE="${LD_LIBRARY_PATH:-}"

if [ "$PREBUILT" != 0 ] && [ -f "$bundle" ]; then
  stamp "using the carried prebuilt binaries ($bundle)"
  use_prebuilt || { [ "$PREBUILT" = 1 ] && { stamp "FAILED: PREBUILT=1 and the bundle cannot run"; exit 5; }; }
fi

configure() {
  cmake -S "$here" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCELO2_CUDA=ON -DCELO2_CORE_ONLY=ON \
    -DCELO2_NATIVE=ON ${CMAKE_ARGS:-} > "$OUT/configure.log" 2>&1
}

use_bundle() {
  local prefix=/tmp/celo2-deps
  mkdir -p "$prefix"
  for f in "$here"/.gpu-deps/*.deb; do dpkg -x "$f" "$prefix"; done
  local lib="$prefix/usr/lib/x86_64-linux-gnu"
  export CMAKE_PREFIX_PATH="$prefix/usr:${CMAKE_PREFIX_PATH:-}"
  export CPATH="$prefix/usr/include:$prefix/usr/include/x86_64-linux-gnu:$prefix/usr/include/x86_64-linux-gnu/openmpi:${CPATH:-}"
  export LIBRARY_PATH="$lib:$lib/openblas-pthread:${LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH="$lib:$lib/openblas-pthread:${LD_LIBRARY_PATH:-}"
  export PKG_CONFIG_PATH="$lib/pkgconfig:$prefix/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
  export PATH="$prefix/usr/bin:$PATH"
  export OPAL_PREFIX="$prefix/usr/lib/x86_64-linux-gnu/openmpi"
  CMAKE_ARGS="${CMAKE_ARGS:-} -DMPI_C_COMPILER=$prefix/usr/bin/mpicc -DBLAS_LIBRARIES=$lib/openblas-pthread/libopenblas.so -DCBLAS_INCLUDE_DIR=$prefix/usr/include/x86_64-linux-gnu/openblas-pthread"
  stamp "unpacked $(ls "$here"/.gpu-deps/*.deb | wc -l) carried packages into $prefix"
}

if [ -z "$BIN_DIR" ]; then
stamp "configure"
if ! configure; then
  tail -20 "$OUT/configure.log"
  if ls "$here"/.gpu-deps/*.deb >/dev/null 2>&1; then
    use_bundle
  elif command -v apt-get >/dev/null; then
    stamp "configure failed; trying scripts/setup.sh's packages through apt (needs a registry)"
    timeout 300 env DEBIAN_FRONTEND=noninteractive bash -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends libopenblas-dev libmsgpack-dev libre2-dev libcli11-dev nlohmann-json3-dev zlib1g-dev libssl-dev libgtest-dev libopenmpi-dev openmpi-bin pkg-config' >/dev/null 2>&1 || stamp "apt failed (no registry?)"
  fi
  rm -f "$BUILD_DIR/CMakeCache.txt"
  if ! configure; then
    tail -30 "$OUT/configure.log"
    stamp "FAILED: configure (missing packages; see $OUT/configure.log and tests/gpu/bundle_deps.sh)"
    exit 3
  fi
fi
grep -E "celo2: CUDA|NCCL" "$OUT/configure.log" || true

stamp "build ($JOBS jobs)"
if ! cmake --build "$BUILD_DIR" -j "$JOBS" --target rule_gpu_test nccl_gpu_test gpu_engine_test celo2-bench-gpu > "$OUT/build.log" 2>&1; then
  # nccl_gpu_test and gpu_engine_test exist only when NCCL was found: build what there is.
  cmake --build "$BUILD_DIR" -j "$JOBS" --target rule_gpu_test celo2-bench-gpu >> "$OUT/build.log" 2>&1 || {
    tail -40 "$OUT/build.log"; stamp "FAILED: build"; exit 4; }
fi
BIN_DIR="$BUILD_DIR"
fi

stamp "GPU tests (CELO2_REQUIRE_GPU=1)"
export CELO2_REQUIRE_GPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
rc_tests=0
for t in rule_gpu_test nccl_gpu_test gpu_engine_test; do
  bin=$(find "$BIN_DIR" -name "$t" -type f -perm -u+x | head -1)
  if [ -z "$bin" ]; then stamp "$t: not built"; [ "$t" = rule_gpu_test ] && rc_tests=1; continue; fi
  timeout 300 "$bin" --gtest_output="xml:$OUT/$t.xml" || rc_tests=1
done

stamp "celo2-bench-gpu"
bench=$(find "$BIN_DIR" -name celo2-bench-gpu -type f -perm -u+x | head -1)
rc_bench=0
timeout 300 "$bench" --out "$OUT" ${BENCH_ARGS:-} || rc_bench=$?

stamp "done: tests rc=$rc_tests bench rc=$rc_bench"
[ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ]
