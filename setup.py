"""Package discovery for sonar-llm: `kernels/` installs as `sonar_kernels`, `sonar_llm/` as itself.

Metadata lives in pyproject.toml; this file only maps the kernel folder to its import name, which
setuptools cannot express together with automatic discovery in pyproject.toml alone.
"""
from setuptools import find_packages, setup

kernel_packages = ["sonar_kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["sonar_llm", "sonar_llm.*"]) + kernel_packages,
    package_dir={"sonar_kernels": "kernels"},
    package_data={"sonar_llm": ["assets/*", "assets/**/*"]},
)
