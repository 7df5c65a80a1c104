"""``gfnalign`` entry point: a table of sub-commands, each a module with ``add_arguments`` and ``run``.

Command modules stay import-light (heavy imports happen inside ``run``) so ``gfnalign --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Before torch loads: OpenMP's default busy-waiting makes torch 10-100x slower whenever the CPU is
# oversubscribed (shared machines, torchrun workers, other jobs); passive waiting costs ~nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module under gfnalign.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "align the shipped tiny digits model on the CPU and write a report (offline)"),
    "train": ("train", "train with a YAML config (any method x reward x backbone)"),
    "sample": ("sample", "sample images from a run or LoRA"),
    "eval": ("evaluate", "reward, diversity and prior drift of a run or LoRA"),
    "tilt": ("tilt", "what a digits-world run samples against its target p_pretrained*exp(beta*r)"),
    "list": ("listing", "list methods, rewards, prompt sets and presets"),
    "rewards": ("rewards", "inspect rewards (`gfnalign rewards list`) and serve one over HTTP"),
    "toy": ("toy", "prove an objective exact on the analytic Gaussian-mixture world"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfnalign",
        description="Align text-to-image diffusion models to rewards with GFlowNets.",
    )
    from gfnalign import __version__

    parser.add_argument("--version", action="version", version=f"gfnalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"gfnalign.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name != f"gfnalign.cli.{module_name}":
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"gfnalign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a raw traceback
        if os.environ.get("GFNALIGN_DEBUG") == "1":
            raise
        text = " ".join(str(err).split())[:500]
        print(f"gfnalign {args.command}: error: {type(err).__name__}: {text} "
              "(set GFNALIGN_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
