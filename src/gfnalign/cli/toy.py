"""``gfnalign toy``: fine-tune the analytic Gaussian-mixture world with one method and compare it with the
exact target (DESIGN.md §6). Stable contract:

    gfnalign toy --method METHOD --mixture MIX.json --reward REWARD.json --beta B
                 [--steps N] [--seed S] [--samples M] [--json OUT.json]

``--steps`` is the number of training updates (default: the method's tuned default). ``--set KEY=VALUE``
(repeatable, optional) overrides a default of the toy loop (``lr``, ``batch_size``, ...) or of the
objective (``objective.gamma=one``); values are parsed as JSON when they can be. Examples:
``--set objective.relative=true`` (prior-relative DAG), ``--set noise_schedule=sd --set num_steps=20``
(Stable Diffusion's grid, whose first state keeps signal), ``--set start=tilted`` (start ∝ N(0, I)·G with the
learned start value). REWARD.json may also be ``{"type": "log_ratio", "target": MIX}`` (β = 1: the target is
MIX exactly). The command prints which reward the method is trained on (plain r for the prior-relative
methods, r + log p/β for the Lebesgue-target ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "grpo", "reward-backprop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHODS, help="objective to train with")
    parser.add_argument("--mixture", required=True, type=Path,
                        help='MIX.json: {"weights": [...], "means": [[...]], "stds": [...]} or "covs" instead of "stds"')
    parser.add_argument("--reward", required=True, type=Path,
                        help='REWARD.json: {"type": "linear", "a": [...]}, {"type": "quadratic", "center": [...], "scale": s} '
                             'or {"type": "log_ratio", "target": MIX} (r = log q - log p: the target is MIX exactly; --beta 1 only)')
    parser.add_argument("--beta", required=True, type=float, help="inverse temperature: target ∝ p(x)·exp(β r(x))")
    parser.add_argument("--steps", type=int, default=None, help="training updates (default: the method's tuned default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default 0)")
    parser.add_argument("--samples", type=int, default=100_000, help="evaluation samples per distribution (default 100000; energy distances in 3+ dimensions use the first 10000)")
    parser.add_argument("--json", type=Path, default=None, help="write the result (OUT.json) here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a toy default, e.g. --set lr=3e-4 or --set objective.gamma=one (repeatable)")
    parser.add_argument("--schedule", choices=("vp", "flow"), default="vp",
                        help="vp (DDPM, default) or flow: the same world under the rectified-flow interpolant "
                             "with its exact velocity, sampled with Flow-GRPO's SDE (noise level √2; --set eta=A)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ValueError(f"--{what} {path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--{what} {path}: not valid JSON ({err})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("objective."):
            out.setdefault("objective", {})[key[len("objective."):]] = value
        else:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from gfnalign.toy.mixture import GaussianMixture
    from gfnalign.toy.rewards import reward_from_spec
    from gfnalign.toy.train import method_config, reward_description, run_toy

    try:
        mixture = GaussianMixture.from_spec(_load_json(args.mixture, "mixture"), source=str(args.mixture))
        if not args.beta > 0:
            raise ValueError(f"--beta {args.beta}: must be a positive number")
        reward = reward_from_spec(_load_json(args.reward, "reward"), mixture.dim, source=str(args.reward),
                                  base=mixture, beta=args.beta)
        if args.steps is not None and args.steps < 0:
            raise ValueError(f"--steps {args.steps}: must be >= 0")
        if args.samples < 2:
            raise ValueError(f"--samples {args.samples}: must be at least 2")
        overrides = parse_overrides(args.overrides)
        if args.schedule != "vp":
            overrides.setdefault("schedule", args.schedule)
        cfg = method_config(args.method, overrides)  # validates the keys before any training
    except ValueError as err:
        print(f"gfnalign toy: error: {err}", file=sys.stderr)
        return 2

    def log(update: int, metrics: dict[str, float]) -> None:
        if not args.quiet:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k in ("loss/total", "reward/mean"))
            print(f"[toy {args.method}] update {update}: {shown}", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"[toy {args.method}] {reward_description(args.method, cfg)}", file=sys.stderr, flush=True)
    result = run_toy(args.method, mixture, reward, args.beta, steps=args.steps, seed=args.seed,
                     samples=args.samples, config=overrides, log=log)
    mm = result["mode_mass"]
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    print(f"method {result['method']}  schedule {result['config']['schedule']}  beta {result['beta']}  updates {result['updates']}  "
          f"train {result['train_seconds']:.1f} s")
    print(f"mode mass  target {fmt(mm['target'])}  finetuned {fmt(mm['finetuned'])}  pretrained {fmt(mm['pretrained'])}")
    print(f"mode-mass TV {result['mode_mass_tv']:.4f}  energy distance {result['energy_distance']:.5f} "
          f"(floor {result['energy_distance_floor']:.5f})")
    if "energy_distance_oracle" in result:
        print(f"exact tilted-eps sampler (discretisation floor of the target)  mode-mass TV "
              f"{result['mode_mass_tv_oracle']:.4f}  energy distance {result['energy_distance_oracle']:.5f}")
    if "noise_start" in result:
        ns = result["noise_start"]
        print(f"same fine-tuned chain started from N(0, I) instead of the tilted start  mode-mass TV "
              f"{ns['mode_mass_tv']:.4f}  energy distance {ns['energy_distance']:.5f}")
    rm = result["reward_mean"]
    print(f"reward mean  target {rm['target']:.4f}  finetuned {rm['finetuned']:.4f}  pretrained {rm['pretrained']:.4f}")
    if result.get("diverged"):
        print("warning: the fine-tuned policy diverged (non-finite samples)", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
