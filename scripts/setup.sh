#!/usr/bin/env bash
# Installs every dependency from Debian's packages (idempotent; apt-get as root) and
# configures + builds celo2 into ${BUILD_DIR:-build}. Called by the README's commands.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$here/build}"
BUILD_TYPE="${BUILD_TYPE:-Release}"

packages=(
  build-essential cmake pkg-config git
  libopenblas-dev libmsgpack-dev libre2-dev libcli11-dev nlohmann-json3-dev zlib1g-dev libssl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin
  libmicrohttpd-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  pybind11-dev python3-dev python3-pytest python3-numpy python3-msgpack
  python3-pip python3-setuptools python3-wheel python3-venv
  python3-torch python3-matplotlib fortunes
  dataset-fashion-mnist python3-sklearn openssl
  slurm-wlm slurm-wlm-basic-plugins munge libpmix-dev curl python3-yaml
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
apt_install() { $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  apt_install "${missing[@]}"
fi

# Optional: OpenBLAS's OpenMP build, so that BLAS and the rule share one thread pool
# (CMakeLists.txt, CELO2_BLAS). Without it the build takes the default OpenBLAS.
optional=(libopenblas0-openmp)
for p in "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
  if ! apt_install "$p" 2>/dev/null && ! { $SUDO apt-get update -qq >/dev/null 2>&1 && apt_install "$p" 2>/dev/null; }; then
    echo "setup: optional $p not installed; BLAS keeps its own thread pool" >&2
  fi
done

jobs="${JOBS:-$(nproc)}"
cmake -S "$here" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$jobs"
