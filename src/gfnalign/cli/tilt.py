"""``gfnalign tilt``: what a fine-tuned run samples, against the target p_pretrained·exp(β·r), on the digits world.

    gfnalign tilt --run runs/demo [--beta B] [--target-samples 4000] [--samples 1000] [--json OUT.json]

The target is estimated from the pretrained sampler's own draws weighted by exp(β·r) (self-normalised; the
effective sample size and the standard error of every class mass are reported); the run's fine-tuned
sampler and an independent pretrained sample are compared with it by class-mass total variation (95%
bootstrap interval), reward mean, diversity, prior drift and a weighted energy distance in the classifier's
feature space. Classes are the digits world's shipped classifier's argmax, so the command needs a run on
the digits world; β defaults to the run's final β. Appends a section and a bar chart to RUN/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run directory written by `gfnalign train`")
    p.add_argument("--lora", type=Path, help="adapter folder (default RUN/final)")
    p.add_argument("--beta", type=float, help="inverse temperature of the target (default: the run's beta.value)")
    p.add_argument("--target-samples", type=int, default=4000,
                   help="pretrained draws per prompt for the target (default 4000: s.e. <= 0.01 at ESS >= 2500)")
    p.add_argument("--samples", type=int, default=1000, help="fine-tuned draws per prompt (default 1000)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first K prompts of the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--no-report", action="store_true", help="print the section but do not append it to RUN/report.md")


def _fail(msg: str) -> int:
    print(f"gfnalign tilt: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import math

    if args.target_samples < 2 or args.samples < 2:
        return _fail(f"--target-samples={args.target_samples} and --samples={args.samples} must be at least 2")
    if args.beta is not None and not math.isfinite(args.beta):
        return _fail(f"--beta={args.beta} must be a finite number")
    try:
        result, md = measure_run(args.run, lora=args.lora, beta=args.beta, target_samples=args.target_samples,
                                 samples=args.samples, max_prompts=args.max_prompts, seed=args.seed,
                                 report=not args.no_report)
    except TiltRunError as err:
        return _fail(str(err))
    print(md)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


class TiltRunError(ValueError):
    """A run that cannot be measured (no config, not the digits world, unreadable adapters)."""


def measure_run(run_dir: Path, *, lora: Path | None = None, beta: float | None = None, target_samples: int = 4000,
                samples: int = 1000, max_prompts: int | None = None, seed: int = 0, report: bool = True,
                before_heading: str | None = None) -> tuple[dict, str]:
    """The image-world benchmark for one run: ``(result, markdown section)``.

    With ``report`` the section and its bar chart (``tilt_class_masses.png``) go into ``RUN/report.md``: at the
    end, or just before the line ``before_heading`` when the report has it (the demo puts it beside the grids).
    """
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise TiltRunError(f"{cfg_path} not found; --run must be a directory written by `gfnalign train`")

    import torch

    from gfnalign.api import load_weights, prompt_texts
    from gfnalign.evaluation.features import DigitFeatures
    from gfnalign.evaluation.tilt import markdown_section, measure_tilt, plot_class_masses
    from gfnalign.rewards.prompts import load_prompts
    from gfnalign.training.build import build_backbone, build_reward
    from gfnalign.training.config import DIGITS_KINDS, TrainConfig

    cfg = TrainConfig.load(cfg_path)
    if cfg.backbone.kind not in DIGITS_KINDS:
        raise TiltRunError(f"backbone.kind={cfg.backbone.kind!r}: class masses need the digits world's classifier; "
                           "on other backbones compare feature distributions with gfnalign.evaluation.tilt."
                           "weighted_energy_distance")
    lora = Path(lora) if lora is not None else Path(run_dir) / "final"
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, torch.device("cpu"))
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.weights import WeightsError

    try:
        load_weights(backbone, lora)
    except (WeightsError, CheckpointError) as err:
        raise TiltRunError(" ".join(str(err).split())) from None
    prompts = list(dict.fromkeys(prompt_texts(load_prompts(cfg.prompts))))[:max_prompts]
    beta = float(cfg.beta.value if beta is None else beta)
    classifier = DigitFeatures().classifier
    result = measure_tilt(backbone, prompts, build_reward(cfg), beta, classifier, target_samples=target_samples,
                          samples=samples, seed=seed, eta=cfg.sampling.eta)
    result.update({"run": str(run_dir), "method": cfg.method.name, "reward": cfg.reward})
    image = None
    try:
        plot_class_masses(result, Path(run_dir) / "tilt_class_masses.png")
        image = "tilt_class_masses.png"
    except ImportError:
        print("note: matplotlib is not installed; no class-mass chart (pip install 'gfnalign[report]')")
    md = markdown_section(result, image)
    if report:
        path = Path(run_dir) / "report.md"
        text = path.read_text() if path.is_file() else ""
        marker = f"\n{before_heading}" if before_heading else None
        if marker and marker in text:
            at = text.index(marker) + 1
            text = text[:at] + md + "\n" + text[at:]
        else:
            text = text + "\n" + md
        path.write_text(text)
    return result, md
