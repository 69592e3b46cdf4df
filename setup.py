"""Builds the CUDA extension xjfast._C with CMake when nvcc is available.

XJFAST_CUDA_ARCHS (default "90a;100a") selects the SASS embedded in _C; an empty value, or no
nvcc, gives the pure-Python package (reference + Triton backends).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "90a;100a"


def find_nvcc():
    for candidate in (os.environ.get("CUDACXX"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DXJFAST_CUDA_ARCHS={ext.archs}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_temp, check=True)


def extensions():
    archs = os.environ.get("XJFAST_CUDA_ARCHS", DEFAULT_ARCHS).strip()
    nvcc = find_nvcc()
    if not archs or nvcc is None:
        why = "XJFAST_CUDA_ARCHS is empty" if not archs else "nvcc was not found"
        print(f"xjfast: building the pure-Python package ({why}); no xjfast._C", file=sys.stderr)
        return []
    ext = Extension("xjfast._C", sources=[])
    ext.nvcc, ext.archs = nvcc, archs
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
