#!/usr/bin/env bash
# Downloads (apt-get download, no install) the Debian packages the CELO2_CORE_ONLY build
# needs beyond CUDA/CMake/a compiler into .gpu-deps/ (git-ignored locally: add "/.gpu-deps/"
# to .git/info/exclude), for a GPU machine that cannot reach a package registry; run.sh
# unpacks them there. Carry .gpu-deps with the device call.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$here/.gpu-deps"
cd "$here/.gpu-deps"
pkgs=(libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev libmsgpack-dev libmsgpackc2
      libre2-dev libre2-9 libcli11-dev nlohmann-json3-dev libgtest-dev libssl-dev
      libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libpmix2 libhwloc15 libevent-core-2.1-7
      libevent-pthreads-2.1-7 libfabric1 libucx0 libpsm2-2 libibverbs1 librdmacm1 libnl-3-200
      libnl-route-3-200 libgfortran5 pkgconf pkgconf-bin libpkgconf3)
apt-get download "${pkgs[@]}"
du -sh .
