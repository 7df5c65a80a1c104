"""Gaussian mixtures in d dimensions and their exact diffusion marginals.

The data distribution of the toy world is ``p(x) = Σ_k w_k N(x; μ_k, Σ_k)``. Under the forward
noising ``x_t = sqrt(ab) x_0 + sqrt(1 - ab) ε`` its marginal at noise level ``ab`` (alpha-bar) is again
a mixture, with components ``N(sqrt(ab) μ_k, ab Σ_k + (1 - ab) I)``, so the exact denoiser is

    ε*(x_t, ab) = -sqrt(1 - ab) ∇_x log p_ab(x_t)

in closed form. Each Σ_k is stored through its eigendecomposition ``Σ_k = U_k diag(λ_k) U_kᵀ``; the
noised covariance shares the eigenvectors (eigenvalues ``ab λ_k + 1 - ab``), which makes log-densities,
scores and responsibilities cheap, batched over rows with different noise levels, and differentiable
(autograd through :meth:`GaussianMixture.log_prob` equals :meth:`GaussianMixture.score`).

Everything is computed in float64; inputs are promoted and results come back in float64.
Shapes: ``[N, d]`` points, ``[N]`` per-row alpha-bars (or a float), ``[K]`` components.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DTYPE = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _as_ab(alpha_bar: torch.Tensor | float | None, n: int) -> torch.Tensor:
    """Per-row alpha-bar ``[N, 1, 1]`` for broadcasting against ``[N, K, d]``."""
    if alpha_bar is None:
        alpha_bar = 1.0
    ab = torch.as_tensor(alpha_bar, dtype=DTYPE)
    if ab.dim() == 0:
        ab = ab.expand(n)
    if ab.shape != (n,):
        raise ValueError(f"alpha_bar must be a float or have shape [{n}], got {tuple(ab.shape)}")
    if bool((ab <= 0).any()) or bool((ab > 1).any()):
        raise ValueError("alpha_bar must lie in (0, 1]")
    return ab.reshape(n, 1, 1)


@dataclass(frozen=True)
class GaussianMixture:
    """``Σ_k w_k N(μ_k, Σ_k)`` with ``Σ_k = U_k diag(λ_k) U_kᵀ``.

    Attributes:
        weights: [K] positive, summing to one.
        means: [K, d].
        eigvals: [K, d] positive eigenvalues λ_k of each covariance.
        eigvecs: [K, d, d] orthonormal eigenvectors U_k (columns).
    """

    weights: torch.Tensor
    means: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_covs(cls, weights: Any, means: Any, covs: Any) -> GaussianMixture:
        w = torch.as_tensor(weights, dtype=DTYPE)
        mu = torch.as_tensor(means, dtype=DTYPE)
        cov = torch.as_tensor(covs, dtype=DTYPE)
        K, d = mu.shape
        if cov.shape != (K, d, d):
            raise ValueError(f"covs must have shape [{K}, {d}, {d}] to match means, got {list(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-10):
            raise ValueError("covs: every covariance matrix must be symmetric")
        lam, U = torch.linalg.eigh(cov)
        if bool((lam <= 0).any()):
            bad = int(torch.nonzero((lam <= 0).any(dim=1))[0])
            raise ValueError(f"covs[{bad}] is not positive definite (eigenvalues {lam[bad].tolist()}); fix the matrix")
        return cls(weights=w / w.sum(), means=mu, eigvals=lam, eigvecs=U)

    @classmethod
    def isotropic(cls, weights: Any, means: Any, stds: Any) -> GaussianMixture:
        mu = torch.as_tensor(means, dtype=DTYPE)
        K, d = mu.shape
        s = torch.as_tensor(stds, dtype=DTYPE).reshape(K)
        eye = torch.eye(d, dtype=DTYPE).expand(K, d, d).clone()
        return cls(
            weights=torch.as_tensor(weights, dtype=DTYPE) / torch.as_tensor(weights, dtype=DTYPE).sum(),
            means=mu,
            eigvals=(s**2).unsqueeze(1).expand(K, d).clone(),
            eigvecs=eye,
        )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, source: str = "mixture") -> GaussianMixture:
        """Build from the ``MIX.json`` content ``{"weights", "means", "stds" | "covs"}`` with checks
        that name the offending field. Weights that do not sum to one are an error (a silent rescale
        would hide a typo); normalise them yourself."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{source}: expected a JSON object with weights, means and stds|covs")
        unknown = set(spec) - {"weights", "means", "stds", "covs"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: weights, means, stds or covs")
        for key in ("weights", "means"):
            if key not in spec:
                raise ValueError(f"{source}: missing field {key!r}")
        if ("stds" in spec) == ("covs" in spec):
            raise ValueError(f"{source}: give exactly one of 'stds' (isotropic) or 'covs' (full covariances)")
        means = _numeric(spec["means"], f"{source}.means")
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"{source}.means must be a non-empty list of equal-length lists [K][d], got shape {list(means.shape)}")
        K, d = means.shape
        weights = _numeric(spec["weights"], f"{source}.weights")
        if weights.shape != (K,):
            raise ValueError(f"{source}.weights has {weights.numel()} entries but means has {K} components")
        if bool((weights <= 0).any()):
            raise ValueError(f"{source}.weights={weights.tolist()} must all be positive")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(
                f"{source}.weights={weights.tolist()} sum to {float(weights.sum()):.6g}, not 1; "
                "divide them by their sum"
            )
        if "stds" in spec:
            stds = _numeric(spec["stds"], f"{source}.stds")
            if stds.shape != (K,):
                raise ValueError(f"{source}.stds has {stds.numel()} entries but means has {K} components (one std each)")
            if bool((stds <= 0).any()):
                raise ValueError(f"{source}.stds={stds.tolist()} must all be positive")
            return cls.isotropic(weights, means, stds)
        covs = _numeric(spec["covs"], f"{source}.covs")
        if covs.shape != (K, d, d):
            raise ValueError(f"{source}.covs must have shape [{K}][{d}][{d}] to match means, got {list(covs.shape)}")
        try:
            return cls.from_covs(weights, means, covs)
        except ValueError as err:
            raise ValueError(f"{source}.{err}") from None

    # -- basic properties ----------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def covs(self) -> torch.Tensor:
        """[K, d, d] covariance matrices."""
        U, lam = self.eigvecs, self.eigvals
        return U @ torch.diag_embed(lam) @ U.transpose(1, 2)

    def mean(self) -> torch.Tensor:
        """[d] mean of the mixture."""
        return (self.weights[:, None] * self.means).sum(0)

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The marginal of ``sqrt(ab) x0 + sqrt(1 - ab) ε`` for x0 from this mixture (a mixture)."""
        ab = float(alpha_bar)
        return GaussianMixture(
            weights=self.weights,
            means=math.sqrt(ab) * self.means,
            eigvals=ab * self.eigvals + (1 - ab),
            eigvecs=self.eigvecs,
        )

    # -- densities -----------------------------------------------------------------------------------
    def _component_terms(
        self, x: torch.Tensor, alpha_bar: torch.Tensor | float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log N (``[N, K]``), rotated residuals y (``[N, K, d]``) and variances v
        (``[N, K, d]``, or ``[1, K, d]`` when every row has the same noise level: samplers and rollouts
        evaluate one level per step, and the broadcast keeps the per-row work to two small matmuls)."""
        x = x.to(DTYPE)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {tuple(x.shape)}")
        n = x.shape[0]
        K, d = self.num_components, self.dim
        ab = _as_ab(alpha_bar, n)  # [N,1,1]
        if n > 1 and not ab.requires_grad and bool((ab == ab[:1]).all()):
            ab = ab[:1]  # one level for all rows
        # y_k = U_kᵀ(x − √ab m_k) for all k at once: x·[U_1 … U_K] − √ab·[U_1ᵀm_1 … U_Kᵀm_K]
        y = (x @ self._stacked_eigvecs).reshape(n, K, d) - ab.sqrt() * self._rotated_means[None]
        v = ab * self.eigvals[None] + (1 - ab)  # [N or 1, K, d]
        log_n = -0.5 * (y**2 / v).sum(-1) - 0.5 * v.log().sum(-1) - 0.5 * self.dim * _LOG_2PI
        return log_n, y, v

    @functools.cached_property
    def _stacked_eigvecs(self) -> torch.Tensor:
        """[d, K·d] the eigenvector matrices side by side (column block k is U_k)."""
        return self.eigvecs.permute(1, 0, 2).reshape(self.dim, -1)

    @functools.cached_property
    def _rotated_means(self) -> torch.Tensor:
        """[K, d] U_kᵀ m_k."""
        return torch.einsum("kde,kd->ke", self.eigvecs, self.means)

    def log_prob(self, x: torch.Tensor, alpha_bar: torch.Tensor | float | None = None) -> torch.Tensor:
        """[N] log p_ab(x) of the mixture noised to ``alpha_bar`` (None or 1: the clean mixture)."""
        log_n, _, _ = self._component_terms(x, alpha_bar)
        return torch.logsumexp(log_n + self.weights.log()[None], dim=1)

    def responsibilities(self, x: torch.Tensor, alpha_bar: torch.Tensor | float | None = None) -> torch.Tensor:
        """[N, K] posterior probability of each component given x (at noise level ``alpha_bar``)."""
        log_n, _, _ = self._component_terms(x, alpha_bar)
        return torch.softmax(log_n + self.weights.log()[None], dim=1)

    def score(self, x: torch.Tensor, alpha_bar: torch.Tensor | float | None = None) -> torch.Tensor:
        """[N, d] ∇_x log p_ab(x), in closed form."""
        log_n, y, v = self._component_terms(x, alpha_bar)
        resp = torch.softmax(log_n + self.weights.log()[None], dim=1)  # [N,K]
        # Σ_k resp_k·(−C_k^{-1}(x − m_k)) = −Σ_k U_k (resp_k·y_k / v_k): one [N, K·d] × [K·d, d] product
        return -((resp[..., None] * y / v).reshape(x.shape[0], -1) @ self._stacked_eigvecs.T)

    def eps(self, x: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """[N, d] the exact noise prediction ε*(x, ab) = -sqrt(1 - ab) ∇ log p_ab(x)."""
        ab = torch.as_tensor(alpha_bar, dtype=DTYPE)
        scale = (1 - ab).sqrt()
        if scale.dim() == 1:
            scale = scale[:, None]
        return -scale * self.score(x, alpha_bar)

    def x0_mean(self, x: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """[N, d] E[x0 | x_t = x] (Tweedie) at noise level ``alpha_bar``."""
        ab = torch.as_tensor(alpha_bar, dtype=DTYPE)
        ab = ab[:, None] if ab.dim() == 1 else ab
        return (x.to(DTYPE) - (1 - ab).sqrt() * self.eps(x, alpha_bar)) / ab.sqrt()

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False) -> Any:
        """``n`` samples [n, d] (and their component labels [n] when ``return_labels``)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=DTYPE, generator=generator)
        x = self.means[labels] + torch.einsum("nde,ne->nd", self.eigvecs[labels], self.eigvals[labels].sqrt() * z)
        return (x, labels) if return_labels else x

    def to_spec(self) -> dict[str, Any]:
        """JSON-able ``{"weights", "means", "covs"}``."""
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}


def _numeric(value: Any, field: str) -> torch.Tensor:
    """A nested list of numbers as a float64 tensor, or an error naming ``field``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | int | float):
        raise ValueError(f"{field} must be a number or a (nested) list of numbers, got {value!r}")
    try:
        out = torch.tensor(value, dtype=DTYPE)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field} must be a (nested) list of numbers of consistent lengths: {err}") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{field} contains a non-finite value: {value!r}")
    return out
