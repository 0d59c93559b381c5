"""Tests for sonar_llm.models.normalizer.SonarNormalizer: robust fit (IQR and the LCM percent quirk)
against numpy percentiles and statistics.NormalDist, round trips, fp32 buffers, file loading."""
from statistics import NormalDist

import numpy as np
import pytest
import torch

from sonar_llm.models.normalizer import SonarNormalizer, column_quantiles


def test_column_quantiles_match_numpy():
    torch.manual_seed(0)
    x = torch.randn(101, 7) * torch.rand(7) * 3 + torch.randn(7)
    qs = [0.0, 0.0025, 0.25, 0.5, 0.75, 1.0]
    got = column_quantiles(x, qs, chunk_cols=3)
    want = np.quantile(x.double().numpy(), qs, axis=0)  # numpy's default "linear" method
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("quirk", [False, True])
def test_gaussian_robust_fit_closed_form(quirk):
    torch.manual_seed(1)
    x = torch.randn(400, 16, dtype=torch.float64) * 0.006 + torch.randn(16, dtype=torch.float64) * 0.01
    norm = SonarNormalizer(16).fit(x, quantile_quirk=quirk)
    arr = x.numpy()
    lo, hi = (0.25, 0.75) if quirk else (25.0, 75.0)  # sklearn's percent-based quantile_range
    q_lo, q_hi = np.percentile(arr, [lo, hi], axis=0)
    nd = NormalDist()
    factor = nd.inv_cdf(hi / 100) - nd.inv_cdf(lo / 100)
    np.testing.assert_allclose(norm.center.numpy(), np.median(arr, axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(norm.scale.numpy(), (q_hi - q_lo) / factor, rtol=1e-6)
    if quirk:
        assert factor == pytest.approx(0.37466, abs=1e-4)  # Phi^-1(.0075) - Phi^-1(.0025)
    else:
        assert factor == pytest.approx(1.34898, abs=1e-4)  # the normal IQR


def test_gaussian_robust_recovers_gaussian_std():
    torch.manual_seed(2)
    mean, std = torch.randn(8) * 0.01, torch.rand(8) * 0.01 + 0.002
    x = torch.randn(200_000, 8) * std + mean
    norm = SonarNormalizer(8).fit(x, quantile_quirk=False)  # the true-IQR option
    torch.testing.assert_close(norm.center, mean, rtol=0, atol=float(std.max()) * 0.02)
    torch.testing.assert_close(norm.scale, std, rtol=0.02, atol=0)
    # The quirk estimates from the far lower tail: noisier, but still near std for Gaussian data.
    quirky = SonarNormalizer(8).fit(x, quantile_quirk=True)
    torch.testing.assert_close(quirky.scale, std, rtol=0.25, atol=0)
    normalized = norm.normalize(x)
    assert normalized.std(0).sub(1).abs().max() < 0.03


def test_standard_and_robust_methods():
    torch.manual_seed(3)
    x = torch.randn(50, 4, dtype=torch.float64)
    std = SonarNormalizer(4).fit(x, method="standard")
    torch.testing.assert_close(std.center.double(), x.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(std.scale.double(), x.std(0, unbiased=False), rtol=1e-6, atol=0)
    rob = SonarNormalizer(4).fit(x, method="robust", quantile_quirk=False)  # the true-IQR option
    q = np.percentile(x.numpy(), [25, 75], axis=0)
    np.testing.assert_allclose(rob.scale.numpy(), q[1] - q[0], rtol=1e-6)


def test_zero_scale_replaced_by_one_and_round_trip():
    x = torch.randn(30, 3, dtype=torch.float64)
    x[:, 1] = 0.5  # constant dimension
    norm = SonarNormalizer(3).fit(x, quantile_quirk=False)  # the true-IQR option: zero scale -> 1
    assert norm.scale[1].item() == 1.0 and norm.center[1].item() == 0.5
    y = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        norm.normalize(y), (y - norm.center.double()) / norm.scale.double(), rtol=1e-12, atol=1e-12
    )


def test_buffers_stay_fp32_and_persist(tmp_path):
    norm = SonarNormalizer(4).fit(torch.randn(20, 4))
    model = torch.nn.Sequential(norm).to(torch.bfloat16)
    assert model[0].center.dtype == torch.float32 and model[0].scale.dtype == torch.float32
    assert set(norm.state_dict()) == {"center", "scale"}
    out = norm.normalize(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    path = tmp_path / "normalizer.pt"
    torch.save({"model": norm.state_dict()}, path)
    loaded = SonarNormalizer.from_file(path)
    assert torch.equal(loaded.center, norm.center) and torch.equal(loaded.scale, norm.scale)


def test_errors():
    norm = SonarNormalizer(4)
    with pytest.raises(ValueError, match="method"):
        norm.fit(torch.randn(5, 4), method="minmax")
    with pytest.raises(ValueError, match="embeddings\\[N, 4\\]"):
        norm.fit(torch.randn(5, 3))
    with pytest.raises(ValueError, match="last dimension"):
        norm.normalize(torch.randn(2, 5))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        SonarNormalizer.from_file("/nonexistent/nope.pt")
