#!/usr/bin/env bash
# Builds the GPU check's binaries HERE (a machine with scripts/setup.sh's packages and the
# CUDA toolkit, no GPU needed) and packs them, with the shared libraries they need beyond
# glibc and CUDA, into .gpu-prebuilt/bundle.tar.xz (about 10 MB). A GPU machine that lacks
# those packages and cannot reach a registry (the project's device sessions) then runs
# tests/gpu/run.sh without building: carry `.gpu-prebuilt` with the call. Portable build:
# no -march=native, CUDA sm_90 machine code plus PTX.
# Usage: tests/gpu/prebuild.sh     (env: BUILD_DIR, default /tmp/celo2-build-prebuilt; JOBS)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD_DIR="${BUILD_DIR:-/tmp/celo2-build-prebuilt}"
JOBS="${JOBS:-$(nproc)}"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
cmake -S "$here" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCELO2_CUDA=ON -DCELO2_CORE_ONLY=ON \
  -DCELO2_NATIVE=OFF "-DCMAKE_CUDA_ARCHITECTURES=90-real;90-virtual" > /dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target rule_gpu_test nccl_gpu_test gpu_engine_test celo2-bench-gpu
stage="$(mktemp -d)/celo2-prebuilt"
mkdir -p "$stage/bin" "$stage/lib"
for t in rule_gpu_test nccl_gpu_test gpu_engine_test celo2-bench-gpu; do
  cp "$(find "$BUILD_DIR" -name "$t" -type f -perm -u+x | head -1)" "$stage/bin/"
done
# Every resolved dependency except glibc's own libraries and CUDA's (cudart, cuBLAS, NCCL:
# the GPU machine has its own, matching its driver).
for b in "$stage"/bin/*; do ldd "$b"; done | awk '$3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda*|libcublas*|libnccl*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
{
  echo "built $(date -u +%FT%TZ) on $(. /etc/os-release; echo "$PRETTY_NAME"), $(ldd --version | head -1)"
  echo "commit $(git -C "$here" describe --always --dirty 2>/dev/null || echo unknown)"
  nvcc --version | tail -1
} > "$stage/BUILD_INFO"
mkdir -p "$here/.gpu-prebuilt"
tar -C "$(dirname "$stage")" -cJf "$here/.gpu-prebuilt/bundle.tar.xz" celo2-prebuilt
exclude="$(git -C "$here" rev-parse --git-path info/exclude)"
case "$exclude" in /*) ;; *) exclude="$here/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpu-prebuilt/" "$exclude" 2>/dev/null || echo "/.gpu-prebuilt/" >> "$exclude"
cat "$stage/BUILD_INFO"
du -h "$here/.gpu-prebuilt/bundle.tar.xz"
