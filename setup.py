"""Package discovery for sonar-llm, and the optional native library build.

Metadata lives in pyproject.toml; this file maps the kernel folder to its import name (`kernels/` installs
as `sonar_kernels`), which setuptools cannot express together with automatic discovery in pyproject.toml,
and tries the CMake build of the optional native CPU library (CMakeLists.txt, native/). That build needs
cmake, a C++17 compiler and torch importable in the build environment: with pip's default build isolation
torch is absent, so it is skipped with a message; `pip install --no-build-isolation .` (or -e .) builds it,
and `scripts/build_native.sh` builds it in place at any time. SONAR_LLM_NATIVE=0 skips it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _try_build_native(install_dir: Path) -> None:
    def skip(why: str) -> None:
        print(f"sonar-llm: native CPU library not built ({why}); the pure-Python paths are used", file=sys.stderr)

    if os.environ.get("SONAR_LLM_NATIVE", "1") == "0":
        return skip("SONAR_LLM_NATIVE=0")
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return skip("cmake or a C++ compiler is missing")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment; use --no-build-isolation "
                    "or scripts/build_native.sh")
    build_dir = ROOT / "build" / "native"
    steps = [[cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_INSTALL_PREFIX={install_dir}"],
             [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)],
             [cmake, "--install", str(build_dir)]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return skip(f"`{' '.join(cmd[:2])}` failed: {res.stderr.strip()[-500:]}")
    print(f"sonar-llm: native CPU library installed in {install_dir}", file=sys.stderr)


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            _try_build_native(ROOT / "kernels" / "_native")
        else:
            _try_build_native(Path(self.build_lib) / "sonar_kernels" / "_native")


kernel_packages = ["sonar_kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["sonar_llm", "sonar_llm.*"]) + kernel_packages,
    package_dir={"sonar_kernels": "kernels"},
    package_data={"sonar_llm": ["assets/*", "assets/**/*"]},
    cmdclass={"build_py": BuildPyWithNative},
)
