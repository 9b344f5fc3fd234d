#!/usr/bin/env bash
# libcelo2.so exports the C ABI only: every defined dynamic symbol is celo2_* (or the
# version node CELO2_1 itself), and every function declared in celo2.h is there.
set -euo pipefail
lib="$1" header="$2"
bad=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v -E '^(celo2_[a-z0-9_]+|CELO2_1)(@@CELO2_1)?$' || true)
if [ -n "$bad" ]; then echo "unexpected exported symbols:"; echo "$bad"; exit 1; fi
missing=0
for f in $(grep -oE '^CELO2_API (celo2_status_t|const char\*) celo2_[a-z_]+' "$header" | awk '{print $NF}'); do
  nm -D --defined-only "$lib" | grep -q " $f\(@@CELO2_1\)\?$" || { echo "missing: $f"; missing=1; }
done
n=$(nm -D --defined-only "$lib" | grep -c ' celo2_' || true)
echo "libcelo2.so exports $n celo2_* symbols, nothing else"
exit $missing
