"""``python -m gfnalign`` (also what ``accelerate launch -m gfnalign`` and ``torchrun -m gfnalign`` run)."""

import sys

from gfnalign.cli.main import main

sys.exit(main())
