"""A seeded generator of random toy cases, so that defaults are chosen over a family and never over one case.

``random_case(seed, dim)`` returns ``(mixture_spec, reward_spec, beta, info)`` in the JSON formats of
``gfnalign toy`` (MIX.json, REWARD.json). The family:

* 2–9 components with Dirichlet(2) weights (floored at 0.03), means uniform in [−3, 3]^d kept at least
  ``min_separation`` apart (so components stay distinguishable by their responsibilities), isotropic
  (std 0.3–0.7) or full covariances (a random rotation of eigen-stds 0.25–0.8), half each;
* a reward, one of three kinds with equal probability:
  - ``linear`` r = aᵀx with a random direction, β log-uniform in [0.5, 2];
  - ``quadratic`` r = −‖x − c‖²/(2s²) with c uniform in the box, β log-uniform in [0.5, 2];
  - ``log_ratio`` r = log q − log p towards a random mixture q with the same number of components
    (means moved by up to 0.5, covariances scaled by 0.7–1.3, new weights), β = 1;
* the reward's strength (|a|, 1/s, or how far q's weights move) is set by bisection so that the exact tilt
  moves ``moved`` ∈ [0.25, 0.6] of the mass between components (total variation between the pretrained
  and the target component weights, drawn per case).

Everything is float64 and deterministic given ``seed`` (a private torch.Generator; the global RNG is
untouched).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gfnalign.toy.mixture import DTYPE, GaussianMixture
from gfnalign.toy.rewards import DEFAULT_FINAL_ALPHA_BAR, reward_from_spec

REWARD_KINDS = ("linear", "quadratic", "log_ratio")


def _uniform(gen: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=DTYPE)


def _random_rotation(gen: torch.Generator, d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))[None]


def _means(gen: torch.Generator, k: int, d: int, min_separation: float) -> torch.Tensor:
    """k points uniform in [-3, 3]^d, each drawn until it is ``min_separation`` from the earlier ones."""
    pts: list[torch.Tensor] = []
    for _ in range(100_000):
        p = _uniform(gen, -3.0, 3.0, d)
        if all(float((p - q).norm()) >= min_separation for q in pts):
            pts.append(p)
            if len(pts) == k:
                return torch.stack(pts)
    raise RuntimeError(f"could not place {k} means {min_separation} apart in [-3, 3]^{d}")


def _covs(gen: torch.Generator, k: int, d: int, full: bool) -> torch.Tensor:
    covs = []
    for _ in range(k):
        if full:
            rot = _random_rotation(gen, d)
            stds = _uniform(gen, 0.25, 0.8, d)
            covs.append(rot @ torch.diag(stds**2) @ rot.T)
        else:
            std = float(_uniform(gen, 0.3, 0.7, 1))
            covs.append(torch.eye(d, dtype=DTYPE) * std**2)
    return torch.stack(covs)


def _weights(gen: torch.Generator, k: int, floor: float = 0.03) -> torch.Tensor:
    # Dirichlet(2) from Gamma(2, 1) draws with our own generator: the sum of two exponentials
    e = -torch.log(torch.rand(k, 2, generator=gen, dtype=DTYPE)).sum(1)
    w = e / e.sum()
    w = torch.clamp(w, min=floor)
    return w / w.sum()


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _bisect(moved_of: Any, target: float, lo: float, hi: float, iters: int = 60) -> float:
    """The strength s in [lo, hi] with moved_of(s) ≈ target (moved_of increasing); hi if never reached."""
    if moved_of(hi) < target:
        return hi
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi)
        if moved_of(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def random_case(seed: int, dim: int = 2, *, kinds: tuple[str, ...] = REWARD_KINDS,
                min_separation: float | None = None) -> tuple[dict[str, Any], dict[str, Any], float, dict[str, Any]]:
    """One random case: ``(mixture_spec, reward_spec, beta, info)``; ``info`` says what was drawn and the
    mass the exact tilt moves (``moved``)."""
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1")
    for kind in kinds:
        if kind not in REWARD_KINDS:
            raise ValueError(f"reward kind {kind!r} is not known; use {', '.join(REWARD_KINDS)}")
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(100):  # redraw (deterministically) the rare case whose reward cannot move 25% of the mass
        case = _draw(gen, int(seed), dim, kinds, min_separation)
        if case[3]["moved"] >= 0.25 - 1e-3:
            return case
    raise RuntimeError(f"seed {seed}: no case moving 25% of the mass in 100 draws")


def _draw(gen: torch.Generator, seed: int, dim: int, kinds: tuple[str, ...],
          min_separation: float | None) -> tuple[dict[str, Any], dict[str, Any], float, dict[str, Any]]:
    k = int(torch.randint(2, 10, (1,), generator=gen))
    sep = (1.6 if dim <= 2 else 2.0) if min_separation is None else float(min_separation)
    means = _means(gen, k, dim, sep)
    full = bool(torch.rand(1, generator=gen) < 0.5)
    covs = _covs(gen, k, dim, full)
    weights = _weights(gen, k)
    mix = GaussianMixture.from_covs(weights, means, covs)
    p_final = mix.noised(DEFAULT_FINAL_ALPHA_BAR)
    kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
    moved_target = float(_uniform(gen, 0.25, 0.6, 1))
    mix_spec = {"weights": weights.tolist(), "means": means.tolist(), "covs": covs.tolist()}
    if kind == "log_ratio":
        beta = 1.0
        new_w = _weights(gen, k)
        shift = torch.randn(k, dim, generator=gen, dtype=DTYPE)
        shift = shift / shift.norm(dim=1, keepdim=True) * _uniform(gen, 0.0, 0.5, k, 1)
        cov_scale = _uniform(gen, 0.7, 1.3, k)

        def target_weights(s: float) -> torch.Tensor:  # geometric path from p's weights towards (and past) new_w
            logw = (1 - s) * weights.log() + s * new_w.log()
            return torch.softmax(logw, 0)

        s = _bisect(lambda s: _tv(target_weights(s), weights), moved_target, 0.0, 8.0)
        q = {"weights": target_weights(s).tolist(), "means": (means + shift).tolist(),
             "covs": (covs * cov_scale[:, None, None]).tolist()}
        reward_spec: dict[str, Any] = {"type": "log_ratio", "target": q}
    else:
        beta = float(math.exp(float(_uniform(gen, math.log(0.5), math.log(2.0), 1))))
        if kind == "linear":
            direction = torch.randn(dim, generator=gen, dtype=DTYPE)
            direction = direction / direction.norm()

            def spec_of(s: float) -> dict[str, Any]:
                return {"type": "linear", "a": (s * direction).tolist()}

            lo, hi = 1e-4, 20.0
        else:
            center = _uniform(gen, -3.0, 3.0, dim)

            def spec_of(s: float) -> dict[str, Any]:  # s = 1/scale: larger is stronger
                return {"type": "quadratic", "center": center.tolist(), "scale": 1.0 / s}

            lo, hi = 1e-3, 5.0

        def moved_of(s: float) -> float:
            return _tv(reward_from_spec(spec_of(s), dim).tilt(p_final, beta).weights, p_final.weights)

        reward_spec = spec_of(_bisect(moved_of, moved_target, lo, hi))
    reward = reward_from_spec(reward_spec, dim, base=mix, beta=beta)
    moved = _tv(reward.tilt(p_final, beta).weights, p_final.weights)
    info = {"seed": int(seed), "dim": dim, "components": k, "covariance": "full" if full else "isotropic",
            "reward": kind, "beta": beta, "moved": moved}
    return mix_spec, reward_spec, beta, info
