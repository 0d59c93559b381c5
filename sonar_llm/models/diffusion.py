"""DDIM noise scheduler for the Two-Tower diffusion LCM (training noise, inference steps, CFG helpers).

Reimplements the behaviour of the LCM's scheduler (facts in ``sonar_and_lcm.md`` section C3):

* ``T`` training steps (100 for the LCM), beta schedules ``squaredcos_cap_v2`` (cosine
  ``alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)``, betas capped at 0.999), ``linear``,
  ``scaled_linear`` and ``sigmoid`` (the LCM paper's Eq. 14, ``alpha_bar(t) = sigmoid(b - a * logit(t))``);
* the zero-terminal-SNR rescale (Lin et al. 2023, Alg. 1), so ``alpha_bar[T-1] == 0`` exactly;
* ``prediction_type="sample"``: the model predicts x0; epsilon is derived from it when stepping;
* ``timestep_spacing="trailing"``, ``set_alpha_to_one=True``, no clipping by default;
* classifier-free guidance with the "rescale" correction (Lin et al. 2023, Alg. 2): ``cfg_combine``.

The schedule tables are computed in float64 on the CPU (also under a ``torch.device("meta")`` context)
and cast to the sample's device and dtype when used.

**The LCM step-count quirk.** The LCM builds its trailing schedule with
``torch.arange(T, 0, -T / S, dtype=torch.long)``: the integer arange truncates the float stride, so
T=100, S=40 runs **50** steps (t = 99, 97, ..., 1) and T=1000, S=40 runs 40 steps (999, 974, ..., 24);
each step goes to ``prev_t = t - T // S``. ``set_timesteps(S, reproduce_lcm_step_quirk=True)`` (the
default) reproduces exactly that. With ``reproduce_lcm_step_quirk=False`` the schedule has exactly S
steps, ``round(T - k * T / S) - 1`` for k = 0..S-1 (round half to even), and each step goes to the next
scheduled timestep (-1 after the last).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DDIMSchedulerConfig",
    "DDIMScheduler",
    "DDIMStepOutput",
    "cfg_combine",
    "make_betas",
    "rescale_zero_terminal_snr",
]

_BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear", "sigmoid")
_PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
_SPACINGS = ("trailing", "leading", "linspace")


@dataclass
class DDIMSchedulerConfig:
    """Settings of :class:`DDIMScheduler`; the defaults are the Two-Tower LCM's."""

    num_train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4  # linear / scaled_linear only
    beta_end: float = 0.02  # linear / scaled_linear only
    scaled_linear_exponent: float = 2.0
    sigmoid_alpha: float = 1.5  # sigmoid schedule only
    sigmoid_beta: float = 0.0
    max_beta: float = 0.999  # cap for the alpha_bar-derived schedules
    rescale_betas_zero_snr: bool = True
    prediction_type: str = "sample"
    timestep_spacing: str = "trailing"
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_steps, int) or self.num_train_steps < 2:
            raise ValueError(f"num_train_steps must be an int >= 2, got {self.num_train_steps!r}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {self.timestep_spacing!r}")
        if not 0.0 < self.max_beta <= 1.0:
            raise ValueError(f"max_beta must be in (0, 1], got {self.max_beta}")


