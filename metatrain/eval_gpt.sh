#!/usr/bin/env bash
# The GPT demo of the main job (examples/gpt_demo.py: a char-level GPT on Debian's fortunes,
# 2 ranks, the sharded engine) as a held-out task of the meta-training evaluation: one Celo2
# run per theta and one AdamW run per learning rate, same seed and data; prints a Markdown
# table and writes every number to OUT/gpt_eval.json.
#
#   metatrain/eval_gpt.sh OUT STEPS ADAMW_LRS label=theta.state [label=theta.state ...]
#   e.g. metatrain/eval_gpt.sh /tmp/gpt_eval 300 "1e-3 3e-3" project=weights/celo2-project/theta.state
# Needs a build with the Python package (BUILD_DIR, default build/). VARIANT=celo2-base runs
# the thetas as Celo2-base weights (the demo's --variant); the AdamW runs do not depend on it.
# Optional thetas: a spec whose file is absent (e.g. published weights not downloaded) is
# reported absent and skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"; steps="$2"; lrs="$3"; shift 3
BUILD_DIR="${BUILD_DIR:-$here/build}"
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export PYTHONPATH="$BUILD_DIR/python"
run() {  # name, extra args...
  local name="$1"; shift
  mpirun --oversubscribe --bind-to none -np 2 -x PYTHONPATH -x OMP_NUM_THREADS /usr/bin/python3 \
    "$here/examples/gpt_demo.py" --steps "$steps" --control "" --out "$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || { echo "eval_gpt: run $name failed:"; tail -20 "$out/$name.log"; exit 1; }
}
VARIANT="${VARIANT:-celo2}"
for spec in "$@"; do
  if [ ! -f "${spec#*=}" ]; then
    echo "eval_gpt: theta '${spec%%=*}': ${spec#*=} is absent (download it to evaluate it); left out"
    continue
  fi
  run "celo2-${spec%%=*}" --runs celo2 --variant "$VARIANT" --theta "$(realpath "${spec#*=}")"
done
for lr in $lrs; do
  run "adamw-$lr" --runs adamw --adamw-lr "$lr"
done
/usr/bin/python3 - "$out" "$steps" <<'PY'
import glob, json, os, sys
out, steps = sys.argv[1], int(sys.argv[2])
rows = {}
for d in sorted(glob.glob(os.path.join(out, "*", "metrics.json"))):
    m = json.load(open(d))
    name = os.path.basename(os.path.dirname(d))
    for run, r in m["results"].items():
        rows[name] = {"validation_loss": r["evals"][-1][1], "train_loss_last": r["curve"][-1] if r["curve"] else None}
best = min((v["validation_loss"], k) for k, v in rows.items() if k.startswith("adamw-"))
json.dump({"steps": steps, "runs": rows, "adamw_best": best[1]}, open(os.path.join(out, "gpt_eval.json"), "w"), indent=1)
print("| task | optimizer | validation loss |")
print("|---|---|---|")
for k, v in rows.items():
    if k.startswith("celo2-"):
        print(f"| gpt-demo ({steps} steps) | {k[6:]} | {v['validation_loss']:.4f} |")
print(f"| gpt-demo ({steps} steps) | AdamW (best lr {best[1][6:]} of grid) | {best[0]:.4f} |")
PY
