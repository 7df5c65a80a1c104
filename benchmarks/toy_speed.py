"""Where a `gfnalign toy` run spends its CPU time: seconds per training update and per evaluation.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/toy_speed.py [--case-seed 0] [--updates 20] [--samples 20000]

Process CPU seconds (``time.process_time``, which other jobs on a shared machine inflate far less than wall
time) of ``--updates`` updates of each method at its toy defaults on the random case ``--case-seed`` (2-D),
after two warm-up updates, and of one evaluation at ``--samples`` samples per distribution. The estimate of
a default run is ``updates × s/update + evaluation × 10⁵ / samples`` (evaluation is linear in the sample
count). It imports whichever gfnalign is first on the path, so the same script times an older checkout:
``PYTHONPATH=/path/to/old/src``.
"""

from __future__ import annotations

import argparse
import json
import time

METHODS = {"residual-nabla-db": ("residual-nabla-db", {}),
           "dag-db-relative": ("dag-db", {"objective": {"relative": True}}),
           "rtb": ("rtb", {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case-seed", type=int, default=0)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()

    from gfnalign.toy.cases import random_case
    from gfnalign.toy.mixture import GaussianMixture
    from gfnalign.toy.rewards import reward_from_spec
    from gfnalign.toy.train import evaluate, method_config, train

    mix_spec, reward_spec, beta, info = random_case(args.case_seed, 2)
    mix = GaussianMixture.from_spec(mix_spec)
    reward = reward_from_spec(reward_spec, mix.dim, base=mix, beta=beta)
    rows = []
    policy = None
    for name in args.methods:
        method, over = METHODS[name]
        train(method, mix, reward, beta, steps=2, config=over)
        start = time.process_time()
        policy, _ = train(method, mix, reward, beta, steps=args.updates, config=over)
        per_update = (time.process_time() - start) / args.updates
        rows.append((name, per_update, int(method_config(method, over)["updates"])))
    start = time.process_time()
    evaluate(policy, mix, reward, beta, samples=args.samples)
    eval_s = (time.process_time() - start) * 100_000 / args.samples
    print(json.dumps({"case": info, "eval_cpu_s_at_1e5": round(eval_s, 1),
                      "methods": {n: {"cpu_s_per_update": round(s, 4), "default_updates": u,
                                      "default_run_cpu_s": round(u * s + eval_s, 0)} for n, s, u in rows}}))
    print("| method | CPU s / update | default updates | default run, CPU s (training + evaluation at 10⁵) |")
    print("|---|---|---|---|")
    for n, s, u in rows:
        print(f"| {n} | {s:.3f} | {u} | {u * s + eval_s:.0f} ({u * s:.0f} + {eval_s:.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
