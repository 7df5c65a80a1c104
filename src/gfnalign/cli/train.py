"""``gfnalign train --config FILE [--set k=v ...] [--out DIR] [--resume latest|PATH]``.

Works as is under ``accelerate launch -m gfnalign train ...`` and ``torchrun --nproc_per_node N -m gfnalign
train ...``: every process runs this command; rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see `gfnalign list` for presets; a preset name also works). "
                                    "With --resume and no --config, the run's own config.yaml is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=3 --set method.options.trust_region=1.0")
    p.add_argument("--out", help="run directory (default: runs/<run_name>)")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint of --out, or a folder")
    p.add_argument("--stop-after-updates", type=int, default=None,
                   help="behave as if interrupted after N optimiser updates (save a checkpoint and exit; for tests)")
    p.add_argument("--validate-only", action="store_true", help="check the config and exit without loading models")


def resolve_config_path(value: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    from gfnalign.cli.listing import find_preset

    preset = find_preset(value)
    return preset if preset is not None else path


def check_output_dir(run_dir: Path) -> None:
    """``--out`` must be a folder we can create and write (checked before any model loads)."""
    from gfnalign.training.config import ConfigError

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a folder; choose another --out")
    parent = run_dir if run_dir.exists() else next((p for p in run_dir.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(run_dir)!r} cannot be created or written here (no write permission on "
                          f"{str(parent)!r}); choose another --out")


def run(args: argparse.Namespace) -> int:
    from gfnalign.training.config import ConfigError, TrainConfig, check_resources

    out = Path(args.out) if args.out else None
    try:
        if args.config:
            cfg = TrainConfig.load(resolve_config_path(args.config), args.overrides)
        elif args.resume and out is not None and (out / "config.yaml").is_file():
            cfg = TrainConfig.load(out / "config.yaml", args.overrides)
        else:
            print("gfnalign train: --config FILE is required (or --out RUN --resume latest for an existing run)",
                  file=sys.stderr)
            return 2
        check_resources(cfg)
        run_dir = out if out is not None else Path("runs") / cfg.run_name
        check_output_dir(run_dir)
    except ConfigError as err:
        print(f"gfnalign train: config error: {err}", file=sys.stderr)
        return 2
    if args.validate_only:
        print("config OK")
        return 0
    from gfnalign.training import checkpoint as ckpt

    if not args.resume and ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        print(f"gfnalign train: {run_dir} already holds checkpoints; pass --resume latest to continue it or "
              "choose another --out", file=sys.stderr)
        return 2

    from gfnalign.training.reward_guard import RewardUnavailableError
    from gfnalign.training.trainer import BadRewardError, NanLossError, Trainer, TrainingFailedError

    trainer = Trainer(cfg, run_dir, resume=args.resume, stop_after_updates=args.stop_after_updates)
    try:
        return trainer.train()
    except (NanLossError, BadRewardError, TrainingFailedError, RewardUnavailableError) as err:
        print(f"gfnalign train: stopped: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ckpt.CheckpointError) as err:
        print(f"gfnalign train: {err}", file=sys.stderr)
        return 2
