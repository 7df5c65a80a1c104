"""``gfnalign train --config FILE [--set k=v ...] [--out DIR] [--resume latest|PATH]``.

Works as is under ``accelerate launch -m gfnalign train ...`` and ``torchrun --nproc_per_node N -m gfnalign
train ...``: every process runs this command; rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
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
    from gfnalign.api import find_preset

    preset = find_preset(value)
    return preset if preset is not None else path


def run(args: argparse.Namespace) -> int:
    from gfnalign.api import check_run
    from gfnalign.training.config import ConfigError, TrainConfig

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
        check_run(cfg, out)
    except ConfigError as err:
        print(f"gfnalign train: config error: {err}", file=sys.stderr)
        return 2
    if args.validate_only:
        print("config OK")
        return 0

    code, _ = train_with_exit_code(cfg, out, resume=args.resume, stop_after_updates=args.stop_after_updates)
    return code


def train_with_exit_code(cfg, out: Path | None, *, resume: str | None = None, stop_after_updates: int | None = None,
                         command: str = "train"):
    """Run :func:`gfnalign.api.train`; a named error becomes one line on stderr and an exit code (2: bad input,
    1: the run stopped; its checkpoint is kept). Returns ``(code, TrainResult or None)``."""
    from gfnalign.api import ArgumentError, RunExistsError, train
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError
    from gfnalign.training.reward_guard import RewardUnavailableError
    from gfnalign.training.trainer import BadRewardError, NanLossError, TrainingFailedError

    try:
        return 0, train(cfg, out=out, resume=resume, stop_after_updates=stop_after_updates)
    except ArgumentError as err:
        print(f"gfnalign {command}: {err.named('--' + err.name.replace('_', '-'))}", file=sys.stderr)
    except (NanLossError, BadRewardError, TrainingFailedError, RewardUnavailableError) as err:
        print(f"gfnalign {command}: stopped: {err}", file=sys.stderr)
        return 1, None
    except (RunExistsError, ConfigError, FileNotFoundError, CheckpointError) as err:
        print(f"gfnalign {command}: {err}", file=sys.stderr)
    return 2, None
