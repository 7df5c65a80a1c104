"""Toy rewards whose exponential tilt of a Gaussian mixture stays a Gaussian mixture.

* linear ``r(x) = aᵀx``: component k becomes ``N(μ_k + βΣ_k a, Σ_k)`` with weight
  ``∝ w_k exp(β aᵀμ_k + ½ β² aᵀΣ_k a)``.
* quadratic ``r(x) = -‖x - c‖² / (2 s²)``: ``N(x; μ_k, Σ_k) exp(β r(x)) ∝ N(x; μ_k, Σ_k) N(x; c, (s²/β) I)``,
  a product of Gaussians: precision ``P_k = Σ_k⁻¹ + (β/s²) I``, mean ``P_k⁻¹(Σ_k⁻¹μ_k + (β/s²) c)``,
  weight ``∝ w_k N(μ_k; c, Σ_k + (s²/β) I)`` (needs β > 0).

``tilt(mixture, beta)`` returns the mixture proportional to ``p(x) exp(β r(x))`` (float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gfnalign.toy.mixture import DTYPE, GaussianMixture, _numeric

REWARD_TYPES = ("linear", "quadratic")


@dataclass(frozen=True)
class LinearReward:
    """``r(x) = aᵀx`` with ``a`` of shape [d]."""

    a: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.a.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.to(x.dtype)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.to(x.dtype).expand_as(x)

    def tilt(self, mix: GaussianMixture, beta: float) -> GaussianMixture:
        covs = mix.covs
        sa = covs @ self.a  # [K, d]
        log_w = mix.weights.log() + beta * (mix.means @ self.a) + 0.5 * beta**2 * (sa @ self.a)
        return GaussianMixture(
            weights=torch.softmax(log_w, 0),
            means=mix.means + beta * sa,
            eigvals=mix.eigvals,
            eigvecs=mix.eigvecs,
        )

    def to_spec(self) -> dict[str, Any]:
        return {"type": "linear", "a": self.a.tolist()}


@dataclass(frozen=True)
class QuadraticReward:
    """``r(x) = -‖x - center‖² / (2 scale²)``."""

    center: torch.Tensor
    scale: float

    @property
    def dim(self) -> int:
        return int(self.center.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.center.to(x.dtype)) ** 2).sum(-1) / (2 * self.scale**2)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return -(x - self.center.to(x.dtype)) / self.scale**2

    def tilt(self, mix: GaussianMixture, beta: float) -> GaussianMixture:
        if beta == 0:
            return mix
        if beta < 0:
            raise ValueError(f"beta={beta}: a quadratic reward tilt needs beta >= 0 (a negative one is not normalisable)")
        K, d = mix.means.shape
        prec_r = beta / self.scale**2
        U, lam = mix.eigvecs, mix.eigvals
        # In each component's eigenbasis both precisions are diagonal.
        post_var = 1.0 / (1.0 / lam + prec_r)  # [K, d]
        c_rot = torch.einsum("kde,d->ke", U, self.center)  # U_kᵀ c
        mu_rot = torch.einsum("kde,kd->ke", U, mix.means)  # U_kᵀ μ_k
        post_mean_rot = post_var * (mu_rot / lam + prec_r * c_rot)
        post_mean = torch.einsum("kde,ke->kd", U, post_mean_rot)
        # weight ∝ w_k N(μ_k; c, Σ_k + (s²/β) I), evaluated in the eigenbasis
        var = lam + 1.0 / prec_r
        log_w = mix.weights.log() - 0.5 * ((mu_rot - c_rot) ** 2 / var).sum(1) - 0.5 * var.log().sum(1)
        return GaussianMixture(weights=torch.softmax(log_w, 0), means=post_mean, eigvals=post_var, eigvecs=U)

    def to_spec(self) -> dict[str, Any]:
        return {"type": "quadratic", "center": self.center.tolist(), "scale": self.scale}


ToyReward = LinearReward | QuadraticReward


def reward_from_spec(spec: Mapping[str, Any], dim: int | None = None, *, source: str = "reward") -> ToyReward:
    """Build from the ``REWARD.json`` content; ``dim`` (the mixture's d) is checked when given."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{source}: expected a JSON object with a 'type' field ({' or '.join(REWARD_TYPES)})")
    kind = spec.get("type")
    if kind not in REWARD_TYPES:
        raise ValueError(f"{source}.type={kind!r} is not a known reward type; use one of {', '.join(REWARD_TYPES)}")
    if kind == "linear":
        unknown = set(spec) - {"type", "a"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} for a linear reward; it takes 'a'")
        if "a" not in spec:
            raise ValueError(f"{source}: a linear reward needs field 'a' (a list of d numbers)")
        a = _numeric(spec["a"], f"{source}.a")
        if a.dim() != 1:
            raise ValueError(f"{source}.a must be a flat list of numbers, got shape {list(a.shape)}")
        if dim is not None and a.shape[0] != dim:
            raise ValueError(f"{source}.a has {a.shape[0]} entries but the mixture has dimension {dim}")
        return LinearReward(a=a)
    unknown = set(spec) - {"type", "center", "scale"}
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} for a quadratic reward; it takes 'center', 'scale'")
    for key in ("center", "scale"):
        if key not in spec:
            raise ValueError(f"{source}: a quadratic reward needs field {key!r}")
    c = _numeric(spec["center"], f"{source}.center")
    if c.dim() != 1:
        raise ValueError(f"{source}.center must be a flat list of numbers, got shape {list(c.shape)}")
    if dim is not None and c.shape[0] != dim:
        raise ValueError(f"{source}.center has {c.shape[0]} entries but the mixture has dimension {dim}")
    scale = spec["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"{source}.scale={scale!r} must be a positive number")
    return QuadraticReward(center=c.to(DTYPE), scale=float(scale))
