"""Reproduce the shipped tiny flow-matching digits world: ``python scripts/pretrain_digits_flow.py`` (see
``gfnalign.backbones.digits_flow_pretrain`` for the steps and options)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gfnalign.backbones.digits_flow_pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
