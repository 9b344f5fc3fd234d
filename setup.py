"""pip's build of the Python package `celo2` from the source tree.

The pure-Python modules come from client/python/celo2/; the extension celo2._celo2 is built
by this project's CMake (target `_celo2` only: the kernels, engine, control plane and client
libraries it links statically, plus the module itself), then copied into the wheel.

    python3 -m venv --system-site-packages .venv      # Debian's torch/numpy stay visible
    .venv/bin/pip install --no-build-isolation --no-index ./

Environment (all optional):
  JOBS=N                parallel compile jobs (default: the number of CPUs)
  CMAKE_ARGS="..."      extra CMake options, e.g. "-DCELO2_CUDA=AUTO -DCELO2_NATIVE=OFF"
                        (defaults here: Release, CELO2_TESTS=OFF, CELO2_CUDA=OFF)
  CELO2_CMAKE_BUILD_DIR where CMake builds (default build/pip/cmake in the source tree; kept,
                        so a second `pip install` only recompiles what changed)
  CELO2_PREBUILT_DIR    an existing, configured CMake build tree of this source for the
                        same Python: nothing is configured, `cmake --build DIR --target _celo2`
                        brings the extension up to date there (a no-op when it is) and the
                        wheel takes it from DIR/python/celo2/
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
BUILD_BASE = Path("build") / "pip"          # relative to HERE (pip builds in the tree)


def project_version() -> str:
    text = (HERE / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*celo2\s+VERSION\s+([0-9][0-9.]*)", text)
    if not m:
        raise RuntimeError("celo2: no `project(celo2 VERSION x.y.z)` in CMakeLists.txt")
    return m.group(1)


def run(cmd, **kw):
    print("celo2 setup.py: " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only places the result."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("celo2: building the extension needs cmake (Debian: apt-get "
                               "install cmake; scripts/setup.sh installs every dependency)")
        jobs = os.environ.get("JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") \
            or str(os.cpu_count() or 1)
        prebuilt = os.environ.get("CELO2_PREBUILT_DIR")
        if prebuilt:
            build_dir = Path(prebuilt).resolve()
            if not (build_dir / "CMakeCache.txt").is_file():
                raise RuntimeError(f"celo2: CELO2_PREBUILT_DIR={prebuilt} is not a configured "
                                   "CMake build tree (no CMakeCache.txt)")
        else:
            build_dir = Path(os.environ.get("CELO2_CMAKE_BUILD_DIR")
                             or HERE / BUILD_BASE / "cmake").resolve()
            build_dir.mkdir(parents=True, exist_ok=True)
            args = [
                "-DCMAKE_BUILD_TYPE=Release",
                "-DCELO2_TESTS=OFF",
                "-DCELO2_CUDA=OFF",
                # The interpreter running pip (a venv's python is fine): the module's ABI tag
                # and headers come from it.
                f"-DPython3_EXECUTABLE={sys.executable}",
            ]
            args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
            run([cmake, "-S", HERE, "-B", build_dir] + args)
        run([cmake, "--build", build_dir, "--target", ext.target, "-j", jobs])

        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = build_dir / "python" / "celo2" / f"_celo2{suffix}"
        if not built.is_file():
            found = sorted(p.name for p in (build_dir / "python" / "celo2").glob("_celo2*"))
            raise RuntimeError(
                f"celo2: {built} was not built (found: {found or 'nothing'}). The build tree "
                f"must be configured for this Python ({sys.version.split()[0]}, suffix {suffix}), "
                "and CMake must find python3-dev and pybind11-dev (see its configure output).")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)
        print(f"celo2 setup.py: {built} -> {dest}", flush=True)


os.makedirs(HERE / BUILD_BASE, exist_ok=True)
setup(
    version=project_version(),
    packages=["celo2"],
    package_dir={"celo2": "client/python/celo2"},
    ext_modules=[CMakeExtension("celo2._celo2", target="_celo2")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    # setuptools' own scratch space under build/pip, beside (not inside) a CMake build in build/.
    options={
        "build": {"build_base": str(BUILD_BASE)},
        "egg_info": {"egg_base": str(BUILD_BASE)},
    },
)
