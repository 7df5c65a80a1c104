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


def _prompt_list(prompt_set) -> list[str]:
    for attr in ("prompts", "texts"):
        value = getattr(prompt_set, attr, None)
        if isinstance(value, list | tuple) and value:
            return [str(v) for v in value]
    if isinstance(prompt_set, list | tuple):
        return [str(v) for v in prompt_set]
    try:
        return [str(v) for v in list(prompt_set)]
    except TypeError as err:
        raise ValueError(f"cannot list the prompts of {prompt_set!r}; pass --prompts with a file or set name") from err


def load_weights(backbone, folder: Path) -> None:
    """Load a diffusers-format LoRA folder (``final/``) or a trainer checkpoint (``checkpoints/step_N``)."""
    from gfnalign.cli.weights import load_into

    load_into(backbone, folder)


def _auto_features(kind: str) -> str:
    from gfnalign.evaluation.features import dreamsim_available

    if kind == "digits":
        return "digits"
    if dreamsim_available():
        return "dreamsim"
    print("note: no local CLIP/DreamSim weights given; measuring diversity and drift in pixel space "
          "(pass --features clip:PATH for a semantic feature space)")
    return "pixels:16"


def run(args: argparse.Namespace) -> int:
    import sys

    from gfnalign.cli.weights import WeightsError
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError

    try:
        return _run(args)
    except (WeightsError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"gfnalign eval: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from gfnalign.cli.weights import WeightsError, positive_int
    from gfnalign.evaluation.evaluate import evaluate_backbone, markdown_report
    from gfnalign.evaluation.features import build_features
    from gfnalign.training.build import build_backbone, build_reward
    from gfnalign.training.config import TrainConfig

    if args.run is None and args.config is None:
        raise WeightsError("pass --run RUN_DIR (or --config FILE together with --lora DIR)")
    positive_int(args.samples, "--samples", "eval", minimum=2)  # diversity needs pairs
    positive_int(args.batch_size, "--batch-size", "eval")
    positive_int(args.max_prompts, "--max-prompts", "eval")
    positive_int(args.seed, "--seed", "eval", minimum=0)
    if args.lora is not None and str(args.lora) != "none" and not Path(args.lora).is_dir():
        raise WeightsError(f"--lora {str(args.lora)!r} does not exist; pass RUN/final, RUN/checkpoints/step_N "
                           "or none")

    cfg_path = args.config or (args.run / "config.yaml")
    if not cfg_path.is_file():
        raise WeightsError(f"{cfg_path} not found; --run must be a directory written by `gfnalign train`")
    cfg = TrainConfig.load(cfg_path, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    lora = args.lora if args.lora is not None else (args.run / "final" if args.run is not None else None)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, device)
    if lora is not None and str(lora) != "none":
        load_weights(backbone, Path(lora))

    from gfnalign.rewards import build_reward as build_any_reward
    from gfnalign.rewards.prompts import load_prompts

    rewards = [build_reward(cfg)] + [build_any_reward(spec) for spec in args.extra_rewards]
    prompts = _prompt_list(load_prompts(args.prompts if args.prompts is not None else cfg.prompts))
    prompts = list(dict.fromkeys(prompts))
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    feat_spec = _auto_features(cfg.backbone.kind) if args.features == "auto" else args.features
    features = build_features(feat_spec, device=device)

    result = evaluate_backbone(
        backbone, prompts, rewards, features, samples_per_prompt=args.samples, seed=args.seed,
        batch_size=args.batch_size, eta=cfg.sampling.eta, metric=args.metric, floor=not args.no_floor,
    )
    result.update({
        "run": str(args.run) if args.run else None,
        "lora": None if lora is None else str(lora),
        "method": cfg.method.name,
        "backbone": cfg.backbone.kind,
        "num_steps": cfg.sampling.num_steps,
        "guidance_scale": cfg.sampling.guidance_scale,
    })
    title = f"Evaluation: {cfg.method.name} (`gfnalign eval`, seed {args.seed})"
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
