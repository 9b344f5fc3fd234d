#!/usr/bin/env bash
# Builds tests/fuzz/theta_fuzz.cc with clang's libFuzzer, ASan and UBSan directly from the
# sources (no CMake) and runs it on a seed corpus of the golden theta-bearing files.
#   tests/fuzz/run_fuzz.sh [SECONDS=30] [WORKDIR=${TMPDIR:-/tmp}/celo2-fuzz]
# Crashing inputs land in WORKDIR/artifacts/; the corpus in WORKDIR/corpus/ grows between
# runs. Extra libFuzzer flags can be passed in FUZZ_FLAGS. Needs clang++ with
# libclang-rt-*-dev, libmsgpack-dev and libssl-dev.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
seconds=${1:-30}
work=${2:-${TMPDIR:-/tmp}/celo2-fuzz}
cxx=${CXX_FUZZ:-clang++}

mkdir -p "$work/corpus" "$work/artifacts"
echo "building $work/theta_fuzz with $cxx"
"$cxx" -std=c++20 -O1 -g -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root/server/include" -I"$root/kernels/include" \
  "$here/theta_fuzz.cc" "$root/server/src/io/flax_msgpack.cc" "$root/server/src/io/theta_io.cc" \
  "$root/kernels/src/config.cc" "$root/kernels/src/project_theta.cc" \
  "$root/kernels/src/project_theta_base.cc" -lmsgpackc -lcrypto -o "$work/theta_fuzz"

# Seeds: the golden theta and the smaller golden rule files (each holds a config and a theta).
install -m 0644 "$root/tests/golden/theta_random.state" "$root"/tests/golden/rule_variant_*.msgpack \
  "$root/tests/golden/rule_edge_values.msgpack" "$work/corpus/"

# The inputs are small (seeds <= 16 KB); -max_len keeps whole files mutable.
# shellcheck disable=SC2086
exec "$work/theta_fuzz" -max_total_time="$seconds" -max_len=32768 -timeout=10 \
  -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/artifacts/" \
  ${FUZZ_FLAGS:-} "$work/corpus"
