"""Builds the CUDA extension xjfast._C with CMake (CMakeLists.txt) when nvcc is available.

XJFAST_CUDA_ARCHS (default "90a;100a") selects the SASS embedded in _C; an empty value, or no
nvcc, gives the pure-Python package (reference + Triton backends). XJFAST_PTXAS_VERBOSE=1 makes
ptxas print each kernel's registers and spills. Metadata lives in pyproject.toml, but for the
version: xjfast.__version__ plus, with _C, a PEP 440 local label naming its archs (as torch's
"+cu130"), so that wheels built for different GPUs have different names: 0.1.0+sm90a.sm100a.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "90a;100a"


def find_nvcc() -> str | None:
    """nvcc from CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH, in that order."""
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [os.environ.get("CUDACXX"), cuda_home and os.path.join(cuda_home, "bin", "nvcc"),
                  "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt builds, for `archs` with `nvcc`."""

    def __init__(self, name: str, nvcc: str, archs: str):
        super().__init__(name, sources=[])
        self.nvcc, self.archs = nvcc, archs


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        verbose = os.environ.get("XJFAST_PTXAS_VERBOSE", "0") not in ("", "0")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DXJFAST_CUDA_ARCHS={ext.archs}", f"-DXJFAST_PTXAS_VERBOSE={'ON' if verbose else 'OFF'}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], check=True)


def extensions() -> list[CMakeExtension]:
    archs = os.environ.get("XJFAST_CUDA_ARCHS", DEFAULT_ARCHS).strip()
    nvcc = find_nvcc()
    if not archs or nvcc is None:
        why = ("XJFAST_CUDA_ARCHS is empty" if not archs
               else "nvcc was not found in CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH")
        print(f"xjfast: building the pure-Python package without xjfast._C ({why})", file=sys.stderr)
        return []
    return [CMakeExtension("xjfast._C", nvcc, archs)]


def version(built: list[CMakeExtension]) -> str:
    """xjfast.__version__, labelled with the archs of the _C being built: "90a;100a" -> +sm90a.sm100a."""
    base = re.search(r'^__version__ = "([^"]+)"', (ROOT / "xjfast" / "__init__.py").read_text(), re.M).group(1)
    if not built:
        return base
    archs = [a.strip() for a in built[0].archs.split(";") if a.strip()]
    # SASS per arch, as xjfast._ext.arch_runs_on reads them: 90a (that GPU only), 100f (its family), 89
    if not archs or not all(re.fullmatch(r"[0-9]+[af]?", a) for a in archs):
        raise SystemExit(f"XJFAST_CUDA_ARCHS: expected compute capabilities separated by ';', each digits with "
                         f"an optional 'a' or 'f' suffix (like \"90a;100a\"), got {built[0].archs!r}")
    return base + "+" + ".".join(f"sm{a}" for a in archs)


EXTENSIONS = extensions()


setup(
    version=version(EXTENSIONS),
    # xjfast and its subpackages, plus the top-level kernels/ and bench/ directories as
    # xjfast.kernels and xjfast.bench (what `xjfast bench` runs from an installed wheel).
    packages=find_packages(include=["xjfast", "xjfast.*"]) + ["xjfast.kernels", "xjfast.bench"],
    package_dir={"xjfast.kernels": "kernels", "xjfast.bench": "bench"},
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": CMakeBuild},
)
