"""Toy rewards whose exponential tilt of a Gaussian mixture stays a Gaussian mixture.

* linear ``r(x) = aᵀx``: component k becomes ``N(μ_k + βΣ_k a, Σ_k)`` with weight
  ``∝ w_k exp(β aᵀμ_k + ½ β² aᵀΣ_k a)``.
* quadratic ``r(x) = -‖x - c‖² / (2 s²)``: ``N(x; μ_k, Σ_k) exp(β r(x)) ∝ N(x; μ_k, Σ_k) N(x; c, (s²/β) I)``,
  a product of Gaussians: precision ``P_k = Σ_k⁻¹ + (β/s²) I``, mean ``P_k⁻¹(Σ_k⁻¹μ_k + (β/s²) c)``,
  weight ``∝ w_k N(μ_k; c, Σ_k + (s²/β) I)`` (needs β > 0).
* log-ratio ``r(x) = log q_f(x) − log p_f(x)`` for a target mixture q (``{"type": "log_ratio", "target": MIX}``):
  p_f and q_f are the pretrained data mixture and q noised to the chain's final alpha-bar, so at β = 1 the
  tilt ``p_f·exp(r)`` is q_f exactly: any mixture is a case. Other β are rejected (the tilt is then not a
  mixture).

``tilt(mixture, beta)`` returns the mixture proportional to ``p(x) exp(β r(x))`` (float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gfnalign.toy.mixture import DTYPE, GaussianMixture, _numeric

REWARD_TYPES = ("linear", "quadratic", "log_ratio")
#: the final alpha-bar of the toy's default grid (alphas_cumprod[0] of linear betas from 1e-4)
DEFAULT_FINAL_ALPHA_BAR = 1.0 - 1e-4


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


@dataclass(frozen=True)
class LogRatioReward:
    """``r(x) = log q_f(x) − log p_f(x)``: q the (clean) target mixture, p the (clean) pretrained data mixture,
    both noised to ``final_alpha_bar`` (the chain's terminal level). Valid at β = 1 only, where the tilt of
    p_f is q_f exactly."""

    target: GaussianMixture
    base: GaussianMixture
    final_alpha_bar: float = DEFAULT_FINAL_ALPHA_BAR

    def __post_init__(self) -> None:
        if self.target.dim != self.base.dim:
            raise ValueError(f"log_ratio reward: the target mixture has dimension {self.target.dim} but the "
                             f"pretrained mixture has {self.base.dim}")
        object.__setattr__(self, "_q", self.target.noised(self.final_alpha_bar))
        object.__setattr__(self, "_p", self.base.noised(self.final_alpha_bar))

    @property
    def dim(self) -> int:
        return self.target.dim

    def with_final_alpha_bar(self, alpha_bar: float) -> LogRatioReward:
        """The same reward for a chain that ends at ``alpha_bar``."""
        if float(alpha_bar) == self.final_alpha_bar:
            return self
        return LogRatioReward(self.target, self.base, float(alpha_bar))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self._q.log_prob(x) - self._p.log_prob(x)).to(x.dtype)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return (self._q.score(x) - self._p.score(x)).to(x.dtype)

    def tilt(self, mix: GaussianMixture, beta: float) -> GaussianMixture:
        if beta != 1:
            raise ValueError(f"beta={beta}: a log_ratio reward targets its mixture exactly only at beta = 1 "
                             "(p·exp(β(log q − log p)) is not a mixture otherwise); use --beta 1")
        return self._q

    def to_spec(self) -> dict[str, Any]:
        return {"type": "log_ratio", "target": self.target.to_spec()}


ToyReward = LinearReward | QuadraticReward | LogRatioReward


def bind_final_alpha_bar(reward: ToyReward, alpha_bar: float) -> ToyReward:
    """``reward`` for a chain whose terminal level is ``alpha_bar`` (only the log-ratio reward depends on it)."""
    if isinstance(reward, LogRatioReward):
        return reward.with_final_alpha_bar(alpha_bar)
    return reward


def reward_from_spec(
    spec: Mapping[str, Any], dim: int | None = None, *, source: str = "reward", base: GaussianMixture | None = None,
    beta: float | None = None,
) -> ToyReward:
    """Build from the ``REWARD.json`` content; ``dim`` (the mixture's d) is checked when given.

    A ``log_ratio`` reward needs ``base``, the pretrained data mixture; ``beta`` (when given) is checked
    against it (only 1 is valid)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{source}: expected a JSON object with a 'type' field ({' or '.join(REWARD_TYPES)})")
    kind = spec.get("type")
    if kind not in REWARD_TYPES:
        raise ValueError(f"{source}.type={kind!r} is not a known reward type; use one of {', '.join(REWARD_TYPES)}")
    if kind == "log_ratio":
        unknown = set(spec) - {"type", "target"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} for a log_ratio reward; it takes 'target'")
        if "target" not in spec:
            raise ValueError(f"{source}: a log_ratio reward needs field 'target' (a mixture like MIX.json)")
        if base is None:
            raise ValueError(f"{source}: a log_ratio reward needs the pretrained mixture (pass base=)")
        target = GaussianMixture.from_spec(spec["target"], source=f"{source}.target")
        if dim is not None and target.dim != dim:
            raise ValueError(f"{source}.target has dimension {target.dim} but the mixture has dimension {dim}")
        if beta is not None and beta != 1:
            raise ValueError(f"{source}: a log_ratio reward targets its mixture exactly only at beta = 1, got "
                             f"beta={beta}; use --beta 1")
        return LogRatioReward(target=target, base=base)
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
