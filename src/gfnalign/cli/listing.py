"""``gfnalign list [methods|rewards|prompts|presets]``: what can be combined, without loading any model."""

from __future__ import annotations

import argparse

from gfnalign.api import find_preset, list_presets, preset_dirs  # noqa: F401  (re-exported for callers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="all", choices=["all", "methods", "rewards", "prompts", "presets"])


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    what = args.what
    if what in ("all", "methods"):
        import gfnalign.objectives  # noqa: F401
        from gfnalign.objectives.base import REGISTRY

        print("methods (method.name):")
        for name in sorted(REGISTRY):
            print(f"  {name:20s} {_first_line(REGISTRY[name])[:90]}")
    if what in ("all", "rewards"):
        from gfnalign.rewards import list_rewards

        print("rewards (reward:):")
        for info in list_rewards():
            flag = "differentiable" if info.differentiable else "black-box"
            extra = f" [needs {info.extra}]" if info.extra else (" [needs weights]" if info.needs_weights else "")
            print(f"  {info.name:24s} {flag:14s} {info.description[:70]}{extra}")
    if what in ("all", "prompts"):
        from gfnalign.rewards import prompt_set_names

        print("prompt sets (prompts:):  " + ", ".join(prompt_set_names()) + "  (or a .txt/.json/.csv file)")
    bad = 0
    if what in ("all", "presets"):
        from gfnalign.training.config import ConfigError, TrainConfig

        print("presets (gfnalign train --config NAME), each validated as `gfnalign train` would before loading:")
        for name, path in list_presets().items():
            try:  # the whole-config checks only: no model, reward weights or prompt files are read
                cfg = TrainConfig.load(path)
                what_ = f"{cfg.backbone.kind}/{cfg.method.name}"
            except (ConfigError, OSError) as err:
                bad += 1
                what_ = f"INVALID: {err}"
            print(f"  {name:44s} {what_:28s} {path}")
    return 1 if bad else 0