class DDIMStepOutput(NamedTuple):
    """Result of :meth:`DDIMScheduler.step`: x_{t_prev} and the x0 estimate used to get it."""

    prev_sample: Tensor
    pred_original_sample: Tensor


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_sigmoid(t: float, a: float, b: float) -> float:
    # sigmoid(b - a * logit(t)), with its limits at the end points: 1 at t=0 and 0 at t=1 (for a > 0).
    if t <= 0.0:
        return 1.0 if a > 0 else 0.0
    if t >= 1.0:
        return 0.0 if a > 0 else 1.0
    z = b - a * math.log(t / (1.0 - t))
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _betas_from_alpha_bar(fn, num_steps: int, max_beta: float) -> Tensor:
    betas = []
    for i in range(num_steps):
        a1, a2 = fn(i / num_steps), fn((i + 1) / num_steps)
        beta = 1.0 - a2 / a1 if a1 > 0 else 1.0
        betas.append(min(beta, max_beta))
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def make_betas(cfg: DDIMSchedulerConfig) -> Tensor:
    """The beta schedule of ``cfg`` (float64, length ``num_train_steps``), before any zero-SNR rescale."""
    n = cfg.num_train_steps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64, device="cpu")
    if cfg.beta_schedule == "scaled_linear":
        e = cfg.scaled_linear_exponent
        return torch.linspace(cfg.beta_start ** (1 / e), cfg.beta_end ** (1 / e), n, dtype=torch.float64, device="cpu") ** e
    if cfg.beta_schedule == "squaredcos_cap_v2":
        return _betas_from_alpha_bar(_alpha_bar_cosine, n, cfg.max_beta)
    a, b = cfg.sigmoid_alpha, cfg.sigmoid_beta
    return _betas_from_alpha_bar(lambda t: _alpha_bar_sigmoid(t, a, b), n, cfg.max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale ``betas`` so that the last cumulative alpha is exactly 0 (Lin et al. 2023, Alg. 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    betas = betas.to(device="cpu", dtype=torch.float64)
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].item(), abar_sqrt[-1].item()
    if not first > last:
        raise ValueError("rescale_zero_terminal_snr: alpha_bar must decrease over the schedule")
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def cfg_combine(eps_cond: Tensor, eps_uncond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance on noise predictions, with the optional "rescale" correction.

    ``g = eps_uncond + scale * (eps_cond - eps_uncond)``; if ``rescale > 0`` the result is
    ``(rescale * std(eps_cond) / std(g) + 1 - rescale) * g`` (Lin et al. 2023, Alg. 2), with the
    (unbiased) standard deviation taken over the last (feature) dimension, as the LCM does.
    """
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(
            f"cfg_combine: eps_cond and eps_uncond must have the same shape, got "
            f"{tuple(eps_cond.shape)} and {tuple(eps_uncond.shape)}"
        )
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale == 0.0:
        return guided
    factor = eps_cond.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True)
    return (rescale * factor + (1.0 - rescale)) * guided


class DDIMScheduler:
    """DDIM forward noising (training) and reverse steps (inference) on a discrete T-step schedule.

    Attributes: ``config``, ``betas``, ``alphas``, ``alphas_cumprod`` (float64 CPU tensors of length T),
    ``final_alpha_cumprod`` (float), and after :meth:`set_timesteps`: ``timesteps`` (int64, descending),
    ``num_inference_steps`` (as requested) and ``reproduce_lcm_step_quirk``.
    """

    def __init__(
        self,
        num_train_steps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        rescale_betas_zero_snr: bool = True,
        prediction_type: str = "sample",
        timestep_spacing: str = "trailing",
        set_alpha_to_one: bool = True,
        clip_sample: bool = False,
        **other: float,
    ) -> None:
        """Keyword arguments are the fields of :class:`DDIMSchedulerConfig`."""
        unknown = set(other) - set(DDIMSchedulerConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"DDIMScheduler: unknown arguments {sorted(unknown)}")
        self.config = DDIMSchedulerConfig(
            num_train_steps=num_train_steps,
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            set_alpha_to_one=set_alpha_to_one,
            clip_sample=clip_sample,
            **other,
        )
        betas = make_betas(self.config)
        if self.config.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 0.0  # exact, not a rounding residue
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self._abar_list = self.alphas_cumprod.tolist()
        self._table_cache: dict[tuple, Tensor] = {}
        self.num_inference_steps: int | None = None
        self.reproduce_lcm_step_quirk = True
        self.timesteps: Tensor | None = None
        self._prev: dict[int, int] = {}

    @classmethod
    def from_config(cls, cfg: DDIMSchedulerConfig) -> "DDIMScheduler":
        fields = dict(cfg.__dict__)
        return cls(**fields)

    @property
    def num_train_steps(self) -> int:
        return self.config.num_train_steps

    # ------------------------------------------------------------------ helpers
    def _table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (str(device), dtype)
        tab = self._table_cache.get(key)
        if tab is None:
            tab = self.alphas_cumprod.to(device=device, dtype=dtype)
            self._table_cache[key] = tab
        return tab

    def _check_t(self, t) -> int:
        if isinstance(t, Tensor):
            if t.numel() != 1:
                raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(t.shape)}")
            t = int(t.item())
        if not isinstance(t, int) or not 0 <= t < self.num_train_steps:
            raise ValueError(f"timestep must be an int in [0, {self.num_train_steps - 1}], got {t!r}")
        return t

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at training step t; ``final_alpha_cumprod`` for t < 0 (the step after the last)."""
        return self._abar_list[t] if t >= 0 else self.final_alpha_cumprod

    # ------------------------------------------------------------------ training
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``.

        ``t`` is an integer tensor whose shape is a prefix of ``x0.shape`` (e.g. [N] for x0 [N, E]).
        """
        if x0.shape != noise.shape:
            raise ValueError(f"add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex():
            raise TypeError("add_noise: t must be an integer tensor")
        if tuple(t.shape) != tuple(x0.shape[: t.dim()]):
            raise ValueError(
                f"add_noise: t shape {tuple(t.shape)} must be a prefix of x0 shape {tuple(x0.shape)}"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_steps):
            raise ValueError(f"add_noise: timesteps must lie in [0, {self.num_train_steps - 1}]")
        abar = self._table(x0.device, x0.dtype)[t.to(x0.device).long()]
        abar = abar.reshape(tuple(t.shape) + (1,) * (x0.dim() - t.dim()))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    # ------------------------------------------------------------------ inference
    def set_timesteps(self, num_inference_steps: int, reproduce_lcm_step_quirk: bool = True) -> Tensor:
        """Build the descending inference schedule ``self.timesteps`` (see the module docstring).

        With ``reproduce_lcm_step_quirk=True`` (the default, what the LCM runs) the trailing stride is
        ``int(T / S)`` (truncated) and every step goes to ``t - T // S``: T=100, S=40 gives 50 steps
        [99, 97, ..., 1]. With ``False`` the schedule has exactly S steps on the float grid and each step
        goes to the next scheduled timestep.
        """
        T = self.num_train_steps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an int in [1, num_train_steps={T}], got {num_inference_steps!r}"
            )
        S = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "trailing":
            if reproduce_lcm_step_quirk:
                ts = [t - 1 for t in range(T, 0, -int(T / S))]
            else:
                ts = [round(T - k * T / S) - 1 for k in range(S)]
        elif spacing == "leading":
            stride = T // S
            if reproduce_lcm_step_quirk:
                ts = list(range(0, T, stride))[::-1]
            else:
                ts = [k * stride for k in range(S)][::-1]
        else:  # linspace
            grid = [k * (T - 1) / (S - 1) for k in range(S)] if S > 1 else [0.0]
            ts = [int(g) if reproduce_lcm_step_quirk else round(g) for g in grid][::-1]
        if reproduce_lcm_step_quirk:
            prev = {t: t - T // S for t in ts}
        else:
            prev = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}
        self.num_inference_steps = S
        self.reproduce_lcm_step_quirk = reproduce_lcm_step_quirk
        self.timesteps = torch.tensor(ts, dtype=torch.long, device="cpu")
        self._prev = prev
        return self.timesteps

    def previous_timestep(self, t: int) -> int:
        """The timestep a step from ``t`` lands on (negative means "clean": alpha_bar = final_alpha_cumprod)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before stepping")
        t = self._check_t(t)
        if t in self._prev:
            return self._prev[t]
        return t - self.num_train_steps // self.num_inference_steps

    def to_epsilon(self, model_output: Tensor, sample: Tensor, t: int, prediction_type: str | None = None) -> Tensor:
        """The noise implied by a model output at step ``t`` (x0 -> eps: ``(x_t - sqrt(ab) x0) / sqrt(1 - ab)``)."""
        t = self._check_t(t)
        kind = prediction_type or self.config.prediction_type
        ab = self.alpha_bar(t)
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - math.sqrt(ab) * model_output) / math.sqrt(1.0 - ab)
        if kind == "v_prediction":
            return math.sqrt(ab) * model_output + math.sqrt(1.0 - ab) * sample
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {kind!r}")

    def step(
        self,
        model_output: Tensor,
        t: int,
        sample: Tensor,
        eta: float = 0.0,
        epsilon_scaling: float | None = None,
        generator: torch.Generator | None = None,
        *,
        prediction_type: str | None = None,
        prev_timestep: int | None = None,
        variance_noise: Tensor | None = None,
    ) -> DDIMStepOutput:
        """One DDIM update x_t -> x_{prev_t} (DDIM paper Eq. 12 and 16).

        ``model_output`` is interpreted by ``prediction_type`` (default: the config's, "sample" = x0).
        ``prev_t`` defaults to :meth:`previous_timestep`. ``epsilon_scaling`` divides the derived epsilon
        (Ning et al. 2023). ``eta`` > 0 adds ``sigma_t * noise`` drawn from ``generator`` (or
        ``variance_noise``). Returns ``(prev_sample, pred_original_sample)``.
        """
        if model_output.shape != sample.shape:
            raise ValueError(
                f"step: model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape"
            )
        t = self._check_t(t)
        if eta < 0:
            raise ValueError(f"step: eta must be >= 0, got {eta}")
        prev_t = self.previous_timestep(t) if prev_timestep is None else int(prev_timestep)
        if prev_t >= t:
            raise ValueError(f"step: prev_timestep {prev_t} must be smaller than t {t}")
        kind = prediction_type or self.config.prediction_type
        ab_t = self.alpha_bar(t)
        ab_prev = self.alpha_bar(prev_t)
        if kind == "sample":
            pred_x0 = model_output
            pred_eps = (sample - math.sqrt(ab_t) * pred_x0) / math.sqrt(1.0 - ab_t)
        elif kind == "epsilon":
            if ab_t == 0.0:
                raise ValueError(f"step: x0 is undefined for an epsilon prediction at t={t} (alpha_bar_t = 0)")
            pred_eps = model_output
            pred_x0 = (sample - math.sqrt(1.0 - ab_t) * pred_eps) / math.sqrt(ab_t)
        elif kind == "v_prediction":
            pred_x0 = math.sqrt(ab_t) * sample - math.sqrt(1.0 - ab_t) * model_output
            pred_eps = math.sqrt(ab_t) * model_output + math.sqrt(1.0 - ab_t) * sample
        else:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {kind!r}")
        if epsilon_scaling is not None:
            pred_eps = pred_eps / epsilon_scaling
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_x0 = pred_x0.clamp(-r, r)
        variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev) if ab_t < 1.0 else 0.0
        std = eta * math.sqrt(max(variance, 0.0))
        direction = math.sqrt(max(1.0 - ab_prev - std**2, 0.0)) * pred_eps
        prev = math.sqrt(ab_prev) * pred_x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(
                    sample.shape, generator=generator, dtype=sample.dtype, device=sample.device
                )
            elif variance_noise.shape != sample.shape:
                raise ValueError(
                    f"step: variance_noise {tuple(variance_noise.shape)} must match sample {tuple(sample.shape)}"
                )
            prev = prev + std * variance_noise
        return DDIMStepOutput(prev, pred_x0)
