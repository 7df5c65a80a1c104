"""Shared helpers for the trainer tests: a tiny random-init digits-like pipeline and tiny configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

_TINY: dict[str, Path] = {}

# The tests run on small shared CPUs: one intra-op thread avoids OpenMP oversubscription slow-downs.
torch.set_num_threads(1)


def tiny_pipeline(root: Path) -> Path:
    """A random-init tiny StableDiffusionPipeline folder (digits architecture), built once per session."""
    if "path" in _TINY and (_TINY["path"] / "model_index.json").is_file():
        return _TINY["path"]
    from gfnalign.backbones.digits_pretrain import build_components, make_pipeline

    path = root / "tiny-pipeline"
    if not (path / "model_index.json").is_file():
        make_pipeline(build_components(seed=0)).save_pretrained(str(path))
    _TINY["path"] = path
    return path


def tiny_config(pipeline: Path, method_name: str = "residual-nabla-db", options: dict[str, Any] | None = None,
                **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run_name": f"test-{method_name}",
        "seed": 0,
        "backbone": {"kind": "digits", "path": str(pipeline), "lora_rank": 2, "lora_alpha": 2.0},
        "reward": "ink",
        "prompts": "digits",
        "method": {"name": method_name, "options": dict(options or {})},
        "beta": {"value": 1.0},
        "lookahead": {"mode": "cached", "model": "policy"},  # x0_hat from the rollout: no extra UNet passes
        "sampling": {"num_steps": 3, "guidance_scale": 1.0, "batch_size": 2, "batches_per_epoch": 1},
        "training": {"epochs": 1, "micro_batch": 2, "grad_accum": 1, "max_updates_per_epoch": 2},
        "logging": {"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                    "checkpoint_every": 1, "eval_samples": 4},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {})
        if isinstance(cfg[name], dict) and isinstance(values, dict):
            cfg[name] = {**copy.deepcopy(cfg[name]), **values}
        else:
            cfg[name] = values
    return cfg


def metrics_rows(run_dir: Path, drop_perf: bool = True) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if drop_perf:
        rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    return rows


def trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    from gfnalign.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    out = {f"policy.{k}": v for k, v in torch.load(ckpt / "trainable.pt").items()}
    out.update({f"heads.{k}": v for k, v in torch.load(ckpt / "heads.pt").items()})
    return out
