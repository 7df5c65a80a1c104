"""Atomic checkpoints: ``checkpoints/step_N/`` is written to a temporary folder and renamed into place.

A kill at any moment therefore leaves every ``step_N`` folder complete; half-written ``.tmp-*`` folders
are ignored by :func:`latest_checkpoint` and deleted by :func:`remove_stale`. Contents::

    state.json          step, epoch, position inside the epoch, counters, beta, world size
    trainable.pt        backbone.trainable_state_dict() (LoRA or full weights)
    heads.pt            objective.state_dict() (flow heads)
    optimizer.pt        AdamW state
    engine/             instead of the three above under FSDP / DeepSpeed: accelerator.save_state (one shard
                        per rank) and objective_state.pt (the objective's state outside the engine)
    rng_rank{r}.pt      torch (CPU + CUDA), python and numpy RNG states of rank r, as plain tensors
    epoch_rank{r}.pt    only for a mid-epoch checkpoint: the epoch's transitions and sampling metrics
    COMPLETE            written last, before the rename

Nothing here is ever unpickled as code: every ``.pt`` file holds only tensors, numbers, strings, lists and
dicts and is read with :func:`load_tensors` (``torch.load(..., weights_only=True)``), so a crafted file
fails with :class:`CheckpointError` instead of running anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_PREFIX = "step_"
ENGINE_DIR = "engine"
TMP_PREFIX = f".tmp-{STEP_PREFIX}"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, of the wrong layout or not plain tensors."""


def load_tensors(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is a :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing; the checkpoint is incomplete") from None
    except Exception as err:  # UnpicklingError (a forbidden global), a truncated zip, not a torch file
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else ""
        raise CheckpointError(f"{path}: not a readable tensor file ({type(err).__name__}: {first}); "
                              "delete this checkpoint folder or resume from another one") from None


def rng_state() -> dict[str, Any]:
    """RNG states of torch, python and numpy as tensors and numbers only (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy_kind": str(kind),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_internal"].tolist()),
                         state["python_gauss"]))
        np.random.set_state((str(state["numpy_kind"]), state["numpy_keys"].numpy().astype(np.uint32),
                             int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                             float(state["numpy_cached_gaussian"])))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"RNG state has the wrong layout ({type(err).__name__}: {err}); "
                              "resume from another checkpoint") from None
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


def remove_stale(root: Path) -> list[Path]:
    """Delete half-written ``.tmp-step_N`` folders (a kill during a checkpoint write leaves one)."""
    stale = sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """``latest`` -> newest complete checkpoint of ``run_dir``, or None when there is none yet (a run killed
    before its first checkpoint then starts fresh); otherwise a checkpoint folder path."""
    if resume == "latest":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not (path / "COMPLETE").is_file() or not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (expected state.json and COMPLETE)")
    return path


def begin(root: Path, step: int) -> Path:
    """Create a fresh temporary folder for checkpoint ``step`` (main rank only)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step}"
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
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename): a kill leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file when it is torn or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """Like :func:`read_json`, but a missing, torn or malformed file counts as absent (it gets recomputed)."""
    try:
        return read_json(path)
    except CheckpointError:
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, dropping a torn (unparsable) last line that a kill mid-append leaves."""
    rows: list[dict[str, Any]] = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path}: line {i + 1} is not JSON (only a torn last line is tolerated)") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows
