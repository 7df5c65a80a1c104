"""Loading fine-tuned weights for sampling and evaluation (``gfnalign.sample`` / ``gfnalign.evaluate`` and the
``gfnalign sample`` / ``gfnalign eval`` commands on top of them) with named errors.

A corrupt or truncated file, weights of another model (rank, targets, architecture) or non-finite weights
each end in one line naming the file and the fix; nothing is unpickled as code (``.pt`` files are read with
``weights_only=True``, LoRA files are safetensors).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"


class WeightsError(ValueError):
    """The weights to evaluate or sample are missing, unreadable, of another model, or not finite."""


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def check_finite(tensors: dict[str, Any], where: Path) -> None:
    for name, t in tensors.items():
        if hasattr(t, "is_floating_point") and t.is_floating_point() and not bool(t.isfinite().all()):
            raise WeightsError(f"{where}: tensor {name!r} holds NaN/inf weights (the run diverged?); evaluate an "
                               "earlier checkpoint (--lora RUN/checkpoints/step_N)")


def read_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of ``path``; truncated or corrupt files become a :class:`WeightsError`."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is unusable
        raise WeightsError(f"{path}: not a readable safetensors file ({type(err).__name__}: {_first_line(err)}); "
                           "re-export it or pass another --lora") from None
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors; pass another --lora")
    return tensors


def load_into(backbone: Any, folder: Path) -> None:
    """Load ``folder`` (a LoRA folder ``RUN/final`` or a checkpoint ``RUN/checkpoints/step_N``) into ``backbone``."""
    from gfnalign.training import checkpoint as ckpt

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"weights folder {str(folder)!r} does not exist; pass --lora DIR (RUN/final or "
                           "RUN/checkpoints/step_N), or --lora none / --pretrained for the base model")
    try:
        if (folder / "trainable.pt").is_file():
            state = ckpt.load_tensors(folder / "trainable.pt")
            if not isinstance(state, dict):
                raise WeightsError(f"{folder / 'trainable.pt'}: expected a dict of tensors, got {type(state).__name__}")
            check_finite(state, folder / "trainable.pt")
            backbone.load_trainable_state_dict(state)
        elif (folder / LORA_FILE).is_file():
            check_finite(read_safetensors(folder / LORA_FILE), folder / LORA_FILE)
            backbone.load_adapter(folder)
        elif (folder / "unet").is_dir():
            backbone.load_adapter(folder)
        else:
            raise WeightsError(f"{folder} holds neither {LORA_FILE} nor a checkpoint's trainable.pt; pass RUN/final "
                               "or RUN/checkpoints/step_N")
    except (WeightsError, ckpt.CheckpointError):
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, OSError) as err:
        raise WeightsError(f"{folder}: these weights do not fit the configured model ({type(err).__name__}: "
                           f"{_first_line(err)}); use the run's own config (lora_rank, lora_targets, base model)") from None
    params = [p for p in getattr(backbone, "trainable_parameters", lambda: [])()]
    if any(not math.isfinite(float(p.detach().float().sum())) for p in params):
        raise WeightsError(f"{folder}: the loaded weights are not finite; evaluate an earlier checkpoint")

