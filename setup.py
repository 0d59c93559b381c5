"""Package discovery for sonar-llm, and the optional native library build.

Metadata lives in pyproject.toml; this file maps the kernel folder to its import name (`kernels/` and `train/`
are source roots holding `sonar_kernels` and `sonar_train`), which setuptools cannot express together with automatic discovery in pyproject.toml,
and tries the CMake build of the optional native CPU library (CMakeLists.txt, native/) with the
steps of kernels/sonar_kernels/native_build.py (loaded by path: the one copy of them). That build needs cmake, a C++
compiler (C++20 for torch >= 2.14) and torch importable in the build environment: with pip's default build
isolation torch is absent, so it is skipped with a message; `pip install --no-build-isolation .` (or -e .)
builds it, and `scripts/build_native.sh` builds it in place at any time. SONAR_LLM_NATIVE=0 skips it.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _native_build_module():
    """kernels/sonar_kernels/native_build.py loaded by path (the package is not importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("_sonar_native_build", ROOT / "kernels" / "sonar_kernels" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try_build_native(install_dir: Path) -> None:
    def skip(why: str) -> None:
        print(f"sonar-llm: native CPU library not built ({why}); the pure-Python paths are used", file=sys.stderr)

    if os.environ.get("SONAR_LLM_NATIVE", "1") == "0":
        return skip("SONAR_LLM_NATIVE=0")
    if shutil.which("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return skip("cmake or a C++ compiler is missing")
    try:
        import torch  # noqa: F401
    except ImportError:
        return skip("torch is not importable in the build environment; use --no-build-isolation "
                    "or scripts/build_native.sh")
    try:
        path = _native_build_module().run_build(install_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        return skip(str(exc)[-800:])
    print(f"sonar-llm: native CPU library installed as {path}", file=sys.stderr)


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            _try_build_native(ROOT / "kernels" / "sonar_kernels" / "_native")
        else:
            _try_build_native(Path(self.build_lib) / "sonar_kernels" / "_native")


# kernels/ and train/ are source roots: neither folder is itself a package, so `import kernels` (a PyPI
# distribution that transformers imports) or `import train` from the checkout never resolves to them.
setup(
    packages=(find_packages(include=["sonar_llm", "sonar_llm.*"])
              + find_packages("kernels", include=["sonar_kernels", "sonar_kernels.*"])
              + find_packages("train", include=["sonar_train", "sonar_train.*"])),
    package_dir={"sonar_kernels": "kernels/sonar_kernels", "sonar_train": "train/sonar_train"},
    package_data={"sonar_llm": ["assets/*", "assets/**/*"]},
    cmdclass={"build_py": BuildPyWithNative},
)
