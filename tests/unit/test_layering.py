"""Layering: core / objectives / sampling / toy never import diffusers, peft, accelerate or higher layers."""

import subprocess
import sys

LOW_LAYERS = ["gfnalign.core", "gfnalign.objectives", "gfnalign.sampling", "gfnalign.toy"]


def test_low_layers_import_without_diffusers_peft_accelerate():
    code = (
        "import sys\n"
        "for banned in ('diffusers', 'peft', 'accelerate', 'transformers'):\n"
        "    sys.modules[banned] = None  # any import of it now raises ImportError\n"
        + "".join(f"import {m}\n" for m in LOW_LAYERS)
        + "import pkgutil, importlib\n"
        + "".join(
            f"for info in pkgutil.walk_packages({m}.__path__, '{m}.'):\n    importlib.import_module(info.name)\n"
            for m in LOW_LAYERS
        )
        + "loaded = [k for k in sys.modules if k.startswith(('gfnalign.backbones', 'gfnalign.training', 'gfnalign.rewards', 'gfnalign.cli', 'gfnalign.evaluation'))]\n"
        + "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
