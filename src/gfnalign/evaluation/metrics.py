"""Evaluation metrics: reward statistics, per-prompt diversity and per-prompt prior drift.

Pure torch (float64 for the statistics); nothing here knows about models.

* **Reward**: mean and standard deviation (population, ``ddof=0``) of the raw reward over all samples.
* **Diversity**: for each prompt, the mean distance over all unordered pairs of that prompt's samples
  in a feature space, then the mean over prompts. ``metric="cosine"`` uses ``1 - cos(f_i, f_j)`` (what
  DreamSim reports for its embeddings; range [0, 2]); ``metric="l2"`` the Euclidean distance. Identical
  samples give 0. This is the ∇-GFlowNet paper's "DreamSim diversity" protocol in any feature space.
* **Prior drift**: for each prompt, the Fréchet distance between Gaussians fitted to the fine-tuned
  and to the pretrained samples' features, then the mean over prompts (the papers' "FID versus the
  pretrained model"; per prompt with few samples it is large in absolute terms — compare it between
  methods at the same sample count and feature space, never with a published FID).

Fréchet distance between N(μ1, C1) and N(μ2, C2):

    FD = ‖μ1 − μ2‖² + tr(C1) + tr(C2) − 2 tr((C1^½ C2 C1^½)^½)

computed in float64 with two symmetric eigendecompositions (C1^½ from eigh(C1), then the eigenvalues
of the symmetric PSD matrix C1^½ C2 C1^½), so no complex square roots appear.

**Few samples.** With n samples in d dimensions the sample covariance has rank ≤ n − 1, which is
singular whenever n ≤ d. The Fréchet formula stays defined for singular PSD matrices, but its
estimate is noisy and biased upward at small n. :func:`feature_gaussian` therefore shrinks the
covariance towards a scaled identity: ``C = (1 − λ) S + λ (tr S / d) I`` with ``λ = shrinkage``
(default ``d / (n + d)``, i.e. strong for n ≪ d and vanishing for n ≫ d), and adds ``ridge · I``
(default 1e-6 · tr S / d) so every eigenvalue is positive. The same n and shrinkage are used on both
sides, so identical sample sets still give exactly 0 (up to float64 rounding). Set
``shrinkage=0.0`` for the plain estimator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DIVERSITY_METRICS = ("cosine", "l2")


def reward_stats(rewards: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` of a reward vector ``[N]`` (population std; 0.0 for a single sample)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() == 0:
        raise ValueError("reward_stats: got an empty reward vector; evaluate at least one sample")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"reward_stats: rewards contain NaN/inf ({int((~torch.isfinite(r)).sum())} of {r.numel()})")
    return float(r.mean()), float(r.std(unbiased=False))


def pairwise_distances(features: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``[n, n]`` distance matrix of feature rows ``[n, d]`` (float64)."""
    if metric not in DIVERSITY_METRICS:
        raise ValueError(f"metric={metric!r} is not known; use one of {', '.join(DIVERSITY_METRICS)}")
    f = features.detach().to(torch.float64).flatten(1)
    if metric == "cosine":
        norm = f.norm(dim=1, keepdim=True)
        if bool((norm == 0).any()):
            raise ValueError("cosine diversity: a feature vector is all zeros; use metric='l2'")
        u = f / norm
        return (1.0 - u @ u.T).clamp(min=0.0)
    sq = (f * f).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * f @ f.T).clamp(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def mean_pairwise_distance(features: torch.Tensor, metric: str = "cosine") -> float:
    """Mean distance over the n(n−1)/2 unordered pairs of rows of ``features`` ``[n, d]`` (n ≥ 2)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples per prompt, got {n}; raise --samples")
    d = pairwise_distances(features, metric)
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def _groups(prompt_ids: torch.Tensor | Sequence[int] | None, n: int) -> dict[int, torch.Tensor]:
    if prompt_ids is None:
        return {0: torch.arange(n)}
    ids = torch.as_tensor(prompt_ids).flatten().to("cpu", torch.int64)
    if ids.numel() != n:
        raise ValueError(f"prompt_ids has {ids.numel()} entries for {n} feature rows")
    return {int(k): (ids == k).nonzero().flatten() for k in torch.unique(ids).tolist()}


def diversity(
    features: torch.Tensor, prompt_ids: torch.Tensor | Sequence[int] | None = None, metric: str = "cosine"
) -> tuple[float, dict[int, float]]:
    """Per-prompt mean pairwise distance, averaged over prompts: ``(mean, {prompt_id: value})``."""
    per = {k: mean_pairwise_distance(features[idx], metric) for k, idx in _groups(prompt_ids, features.shape[0]).items()}
    return float(sum(per.values()) / len(per)), per


@dataclass(frozen=True)
class FeatureGaussian:
    """Mean ``[d]`` and (regularised) covariance ``[d, d]`` of a feature set, float64."""

    mean: torch.Tensor
    cov: torch.Tensor
    n: int


def feature_gaussian(
    features: torch.Tensor, *, shrinkage: float | None = None, ridge: float | None = None
) -> FeatureGaussian:
    """Fit N(μ, C) to ``features`` ``[n, d]`` with the shrinkage and ridge described in the module doc."""
    f = features.detach().to(torch.float64).flatten(1)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"prior drift needs at least 2 samples per prompt, got {n}; raise --samples")
    mu = f.mean(0)
    xc = f - mu
    s = xc.T @ xc / (n - 1)
    avg_var = float(torch.diagonal(s).mean())
    lam = d / (n + d) if shrinkage is None else float(shrinkage)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must lie in [0, 1]")
    eye = torch.eye(d, dtype=torch.float64)
    cov = (1.0 - lam) * s + lam * avg_var * eye
    eps = 1e-6 * max(avg_var, 1e-12) if ridge is None else float(ridge)
    cov = cov + eps * eye
    return FeatureGaussian(mean=mu, cov=0.5 * (cov + cov.T), n=n)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2), float64, ≥ 0."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    c1, c2 = cov1.to(torch.float64), cov2.to(torch.float64)
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
            f"cov {tuple(c1.shape)}/{tuple(c2.shape)}"
        )
    s1 = _sqrt_psd(c1)
    inner = s1 @ c2 @ s1
    cross = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0.0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2.0 * cross
    return float(fd.clamp(min=0.0))


def feature_frechet(
    feats_a: torch.Tensor, feats_b: torch.Tensor, *, shrinkage: float | None = None, ridge: float | None = None
) -> float:
    """Fréchet distance between two feature sets ``[n_a, d]`` and ``[n_b, d]``.

    The ridge defaults to one value shared by both sides (from the pooled average variance), so two
    identical sets give 0.
    """
    if ridge is None:
        pooled = torch.cat([feats_a, feats_b]).detach().to(torch.float64).flatten(1)
        ridge = 1e-6 * max(float(pooled.var(0).mean()), 1e-12)
    a = feature_gaussian(feats_a, shrinkage=shrinkage, ridge=ridge)
    b = feature_gaussian(feats_b, shrinkage=shrinkage, ridge=ridge)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def prior_drift(
    feats_finetuned: torch.Tensor,
    feats_pretrained: torch.Tensor,
    prompt_ids_finetuned: torch.Tensor | Sequence[int] | None = None,
    prompt_ids_pretrained: torch.Tensor | Sequence[int] | None = None,
    *,
    shrinkage: float | None = None,
) -> tuple[float, dict[int, float]]:
    """Per-prompt Fréchet distance (fine-tuned vs pretrained features), averaged: ``(mean, per_prompt)``."""
    if prompt_ids_pretrained is None:
        prompt_ids_pretrained = prompt_ids_finetuned
    ga = _groups(prompt_ids_finetuned, feats_finetuned.shape[0])
    gb = _groups(prompt_ids_pretrained, feats_pretrained.shape[0])
    if set(ga) != set(gb):
        raise ValueError(f"prior drift: prompt ids differ between the two sample sets: {sorted(ga)} vs {sorted(gb)}")
    per = {k: feature_frechet(feats_finetuned[ga[k]], feats_pretrained[gb[k]], shrinkage=shrinkage) for k in ga}
    return float(sum(per.values()) / len(per)), per


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP score per row: ``100 · max(cos(image, text), 0)`` (Hessel et al. 2021 without the 2.5 weight)."""
    a = image_embeds.to(torch.float64)
    b = text_embeds.to(torch.float64)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
    return 100.0 * cos.clamp(min=0.0)
