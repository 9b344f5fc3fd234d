#!/usr/bin/env bash
# End to end: a real celo2-train job with --control, driven by celo2ctl while it trains.
#   plain  2 ranks under mpirun on loopback: status, health, auth refusals, set-schedule,
#          set-rules (dry run, then for real), bad commands, load-weights (the published
#          weights, when present), save-checkpoint, watch; then every rank must have applied
#          every change at the same step with the same version, and the job must end well.
#   tls    1 rank with mutual TLS (certificates made here with openssl): a client without a
#          certificate, or speaking plain text, is refused; one with a certificate works.
# usage: e2e_test.sh plain|tls MPIEXEC CELO2_TRAIN CELO2CTL SHARED_DIR WORK_DIR
set -u
mode=$1 mpiexec=$2 train=$3 ctl=$4 shared=$5 work=$6

rm -rf "$work"
mkdir -p "$work/ckpt"
cd "$work" || exit 1
job_pid=""
cleanup() { [ -n "$job_pid" ] && kill "$job_pid" 2>/dev/null; }
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  echo "--- job stdout (tail)"; tail -n 20 "$work/job.out" 2>/dev/null
  echo "--- job stderr (tail)"; tail -n 20 "$work/job.err" 2>/dev/null
  exit 1
}
# run NAME EXPECTED_RC CMD...: runs a celo2ctl command, keeps its output in NAME.out
run() {
  local name=$1 want=$2
  shift 2
  "$@" > "$name.out" 2>&1
  local rc=$?
  echo "== $name (rc $rc)"
  cat "$name.out"
  [ "$rc" = "$want" ] || fail "$name: exit status $rc, expected $want"
}
expect_in() { grep -q -- "$2" "$1.out" || fail "$1: output lacks '$2'"; }
json_get() {  # json_get FILE PYTHON-EXPR (on the parsed object `j`)
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"
}
have_python=1
python3 -c "import json" 2>/dev/null || { have_python=0; echo "note: no python3, JSON checks skipped"; }

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > token
chmod 600 token
export CELO2_CONTROL_TOKEN=""
weights_root="$shared/weights/celo2"
have_weights=1
if [ ! -f "$weights_root/theta.state" ]; then
  have_weights=0
  weights_root="$work/weights"
  mkdir -p "$weights_root"
fi

tls_server=() tls_client=()
if [ "$mode" = tls ]; then
  command -v openssl > /dev/null || { echo "SKIP: openssl not installed"; exit 0; }
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=celo2 test CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign,cRLSign 2> /dev/null ||
    fail "openssl: CA"
  for who in server client; do
    openssl req "${ec[@]}" -keyout "$who.key" -out "$who.csr" -subj "/CN=celo2 test $who" \
      2> /dev/null || fail "openssl: $who key"
  done
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  for who in server client; do
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile "$who.ext" -out "$who.pem" 2> /dev/null || fail "openssl: sign $who"
  done
  tls_server=(--tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem)
  tls_client=(--tls-ca ca.pem --tls-cert client.pem --tls-key client.key)
  steps=600
  launch=("$train")
else
  steps=500
  launch=("$mpiexec" --oversubscribe --allow-run-as-root --bind-to none -np 2 "$train")
fi

"${launch[@]}" --steps "$steps" --step-sleep-ms 3 --log-every 500 --control 127.0.0.1:0 \
  --control-token-file token --weights-root "$weights_root" --checkpoint-dir ckpt \
  --control-log 'applied.{rank}.log' "${tls_server[@]}" > job.out 2> job.err &
job_pid=$!

