"""What the toy's energy distances are measured against: the floors, with no training.

Per 2-D case and evaluation seed, at ``--samples`` per side (energy distances from sorted projections):

* ``contract floor``: the pretrained sampler (exact ε, 50 steps) vs exact samples of the *untilted* p_f
  (DESIGN.md §6);
* ``oracle``: the sampler run with the exact ε of the *tilted* target vs exact tilted samples, the
  discretisation floor of the problem that dag-* and nabla-db solve;
* ``reweighted``: the pretrained sampler's samples (a pool of ``--pool``) resampled by exp(β r): the exact
  target of residual-nabla-db, p_pretrained-sampler·exp(β r), which is not the tilt of p_f when the
  pretrained sampler has a discretisation error;
* ``null``: two independent sets of exact tilted samples, the statistic's own noise.

    .venv/bin/python benchmarks/toy_floors.py --seeds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_exactness import CASES  # noqa: E402

from gfnalign.toy.metrics import energy_distance, mode_mass, total_variation  # noqa: E402
from gfnalign.toy.mixture import GaussianMixture  # noqa: E402
from gfnalign.toy.rewards import reward_from_spec  # noqa: E402
from gfnalign.toy.world import ToyPolicy, final_alpha_bar, oracle_mixture, sample_chain, toy_schedule  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["ring4-linear", "grid9-quadratic"], choices=list(CASES))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--pool", type=int, default=1_000_000, help="pretrained samples to reweight")
    args = ap.parse_args()
    print("| case | seed | contract floor | oracle ED (TV) | reweighted pretrained ED (TV) | null ED | s |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        mix_spec, reward_spec, beta = CASES[case]
        mixture = GaussianMixture.from_spec(mix_spec)
        reward = reward_from_spec(reward_spec, mixture.dim)
        schedule = toy_schedule()
        p_final = mixture.noised(final_alpha_bar(schedule))
        target = reward.tilt(p_final, beta)
        pretrained = ToyPolicy(mixture, schedule)
        oracle = ToyPolicy(oracle_mixture(target, schedule), schedule)
        for seed in range(args.seeds):
            start = time.perf_counter()
            gen = torch.Generator().manual_seed(7_000 + seed)
            pool = sample_chain(pretrained, args.pool, gen, reference=True)
            weights = torch.softmax(beta * reward(pool), 0)
            reweighted = pool[torch.multinomial(weights, args.samples, replacement=True, generator=gen)]
            oracle_x = sample_chain(oracle, args.samples, gen, reference=True)
            exact, exact2 = target.sample(args.samples, gen), target.sample(args.samples, gen)
            masses = mode_mass(target.sample(200_000, gen), target)
            floor = energy_distance(pool[: args.samples], p_final.sample(args.samples, gen))

            def tv(x: torch.Tensor, target: GaussianMixture = target, masses: list[float] = masses) -> float:
                return total_variation(mode_mass(x, target), masses)

            print(f"| {case} | {seed} | {floor:.5f} | {energy_distance(oracle_x, exact):.5f} ({tv(oracle_x):.3f}) | "
                  f"{energy_distance(reweighted, exact):.5f} ({tv(reweighted):.3f}) | "
                  f"{energy_distance(exact2, exact):.6f} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
