"""The CMake build of the optional native CPU library: the one place its configure/build/install steps live.

Used by `python -m sonar_kernels.native build` (and scripts/build_native.sh) and by setup.py, which loads
this file by path (it imports nothing from the package and no torch at import time, so it works before
the package is installed). The CMakeLists.txt at the checkout root reads torch's files itself (see there
why it does not call find_package(Torch)); this module only passes where torch lives and its C++ ABI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout: CMakeLists.txt and native/ live here
LIBRARY_NAME = "libsonar_native.so"


def cmake_steps(install_dir: Path, build_dir: Path | None = None, jobs: int | None = None,
                generator: str | None = None) -> list[list[str]]:
    """The three commands (configure, build, install) for the torch importable here.

    Raises FileNotFoundError when cmake or the source checkout is missing, ImportError without torch."""
    import torch  # the torch the library will run with: its headers, libraries and ABI

    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake not found on PATH (need cmake >= 3.25 to build the native library)")
    lists = SOURCE_ROOT / "CMakeLists.txt"
    if not lists.is_file():
        raise FileNotFoundError(f"{lists} not found: the native build needs a source checkout")
    build_dir = Path(build_dir) if build_dir else SOURCE_ROOT / "build" / "native"
    if generator is None and shutil.which("ninja"):
        generator = "Ninja"
    configure = [cmake, "-S", str(SOURCE_ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_INSTALL_PREFIX={install_dir}",
                 f"-DSONAR_TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    if generator:
        configure += ["-G", generator]
    return [configure,
            [cmake, "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 1)],
            [cmake, "--install", str(build_dir)]]


def run_build(install_dir: Path, build_dir: Path | None = None, jobs: int | None = None,
              generator: str | None = None, verbose: bool = False) -> Path:
    """Configure, build and install the library into `install_dir`; returns the installed library's path.

    Raises RuntimeError naming the failing step (with the end of its error output)."""
    Path(build_dir or SOURCE_ROOT / "build" / "native").mkdir(parents=True, exist_ok=True)
    for cmd in cmake_steps(Path(install_dir), build_dir, jobs, generator):
        res = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE,
                             stderr=None if verbose else subprocess.STDOUT, text=True)
        if res.returncode != 0:
            detail = "" if verbose else f"\n{(res.stdout or '')[-4000:]}"
            raise RuntimeError(f"native build step failed ({' '.join(cmd)}){detail}")
    path = Path(install_dir) / LIBRARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the build finished but {path} is missing")
    return path