addr=""
for _ in $(seq 600); do
  addr=$(sed -n 's/^control: listening on //p' job.out 2> /dev/null | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$job_pid" 2> /dev/null || fail "the job exited before serving"
  sleep 0.1
done
[ -n "$addr" ] || fail "the job never printed its control address"
echo "job serving on $addr"
c=("$ctl" --addr "$addr" --timeout 20 "${tls_client[@]}")
ct=("${c[@]}" --token-file token)

run health 0 "${c[@]}" health
expect_in health SERVING
run no_token 2 "${c[@]}" status
expect_in no_token "no bearer token"
echo wrong-token-0123456789 > wrong
run wrong_token 1 "${c[@]}" --token-file wrong status
expect_in wrong_token UNAUTHENTICATED
run status0 0 "${ct[@]}" status
expect_in status0 "job      running"

if [ "$mode" = tls ]; then
  run tls_no_client_cert 1 "$ctl" --addr "$addr" --timeout 5 --tls-ca ca.pem --token-file token status
  run tls_plaintext 1 "$ctl" --addr "$addr" --timeout 5 --token-file token status
  run tls_schedule 0 "${ct[@]}" set-schedule constant:lr=5e-4
  expect_in tls_schedule "applied at step"
  run tls_status 0 "${ct[@]}" --json status
  if [ $have_python = 1 ]; then
    [ "$(json_get tls_status.out "j['versions']['schedule']")" = 1 ] || fail "schedule version"
  fi
  wait "$job_pid"
  rc=$?
  job_pid=""
  [ $rc = 0 ] || fail "the job exited with $rc"
  grep -q "final mean_loss_last100" job.out || fail "the job did not finish training"
  echo "PASS (tls)"
  exit 0
fi

run schedule 0 "${ct[@]}" set-schedule "cosine:lr=2e-3,warmup=50,total=$steps,final=0.1" \
  --mult-1d 10 --wd 1e-4
expect_in schedule "applied at step"
run rules_dry 0 "${ct[@]}" set-rules 're:^fc1/ => adamw; * => celo2' --dry-run
expect_in rules_dry "dry run: nothing changed"
grep -q '^fc1/w .*adamw' rules_dry.out || fail "rules_dry: fc1/w should route to adamw"
run rules 0 "${ct[@]}" set-rules 're:^fc1/ => adamw; * => celo2'
expect_in rules "applied at step"
run bad_regex 1 "${ct[@]}" set-rules 're:( => adamw'
expect_in bad_regex INVALID_ARGUMENT
run bad_lr 1 "${ct[@]}" set-schedule constant:lr=nan
expect_in bad_lr INVALID_ARGUMENT
run outside_root 1 "${ct[@]}" load-weights ../celo-v1/theta.state
expect_in outside_root "outside the weights root"
if [ -f "$shared/weights/celo-v1/theta.state" ]; then
  run celo_v1 1 "${ct[@]}" load-weights --file "$shared/weights/celo-v1/theta.state"
  expect_in celo_v1 "Celo v1"
fi
if [ $have_weights = 1 ]; then
  run weights 0 "${ct[@]}" load-weights theta.state
  expect_in weights "applied at step"
  expect_in weights "$(sha256sum "$weights_root/theta.state" | cut -d' ' -f1)"
else
  echo "SKIP: $shared/weights/celo2/theta.state is absent; the weight swap is not tested"
fi
run checkpoint 0 "${ct[@]}" save-checkpoint e2e.state
[ -s ckpt/e2e.state ] || fail "no checkpoint file"
run watch 0 "${ct[@]}" watch --count 5
[ "$(grep -c '^ *[0-9]' watch.out)" = 5 ] || fail "watch: expected 5 step lines"
run status1 0 "${ct[@]}" --json status
if [ $have_python = 1 ]; then
  j() { json_get status1.out "$1"; }
  [ "$(j "j['state']")" = running ] || fail "the job should still be running"
  [ "$(j "j['world_size']")" = 2 ] || fail "world size"
  [ "$(j "j['versions']['schedule']")" = 1 ] || fail "schedule version"
  [ "$(j "j['versions']['mult_1d']")" = 1 ] || fail "mult_1d version"
  [ "$(j "j['versions']['weight_decay']")" = 1 ] || fail "weight_decay version"
  [ "$(j "j['versions']['rules']")" = 1 ] || fail "rules version (the dry run must not count)"
  [ "$(j "j['versions']['weights']")" = $have_weights ] || fail "weights version"
  [ "$(j "j['versions']['checkpoints']")" = 1 ] || fail "checkpoints version"
  # bad regex, bad lr, outside the root, and the Celo v1 file when the shared copy exists.
  want_rejected=3
  [ -f "$shared/weights/celo-v1/theta.state" ] && want_rejected=4
  [ "$(j "j['control']['rejected']")" -ge "$want_rejected" ] || fail "rejected count"
  [ "$(j "j['control']['unauthenticated']")" = 1 ] || fail "unauthenticated count"
  [ "$(j "int(j['step']) < $steps")" = True ] || fail "the commands should land mid-run"
  [ "$(j "len(j['comm']) > 0 and len(j['phases']) > 0")" = True ] || fail "no comm/phase stats"
fi

wait "$job_pid"
rc=$?
job_pid=""
[ $rc = 0 ] || fail "the job exited with $rc"
grep -q "final mean_loss_last100 [0-9]" job.out || fail "the job did not finish training"
grep "final mean_loss_last100" job.out

# Every rank applied the same changes, with the same versions, at the same steps.
for r in 0 1; do
  [ -s "applied.$r.log" ] || fail "rank $r logged no applied changes"
  sed "s/^rank $r //" "applied.$r.log" > "applied.$r.norank"
done
echo "== applied (rank 0)"
cat applied.0.log
cmp -s applied.0.norank applied.1.norank || {
  diff applied.0.norank applied.1.norank
  fail "ranks applied different changes or at different steps"
}
want=$((5 + have_weights))  # schedule, mult_1d, weight_decay, rules, checkpoint (+ weights)
[ "$(wc -l < applied.0.norank)" = $want ] || fail "expected $want applied changes"
for s in schedule mult_1d weight_decay rules checkpoint; do
  grep -q "^applied $s v1 at step [0-9]" applied.0.norank || fail "no '$s v1' line"
done
echo "PASS (plain, 2 ranks)"
