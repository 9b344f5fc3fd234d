#!/usr/bin/env bash
# Launch a data-parallel celo2-train job with the sharded engine under Open MPI.
#   deploy/mpirun/run.sh [-n RANKS] [-H HOSTFILE] [-- celo2-train args...]
# On one machine: deploy/mpirun/run.sh -n 2 -- --steps 1000 --eval
# On several: list the hosts in a hostfile ("node1 slots=8" per line) and pass -H.
# As root, Open MPI needs --allow-run-as-root; --oversubscribe allows more ranks than cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ranks=2
hostfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) ranks="$2"; shift 2 ;;
    -H) hostfile="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
args=(--oversubscribe --bind-to none -np "$ranks" -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
      -x CELO2_COMM_TIMEOUT_S="${CELO2_COMM_TIMEOUT_S:-600}")
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
[ -n "$hostfile" ] && args+=(--hostfile "$hostfile")
exec mpirun "${args[@]}" "${BUILD_DIR:-$here/build}/client/celo2-train" "$@"
