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


def run(args: argparse.Namespace) -> int:
    from gfnalign.cli.weights import WeightsError
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError

    try:
        return _run(args)
    except (WeightsError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"gfnalign sample: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import math

    import torch
    from PIL import Image

    from gfnalign.cli.weights import WeightsError, load_into, positive_int
    from gfnalign.sampling import rollout
    from gfnalign.training.build import build_backbone
    from gfnalign.training.config import TrainConfig
    from gfnalign.training.report import save_grid, to_uint8
    from gfnalign.training.trainer import prompt_list

    positive_int(args.n, "--n", "sample")
    positive_int(args.batch_size, "--batch-size", "sample")
    positive_int(args.steps, "--steps", "sample")
    positive_int(args.seed, "--seed", "sample", minimum=0)
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance > 0):
        raise WeightsError(f"--guidance={args.guidance!r} is not allowed; use a finite number > 0")
    if any(not p.strip() for p in args.prompt):
        raise WeightsError("--prompt '' is not allowed; give a non-empty prompt")
    if args.out.exists() and not args.out.is_dir():
        raise WeightsError(f"--out {str(args.out)!r} is a file; give a folder")
    if args.run is not None:
        cfg_file, lora = args.run / "config.yaml", args.run / "final"
        if not cfg_file.is_file():
            print(f"gfnalign sample: {cfg_file} not found; --run must be a gfnalign run directory", file=sys.stderr)
            return 2
        cfg = TrainConfig.load(cfg_file)
    else:
        lora = args.lora
        if not (lora / "pytorch_lora_weights.safetensors").is_file() and not args.pretrained:
            print(f"gfnalign sample: {lora / 'pytorch_lora_weights.safetensors'} not found", file=sys.stderr)
            return 2
        cfg_file = lora / "training_config.yaml"
        cfg = TrainConfig.load(cfg_file) if cfg_file.is_file() else TrainConfig()
        if args.base:
            cfg.backbone.kind, cfg.backbone.path = "sd", args.base
    if args.steps is not None:
        cfg.sampling.num_steps = args.steps
    if args.guidance is not None:
        cfg.sampling.guidance_scale = args.guidance
    if args.prompt:
        prompts = list(args.prompt)
    else:
        from gfnalign.rewards.prompts import load_prompts

        prompts = list(dict.fromkeys(prompt_list(load_prompts(args.prompts or cfg.prompts))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = build_backbone(cfg, device)
    if not args.pretrained:
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            print(f"gfnalign sample: no LoRA at {lora} (train first, or pass --pretrained)", file=sys.stderr)
            return 2
        load_into(backbone, lora)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    todo = [p for p in prompts for _ in range(args.n)]
    images = []
    with torch.no_grad():
        for s in range(0, len(todo), args.batch_size):
            texts = todo[s:s + args.batch_size]
            cond = backbone.encode_prompts(texts)
            traj = rollout(backbone, cond, backbone.initial_noise(len(texts), gen), eta=cfg.sampling.eta,
                           generator=gen)
            images.append(backbone.decode(traj.final).float().cpu())
    images = torch.cat(images)
    for i, (arr, p) in enumerate(zip(to_uint8(images), todo)):
        slug = "".join(c if c.isalnum() else "_" for c in p)[:40]
        Image.fromarray(arr).save(args.out / f"{i:04d}_{slug}.png")
    save_grid(images, todo, args.out / "grid.png", cols=args.n)
    print(f"wrote {len(todo)} images to {args.out}")
    return 0
