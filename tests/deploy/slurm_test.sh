#!/usr/bin/env bash
# A real one-node Slurm on localhost: munged, slurmctld and slurmd started here (as root,
# temp dirs, free ports; docs/OPERATIONS.md), then a 2-task CPU batch job that runs
# celo2-train through `srun --mpi=pmix -n 2`, its output checked. The daemons are stopped by
# pid whatever happens. Exit 77 (skipped) only where the daemons cannot run here.
# With REPO and PYTHON_DIR (build/python) as well, it then submits deploy/slurm/celo2.sbatch
# itself (1 node x 2 tasks, no GPUs) running a few steps of examples/gpt_demo.py on CPU.
#   slurm_test.sh CELO2_TRAIN WORK_DIR [REPO PYTHON_DIR]
set -uo pipefail
train="$1"; work_parent="${2:-${TMPDIR:-/tmp}}"; repo="${3:-}"; pydir="${4:-}"
skip() { echo "SKIP: $*"; exit 77; }
for b in munged slurmctld slurmd sbatch srun sinfo; do
  command -v "$b" >/dev/null 2>&1 || skip "$b not installed (apt-get install slurm-wlm munge)"
done
[ "$(id -u)" -eq 0 ] || skip "needs root to run munged/slurmd (SlurmUser=root)"
[ -r /etc/munge/munge.key ] || skip "/etc/munge/munge.key missing"
[ -x "$train" ] || { echo "FAIL: no $train"; exit 1; }
ls /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix*.so /usr/lib/*/slurm*/mpi_pmix*.so >/dev/null 2>&1 ||
  skip "Slurm's PMIx plugin (mpi_pmix.so) is not installed"

mkdir -p "$work_parent"
work="$(mktemp -d "$work_parent/slurm.XXXXXX")"
chmod 755 "$work"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  [ "${passed:-0}" = 1 ] && rm -rf "$work"   # logs are kept when the test fails
}
trap cleanup EXIT
trap 'exit 1' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
host="$(hostname -s)"
ctld_port="$(free_port)"; d_port="$(free_port)"
while [ "$d_port" = "$ctld_port" ]; do d_port="$(free_port)"; done
mkdir -p "$work"/{munge,state,spool,log}

# munged with its own socket, so a system munged (if any) is left alone.
munged --force --socket="$work/munge/munge.socket" --pid-file="$work/munge/munged.pid" \
  --log-file="$work/log/munged.log" --seed-file="$work/munge/seed" --foreground \
  >"$work/log/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$work/munge/munge.socket" ] && break; sleep 0.1; done
[ -S "$work/munge/munge.socket" ] || { cat "$work/log/munged.log" 2>/dev/null; skip "munged did not start"; }

conf="$work/slurm.conf"
cat > "$conf" <<CONF
ClusterName=celo2test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge/munge.socket
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc --all) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$conf"

slurmctld -D -f "$conf" >"$work/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$conf" >"$work/log/slurmd.out" 2>&1 &
pids+=($!)

state=""
for _ in $(seq 60); do
  state="$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1)"
  [ "$state" = "idle" ] && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || break 2; done
  sleep 0.5
done
if [ "$state" != "idle" ]; then
  echo "node state: '${state}'"
  tail -n 20 "$work"/log/*.log "$work"/log/*.out 2>/dev/null
  skip "slurmctld/slurmd did not come up here"
fi
echo "slurm up: node $host idle (slurmctld :$ctld_port, slurmd :$d_port)"

job="$work/job.sh"
cat > "$job" <<JOB
#!/bin/bash
#SBATCH --job-name=celo2-test
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
export OMP_NUM_THREADS=1
echo "slurm job \$SLURM_JOB_ID: \$SLURM_NTASKS tasks on \$SLURM_JOB_NODELIST"
srun --mpi=pmix -n 2 "$train" --steps 100 --log-every 50
JOB
chmod +x "$job"
out="$work/job.out"
t0=$(date +%s)
jobid="$(timeout 240 sbatch --parsable --wait -o "$out" -D "$work" "$job")"
rc=$?
echo "sbatch: job ${jobid:-?} finished rc $rc in $(( $(date +%s) - t0 )) s"
echo "----- job output -----"; cat "$out" 2>/dev/null; echo "----------------------"
fail() { echo "FAIL: $*"; tail -n 30 "$work"/log/slurmd.log 2>/dev/null; exit 1; }
[ "$rc" -eq 0 ] || fail "the job failed (sbatch --wait rc $rc)"
grep -q "engine: mpi communicator, 2 rank" "$out" || fail "no 2-rank MPI engine in the output"
grep -q "final mean_loss_last100" "$out" || fail "no final loss in the output"
echo "celo2-train job passed"

# The template itself, on CPU: 1 node x 2 tasks, a tiny GPT for 4 steps.
if [ -n "$repo" ] && [ -f "$pydir/celo2/__init__.py" ] && /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  jobdir="$work/template"
  mkdir -p "$jobdir"
  train_cmd="/usr/bin/python3 $repo/examples/gpt_demo.py --device cpu --steps 4 --eval-every 2 --eval-batches 1 --layers 1 --width 32 --heads 2 --batch-size 4 --context 32 --no-baseline --control 127.0.0.1:0 --out $jobdir"
  t0=$(date +%s)
  jobid="$(TRAIN="$train_cmd" CELO2_REPO="$repo" CELO2_JOB_DIR="$jobdir" PYTHONPATH="$pydir" \
    timeout 240 sbatch --parsable --wait --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
    --gpus-per-node=0 --mem=0 --time=00:05:00 -o "$work/template.out" -D "$work" \
    "$repo/deploy/slurm/celo2.sbatch")"
  rc=$?
  echo "sbatch celo2.sbatch: job ${jobid:-?} finished rc $rc in $(( $(date +%s) - t0 )) s"
  echo "----- template output -----"; cat "$work/template.out" 2>/dev/null; echo "---------------------------"
  [ "$rc" -eq 0 ] || fail "the celo2.sbatch job failed (rc $rc)"
  grep -q "celo2ctl --addr .* --token-file .*control.token watch" "$work/template.out" ||
    fail "the template did not print how to attach celo2ctl"
  grep -q "celo2 GPT demo: report" "$work/template.out" || fail "no GPT demo report from the template's job"
  [ "$(stat -c %a "$jobdir/control.token")" = "600" ] || fail "the token file is not mode 0600"
  echo "celo2.sbatch job passed"
else
  echo "note: celo2.sbatch not submitted (needs REPO, PYTHON_DIR with the celo2 package and /usr/bin/python3 with torch)"
fi
passed=1
echo "slurm test passed"
