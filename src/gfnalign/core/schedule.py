"""Noise schedules built from diffusers scheduler configs, without importing diffusers.

A trajectory runs from pure noise to the image: step ``k`` (0-based) goes from timestep
``timesteps[k]`` to ``next_timesteps[k]`` (``t > t_next``), with cumulative signal rates
``alpha_bars[k]`` and ``alpha_bars_next[k]``. The last step lands on the *final* alpha-bar, which is
1.0 (clean) or ``alphas_cumprod[0]`` exactly as diffusers' DDIM ``set_alpha_to_one`` decides, so the
math here reproduces ``DDIMScheduler.step`` / ``DDPMScheduler.step`` given the same noise.

Timestep grids follow diffusers' ``set_timesteps``:

* ``leading``:  ``arange(K) * (T // K)`` reversed, plus ``steps_offset``
* ``trailing``: ``round(arange(T, 0, -T / K)) - 1``
* ``linspace``: ``round(linspace(0, T - 1, K))`` reversed

and the successor of ``t`` is ``t - T // K`` (diffusers' rule), landing on the final alpha-bar when
negative. ``next_timesteps`` is clamped at 0 so networks that take a timestep input see a valid one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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


@dataclass(frozen=True)
class NoiseSchedule:
    """Everything the kernels need about the inference grid.

    Attributes (shapes in brackets):
        alphas_cumprod: [T] float64, the training schedule's cumulative alphas.
        timesteps: [K] int64, diffusion timestep of the state *before* each step (noisiest first).
        next_timesteps: [K] int64, timestep after each step, clamped at 0 for network inputs.
        alpha_bars: [K] float64, alpha-bar at ``timesteps``.
        alpha_bars_next: [K] float64, alpha-bar after each step (the last one is the final alpha-bar).
        prediction_type: what the network predicts (``epsilon``, ``v_prediction`` or ``sample``).
    """

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    next_timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    alpha_bars_next: torch.Tensor
    prediction_type: str = "epsilon"

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

    # -- construction --------------------------------------------------------------------------------
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
        stride = T // num_inference_steps
        nxt = ts - stride
        ab_next = torch.where(nxt >= 0, ac[nxt.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
        return cls(
            alphas_cumprod=ac,
            timesteps=ts,
            next_timesteps=nxt.clamp(min=0),
            alpha_bars=ac[ts],
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
        T = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        else:
            betas = make_betas(
                cfg.get("beta_schedule", "linear"), T, cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
            )
        if cfg.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if final_alpha_cumprod is None:
            # DDIM: set_alpha_to_one; DDPM has no such flag and steps to alpha-bar 1 (a deterministic
            # last step), which the objectives reject later with a clear message.
            # the class name is in saved configs (``_class_name``) or, for a live scheduler object, its type
            class_name = str(cfg.get("_class_name") or (type(config).__name__ if hasattr(config, "config") else ""))
            # a bare DDPM config dict has DDPM's ``variance_type`` and no ``set_alpha_to_one``
            is_ddpm = "DDPM" in class_name or ("variance_type" in cfg and "set_alpha_to_one" not in cfg)
            set_one = cfg.get("set_alpha_to_one", is_ddpm)
            final_alpha_cumprod = 1.0 if set_one else float(alphas_cumprod[0])
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
        idx = step.detach().to("cpu", torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise IndexError(f"step indices must be in [0, {self.num_steps - 1}], got {idx.tolist()}")
        device = device if device is not None else step.device
        return (
            self.timesteps[idx].to(device),
            self.next_timesteps[idx].to(device),
            self.alpha_bars[idx].to(device=device, dtype=dtype),
            self.alpha_bars_next[idx].to(device=device, dtype=dtype),
        )

    def alpha_bar_of_timestep(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Alpha-bar of the training schedule at integer timesteps ``t`` ([N])."""
        return self.alphas_cumprod.to(t.device)[t.long()].to(dtype)
