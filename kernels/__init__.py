"""sonar_kernels: fused, frozen-weight kernels for concept-level language models.

Importable on its own (depends on torch and, optionally, triton). Each op has a Triton path and a
plain-PyTorch path; `impl="auto"` picks Triton on CUDA and PyTorch elsewhere (see `backend.py`).
"""
from .backend import interpret_mode, triton_available, use_triton

__all__ = ["interpret_mode", "triton_available", "use_triton"]
