"""How far is a trained toy sampler from its discretisation floor, with the evaluation noise measured?

Trains one method once (toy defaults, training seed 0), then evaluates the same policy with several
evaluation seeds. Each evaluation draws new chain noise and new exact target samples; the oracle
(the exact-ε sampler of the tilted target) shares the chain noise. Reports the energy distance
(ED), the oracle's ED and their ratio per evaluation seed, and the mean and spread.

    .venv/bin/python benchmarks/toy_ed_ratio.py --case ring4-linear --method residual-nabla-db --evals 5
    .venv/bin/python benchmarks/toy_ed_ratio.py --case grid9-quadratic --seed 1 --set objective.forward_at=next

``--set`` takes the same KEY=VALUE overrides as ``gfnalign toy`` (``objective.<option>`` for the objective).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_exactness import CASES  # noqa: E402

from gfnalign.cli.toy import parse_overrides  # noqa: E402
from gfnalign.toy.mixture import GaussianMixture  # noqa: E402
from gfnalign.toy.rewards import reward_from_spec  # noqa: E402
from gfnalign.toy.train import METHODS, evaluate, train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="ring4-linear", choices=list(CASES))
    ap.add_argument("--method", default="residual-nabla-db", choices=list(METHODS))
    ap.add_argument("--evals", type=int, default=5, help="evaluation seeds 0..N-1")
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="toy training override")
    args = ap.parse_args()
    overrides = parse_overrides(args.set)
    mix_spec, reward_spec, beta = CASES[args.case]
    mixture = GaussianMixture.from_spec(mix_spec)
    reward = reward_from_spec(reward_spec, mixture.dim)
    start = time.perf_counter()
    policy, info = train(args.method, mixture, reward, beta, seed=args.seed, config=overrides)
    print(f"{args.case} {args.method} (training seed {args.seed}, overrides {overrides or 'none'}): "
          f"trained {info['updates']} updates in {time.perf_counter() - start:.0f} s")
    ratios, floor_ratios, tvs = [], [], []
    print("| eval seed | TV | TV oracle | ED | ED oracle | ED / oracle | ED / contract floor |\n|---|---|---|---|---|---|---|")
    for s in range(args.evals):
        r = evaluate(policy, mixture, reward, beta, samples=args.samples, seed=s)
        ratio = r["energy_distance"] / r["energy_distance_oracle"]
        ratios.append(ratio)
        floor_ratios.append(r["energy_distance"] / r["energy_distance_floor"])
        tvs.append(r["mode_mass_tv"])
        print(f"| {s} | {r['mode_mass_tv']:.4f} | {r['mode_mass_tv_oracle']:.4f} | {r['energy_distance']:.4f} | "
              f"{r['energy_distance_oracle']:.4f} | {ratio:.1f} | {r['energy_distance'] / r['energy_distance_floor']:.1f} |")
    sd = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
    print(f"ED / oracle: mean {statistics.mean(ratios):.2f}, sd {sd:.2f}, median {statistics.median(ratios):.2f}; "
          f"ED / contract floor: median {statistics.median(floor_ratios):.2f}; TV mean {statistics.mean(tvs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
