#!/usr/bin/env bash
# celo2-metatrain over MPI: the same run on 1 and 2 ranks gives the same theta (the pairs
# are spread over ranks, the estimate summed), and a run stopped by its time limit resumes
# from its checkpoint. Usage: metatrain_mpi_test.sh MPIEXEC CELO2_METATRAIN
set -euo pipefail
mpiexec="$1"
bin="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
common=(--tasks 4 --family synthetic,digits --unroll-min 100 --unroll-max 200 --seed 5
        --outer-lr 1e-3 --no-progress)

"$mpiexec" --oversubscribe --bind-to none -np 1 "$bin" train --comm mpi --out "$work/np1" \
  --outer-steps 4 "${common[@]}" > "$work/np1.log"
"$mpiexec" --oversubscribe --bind-to none -np 2 "$bin" train --comm mpi --out "$work/np2" \
  --outer-steps 4 "${common[@]}" > "$work/np2.log"
grep -q "2 rank(s)" "$work/np2.log" || { echo "FAIL: the 2-rank run did not see 2 ranks"; cat "$work/np2.log"; exit 1; }

python3 - "$work" <<'PY'
import json, sys, math
w = sys.argv[1]
a = json.load(open(f"{w}/np1/ckpt.json")); b = json.load(open(f"{w}/np2/ckpt.json"))
assert a["step"] == b["step"] == 4, (a["step"], b["step"])
init_moved = max(abs(x) for x in a["adam_m"])
assert init_moved > 0, "the outer optimizer never moved"
diff = max(abs(x - y) for x, y in zip(a["theta"], b["theta"]))
print(f"max |theta(np1) - theta(np2)| = {diff:.3g}")
assert diff <= 1e-6, f"1 and 2 ranks disagree by {diff}"
rows = open(f"{w}/np2/metrics.csv").read().strip().splitlines()
assert rows[0].startswith("step,wall_s,meta_loss") and len(rows) == 5, rows
for r in rows[1:]:
    loss = float(r.split(",")[2])
    assert 0 <= loss <= 1.5 * math.log(10) + 1e-9, r
PY

# Resume: stop after the first checkpoint via a zero-second time limit, then continue.
"$bin" train --comm local --out "$work/res" --outer-steps 3 --time-limit 1e-9 "${common[@]}" > "$work/res1.log"
grep -q "time limit reached at outer step 1" "$work/res1.log" || { cat "$work/res1.log"; exit 1; }
echo "2,999,1.0,1.0,1.0,0,1.0" >> "$work/res/metrics.csv"  # a row written after the checkpoint
"$bin" train --comm local --out "$work/res" --outer-steps 3 --resume "${common[@]}" > "$work/res2.log"
grep -q "resumed .* at outer step 1" "$work/res2.log" || { cat "$work/res2.log"; exit 1; }
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
c = json.load(open(f"{w}/res/ckpt.json"))
assert c["step"] == 3 and c["adam_t"] == 3, (c["step"], c["adam_t"])
rows = open(f"{w}/res/metrics.csv").read().strip().splitlines()
assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3], rows
PY
# A checkpoint of the wrong kind is refused with a message.
if "$bin" train --comm local --out "$work/res" --outer-steps 4 --resume --base "${common[@]}" > "$work/bad.log" 2>&1; then
  echo "FAIL: a Celo2 checkpoint resumed a Celo2-base run"; exit 1
fi
grep -q "checkpoint is for Celo2" "$work/bad.log" || { cat "$work/bad.log"; exit 1; }
"$bin" train --comm local --out "$work/res" --outer-steps 3 --resume "${common[@]}" >/dev/null
echo "metatrain MPI test passed"
