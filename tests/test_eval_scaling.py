"""Scaling fits (`sonar_llm.eval.scaling`): L(N) = E + A * N^-alpha recovered from synthetic points.

Points are drawn from known (E, A, alpha) with a small seeded multiplicative noise; the fitted exponent must
be within 0.02 of the truth and its 95% interval (the fit's covariance, Student t) must cover it. Exact
points (no noise) are recovered to 1e-6 (4 points), an exact 3-point fit has no interval, and the command
writes the fit and the plot, or one line on bad input.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scipy")

from sonar_llm.eval.scaling import fit_families, fit_power_law, main, power_law  # noqa: E402


def _points(e, alpha, n=12, noise=1e-4, seed=0):
    big_n = np.geomspace(1e6, 1e9, n)
    a = 2.0 * e * big_n[0] ** alpha  # the power term is 2E at the smallest N
    clean = power_law(big_n, e, a, alpha)
    return big_n, clean * (1.0 + noise * np.random.default_rng(seed).standard_normal(n)), a


@pytest.mark.parametrize("e, alpha", [(1.7, 0.3), (2.2, 0.5), (0.9, 0.57), (3.0, 0.79)])
def test_recovers_known_exponents_with_covering_interval(e, alpha):
    """Seed 0: within 0.02 and covered. Over 40 seeds every estimate is within 0.02 and the 95% interval covers
    the truth in >= 75% of the draws: the covariance (Wald) interval of a 3-parameter nonlinear fit on 12 points
    under-covers a little (measured: 88-90% over 200 draws of each case here); see the module docstring of
    sonar_llm.eval.scaling."""
    covered = 0
    for seed in range(40):
        big_n, loss, a = _points(e, alpha, noise=3e-4, seed=seed)
        fit = fit_power_law(big_n, loss)
        assert abs(fit["alpha"] - alpha) < 0.02, seed
        lo, hi = fit["ci"]["alpha"]
        covered += lo <= alpha <= hi
        if seed == 0:
            assert lo <= alpha <= hi and hi - lo < 0.2
            assert fit["E"] == pytest.approx(e, rel=0.02) and fit["num_points"] == 12
    assert covered >= 30


def test_exact_points_and_three_point_fit():
    big_n, loss, a = _points(1.5, 0.49, n=4, noise=0.0)
    fit = fit_power_law(big_n, loss)
    assert fit["alpha"] == pytest.approx(0.49, abs=1e-6) and fit["A"] == pytest.approx(a, rel=1e-4)
    three = fit_power_law(big_n[:3], loss[:3])
    assert three["alpha"] == pytest.approx(0.49, abs=1e-5) and three["ci"] is None


def test_errors_and_families():
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_power_law([1e6, 1e6, 1e7], [2.0, 2.0, 1.5])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1e6, 1e7], [2.0, 1.8, 1.5])
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1e5, 1e6, 1e7], [2.0, float("nan"), 1.5])
    n1, l1, _ = _points(1.0, 0.5, n=6)
    n2, l2, _ = _points(2.0, 0.8, n=6)
    pts = [{"family": "a", "params": float(x), "value": float(y)} for x, y in zip(n1, l1)]
    pts += [{"family": "b", "params": float(x), "value": float(y)} for x, y in zip(n2, l2)]
    pts += [{"family": "c", "params": 1e6, "value": 3.0}]
    fits = fit_families(pts)
    assert abs(fits["a"]["alpha"] - 0.5) < 0.02 and abs(fits["b"]["alpha"] - 0.8) < 0.02
    assert "error" in fits["c"] and len(fits["a"]["points"]) == 6


def test_command_writes_fit_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    big_n, loss, _ = _points(1.2, 0.55, n=8)
    pts = tmp_path / "points.json"
    pts.write_text(json.dumps([{"family": "sonar_llm", "params": float(x), "value": float(y)}
                               for x, y in zip(big_n, loss)]))
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert main(["--points", str(pts), "--out", str(out), "--plot", str(png)]) == 0
    fit = json.loads(out.read_text())["fits"]["sonar_llm"]
    assert abs(fit["alpha"] - 0.55) < 0.02 and png.stat().st_size > 1000
    assert "sonar_llm: alpha 0.5" in capsys.readouterr().out


def test_command_bad_input_is_one_line(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(["--points", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.json" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('[{"family": "x", "params": "big"}]')
    assert main(["--points", str(bad), "--out", str(out)]) == 2
    assert "--points" in capsys.readouterr().err
    assert main(["--runs", str(tmp_path), "--out", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not out.exists()


def test_points_from_evaluation_results(tmp_path, capsys):
    """--evals reads `nll.bits_per_byte` (or token_nll) and `non_embedding_parameters` of evaluate's JSON."""
    big_n, bpb, _ = _points(0.8, 0.6, n=5)
    files = []
    for i, (n, v) in enumerate(zip(big_n, bpb)):
        f = tmp_path / f"e{i}.json"
        f.write_text(json.dumps({"family": "token_llm", "non_embedding_parameters": int(n),
                                 "nll": {"bits_per_byte": float(v), "token_nll": 2.0}}))
        files.append(str(f))
    out = tmp_path / "fit.json"
    assert main(["--evals", *files, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "bits_per_byte" and abs(res["fits"]["token_llm"]["alpha"] - 0.6) < 0.02
    (tmp_path / "e0.json").write_text(json.dumps({"family": "base_lcm", "nll": None}))
    assert main(["--evals", *files, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "e0.json" in err and "nll.bits_per_byte" in err
