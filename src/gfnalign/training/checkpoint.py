"""Atomic checkpoints: ``checkpoints/step_N/`` is written to a temporary folder and renamed into place.

A kill at any moment therefore leaves every ``step_N`` folder complete; half-written ``.tmp-*`` folders
are ignored (and cleaned up) by :func:`latest_checkpoint`. Contents::

    state.json          step, epoch, position inside the epoch, counters, beta, world size
    trainable.pt        backbone.trainable_state_dict() (LoRA or full weights)
    heads.pt            objective.state_dict() (flow heads)
    optimizer.pt        AdamW state
    engine/             instead of the three above under FSDP / DeepSpeed: accelerator.save_state (one shard
                        per rank) and objective_state.pt (the objective's state outside the engine)
    rng_rank{r}.pt      torch (CPU + CUDA), python and numpy RNG states of rank r
    epoch_rank{r}.pt    only for a mid-epoch checkpoint: the epoch's transitions and sampling metrics
    COMPLETE            written last, before the rename
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_PREFIX = "step_"
ENGINE_DIR = "engine"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "COMPLETE").is_file():
            try:
                int(p.name[len(STEP_PREFIX):])
            except ValueError:
                continue
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> newest complete checkpoint of ``run_dir``; otherwise a checkpoint folder path."""
    if resume == "latest":
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume latest: no complete checkpoint under {run_dir / 'checkpoints'}; "
                "start without --resume or pass --out to the run you want to continue"
            )
        return ckpt
    path = Path(resume)
    if not (path / "COMPLETE").is_file() or not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (expected state.json and COMPLETE)")
    return path


def begin(root: Path, step: int) -> Path:
    """Create a fresh temporary folder for checkpoint ``step`` (main rank only)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{STEP_PREFIX}{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Mark ``tmp`` complete, rename it to ``step_N`` and delete the oldest beyond ``keep``."""
    (tmp / "COMPLETE").write_text("ok\n")
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{STEP_PREFIX}*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
