"""``gfnalign eval``: reward, diversity and prior drift of a fine-tuned run against its pretrained model.

    gfnalign eval --run runs/demo [--lora DIR] [--samples 16] [--prompts SPEC] [--json OUT.json] [--seed 0]

Loads the run's resolved ``config.yaml`` (backbone, reward, prompts, sampler), the LoRA in ``RUN/final``
(or ``--lora``), samples ``--samples`` images per prompt with the fine-tuned and with the pretrained model
from the same noise, and prints a markdown section (also appended to ``RUN/report.md`` unless
``--no-report``). ``--json`` writes the full result; its keys are documented in
:mod:`gfnalign.evaluation.evaluate`. Everything works offline on the digits world.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, help="run directory holding config.yaml (and final/ with the LoRA)")
    p.add_argument("--config", type=Path, help="a config YAML instead of RUN/config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sampling.num_steps=10 (repeatable)")
    p.add_argument("--lora", type=Path, help="adapter folder (RUN/final) or checkpoint (RUN/checkpoints/step_N) to evaluate (default RUN/final); "
                        "'none' = pretrained only")
    p.add_argument("--samples", type=int, default=16, help="images per prompt and model (default 16, at least 2)")
    p.add_argument("--prompts", help="prompt set spec (default: the run's prompts), e.g. digits or prompts.txt")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first K prompts")
    p.add_argument("--reward", dest="extra_rewards", action="append", default=[], metavar="SPEC",
                   help="an extra reward to report (repeatable); the run's reward is always first")
    p.add_argument("--features", default="auto",
                   help="feature space: auto (digits in the digits world, else dreamsim if installed, else "
                        "pixels), digits, clip:PATH, dreamsim[:CACHE], pixels[:S]")
    p.add_argument("--metric", choices=("cosine", "l2"), default=None,
                   help="diversity distance (default: the feature space's own)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for both models)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the pretrained-vs-pretrained drift floor (saves a third of the sampling)")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--report", type=Path, help="append the markdown section here (default RUN/report.md)")
    p.add_argument("--no-report", action="store_true", help="print the markdown but append it nowhere")


#: the API's argument names as this command spells them
FLAGS = {"samples": "--samples", "batch_size": "--batch-size", "max_prompts": "--max-prompts", "seed": "--seed",
         "lora": "--lora", "run": "--run"}


def run(args: argparse.Namespace) -> int:
    import sys

    from gfnalign.api import ArgumentError, evaluate, markdown_report
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError
    from gfnalign.training.weights import WeightsError

    try:
        result = evaluate(
            args.run, config=args.config, overrides=args.overrides, lora=args.lora, samples=args.samples,
            prompts=args.prompts, max_prompts=args.max_prompts, extra_rewards=args.extra_rewards,
            features=args.features, metric=args.metric, seed=args.seed, batch_size=args.batch_size,
            device=args.device, floor=not args.no_floor,
        )
    except ArgumentError as err:
        print(f"gfnalign eval: {err.named(FLAGS.get(err.name, err.name))}", file=sys.stderr)
        return 2
    except (WeightsError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"gfnalign eval: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    title = f"Evaluation: {result['method']} (`gfnalign eval`, seed {args.seed})"
    md = markdown_report(result, title=title)
    print(md)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report = args.report or (args.run / "report.md" if args.run is not None else None)
    if report is not None and not args.no_report:
        with open(report, "a") as fh:
            fh.write("\n" + md)
    return 0
