"""``gfnalign sample --run DIR | --lora DIR [--prompt P ... | --prompts FILE] [--n N] --out DIR``: PNG files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run directory (uses its config.yaml and final/ LoRA)")
    src.add_argument("--lora", type=Path, help="a LoRA folder (final/ of a run, or any diffusers LoRA folder)")
    p.add_argument("--base", help="base model for --lora when the folder has no training_config.yaml "
                                  "(a pipeline folder or hub id; default: the shipped digits model)")
    p.add_argument("--pretrained", action="store_true", help="sample the base model (adapters off)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a prompt set name or file (txt/json/csv)")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files (and grid.png)")


#: the API's argument names as this command spells them
FLAGS = {"n": "--n", "batch_size": "--batch-size", "steps": "--steps", "seed": "--seed", "guidance": "--guidance",
         "out": "--out", "run": "--run"}


def run(args: argparse.Namespace) -> int:
    from gfnalign.api import ArgumentError, sample
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError
    from gfnalign.training.weights import WeightsError

    try:
        result = sample(args.run, lora=args.lora, base=args.base, pretrained=args.pretrained,
                        prompts=list(args.prompt) or args.prompts, n=args.n, steps=args.steps,
                        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, out=args.out)
    except ArgumentError as err:
        flag = {**FLAGS, "prompts": "--prompt" if args.prompt else "--prompts"}.get(err.name, err.name)
        print(f"gfnalign sample: {err.named(flag)}", file=sys.stderr)
        return 2
    except (WeightsError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"gfnalign sample: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {len(result.prompts)} images to {args.out}")
    return 0
