#!/usr/bin/env bash
# Installs a built tree into a temporary prefix, then builds tests/deploy/consumer against
# it twice: with find_package(celo2) (CMake) and with `pkg-config --cflags --libs celo2`,
# and runs both. Both must print the same checksum.
#   install_test.sh BUILD_DIR CONSUMER_SRC [CXX]
set -euo pipefail
build="$1"; src="$2"; cxx="${3:-c++}"
work="$(mktemp -d "${TMPDIR:-/tmp}/celo2-install-test.XXXXXX")"
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

echo "== cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >/dev/null
for f in include/celo2/optimizer.h include/celo2/engine.h include/celo2/celo2.h \
         lib/cmake/celo2/celo2Config.cmake lib/cmake/celo2/celo2Targets.cmake; do
  [ -f "$prefix/$f" ] || { echo "missing $prefix/$f"; exit 1; }
done
# Public headers only: no private header of the engine or the CUDA kernels is installed, every
# header an installed one includes is installed too, and none declares the engine's internals.
inc="$prefix/include"
for h in backend.h control_impl.h engine_internal.h recipe_internal.h rule_layout.h rule_device.h \
         newton_schulz_plan.h golden.h; do
  if [ -n "$(find "$inc" -name "$h")" ]; then echo "private header installed: $(find "$inc" -name "$h")"; exit 1; fi
done
for h in $(cd "$inc" && find . -name '*.h'); do
  for dep in $(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$inc/$h"); do
    [ -f "$inc/$dep" ] || { echo "installed ${h#./} includes \"$dep\", which is not installed"; exit 1; }
  done
done
if grep -rnwE "agree_on_error|read_state_collective|TensorIdentity|check_registration|prepare_options|name_taken" "$inc"; then
  echo "installed headers declare engine internals"; exit 1
fi
# A build that linked OpenBLAS's OpenMP build by path (CELO2_BLAS) must load it from the
# installed tools and libcelo2.so too (their RPATH), not the system's default BLAS.
if grep -q '^CELO2_OPENBLAS_OPENMP=/' "$build/celo2-build.env" 2>/dev/null; then
  for b in "$prefix/bin/celo2-train" "$(find "$prefix" -name 'libcelo2.so' | head -1)"; do
    [ -e "$b" ] || continue
    # grep without -q: under pipefail, -q's early exit can make ldd die of SIGPIPE.
    ldd "$b" | grep 'openblas-openmp/libopenblas' >/dev/null ||
      { echo "FAIL: installed $b does not load OpenBLAS's OpenMP build:"; ldd "$b" | grep -i blas; exit 1; }
  done
  echo "installed binaries load OpenBLAS's OpenMP build"
fi
pc="$(find "$prefix" -name celo2.pc | head -1)"
[ -n "$pc" ] || { echo "missing celo2.pc"; exit 1; }
# The installed headers must not reach into the source or build tree.
if grep -rl "$(cd "$build" && pwd)" "$prefix/lib/cmake/celo2" >/dev/null 2>&1; then
  echo "the CMake package names the build tree:"; grep -rn "$(cd "$build" && pwd)" "$prefix/lib/cmake/celo2"; exit 1
fi

echo "== find_package(celo2)"
cmake -S "$src" -B "$work/cmake-build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/cmake-build" >/dev/null
out_cmake="$("$work/cmake-build/consumer")"
echo "cmake consumer: $out_cmake"
out_capi="$("$work/cmake-build/capi_consumer")"
echo "cmake C ABI consumer: $out_capi"
case "$out_capi" in "capi consumer ok version "*) ;; *) echo "FAIL: C ABI consumer"; exit 1 ;; esac

echo "== pkg-config --cflags --libs celo2"
export PKG_CONFIG_PATH="$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
flags="$(pkg-config --cflags --libs celo2)"
echo "pkg-config: $flags"
# shellcheck disable=SC2086
"$cxx" -O2 "$src/main.cc" -o "$work/consumer-pc" $flags
out_pc="$("$work/consumer-pc")"
echo "pkg-config consumer: $out_pc"

case "$out_cmake" in "consumer ok "*) ;; *) echo "FAIL: cmake consumer"; exit 1 ;; esac
[ "$out_cmake" = "$out_pc" ] || { echo "FAIL: outputs differ"; exit 1; }
echo "install test passed"
