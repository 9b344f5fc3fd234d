#!/usr/bin/env bash
# A rank that dies or hangs mid-training must make the job stop with a clear error within a
# bounded time, never hang. Usage: fault_test.sh MPIEXEC FAULT_MAIN
set -u
mpiexec="$1"
prog="$2"
run() {  # mode, limit seconds
  local mode="$1" limit="$2" out rc start end
  out=$(mktemp)
  start=$(date +%s)
  CELO2_COMM_TIMEOUT_S=5 OMP_NUM_THREADS=1 timeout 120 "$mpiexec" --oversubscribe --allow-run-as-root \
    -np 3 "$prog" "$mode" 1 20 >"$out" 2>&1
  rc=$?
  end=$(date +%s)
  echo "--- $mode: exit $rc after $((end - start)) s"
  tail -n 15 "$out"
  if [ "$rc" -eq 0 ]; then echo "FAIL: $mode: the job exited 0"; return 1; fi
  if [ "$rc" -eq 124 ]; then echo "FAIL: $mode: the job hung (killed by timeout)"; return 1; fi
  if [ $((end - start)) -gt "$limit" ]; then echo "FAIL: $mode: took over $limit s"; return 1; fi
  if [ "$mode" = hang ] && ! { grep -q "did not complete within 5 s (CELO2_COMM_TIMEOUT_S): the other ranks did not join it" "$out" &&
                               grep -q "alive (Open MPI ends the job when a rank dies) but in a different collective or none, or hung" "$out" &&
                               grep -q "call opt.consolidate_state_dict(to=0) on every rank" "$out"; }; then
    echo "FAIL: hang: no clear message from the surviving ranks (alive elsewhere, the usual cause and its fix)"; return 1
  fi
  rm -f "$out"
  echo "PASS: $mode"
}
fail=0
run kill 60 || fail=1
run hang 60 || fail=1
exit $fail
