"""Gaussian transition kernels of the sampling chain, their log-probabilities and scores.

States follow a Gaussian interpolant ``x = alpha * x0 + sigma * eps``; a step goes ``x_t -> x_next`` with
``sigma_t > sigma_next``. Every interpolant is a scaled VP one: with ``scale = sqrt(alpha^2 + sigma^2)``
and the VP-equivalent alpha-bar ``a = alpha^2 / scale^2``, ``x / scale`` is a VP state. The kernels are
written once in that form, so the VP schedules of DDPM/DDIM (``scale = 1``, carried as ``None`` and never
multiplied) keep their ᾱ-form arithmetic bit for bit, and rectified flow (SD3, FLUX: ``alpha = 1 - sigma``)
reuses them. Log-densities are taken in the unscaled x, so no Jacobian term appears anywhere.

Forward policies ``P_F(x_next | x_t)`` (``kind``), from the policy's (x̂0, ε̂) at x_t:

* ``ddim`` (eta in (0, 1], any interpolant; eta = 1 on VP is DDPM's posterior)::

      s^2  = eta^2 * (1 - a') / (1 - a) * (1 - a / a')          (VP units)
      mean = scale' * (sqrt(a') * x0_hat + sqrt(1 - a' - s^2) * eps_hat),   std = scale' * s

* ``flow_sde``: Flow-GRPO's SDE step (rectified flow; ``eta`` is its noise level a, default 0.7),
  with the velocity ``u = eps_hat - x0_hat`` and ``dt = sigma' - sigma < 0``::

      s_t  = a * sqrt(sigma / (1 - sigma))       (at sigma = 1 the next grid value replaces sigma below)
      mean = x * (1 + s_t^2 * dt / (2 sigma)) + u * (1 + s_t^2 * (1 - sigma) / (2 sigma)) * dt
      std  = s_t * sqrt(-dt)

  a = 0 is ``FlowMatchEulerDiscreteScheduler.step`` (``x + dt * u``).
* ``cps``: coefficients-preserving sampling (arXiv 2509.05952), any interpolant, ``eta`` = a in (0, 1]::

      std = sigma' * sin(a * pi / 2),   mean = alpha' * x0_hat + sqrt(sigma'^2 - std^2) * eps_hat

Backward policy (the fixed noising kernel between grid points, any interpolant), ``r = alpha / alpha'``::

    P_B(x_t | x_next) = N(r * x_next, (sigma^2 - r^2 * sigma'^2) I)
                      = N(scale * sqrt(a / a') * x_next / scale', scale^2 * (1 - a / a') I)

Log-probabilities are **summed** over all non-batch dimensions by default; ``reduction="mean"`` divides by
the dimension D, which multiplies the effective inverse temperature of every balance condition by D (the
authors' code does this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gfnalign.core.parametrization import _bcast

REDUCTIONS = ("sum", "mean")
KERNELS = ("ddim", "flow_sde", "cps")
POLICY_OUTPUTS = ("epsilon", "flow")
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianKernel:
    """An isotropic Gaussian per row: ``mean`` like x, ``std`` broadcastable to x (``[N,1,...]``)."""

    mean: torch.Tensor
    std: torch.Tensor

    def log_prob(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return gaussian_log_prob(x, self.mean, self.std, reduction)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Reparametrised sample ``mean + std * noise``."""
        return self.mean + self.std * noise

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Gradient of the log-density with respect to the sample: ``-(x - mean) / std^2``."""
        return -(x - self.mean) / self.std**2

    def noise_of(self, x: torch.Tensor) -> torch.Tensor:
        """The standard-normal draw that produced ``x`` (inverse of :meth:`sample`)."""
        return (x - self.mean) / self.std


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """log N(x; mean, std^2 I) per row, ``[N]``, reduced over every non-batch dimension.

    The per-element terms are accumulated in float64 so that differences of large summed log-probs
    (D = 16384 for SD1.5) keep their precision; the result has the promoted input dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use 'sum' (default, exact balance) or 'mean' (authors' code)")
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError(
            "a transition has zero variance (the last step lands on alpha_bar = 1 / sigma = 0 with a ddim or cps "
            "kernel, or eta = 0), so its log-probability is undefined; use a DDIM config with "
            "set_alpha_to_one=False, or pass final_alpha_cumprod < 1 (VP) / final_sigma > 0 (flow) to "
            "NoiseSchedule, or the flow_sde kernel, and eta > 0"
        )
    out_dtype = torch.promote_types(x.dtype, mean.dtype)
    z = (x - mean) / std
    per_element = -0.5 * z.double() ** 2 - torch.log(std).double() - 0.5 * _LOG_2PI
    per_element = per_element.expand_as(z) if per_element.shape != z.shape else per_element
    total = per_element.flatten(1).sum(dim=1)
    if reduction == "mean":
        total = total / z[0].numel()
    return total.to(out_dtype)


def check_noise_level(kind: str, eta: float) -> float:
    """The noise level a kernel ``kind`` accepts (a clear error naming the field otherwise)."""
    if kind not in KERNELS:
        raise ValueError(f"kernel={kind!r} is not supported; use one of {', '.join(KERNELS)}")
    eta = float(eta)
    if kind == "ddim" and not 0 < eta <= 1:
        raise ValueError(f"eta={eta!r} is not allowed for the ddim kernel: use 0 < eta <= 1 (1 = DDPM's posterior)")
    if kind == "cps" and not 0 < eta <= 1:
        raise ValueError(f"eta={eta!r} is not allowed for the cps kernel: its noise level a needs 0 < a <= 1")
    if kind == "flow_sde" and not (0 < eta < math.inf):
        raise ValueError(f"eta={eta!r} is not allowed for the flow_sde kernel: its noise level a must be > 0 (0.7 in Flow-GRPO)")
    return eta


def _as_float_tensor(value: torch.Tensor | float) -> torch.Tensor:
    """Tensors as they are; Python numbers as float64 (never rounded to float32 on the way)."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)


@dataclass(frozen=True)
class NoiseLevels:
    """The noise levels of one step ``x_t -> x_next`` per row (``[N]`` tensors, or floats).

    ``alpha_t, sigma_t`` (``alpha_next, sigma_next``) are the interpolant's coefficients
    ``x = alpha * x0 + sigma * eps``; ``alpha_bar = alpha^2 / (alpha^2 + sigma^2)`` is the VP-equivalent
    alpha-bar and ``scale = sqrt(alpha^2 + sigma^2)``, ``None`` for VP schedules (exactly 1, never multiplied,
    so the VP arithmetic is the ᾱ form bit for bit). Build with :meth:`vp` or :meth:`rectified_flow`, or
    take them from :meth:`gfnalign.core.NoiseSchedule.levels`.
    """

    alpha_bar_t: torch.Tensor | float
    alpha_bar_next: torch.Tensor | float
    alpha_t: torch.Tensor | float
    sigma_t: torch.Tensor | float
    alpha_next: torch.Tensor | float
    sigma_next: torch.Tensor | float
    scale_t: torch.Tensor | float | None = None
    scale_next: torch.Tensor | float | None = None

    @classmethod
    def vp(cls, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float) -> NoiseLevels:
        a, an = _as_float_tensor(alpha_bar_t), _as_float_tensor(alpha_bar_next)
        return cls(a, an, a.sqrt(), (1 - a).sqrt(), an.sqrt(), (1 - an).sqrt())

    @classmethod
    def rectified_flow(cls, sigma_t: torch.Tensor | float, sigma_next: torch.Tensor | float) -> NoiseLevels:
        """``alpha = 1 - sigma``; compute in float64 and cast where precision matters."""
        s, sn = _as_float_tensor(sigma_t), _as_float_tensor(sigma_next)
        a, an = 1 - s, 1 - sn
        c2, cn2 = a**2 + s**2, an**2 + sn**2
        return cls(a**2 / c2, an**2 / cn2, a, s, an, sn, c2.sqrt(), cn2.sqrt())

    def after(self) -> NoiseLevels:
        """The levels of the state *after* the step (its ``*_next`` values in the ``*_t`` slots)."""
        return NoiseLevels(self.alpha_bar_next, self.alpha_bar_next, self.alpha_next, self.sigma_next,
                           self.alpha_next, self.sigma_next, self.scale_next, self.scale_next)

    def like(self, x: torch.Tensor) -> NoiseLevels:
        """Every level broadcast against ``x`` (``[N] -> [N,1,...]``) in its dtype and device."""
        return NoiseLevels(**{
            name: None if value is None else _bcast(value, x) for name, value in self.__dict__.items()
        })


def forward_std(
    alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float, eta: float = 1.0
) -> torch.Tensor:
    """DDIM's sigma_t for one step (VP units): ``eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))`` (``[N]``)."""
    a = torch.as_tensor(alpha_bar_t)
    an = torch.as_tensor(alpha_bar_next, dtype=a.dtype, device=a.device)
    return eta * ((1 - an) / (1 - a) * (1 - a / an)).clamp(min=0).sqrt()


def predict_x0_eps(
    x_t: torch.Tensor, output: torch.Tensor, levels: NoiseLevels, output_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε̂)`` from the policy's output: ``epsilon`` (any interpolant, via the VP-scaled state) or
    ``flow`` (the rectified-flow velocity ``u = eps - x0``, finite at sigma = 1). ``levels`` already
    broadcast against ``x_t`` (:meth:`NoiseLevels.like`)."""
    if output_type == "epsilon":
        a = levels.alpha_bar_t
        xs = x_t if levels.scale_t is None else x_t / levels.scale_t
        return (xs - (1 - a).sqrt() * output) / a.sqrt(), output
    if output_type == "flow":
        sigma = levels.sigma_t
        return x_t - sigma * output, x_t + (1 - sigma) * output
    raise ValueError(f"policy output {output_type!r} is not supported; use one of {', '.join(POLICY_OUTPUTS)}")


def step_kernel(
    x_t: torch.Tensor,
    output: torch.Tensor,
    levels: NoiseLevels,
    eta: float = 1.0,
    *,
    kind: str = "ddim",
    output_type: str = "epsilon",
) -> GaussianKernel:
    """P_F(x_next | x_t) of kernel ``kind`` (see the module docstring) for the policy's (guided) ``output``;
    gradients flow through ``output``. ``eta = 0`` gives the deterministic step (``std = 0``: a mean, no
    density), e.g. ``flow_sde`` at 0 is the Euler step of ``FlowMatchEulerDiscreteScheduler``."""
    lv = levels.like(x_t)
    if kind == "ddim":
        a, an = lv.alpha_bar_t, lv.alpha_bar_next
        std = forward_std(a, an, eta)
        x0, eps = predict_x0_eps(x_t, output, lv, output_type)
        mean = an.sqrt() * x0 + (1 - an - std**2).clamp(min=0).sqrt() * eps
        if lv.scale_next is not None:
            mean, std = lv.scale_next * mean, lv.scale_next * std
        return GaussianKernel(mean=mean, std=std)
    if kind == "flow_sde":
        sigma, sigma_next = lv.sigma_t, lv.sigma_next
        dt = sigma_next - sigma
        # at sigma = 1 the ratio sigma / (1 - sigma) is infinite: flow_grpo uses the next grid value there
        std_t = eta * (sigma / (1 - torch.where(sigma == 1, sigma_next, sigma))).sqrt()
        if output_type == "flow":
            velocity = output
        else:
            x0, eps = predict_x0_eps(x_t, output, lv, output_type)
            velocity = eps - x0
        mean = x_t * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        return GaussianKernel(mean=mean, std=std_t * (-dt).sqrt())
    if kind == "cps":
        std = lv.sigma_next * math.sin(eta * math.pi / 2)
        x0, eps = predict_x0_eps(x_t, output, lv, output_type)
        mean = lv.alpha_next * x0 + (lv.sigma_next**2 - std**2).clamp(min=0).sqrt() * eps
        return GaussianKernel(mean=mean, std=std)
    raise ValueError(f"kernel={kind!r} is not supported; use one of {', '.join(KERNELS)}")


def noising_kernel(x_next: torch.Tensor, levels: NoiseLevels) -> GaussianKernel:
    """P_B(x_t | x_next): the fixed forward-noising kernel of the interpolant between two grid points."""
    lv = levels.like(x_next)
    ratio = lv.alpha_bar_t / lv.alpha_bar_next
    mean, std = ratio.sqrt() * x_next, (1 - ratio).sqrt()
    if lv.scale_t is not None:
        mean, std = (lv.scale_t / lv.scale_next) * mean, lv.scale_t * std
    return GaussianKernel(mean=mean, std=std)


def noising_score_next(x_t: torch.Tensor, x_next: torch.Tensor, levels: NoiseLevels) -> torch.Tensor:
    """∇_{x_next} log P_B(x_t | x_next) = m (x_t - m x_next) / v for P_B = N(m x_next, v I)."""
    lv = levels.like(x_next)
    ratio = lv.alpha_bar_t / lv.alpha_bar_next
    if lv.scale_t is None:
        return ratio.sqrt() * (x_t - ratio.sqrt() * x_next) / (1 - ratio)
    m = ratio.sqrt() * (lv.scale_t / lv.scale_next)
    return m * (x_t - m * x_next) / ((1 - ratio) * lv.scale_t**2)


def noising_score_t(x_t: torch.Tensor, x_next: torch.Tensor, levels: NoiseLevels) -> torch.Tensor:
    """∇_{x_t} log P_B(x_t | x_next)."""
    return noising_kernel(x_next, levels).score(x_t)


# -- the VP ε-form entry points (alpha-bars in, ε-prediction, DDIM-η) ------------------------------------
def forward_kernel(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    alpha_bar_next: torch.Tensor | float,
    eta: float = 1.0,
) -> GaussianKernel:
    """P_F(x_next | x_t) of a VP schedule for a (guided) noise prediction ``eps`` (DDIM-η).

    Equals ``DDIMScheduler.step(eta=eta)`` (and ``DDPMScheduler.step`` for eta = 1) with
    ``clip_sample=False``, given the same noise.
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: the forward kernel needs eta > 0 to have a density (DDIM eta=0 is deterministic)")
    return step_kernel(x_t, eps, NoiseLevels.vp(alpha_bar_t, alpha_bar_next), eta)


def backward_kernel(
    x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> GaussianKernel:
    """P_B(x_t | x_next) of a VP schedule: ``N(sqrt(a/a') x_next, (1 - a/a') I)``."""
    return noising_kernel(x_next, NoiseLevels.vp(alpha_bar_t, alpha_bar_next))


def score_pb_next(
    x_t: torch.Tensor, x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> torch.Tensor:
    """VP ∇_{x_next} log P_B(x_t | x_next) = sqrt(a/a') (x_t - sqrt(a/a') x_next) / (1 - a/a')."""
    return noising_score_next(x_t, x_next, NoiseLevels.vp(alpha_bar_t, alpha_bar_next))


def score_pb_t(
    x_t: torch.Tensor, x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> torch.Tensor:
    """VP ∇_{x_t} log P_B(x_t | x_next) = -(x_t - sqrt(a/a') x_next) / (1 - a/a')."""
    return noising_score_t(x_t, x_next, NoiseLevels.vp(alpha_bar_t, alpha_bar_next))


def score_wrt_mean_input(
    log_prob: torch.Tensor, x_t: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor:
    """∇_{x_t} of a per-row log-probability whose mean depends on ``x_t`` (autograd through the model).

    ``x_t`` must have ``requires_grad=True`` and ``log_prob`` must have been computed from it. With
    ``create_graph=False`` (default, like the authors' code) the result is a constant for the
    optimiser; ``create_graph=True`` lets a loss on it train the model (second-order, expensive).
    """
    if not x_t.requires_grad:
        raise ValueError("x_t must require grad to take the reverse score ∇_{x_t} log P_F")
    (grad,) = torch.autograd.grad(log_prob.sum(), x_t, create_graph=create_graph, retain_graph=True)
    return grad
