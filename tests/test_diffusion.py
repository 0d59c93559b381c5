"""Tests for the DDIM scheduler: schedule values, LCM step-count quirk, DDIM update, CFG rescale."""
import math

import pytest
import torch

from sonar_llm.models.diffusion import DDIMScheduler, DDIMSchedulerConfig, cfg_combine, rescale_zero_terminal_snr


def _cosine_abar_f64(T: int) -> list[float]:
    """Independent closed form: betas from cos^2((t+0.008)/1.008*pi/2), capped at 0.999, then cumprod."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out, acc = [], 1.0
    for i in range(T):
        acc *= 1.0 - min(1.0 - f((i + 1) / T) / f(i / T), 0.999)
        out.append(acc)
    return out


def test_cosine_schedule_without_rescale_matches_closed_form():
    s = DDIMScheduler(rescale_betas_zero_snr=False)
    ref = torch.tensor(_cosine_abar_f64(100), dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)


def test_zero_snr_rescaled_values():
    s = DDIMScheduler()  # LCM defaults: T=100, cosine, zero-SNR rescale
    abar = s.alphas_cumprod
    assert abar.shape == (100,)
    assert abs(abar[0].item() - 0.99937) < 5e-6
    assert abs(abar[49].item() - 0.494) < 1e-3
    assert abar[99].item() == 0.0
    assert bool((abar[1:] < abar[:-1]).all())
    # closed form of the rescale: sqrt(abar) = (sqrt(abar_raw) - last) * first / (first - last)
    raw = torch.tensor(_cosine_abar_f64(100), dtype=torch.float64).sqrt()
    ref = ((raw - raw[-1]) * raw[0] / (raw[0] - raw[-1])) ** 2
    torch.testing.assert_close(abar, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "sigmoid"])
def test_other_schedules_end_at_zero_snr(schedule):
    s = DDIMScheduler(beta_schedule=schedule)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert 0.99 < s.alphas_cumprod[0].item() <= 1.0
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_rescale_function_keeps_first_and_zeroes_last():
    torch.manual_seed(0)
    betas = torch.rand(20, dtype=torch.float64) * 0.1 + 0.01
    before = torch.cumprod(1 - betas, 0)
    after = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert abs(after[0].item() - before[0].item()) < 1e-14
    assert after[-1].item() == 0.0


def test_lcm_step_count_quirk():
    s = DDIMScheduler()
    ts = s.set_timesteps(40)
    assert ts.tolist() == list(range(99, 0, -2))  # 50 steps, not 40
    assert s.previous_timestep(99) == 97 and s.previous_timestep(1) == -1
    s1000 = DDIMScheduler(num_train_steps=1000)
    ts = s1000.set_timesteps(40)
    assert ts.tolist() == list(range(999, 0, -25)) and len(ts) == 40 and ts[-1].item() == 24
    assert s.set_timesteps(100).tolist() == list(range(99, -1, -1))
    assert len(s.set_timesteps(50)) == 50


def test_exact_spacing_without_quirk():
    s = DDIMScheduler()
    ts = s.set_timesteps(40, reproduce_lcm_step_quirk=False).tolist()
    assert len(ts) == 40 and ts[0] == 99 and ts[-1] == 1
    # independent: round-half-even of T - k*T/S, minus one
    assert ts == [round(100 - 2.5 * k) - 1 for k in range(40)]
    assert [s.previous_timestep(t) for t in ts] == ts[1:] + [-1]


def test_set_timesteps_rejects_bad_counts():
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(101)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="cosine")


def test_add_noise_matches_formula():
    g = torch.Generator().manual_seed(1)
    s = DDIMScheduler()
    x0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 49, 50, 98, 99, 12])
    out = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = _rescaled(ti)
        torch.testing.assert_close(out[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[5], eps[5])  # t = 99 is pure noise
    with pytest.raises(ValueError, match="prefix"):
        s.add_noise(x0, eps, t[:3])


def _rescaled(t: int) -> float:
    raw = [math.sqrt(a) for a in _cosine_abar_f64(100)]
    first, last = raw[0], raw[-1]
    return ((raw[t] - last) * first / (first - last)) ** 2


def test_ddim_step_eta0_matches_hand_formula():
    g = torch.Generator().manual_seed(2)
    s = DDIMScheduler()
    s.set_timesteps(40)
    z = torch.randn(3, 8, generator=g, dtype=torch.float64)
    x0_hat = torch.randn(3, 8, generator=g, dtype=torch.float64)
    for t in (97, 51, 1):
        prev, px0 = s.step(x0_hat, t, z)
        a_t, a_p = _rescaled(t), (_rescaled(t - 2) if t >= 2 else 1.0)
        eps = (z - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
        ref = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p) * eps
        torch.testing.assert_close(prev, ref, rtol=1e-10, atol=1e-12)
        assert px0 is x0_hat
    # epsilon scaling divides the derived epsilon
    prev, _ = s.step(x0_hat, 51, z, epsilon_scaling=1.5)
    a_t, a_p = _rescaled(51), _rescaled(49)
    eps = (z - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t) / 1.5
    torch.testing.assert_close(prev, math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p) * eps, rtol=1e-10, atol=1e-12)


def test_ddim_step_with_eta_uses_given_noise():
    g = torch.Generator().manual_seed(3)
    s = DDIMScheduler()
    s.set_timesteps(40)
    z, x0_hat, n = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(3))
    eta, t = 0.7, 41
    prev, _ = s.step(x0_hat, t, z, eta=eta, variance_noise=n)
    a_t, a_p = _rescaled(t), _rescaled(t - 2)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    eps = (z - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
    ref = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p - sigma**2) * eps + sigma * n
    torch.testing.assert_close(prev, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("quirk", [True, False])
def test_deterministic_sampling_recovers_x0_with_oracle(quirk):
    """If the model always predicts the true x0, DDIM (eta=0) from pure noise lands exactly on x0."""
    g = torch.Generator().manual_seed(4)
    s = DDIMScheduler()
    s.set_timesteps(40, reproduce_lcm_step_quirk=quirk)
    x0 = torch.randn(4, 16, generator=g, dtype=torch.float64)
    z = torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.6
    for t in s.timesteps.tolist():
        z, px0 = s.step(x0.clone(), t, z)
    torch.testing.assert_close(z, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(px0, x0)


def test_epsilon_prediction_roundtrip():
    g = torch.Generator().manual_seed(5)
    s = DDIMScheduler()
    s.set_timesteps(40)
    z, x0_hat = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    eps = s.to_epsilon(x0_hat, z, 51)
    a = s.step(x0_hat, 51, z)
    b = s.step(eps, 51, z, prediction_type="epsilon")
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-10, atol=1e-12)


def test_cfg_combine_with_rescale():
    g = torch.Generator().manual_seed(6)
    c = torch.randn(3, 1, 10, generator=g, dtype=torch.float64)
    u = torch.randn(3, 1, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cfg_combine(c, u, 3.0, 0.0), u + 3.0 * (c - u))
    torch.testing.assert_close(cfg_combine(c, u, 1.0, 0.0), c)
    out = cfg_combine(c, u, 3.0, 0.7)
    for b in range(3):
        gv = (u[b, 0] + 3.0 * (c[b, 0] - u[b, 0])).tolist()
        cv = c[b, 0].tolist()

        def std(v):
            m = sum(v) / len(v)
            return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

        f = 0.7 * std(cv) / std(gv) + 0.3
        torch.testing.assert_close(out[b, 0], torch.tensor([f * x for x in gv], dtype=torch.float64))
    # rescale = 1 gives the conditional prediction's standard deviation
    full = cfg_combine(c, u, 3.0, 1.0)
    torch.testing.assert_close(full.std(-1), c.std(-1))


def test_config_roundtrip():
    cfg = DDIMSchedulerConfig(num_train_steps=50, beta_schedule="linear")
    s = DDIMScheduler.from_config(cfg)
    assert s.num_train_steps == 50 and s.config == cfg
    with pytest.raises(TypeError, match="unknown"):
        DDIMScheduler(num_steps=3)
