"""SonarNormalizer: per-dimension centring and scaling of SONAR embeddings (the LCM's robust scaler).

normalize(x) = (x - center) / scale, denormalize(y) = y * scale + center, with persistent fp32
buffers `center` and `scale` (names as in LCM checkpoints: `frontend.sonar_normalizer.{center,scale}`).

`fit(embeddings, method="gaussian_robust", quantile_quirk=True)`: center = per-dimension median; scale =
an inter-quantile range divided by the same range of a standard normal,
    scale = (Q(q_hi) - Q(q_lo)) / (Phi^-1(q_hi) - Phi^-1(q_lo)),
so scale estimates the standard deviation of Gaussian data robustly.

Default (`quantile_quirk=True`) = Meta's fit: `lcm/models/sonar_normalizer/builder.py`,
`SonarNormalizer.fit` calls scikit-learn's `RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75))`
with `SonarNormalizerConfig.quantile_min/max = 0.25/0.75`, and RobustScaler reads the range in *percent*:
(q_lo, q_hi) = (0.25%, 0.75%), the far lower tail, and the normal range Phi^-1(0.0075) - Phi^-1(0.0025).
As RobustScaler does, a near-zero range (< 10 x float32 eps, Meta fits float32 data) is replaced by 1
*before* the division by the normal range. `quantile_quirk=False` (an option, not Meta's) uses the true
interquartile range (q_lo, q_hi) = (0.25, 0.75) and replaces a zero scale by 1 after the division.
Quantiles interpolate linearly (numpy/sklearn's default), computed in float64. Other methods: "robust"
(the range without the Gaussian factor, sklearn's `unit_variance=False`) and "standard" (mean,
population std).
"""
from __future__ import annotations

import os
from statistics import NormalDist

import torch
from torch import Tensor, nn

__all__ = ["SonarNormalizer", "column_quantiles", "sonar_dim_from_state"]

METHODS = ("gaussian_robust", "robust", "standard")


def column_quantiles(x: Tensor, qs: list[float], chunk_cols: int = 64) -> Tensor:
    """Per-column quantiles of x[N,E] with linear interpolation (numpy's default), computed in fp64
    a few columns at a time (torch.quantile refuses large inputs). Returns [len(qs), E]."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"column_quantiles expects a non-empty [N, E] tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    out = torch.empty(len(qs), x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[1], chunk_cols):
        cols = x[:, start : start + chunk_cols].to(torch.float64).sort(dim=0).values
        for i, q in enumerate(qs):
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q}")
            pos = q * (n - 1)
            lo = int(pos)
            hi = min(lo + 1, n - 1)
            frac = pos - lo
            out[i, start : start + cols.shape[1]] = (cols[lo] + (cols[hi] - cols[lo]) * frac).cpu()
    return out


class SonarNormalizer(nn.Module):
    """Per-dimension (x - center) / scale with fp32 buffers that stay fp32 under `model.to(dtype)`."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"SonarNormalizer dim must be positive, got {dim}")
        self.dim = dim
        self.register_buffer("center", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # keep the statistics in fp32 when the model is cast
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _check(self, x: Tensor, what: str) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"SonarNormalizer.{what}: last dimension must be {self.dim}, got shape {tuple(x.shape)}")

    def normalize(self, x: Tensor) -> Tensor:
        """(x - center) / scale, computed in fp32 (fp64 for fp64 input), returned in x's dtype."""
        self._check(x, "normalize")
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ((x.to(dt) - self.center.to(dt)) / self.scale.to(dt)).to(x.dtype)

    def denormalize(self, y: Tensor) -> Tensor:
        """y * scale + center, the inverse of `normalize`."""
        self._check(y, "denormalize")
        dt = torch.float64 if y.dtype == torch.float64 else torch.float32
        return (y.to(dt) * self.scale.to(dt) + self.center.to(dt)).to(y.dtype)

    forward = normalize

    @torch.no_grad()
    def fit(
        self, embeddings: Tensor, method: str = "gaussian_robust", quantile_quirk: bool = True
    ) -> "SonarNormalizer":
        """Set `center` and `scale` from embeddings[N, dim] (see the module docstring). Returns self."""
        if method not in METHODS:
            raise ValueError(f"SonarNormalizer.fit method must be one of {METHODS}, got {method!r}")
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(f"SonarNormalizer.fit expects embeddings[N, {self.dim}], got {shape}")
        if embeddings.shape[0] < 2:
            raise ValueError(f"SonarNormalizer.fit needs at least 2 embeddings, got {embeddings.shape[0]}")
        if not embeddings.is_floating_point():
            raise TypeError(f"SonarNormalizer.fit expects floating-point embeddings, got {embeddings.dtype}")
        if method == "standard":
            x = embeddings.to(torch.float64)
            center, scale = x.mean(0), x.std(0, unbiased=False)
        else:
            # Meta passes quantile_range=(0.25, 0.75) to RobustScaler, which reads it in percent
            q_lo, q_hi = (0.0025, 0.0075) if quantile_quirk else (0.25, 0.75)
            median, lo, hi = column_quantiles(embeddings, [0.5, q_lo, q_hi])
            center, scale = median, hi - lo
            if quantile_quirk:  # sklearn's _handle_zeros_in_scale, before the unit-variance division
                scale = torch.where(scale < 10 * torch.finfo(torch.float32).eps, torch.ones_like(scale), scale)
            if method == "gaussian_robust":
                normal = NormalDist()
                scale = scale / (normal.inv_cdf(q_hi) - normal.inv_cdf(q_lo))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        self.center.copy_(center.to(self.center))
        self.scale.copy_(scale.to(self.scale))
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SonarNormalizer":
        """Load an LCM normalizer file ({"model": {"center", "scale"}} or a flat dict of the two)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"normalizer file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        if not isinstance(state, dict) or not {"center", "scale"} <= set(state):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path}: expected keys 'center' and 'scale', got {keys}")
        norm = cls(int(state["center"].numel()))
        norm.load_state_dict({"center": state["center"], "scale": state["scale"]})
        return norm

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def sonar_dim_from_state(state: dict[str, Tensor]) -> dict[str, int]:
    """`sonar_dim` of a trained model with a SonarNormalizer: the length of its `normalizer.center`
    (training inferred the width from its data; the normalizer holds it too)."""
    centers = [v for k, v in state.items() if k.endswith("normalizer.center")]
    if not centers:
        raise ValueError("state has no normalizer center to read the SONAR width from")
    return {"sonar_dim": int(centers[0].numel())}
