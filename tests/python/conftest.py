"""pytest setup for the Python client: finds the built package and the test data.

CTest runs these with PYTHONPATH=<build>/python (see tests/CMakeLists.txt). By hand:
    PYTHONPATH=build/python /usr/bin/python3 -m pytest -q tests/python
"""
import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
SHARED_DIR = os.path.join(os.path.dirname(REPO), "shared")

if "CELO2_PYTHONPATH" in os.environ:
    sys.path.insert(0, os.environ["CELO2_PYTHONPATH"])

os.environ.setdefault("OMP_NUM_THREADS", "1")


def mpirun_command(np_: int):
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        return None
    cmd = [exe, "-np", str(np_), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


@pytest.fixture
def golden_dir():
    return GOLDEN_DIR


@pytest.fixture
def shared_dir():
    return SHARED_DIR
