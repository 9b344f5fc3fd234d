#!/usr/bin/env bash
# Before/after measurement of the sharded engine (`celo2-bench --engine`, docs/PERF.md):
#   1. step time at W = 2 ranks, Celo2 (default) and Celo2-base, median of REPS runs each;
#   2. peak RSS per rank of --engine --engine-base at W = 1, 2, 4.
# Usage: scripts/measure_engine.sh BEFORE_BUILD_DIR AFTER_BUILD_DIR   (env: REPS=3)
# Prints a markdown report on stdout; every command line run goes to stderr ("+ ...").
# Runs are interleaved in one sitting (before/after, then after/before: ABBA) so that load
# from other jobs on this shared 2-core machine hits both builds alike.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BEFORE_BUILD_DIR AFTER_BUILD_DIR" >&2; exit 2; }
REPS=${REPS:-3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # Open MPI refuses root otherwise
# One thread per rank (OpenMP and OpenBLAS), as docs/PERF.md's W = 2 runs: W = 2 is then
# exactly 2 cores of work; W = 4 is oversubscribed (memory is what W = 4 is run for).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# /usr/bin/time (not the shell keyword) reports each rank's peak RSS (%M, KiB).
[ -x /usr/bin/time ] || apt-get install -y -q time >&2

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# Snapshot both binaries first: the build dirs may be rebuilt by others mid-sitting, and every
# run of one side must time the same bits (celo2 libraries are linked statically).
declare -A src=([before]=$1 [after]=$2)
for side in before after; do
  dir=${src[$side]}
  cp "$dir/bench/celo2-bench" "$tmp/$side"
  "$tmp/$side" --help >/dev/null   # fails loudly if we copied a half-linked file
  echo "- $side: \`$dir/bench/celo2-bench\` ($(date -r "$dir/bench/celo2-bench" '+%F %T'), sha256 $(sha256sum "$tmp/$side" | cut -c1-12))"
done
# Exact parameter count of the bench's default model: gpt_tensors(L = 8, d = 512, ffn = 4d,
# vocab 50257, context 1024) in server/src/engine/comm_model.cc (the bench prints only "51.5 M").
L=8 d=512 f=2048
N=$(( 50257*d + 1024*d + L*(4*d*d + 2*d*f + 9*d + f) + 2*d ))   # = 51,475,968
Nm=$(awk -v N="$N" 'BEGIN {printf "%.1f", N/1e6}')   # as the bench prints it, checked in run()

# run SIDE W TAG [bench args...]: one mpirun; its log is $tmp/TAG.SIDE (rank 0's report plus one
# "rank-rss-kb" line per rank). --bind-to none: Open MPI would otherwise pin ranks to cores,
# which fails or serialises when oversubscribed; --oversubscribe allows W > 2 on 2 cores.
run() {
  local side=$1 W=$2 tag=$3; shift 3
  local cmd=(mpirun -np "$W" --oversubscribe --bind-to none -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS
             /usr/bin/time -f "rank-rss-kb %M" "$tmp/$side" --engine "$@")
  # Log the command as it can be pasted (the snapshot shown as the binary it was copied from).
  printf '%q ' "${cmd[@]}" | sed "s#$tmp/$side#${src[$side]}/bench/celo2-bench#; s/^/+ /; s/ \$//" >&2; echo >&2
  "${cmd[@]}" >"$tmp/$tag.$side" 2>&1 || { cat "$tmp/$tag.$side" >&2; exit 1; }
  grep -q "$Nm M parameters, W = $W, median step" "$tmp/$tag.$side"   # report printed, model as assumed
}
step_of() { sed -n 's/.*median step \([0-9.]*\) s.*/\1/p' "$1"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Side order of round i: odd rounds before-after, even rounds after-before (ABBA).
sides() { if [ $(($1 % 2)) = 1 ]; then echo before after; else echo after before; fi; }

start=$SECONDS
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. Step time at W = 2 (the docs' 2-rank case, one rank per core), REPS runs per side.
declare -A runs
for i in $(seq "$REPS"); do
  for c in celo2 celo2-base; do
    args=(); [ "$c" = celo2-base ] && args=(--engine-base)
    for side in $(sides "$i"); do
      run "$side" 2 "t.$c.$i" "${args[@]}"
      runs[$c.$side]+="$(step_of "$tmp/t.$c.$i.$side") "
    done
  done
done

# 2. Peak RSS per rank, --engine-base (no Newton–Schulz: quicker, and the engine's buffers
# are what is measured), W = 1, 2, 4; one run each (RSS barely varies between runs).
for W in 1 2 4; do
  for side in $(sides "$W"); do run "$side" "$W" "m.$W" --engine-base; done
done

echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg); wall time $((SECONDS - start)) s"
echo
echo "### Engine step at W = 2 (median of $REPS runs; each run = median of 3 timed steps)"
echo
echo "| case | before, s | after, s | after/before | before runs | after runs |"
echo "|---|---|---|---|---|---|"
for c in celo2 celo2-base; do
  b=$(tr ' ' '\n' <<<"${runs[$c.before]}" | grep . | median)
  a=$(tr ' ' '\n' <<<"${runs[$c.after]}" | grep . | median)
  awk -v c="$c" -v b="$b" -v a="$a" -v rb="${runs[$c.before]% }" -v ra="${runs[$c.after]% }" \
    'BEGIN {printf "| %s | %.3f | %.3f | %.2f | %s | %s |\n", c, b, a, a/b, rb, ra}'
done
echo
echo "### Peak RSS per rank, --engine --engine-base, $N parameters (MB = 10^6 B)"
echo
echo "| W | before max / mean MB | after max / mean MB | after/before (max) | before B/param/rank (max) | after B/param/rank (max) | step s before / after (1 run) |"
echo "|---|---|---|---|---|---|---|"
# rss W SIDE -> "max mean" per-rank peak RSS in MB (%M is in KiB)
rss() { awk '/^rank-rss-kb/ {s+=$2; n++; if ($2>m) m=$2} END {printf "%.2f %.2f", m*1024/1e6, s/n*1024/1e6}' "$tmp/m.$1.$2"; }
for W in 1 2 4; do
  read -r bmax bmean <<<"$(rss "$W" before)"; read -r amax amean <<<"$(rss "$W" after)"
  awk -v W="$W" -v N="$N" -v bm="$bmax" -v bn="$bmean" -v am="$amax" -v an="$amean" \
      -v bs="$(step_of "$tmp/m.$W.before")" -v as="$(step_of "$tmp/m.$W.after")" \
    'BEGIN {printf "| %d | %.0f / %.0f | %.0f / %.0f | %.2f | %.1f | %.1f | %.2f / %.2f |\n",
            W, bm, bn, am, an, am/bm, bm*1e6/N, am*1e6/N, bs, as}'
done
