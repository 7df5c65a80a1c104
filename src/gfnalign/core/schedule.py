"""Noise schedules built from diffusers scheduler configs, without importing diffusers.

A schedule is a Gaussian interpolant ``x_t = alpha_t * x0 + sigma_t * eps`` on an inference grid, in one
of two instances:

* ``interpolant="vp"``: DDPM/DDIM configs, ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``
  (the grids below);
* ``interpolant="rectified_flow"``: FlowMatchEulerDiscreteScheduler configs (SD3, FLUX),
  ``alpha = 1 - sigma``, the network predicts the velocity ``eps - x0`` (``prediction_type="flow"``), and
  the grid is diffusers' sigmas with SD3's static ``shift`` or FLUX's resolution-dependent ``mu``
  (:meth:`NoiseSchedule.from_flow_match_config`). ``alpha_bars`` then hold the VP-equivalent
  ``alpha^2 / (alpha^2 + sigma^2)`` and timesteps are ``sigma * num_train_timesteps`` (floats).

Both feed the same kernels (:mod:`gfnalign.core.kernels`) through :meth:`NoiseSchedule.levels`; the
schedule also names the sampler's stochastic kernel (``kernel``: ``ddim``, ``flow_sde`` or ``cps``).

A trajectory runs from pure noise to the image: step ``k`` (0-based) goes from timestep
``timesteps[k]`` to ``next_timesteps[k]`` (``t > t_next``), with cumulative signal rates
``alpha_bars[k]`` and ``alpha_bars_next[k]``. The last step lands on the *final* alpha-bar, which is
1.0 (clean) or ``alphas_cumprod[0]`` exactly as diffusers' DDIM ``set_alpha_to_one`` decides, so the
math here reproduces ``DDIMScheduler.step`` / ``DDPMScheduler.step`` given the same noise.

Timestep grids follow diffusers' ``set_timesteps``:

* ``leading``:  ``arange(K) * (T // K)`` reversed, plus ``steps_offset``
* ``trailing``: ``round(arange(T, 0, -T / K)) - 1``
* ``linspace``: ``round(linspace(0, T - 1, K))`` reversed

The successor of each grid point is the **next grid point** (the last one steps to the final
alpha-bar), so the state a step lands on is exactly the state the next step starts from: the chain the
balance conditions need. Diffusers' DDIM uses ``t - T // K`` instead; the two agree for ``leading`` and
for ``trailing`` with ``K | T``. For ``trailing`` with ``K ∤ T`` diffusers lands on a noise level that
differs from the timestep its next call is given (10 of 29 steps at K = 30); here the chain is kept.
``next_timesteps`` of the last step is 0 so networks that take a timestep input see a valid one.

Grids that cannot be a chain of Gaussian steps are rejected with the reason and the fix:

* a grid point with alpha-bar 0 (zero-terminal-SNR betas with a grid that starts at ``T - 1``, e.g.
  ``trailing``): the ε-form kernels recover x̂0 by dividing by √ᾱ, which is undefined there;
* a grid that ends where the final alpha-bar already is (``linspace`` always ends at timestep 0, as
  does ``leading`` with ``steps_offset=0``): the last step would not move and has no density.

Rectified-flow grids are chains by construction (each step lands on the next sigma, the last on
``final_sigma``) and start at sigma = 1 (zero SNR) legitimately: the velocity output stays finite there
and x̂0 is recovered without dividing by alpha. The chain check in ``__post_init__`` covers both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from gfnalign.core.kernels import (
    KERNELS,
    GaussianKernel,
    NoiseLevels,
    check_noise_level,
    noising_kernel,
    noising_score_next,
    noising_score_t,
    predict_x0_eps,
    step_kernel,
)
from gfnalign.core.parametrization import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
INTERPOLANTS = ("vp", "rectified_flow")


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Betas as diffusers computes them (in float32, so alphas_cumprod match bit for bit)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
            for i in range(num_train_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)} "
        "or pass trained_betas"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last training timestep has zero SNR (Lin et al. 2023), as diffusers does."""
    alphas_bar_sqrt = (1.0 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The diffusers inference grid, noisiest first, as int64."""
    T, K = num_train_timesteps, num_inference_steps
    if not 1 <= K <= T:
        raise ValueError(
            f"num_inference_steps={K} must be between 1 and num_train_timesteps={T}; "
            "choose fewer inference steps"
        )
    if spacing == "leading":
        ts = torch.arange(K, dtype=torch.float64) * (T // K)
        ts = ts.round().flip(0) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / K, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, K, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(
            f"timestep_spacing={spacing!r} is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}"
        )
    return ts.to(torch.int64)


def alphas_cumprod_from_config(config: Mapping[str, Any] | Any) -> torch.Tensor:
    """``[T]`` float32 cumulative alphas of a diffusers scheduler config (betas, trained_betas, zero SNR)."""
    cfg = dict(getattr(config, "config", config))
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    else:
        betas = make_betas(cfg.get("beta_schedule", "linear"), T, cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02))
    if cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def lands_on_alpha_bar_one(config: Mapping[str, Any] | Any) -> bool:
    """Whether diffusers' last step for this config lands on alpha-bar 1: DDIM's ``set_alpha_to_one``,
    or a DDPM config (no such flag; DDPM always steps to a clean sample)."""
    cfg = dict(getattr(config, "config", config))
    # the class name is in saved configs (``_class_name``) or, for a live scheduler object, its type
    class_name = str(cfg.get("_class_name") or (type(config).__name__ if hasattr(config, "config") else ""))
    # a bare DDPM config dict has DDPM's ``variance_type`` and no ``set_alpha_to_one``
    is_ddpm = "DDPM" in class_name or ("variance_type" in cfg and "set_alpha_to_one" not in cfg)
    return bool(cfg.get("set_alpha_to_one", is_ddpm))


@dataclass(frozen=True)
class NoiseSchedule:
    """Everything the kernels need about the inference grid.

    Attributes (shapes in brackets):
        alphas_cumprod: [T] float64, the training schedule's cumulative alphas.
        timesteps: [K] int64, diffusion timestep of the state *before* each step (noisiest first).
        next_timesteps: [K] int64, timestep after each step, clamped at 0 for network inputs.
        alpha_bars: [K] float64, alpha-bar at ``timesteps``.
        alpha_bars_next: [K] float64, alpha-bar after each step (the last one is the final alpha-bar).
        prediction_type: what the network predicts (``epsilon``, ``v_prediction``, ``sample``, or ``flow``:
            the rectified-flow velocity).
        interpolant: ``vp`` or ``rectified_flow``.
        sigmas / sigmas_next: [K] float64 sigma before / after each step (rectified flow only; ``None`` for VP).
        kernel: the sampler's stochastic kernel, ``ddim`` (DDIM-η, any interpolant), ``flow_sde``
            (Flow-GRPO's SDE, rectified flow) or ``cps`` (coefficients-preserving); its noise level is
            the ``eta`` passed to rollouts and objectives.

    For rectified flow ``timesteps`` are the float64 ``sigma * T`` the transformer is given and
    ``alphas_cumprod[t]`` is the VP-equivalent alpha-bar at sigma = t / T (t = 0..T-1).
    """

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    next_timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    alpha_bars_next: torch.Tensor
    prediction_type: str = "epsilon"
    interpolant: str = "vp"
    sigmas: torch.Tensor | None = None
    sigmas_next: torch.Tensor | None = None
    kernel: str = "ddim"

    def __post_init__(self) -> None:
        K = self.timesteps.shape[0]
        for name in ("next_timesteps", "alpha_bars", "alpha_bars_next"):
            if getattr(self, name).shape != (K,):
                raise ValueError(f"NoiseSchedule.{name} must have shape [{K}], got {tuple(getattr(self, name).shape)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if not bool((self.alpha_bars_next > self.alpha_bars).all()):
            raise ValueError("NoiseSchedule: alpha-bar must increase along the trajectory (t > t_next)")
        if K > 1 and not (
            torch.equal(self.next_timesteps[:-1], self.timesteps[1:])
            and torch.equal(self.alpha_bars_next[:-1], self.alpha_bars[1:])
        ):
            raise ValueError(
                "NoiseSchedule: each step must land on the next grid point (next_timesteps[k] == timesteps[k+1] "
                "and alpha_bars_next[k] == alpha_bars[k+1]); a broken chain breaks every balance condition"
            )
        self._check_interpolant()

    def _check_interpolant(self) -> None:
        K = self.num_steps
        if self.interpolant not in INTERPOLANTS:
            raise ValueError(f"interpolant={self.interpolant!r} is not supported; use one of {', '.join(INTERPOLANTS)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported; use one of {', '.join(KERNELS)}")
        flow = self.interpolant == "rectified_flow"
        if flow != (self.prediction_type == "flow"):
            raise ValueError(
                f"prediction_type={self.prediction_type!r} does not fit interpolant={self.interpolant!r}: a "
                "rectified-flow schedule has prediction_type='flow' (a velocity) and a VP schedule does not"
            )
        if flow:
            for name in ("sigmas", "sigmas_next"):
                value = getattr(self, name)
                if value is None or value.shape != (K,):
                    raise ValueError(f"NoiseSchedule.{name} must be a [{K}] tensor for a rectified-flow schedule")
            if not (bool((self.sigmas <= 1).all()) and bool((self.sigmas_next >= 0).all())
                    and bool((self.sigmas_next < self.sigmas).all())):
                raise ValueError("NoiseSchedule: sigmas must decrease within [0, 1] along the trajectory")
            if K > 1 and not torch.equal(self.sigmas_next[:-1], self.sigmas[1:]):
                raise ValueError(
                    "NoiseSchedule: each step must land on the next grid sigma (sigmas_next[k] == sigmas[k+1]); "
                    "a broken chain breaks every balance condition"
                )
        elif self.sigmas is not None or self.sigmas_next is not None:
            raise ValueError("NoiseSchedule.sigmas are for interpolant='rectified_flow'; a VP schedule has alpha-bars only")
        if self.kernel == "flow_sde" and not flow:
            raise ValueError(
                "kernel='flow_sde' (Flow-GRPO's SDE) is written for rectified flow (alpha = 1 - sigma); use "
                "kernel='ddim' or 'cps' with a VP schedule"
            )

    # -- construction --------------------------------------------------------------------------------
    def with_kernel(self, kernel: str) -> NoiseSchedule:
        """The same grid sampled with another stochastic kernel (``ddim``, ``flow_sde``, ``cps``)."""
        return replace(self, kernel=kernel)

    @classmethod
    def rectified_flow(
        cls,
        sigmas: torch.Tensor,
        *,
        final_sigma: float = 0.0,
        num_train_timesteps: int = 1000,
        kernel: str = "flow_sde",
    ) -> NoiseSchedule:
        """A rectified-flow grid from its ``[K]`` sigmas (noisiest first); the last step lands on
        ``final_sigma`` (diffusers: 0, the clean image; > 0 keeps the last ddim/cps step stochastic)."""
        sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        T = int(num_train_timesteps)
        if sig.numel() == 0:
            raise ValueError("a rectified-flow schedule needs at least one sigma")
        if not 0.0 <= float(final_sigma) < float(sig[-1]):
            raise ValueError(
                f"final_sigma={final_sigma} must lie in [0, {float(sig[-1]):.6g}) (below the last grid sigma); "
                "0 lands on the clean image as diffusers does"
            )
        sig_next = torch.cat([sig[1:], torch.tensor([float(final_sigma)], dtype=torch.float64)])

        def vp_alpha_bar(s: torch.Tensor) -> torch.Tensor:
            return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)

        # timesteps as the transformer sees them: sigma * T computed in float32, like diffusers
        ts = (sig.float() * T).double()
        ts_next = (sig_next.float() * T).double()
        return cls(
            alphas_cumprod=vp_alpha_bar(torch.arange(T, dtype=torch.float64) / T),
            timesteps=ts,
            next_timesteps=ts_next,
            alpha_bars=vp_alpha_bar(sig),
            alpha_bars_next=vp_alpha_bar(sig_next),
            prediction_type="flow",
            interpolant="rectified_flow",
            sigmas=sig,
            sigmas_next=sig_next,
            kernel=kernel,
        )

    @classmethod
    def from_flow_match_config(
        cls,
        config: Mapping[str, Any] | Any,
        num_inference_steps: int,
        *,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        image_seq_len: int | None = None,
        final_sigma: float = 0.0,
        kernel: str = "flow_sde",
    ) -> NoiseSchedule:
        """The grid of ``FlowMatchEulerDiscreteScheduler.set_timesteps`` for a scheduler config.

        SD3 (static ``shift``): leave ``sigmas`` unset (the pipeline's default grid). FLUX
        (``use_dynamic_shifting``): the pipeline passes ``sigmas = linspace(1, 1/K, K)`` and
        ``mu = calculate_shift(image_seq_len)``; give ``mu`` or ``image_seq_len`` (the packed latent
        length, ``(H/16) * (W/16)`` for FLUX), and ``sigmas`` as the pipeline does. The sigma arithmetic
        is diffusers' (float32), so the grid is the scheduler's exactly.
        """
        cfg = dict(getattr(config, "config", config))
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling"):
            if cfg.get(flag, False):
                raise ValueError(f"flow-match scheduler config has {flag}=True, which is not supported; set it to False")
        T = int(cfg.get("num_train_timesteps", 1000))
        K = int(num_inference_steps)
        if K < 1:
            raise ValueError(f"num_inference_steps={K} must be >= 1")
        shift = float(cfg.get("shift", 1.0))
        dynamic = bool(cfg.get("use_dynamic_shifting", False))

        # numpy, in the dtypes diffusers uses (float64 for its default grid, float32 for given sigmas)
        if sigmas is None:
            train = np.linspace(1, T, T, dtype=np.float32)[::-1] / T
            if not dynamic:
                train = shift * train / (1 + (shift - 1) * train)
            s_max, s_min = float(train[0]), float(train[-1])
            grid = np.linspace(s_max * T, s_min * T, K) / T
        else:
            grid = np.array(list(sigmas)).astype(np.float32)
            if grid.shape != (K,):
                raise ValueError(f"sigmas has {grid.size} values but num_inference_steps={K}")
        if dynamic:
            if mu is None:
                if image_seq_len is None:
                    raise ValueError(
                        "this flow-match config uses dynamic shifting (FLUX): pass mu or image_seq_len "
                        "(the packed latent length, (height/16)*(width/16))"
                    )
                mu = flux_shift_mu(image_seq_len, cfg)
            if cfg.get("time_shift_type", "exponential") == "linear":
                grid = mu / (mu + (1 / grid - 1))
            else:
                grid = math.exp(mu) / (math.exp(mu) + (1 / grid - 1))
        else:
            grid = shift * grid / (1 + (shift - 1) * grid)
        terminal = cfg.get("shift_terminal")
        if terminal:
            one_minus = 1 - grid
            grid = 1 - one_minus / (one_minus[-1] / (1 - terminal))
        grid = torch.from_numpy(np.ascontiguousarray(grid)).to(torch.float32)
        return cls.rectified_flow(grid.float().double(), final_sigma=final_sigma, num_train_timesteps=T, kernel=kernel)

    def levels(
        self, step: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> NoiseLevels:
        """The interpolant's noise levels of steps ``step`` ([N] indices), for :mod:`gfnalign.core.kernels`.

        Alpha-bars are cast to ``dtype`` as :meth:`at_steps` does; VP schedules carry no scale (exactly 1)."""
        idx = self._index(step)
        device = device if device is not None else step.device

        def cast(v: torch.Tensor) -> torch.Tensor:
            return v[idx].to(device=device, dtype=dtype)

        a, an = cast(self.alpha_bars), cast(self.alpha_bars_next)
        if self.interpolant == "vp":
            return NoiseLevels(
                a, an, cast(self.alpha_bars.sqrt()), cast((1 - self.alpha_bars).sqrt()),
                cast(self.alpha_bars_next.sqrt()), cast((1 - self.alpha_bars_next).sqrt()),
            )
        full = NoiseLevels.rectified_flow(self.sigmas, self.sigmas_next)  # float64, then cast once
        return NoiseLevels(
            a, an, cast(full.alpha_t), cast(full.sigma_t), cast(full.alpha_next), cast(full.sigma_next),
            cast(full.scale_t), cast(full.scale_next),
        )

    @property
    def policy_output(self) -> str:
        """What ``PolicyModel.eps`` returns for this schedule: ``epsilon`` (VP backbones convert any VP
        prediction to ε) or ``flow`` (the rectified-flow velocity, which stays finite at sigma = 1)."""
        return "flow" if self.prediction_type == "flow" else "epsilon"

    def forward_kernel(self, x_t: torch.Tensor, output: torch.Tensor, step: torch.Tensor, eta: float) -> GaussianKernel:
        """P_F(x_next | x_t) of this schedule's ``kernel`` at steps ``step`` [N] for the policy's ``output``."""
        return step_kernel(x_t, output, self.levels(step, dtype=x_t.dtype, device=x_t.device), eta,
                           kind=self.kernel, output_type=self.policy_output)

    def backward_kernel(self, x_next: torch.Tensor, step: torch.Tensor) -> GaussianKernel:
        """P_B(x_t | x_next), the interpolant's noising kernel between the grid points of ``step``."""
        return noising_kernel(x_next, self.levels(step, dtype=x_next.dtype, device=x_next.device))

    def score_pb_next(self, x_t: torch.Tensor, x_next: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """∇_{x_next} log P_B(x_t | x_next)."""
        return noising_score_next(x_t, x_next, self.levels(step, dtype=x_next.dtype, device=x_next.device))

    def score_pb_t(self, x_t: torch.Tensor, x_next: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """∇_{x_t} log P_B(x_t | x_next)."""
        return noising_score_t(x_t, x_next, self.levels(step, dtype=x_next.dtype, device=x_next.device))

    def predict_x0(self, x: torch.Tensor, output: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """x̂0 at the state *before* step ``step`` from the policy's output there."""
        return predict_x0_eps(x, output, self.levels(step, dtype=x.dtype, device=x.device).like(x),
                              self.policy_output)[0]

    def predict_eps(self, x: torch.Tensor, output: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """ε̂ at the state before step ``step`` from the policy's output there."""
        return predict_x0_eps(x, output, self.levels(step, dtype=x.dtype, device=x.device).like(x),
                              self.policy_output)[1]

    def marginal_score(
        self, x: torch.Tensor, output: torch.Tensor, step: torch.Tensor, *, after: bool = False
    ) -> torch.Tensor:
        """Tweedie's marginal score ∇_x log p(x) = −ε̂/σ from the policy's output at the state before step
        ``step`` (``after=True``: the state after it, the output taken there)."""
        lv = self.levels(step, dtype=x.dtype, device=x.device)
        lv = (lv.after() if after else lv).like(x)
        _, eps = predict_x0_eps(x, output, lv, self.policy_output)
        if self.interpolant == "vp":
            return -eps / (1 - lv.alpha_bar_t).clamp(min=1e-12).sqrt()
        return -eps / lv.sigma_t.clamp(min=1e-12)

    def output_per_score(
        self, step: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """[N] how the policy's output at the state before ``step`` moves per unit shift of the marginal score
        at fixed x: ε-output −σ; flow velocity −σ/α (0 at pure noise, where the score is the prior's)."""
        lv = self.levels(step, dtype=dtype, device=device)
        if self.interpolant == "vp":
            return -(1 - lv.alpha_bar_t).sqrt()
        alpha = lv.alpha_t
        return torch.where(alpha > 0, -lv.sigma_t / alpha.clamp(min=1e-12), torch.zeros_like(alpha))

    def check_noise_level(self, eta: float) -> float:
        """``eta`` validated for this schedule's kernel (ddim: (0, 1], cps: (0, 1], flow_sde: > 0)."""
        return check_noise_level(self.kernel, eta)

    @classmethod
    def from_alphas_cumprod(
        cls,
        alphas_cumprod: torch.Tensor,
        num_inference_steps: int,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        final_alpha_cumprod: float | None = None,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """Grid over a given training schedule. ``final_alpha_cumprod=None`` means ``alphas_cumprod[0]``
        (diffusers' ``set_alpha_to_one=False``), which keeps the last step stochastic."""
        ac = alphas_cumprod.to(torch.float64)
        T = ac.shape[0]
        ts = make_timesteps(T, num_inference_steps, timestep_spacing, steps_offset)
        if int(ts.max()) >= T or int(ts.min()) < 0:
            raise ValueError(
                f"timesteps {ts.tolist()} fall outside [0, {T - 1}]; lower steps_offset={steps_offset}"
            )
        final = float(ac[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
        alpha_bars = ac[ts]
        grid = f"timestep_spacing={timestep_spacing!r} with steps_offset={steps_offset} and {num_inference_steps} steps"
        if bool((alpha_bars <= 0).any()):
            first_zero = int(ts[alpha_bars <= 0][0])
            raise ValueError(
                f"{grid} puts a grid point at timestep {first_zero}, where alpha-bar is 0 (zero terminal SNR): "
                "the ε-form kernels recover x̂0 by dividing by √alpha-bar, which is undefined there (and an "
                "ε-prediction carries no information about x0 at zero SNR); use timestep_spacing='leading' "
                "with steps_offset=1, whose first grid point keeps alpha-bar > 0"
            )
        if final <= float(alpha_bars[-1]):
            raise ValueError(
                f"{grid} ends the grid at timestep {int(ts[-1])}, whose alpha-bar {float(alpha_bars[-1]):.6g} "
                f"already equals the final alpha-bar {final:.6g}: the last step would not move and has no "
                "density; use timestep_spacing='trailing' (it ends at T/K - 1 > 0), or 'leading' with "
                "steps_offset=1 as Stable Diffusion's configs do"
            )
        # the successor of each grid point is the next grid point, so the chain is never broken
        ab_next = torch.cat([alpha_bars[1:], torch.tensor([final], dtype=torch.float64)])
        next_ts = torch.cat([ts[1:], torch.zeros(1, dtype=torch.int64)])
        return cls(
            alphas_cumprod=ac,
            timesteps=ts,
            next_timesteps=next_ts,
            alpha_bars=alpha_bars,
            alpha_bars_next=ab_next,
            prediction_type=prediction_type,
        )

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | Any,
        num_inference_steps: int,
        *,
        timestep_spacing: str | None = None,
        final_alpha_cumprod: float | None = None,
    ) -> NoiseSchedule:
        """Build from a diffusers scheduler config (a dict, a ``FrozenDict`` or a scheduler object).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
        ``trained_betas``, ``rescale_betas_zero_snr``, ``timestep_spacing``, ``steps_offset``,
        ``set_alpha_to_one`` and ``prediction_type``. ``clip_sample`` / ``thresholding`` must be off:
        a clipped x0 makes the Gaussian kernel's mean non-smooth, which the objectives cannot use.
        """
        cfg = dict(getattr(config, "config", config))
        if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
            raise ValueError(
                "scheduler config has clip_sample/thresholding enabled; set clip_sample=False and "
                "thresholding=False (Stable Diffusion's configs already do)"
            )
        alphas_cumprod = alphas_cumprod_from_config(cfg)
        if final_alpha_cumprod is None:
            # DDIM: set_alpha_to_one; DDPM has no such flag and steps to alpha-bar 1 (a deterministic
            # last step), which the objectives reject later with a clear message.
            final_alpha_cumprod = 1.0 if lands_on_alpha_bar_one(config) else float(alphas_cumprod[0])
        return cls.from_alphas_cumprod(
            alphas_cumprod,
            num_inference_steps,
            timestep_spacing=timestep_spacing or cfg.get("timestep_spacing", "leading"),
            steps_offset=int(cfg.get("steps_offset", 0)),
            final_alpha_cumprod=final_alpha_cumprod,
            prediction_type=cfg.get("prediction_type", "epsilon"),
        )

    # -- lookups -------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def at_steps(
        self, step: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, t_next, alpha_bar_t, alpha_bar_next)`` for a tensor of step indices ``[N]``."""
        idx = self._index(step)
        device = device if device is not None else step.device
        return (
            self.timesteps[idx].to(device),
            self.next_timesteps[idx].to(device),
            self.alpha_bars[idx].to(device=device, dtype=dtype),
            self.alpha_bars_next[idx].to(device=device, dtype=dtype),
        )

    def _index(self, step: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(step).detach().to("cpu", torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise IndexError(f"step indices must be in [0, {self.num_steps - 1}], got {idx.tolist()}")
        return idx

    def alpha_bar_of_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Alpha-bar of the training schedule at timesteps ``t`` ([N]): integer indices for VP; for rectified
        flow the VP-equivalent alpha-bar at sigma = t / T (any float t)."""
        if self.interpolant == "rectified_flow":
            return self.alpha_bar_of_sigma(self.sigma_of_timestep(t)).to(dtype)
        return self.alphas_cumprod.to(t.device)[t.long()].to(dtype)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sigma_of_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Rectified flow: sigma = t / T in float64 (timesteps are ``sigma * T``)."""
        if self.interpolant != "rectified_flow":
            raise ValueError("sigma_of_timestep is for rectified-flow schedules; VP schedules index alphas_cumprod")
        return torch.as_tensor(t).to(torch.float64) / self.num_train_timesteps

    @staticmethod
    def alpha_bar_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
        """The VP-equivalent alpha-bar ``(1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)`` of a rectified-flow sigma."""
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)


def flux_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """FLUX's resolution-dependent shift mu (``calculate_shift`` of diffusers' FluxPipeline): linear in the
    packed latent length between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len = int(config.get("base_image_seq_len", 256))
    max_len = int(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5))
    max_shift = float(config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len
