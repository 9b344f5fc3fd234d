#!/usr/bin/env bash
# Prometheus /metrics from rank 0 of a real 2-rank job, scraped with curl while it trains.
# Usage: metrics_test.sh MPIEXEC CELO2_TRAIN WORKDIR
set -u
mpiexec="$1" train="$2" work="$3"
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
echo "metrics-test-token" > token
OMP_NUM_THREADS=1 "$mpiexec" --oversubscribe --allow-run-as-root -np 2 "$train" --steps 600 \
  --step-sleep-ms 10 --log-every 300 --control 127.0.0.1:0 --control-token-file token \
  --metrics 127.0.0.1:0 > job.out 2>&1 &
job=$!
trap 'kill $job 2>/dev/null' EXIT
port=""
for _ in $(seq 1 120); do
  port=$(grep -o "metrics: http://127.0.0.1:[0-9]*" job.out 2>/dev/null | grep -o "[0-9]*$")
  [ -n "$port" ] && break
  sleep 0.5
done
[ -n "$port" ] || { echo "FAIL: no metrics port"; cat job.out; exit 1; }
sleep 2
curl -sS --max-time 10 "http://127.0.0.1:$port/metrics" > scrape1.txt || { echo "FAIL: curl"; exit 1; }
sleep 1
curl -sS --max-time 10 "http://127.0.0.1:$port/metrics" > scrape2.txt || { echo "FAIL: curl"; exit 1; }
code=$(curl -s -o /dev/null -w "%{http_code}" --max-time 10 "http://127.0.0.1:$port/elsewhere")
head -n 12 scrape1.txt
fail=0
for m in celo2_step celo2_learning_rate celo2_loss 'celo2_update_rms{label="celo2"}' \
         'celo2_grad_norm{label="adamw"}' celo2_skipped_steps 'celo2_phase_seconds{phase="mlp"}' \
         'celo2_comm_bytes_total{op="all_gather"}' 'celo2_setting_version{setting="schedule"}' \
         'celo2_world_size{backend="mpi"} 2' celo2_up; do
  grep -qF "$m" scrape1.txt || { echo "FAIL: $m missing"; fail=1; }
done
s1=$(awk '$1=="celo2_step"{print $2}' scrape1.txt)
s2=$(awk '$1=="celo2_step"{print $2}' scrape2.txt)
[ "${s2:-0}" -gt "${s1:-0}" ] || { echo "FAIL: celo2_step did not advance ($s1 -> $s2)"; fail=1; }
[ "$code" = 404 ] || { echo "FAIL: /elsewhere gave $code, not 404"; fail=1; }
wait $job || { echo "FAIL: the job failed"; tail -20 job.out; fail=1; }
trap - EXIT
[ $fail = 0 ] && echo "PASS: /metrics scraped twice (step $s1 -> $s2), 404 elsewhere"
exit $fail
