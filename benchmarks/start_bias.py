"""How large the value-function bias of a fixed N(0, I) start is on a toy case, before any training.

    python benchmarks/start_bias.py [--samples 100000]

At the optimum of a prior-relative objective with a fixed start the path measure is P^#(τ | x_start)·R/G(x_start):
each start keeps its own mass. With the exact pretrained posterior over components given x_start (the noised
mixture's responsibilities at the first grid level) and the tilt factor c_k of each component (target weight /
pretrained weight; exact for linear and quadratic rewards, whose tilt keeps the components), the per-noise
tilt's component masses are E_{x_start ~ N(0, I)}[resp_k(x_start)·c_k / Σ_j resp_j(x_start)·c_j], against the
global tilt's target weights. The table gives their total variation (mode-mass TV the bias alone would cost)
for the named cases on the default grid ("linear" betas, 50 steps) and on Stable Diffusion's (20 and 50 steps).
It ignores the sampler's discretisation (a lower-order effect here), so it is an estimate, not a floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def per_noise_tv(mix, reward, beta: float, schedule, samples: int) -> float:
    from gfnalign.toy.world import final_alpha_bar

    p_f = mix.noised(final_alpha_bar(schedule))
    tilt = reward.tilt(p_f, beta)
    c = tilt.weights / p_f.weights
    x = torch.randn(samples, mix.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab = torch.full((samples,), float(schedule.alpha_bars[0]), dtype=torch.float64)
    resp = mix.responsibilities(x, ab)
    per = (resp * c) / (resp * c).sum(1, keepdim=True)
    return 0.5 * float((per.mean(0) - tilt.weights).abs().sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000)
    args = ap.parse_args()
    from toy_exactness import CASES

    from gfnalign.toy.mixture import GaussianMixture
    from gfnalign.toy.rewards import reward_from_spec
    from gfnalign.toy.world import toy_schedule

    grids = [("linear", 50), ("sd", 50), ("sd", 20)]
    print("| case | " + " | ".join(f"{n} {k} steps (√ᾱ_start)" for n, k in grids) + " |")
    print("|---|" + "---|" * len(grids))
    for name in ("ring4-linear", "grid9-quadratic", "d8-linear", "sdstart-d32-linear"):
        mix_spec, reward_spec, beta = CASES[name][:3]
        mix = GaussianMixture.from_spec(mix_spec)
        reward = reward_from_spec(reward_spec, mix.dim, base=mix, beta=beta)
        cells = []
        for noise, k in grids:
            sched = toy_schedule(k, noise_schedule=noise)
            tv = per_noise_tv(mix, reward, beta, sched, args.samples)
            cells.append(f"{tv:.4f} ({float(sched.alpha_bars[0]) ** 0.5:.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
