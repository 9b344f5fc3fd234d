"""Which OpenBLAS the Python module runs on (docs/OPERATIONS.md, "BLAS").

The build links OpenBLAS's OpenMP build by path (CELO2_BLAS=auto). The dynamic loader keeps one
object per soname per process, so a process that loaded the system's default OpenBLAS first
(Debian's python3-torch links libopenblas.so.0) shares that one with celo2. These tests check
both cases in fresh interpreters: celo2 alone loads the build's choice, and whatever was
loaded, celo2.blas_threading() names the pool of the library actually mapped.
"""
import os
import subprocess
import sys

import pytest

import celo2

PROBE = r"""
import sys
if sys.argv[1] == "torch-first":
    import torch  # noqa: F401
import celo2
maps = [l.split()[-1] for l in open("/proc/self/maps") if "libopenblas" in l]
dirs = sorted({m.rsplit("/", 2)[-2] for m in maps})
print(celo2.blas_threading(), ",".join(dirs))
"""


def _probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    pool, dirs = out.stdout.split()
    return pool, dirs.split(",")


def _build_linked_openmp():
    build = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(celo2.__file__))))
    env = os.path.join(build, "celo2-build.env")  # the build's choices (CMakeLists.txt)
    if not os.path.exists(env):
        return None  # an installed package: the build's choice is not known here
    with open(env) as f:
        return any(l.startswith("CELO2_OPENBLAS_OPENMP=/") for l in f)


def test_alone_it_loads_the_builds_blas():
    pool, dirs = _probe("alone")
    assert pool in ("openmp", "pthread", "sequential")
    linked = _build_linked_openmp()
    if linked is None:
        pytest.skip("not a build tree")
    if linked and "LD_LIBRARY_PATH" not in os.environ:
        assert pool == "openmp" and dirs == ["openblas-openmp"], (pool, dirs)


def test_blas_threading_names_the_library_actually_mapped():
    pytest.importorskip("torch")
    pool, dirs = _probe("torch-first")
    # One libopenblas per process, whichever came first; the reported pool is its pool.
    assert len(dirs) == 1, dirs
    expected = {"openblas-openmp": "openmp", "openblas-pthread": "pthread"}.get(dirs[0])
    if expected is None:
        pytest.skip(f"OpenBLAS from {dirs[0]}: pool not known from its directory")
    assert pool == expected, (pool, dirs)
