"""Gaussian transition kernels of the sampling chain, their log-probabilities and scores.

Forward policy (denoising step x_t -> x_next, DDIM with eta > 0; eta = 1 is DDPM's posterior):

    x0_hat  = (x_t - sqrt(1 - a) * eps) / sqrt(a)
    sigma^2 = eta^2 * (1 - a') / (1 - a) * (1 - a / a')
    mean    = sqrt(a') * x0_hat + sqrt(1 - a' - sigma^2) * eps
    P_F(x_next | x_t) = N(mean, sigma^2 I)

Backward policy (fixed noising between grid points, no parameters):

    P_B(x_t | x_next) = N(sqrt(a / a') * x_next, (1 - a / a') I)

with ``a = alpha_bar_t`` and ``a' = alpha_bar_next``. Log-probabilities are **summed** over all
non-batch dimensions by default; ``reduction="mean"`` divides by the dimension D, which multiplies the
effective inverse temperature of every balance condition by D (the authors' code does this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gfnalign.core.parametrization import _bcast

REDUCTIONS = ("sum", "mean")
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
            "a transition has zero variance (the last step lands on alpha_bar = 1, or eta = 0), so its "
            "log-probability is undefined; use a DDIM config with set_alpha_to_one=False, or pass "
            "final_alpha_cumprod < 1 to NoiseSchedule, and eta > 0"
        )
    out_dtype = torch.promote_types(x.dtype, mean.dtype)
    z = (x - mean) / std
    per_element = -0.5 * z.double() ** 2 - torch.log(std).double() - 0.5 * _LOG_2PI
    per_element = per_element.expand_as(z) if per_element.shape != z.shape else per_element
    total = per_element.flatten(1).sum(dim=1)
    if reduction == "mean":
        total = total / z[0].numel()
    return total.to(out_dtype)


def forward_std(
    alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float, eta: float = 1.0
) -> torch.Tensor:
    """DDIM's sigma_t for one step: ``eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))`` (``[N]``)."""
    a = torch.as_tensor(alpha_bar_t)
    an = torch.as_tensor(alpha_bar_next, dtype=a.dtype, device=a.device)
    return eta * ((1 - an) / (1 - a) * (1 - a / an)).clamp(min=0).sqrt()


def forward_kernel(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    alpha_bar_next: torch.Tensor | float,
    eta: float = 1.0,
) -> GaussianKernel:
    """P_F(x_next | x_t) for a (guided) noise prediction ``eps``; gradients flow through ``eps``.

    Equals ``DDIMScheduler.step(eta=eta)`` (and ``DDPMScheduler.step`` for eta = 1) with
    ``clip_sample=False``, given the same noise.
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: the forward kernel needs eta > 0 to have a density (DDIM eta=0 is deterministic)")
    a = _bcast(torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device), x_t)
    an = _bcast(torch.as_tensor(alpha_bar_next, dtype=x_t.dtype, device=x_t.device), x_t)
    std = forward_std(a, an, eta)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    mean = an.sqrt() * x0 + (1 - an - std**2).clamp(min=0).sqrt() * eps
    return GaussianKernel(mean=mean, std=std)


def backward_kernel(
    x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> GaussianKernel:
    """P_B(x_t | x_next): the fixed forward-noising kernel between two grid points."""
    a = _bcast(torch.as_tensor(alpha_bar_t, dtype=x_next.dtype, device=x_next.device), x_next)
    an = _bcast(torch.as_tensor(alpha_bar_next, dtype=x_next.dtype, device=x_next.device), x_next)
    ratio = a / an
    return GaussianKernel(mean=ratio.sqrt() * x_next, std=(1 - ratio).sqrt())


def score_pb_next(
    x_t: torch.Tensor, x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> torch.Tensor:
    """∇_{x_next} log P_B(x_t | x_next) = sqrt(a/a') (x_t - sqrt(a/a') x_next) / (1 - a/a')."""
    a = _bcast(torch.as_tensor(alpha_bar_t, dtype=x_next.dtype, device=x_next.device), x_next)
    an = _bcast(torch.as_tensor(alpha_bar_next, dtype=x_next.dtype, device=x_next.device), x_next)
    ratio = a / an
    return ratio.sqrt() * (x_t - ratio.sqrt() * x_next) / (1 - ratio)


def score_pb_t(
    x_t: torch.Tensor, x_next: torch.Tensor, alpha_bar_t: torch.Tensor | float, alpha_bar_next: torch.Tensor | float
) -> torch.Tensor:
    """∇_{x_t} log P_B(x_t | x_next) = -(x_t - sqrt(a/a') x_next) / (1 - a/a')."""
    return backward_kernel(x_next, alpha_bar_t, alpha_bar_next).score(x_t)


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
