#!/usr/bin/env bash
# ThreadSanitizer on the code that runs on two threads: the engine's gradient-bucket worker
# (overlap_grad_reduce) beside the caller's thread, on the CPU backend and on the
# host-emulated cuda backend, and the worker itself. OpenMP is held to one thread
# (libgomp is not instrumented, so its barriers would be reported as races), so the threads
# checked are ours. Not part of scripts/test.sh (a third build of the engine); run by hand:
#   scripts/tsan.sh            (build-tsan/, RelWithDebInfo)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TSAN_DIR="${TSAN_DIR:-$here/build-tsan}"
targets=(serial_worker_test engine_mpi_test engine_cuda_host_test)
cmake -S "$here" -B "$TSAN_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCELO2_TSAN=ON -DCELO2_CUDA=OFF >/dev/null
cmake --build "$TSAN_DIR" -j "${JOBS:-$(nproc)}" --target "${targets[@]}"
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$here/tests/tsan/suppressions.txt ${TSAN_OPTIONS:-}"
export OMP_NUM_THREADS=1
fail=0
echo "== serial_worker_test (TSan)"
"$TSAN_DIR/tests/serial_worker_test" --gtest_brief=1 || fail=1
for t in engine_mpi_test engine_cuda_host_test; do
  for np in 1 2; do
    echo "== $t, $np rank(s), overlap tests (TSan)"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
      mpirun --oversubscribe --bind-to none -np "$np" -x TSAN_OPTIONS -x OMP_NUM_THREADS \
      "$TSAN_DIR/tests/$t" --gtest_brief=1 --gtest_filter='*Overlap*' || fail=1
  done
done
exit $fail
