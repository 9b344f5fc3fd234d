#!/usr/bin/env bash
# The sanitizer configuration: the checkpoint, optimizer and rule tests, the engine on MPI
# ranks and the engine on its host-emulated cuda backend (1 and 3 ranks) built with ASan and
# UBSan (Debug) and run,
# then 30 s of libFuzzer on the theta loader (ASan + UBSan).
# Called by scripts/test.sh; SANITIZE=0 skips it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASAN_DIR="${ASAN_DIR:-$here/build-asan}"
for p in clang libclang-rt-14-dev; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev >/dev/null
    break
  fi
done
targets=(flax_msgpack_test theta_io_test optimizer_test rule_test golden_test engine_mpi_test engine_cuda_host_test)
cmake -S "$here" -B "$ASAN_DIR" -DCMAKE_BUILD_TYPE=Debug -DCELO2_SANITIZE=ON -DCELO2_NATIVE=ON -DCELO2_CUDA=OFF >/dev/null
cmake --build "$ASAN_DIR" -j "${JOBS:-$(nproc)}" --target "${targets[@]}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fail=0
for t in "${targets[@]}"; do
  case "$t" in engine_mpi_test | engine_cuda_host_test) continue ;; esac
  echo "== $t (ASan+UBSan)"
  "$ASAN_DIR/tests/$t" --gtest_brief=1 || fail=1
done
# The engine on 1 and 3 MPI ranks (CPU backend; host-emulated cuda backend); Open MPI's own
# allocations are not ours to report, so leak checking is off for them.
for t in engine_mpi_test engine_cuda_host_test; do
  for np in 1 3; do
    echo "== $t, $np rank(s) (ASan+UBSan)"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
      ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
      mpirun --oversubscribe --bind-to none -np "$np" "$ASAN_DIR/tests/$t" --gtest_brief=1 || fail=1
  done
done
echo "== libFuzzer: theta loader, ${FUZZ_SECONDS:-30} s"
"$here/tests/fuzz/run_fuzz.sh" "${FUZZ_SECONDS:-30}" "$ASAN_DIR/fuzz" 2>&1 | tail -n 12 || fail=1
exit $fail
