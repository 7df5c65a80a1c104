"""SIGKILL at random moments (including during checkpoint and export writes), then `--resume latest` until the
run finishes: the result is bit-identical to an uninterrupted run (LoRA file bytes, checkpoint tensors,
metrics rows). ``benchmarks/fuzz_cli.py`` runs the same routine over many more kill times."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline, trainable

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill_config(pipeline: Path) -> dict[str, Any]:
    """Tiny and checkpoint-heavy: a checkpoint after every epoch, so kills often land inside a write."""
    return tiny_config(pipeline, "dag-db", {"fraction": 0.5},
                       training={"epochs": 3, "micro_batch": 2, "max_updates_per_epoch": 2},
                       logging={"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                                "checkpoint_every": 1, "keep_checkpoints": 2})


def train_cmd(config: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "gfnalign", "train", "--config", str(config), "--out", str(run),
            "--resume", "latest"]


def run_to_end(config: Path, run: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, run), capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=timeout)


def kill_and_resume(config: Path, run: Path, kill_after_s: list[float]) -> dict[str, Any]:
    """Start the run, SIGKILL it after each delay in turn (each restart uses --resume latest), then finish it.
    Returns what happened: kills that landed, and how many of them left a half-written checkpoint."""
    landed, in_write = 0, 0
    for delay in kill_after_s:
        proc = subprocess.Popen(train_cmd(config, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=_env(), cwd=REPO)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            landed += 1
            in_write += int(any((run / "checkpoints").glob(".tmp-*")) or (run / ".tmp-final").exists())
    final = run_to_end(config, run)
    return {"landed": landed, "in_write": in_write, "returncode": final.returncode, "stderr": final.stderr}


def same_result(clean: Path, run: Path) -> list[str]:
    """Differences between two finished runs (empty when bit-identical)."""
    problems = []
    lora = "final/pytorch_lora_weights.safetensors"
    if not (run / lora).is_file() or (clean / lora).read_bytes() != (run / lora).read_bytes():
        problems.append("LoRA file bytes differ")
    if metrics_rows(clean) != metrics_rows(run):
        problems.append("metrics rows differ")
    a, b = trainable(clean), trainable(run)
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        problems.append("checkpoint tensors differ")
    if list((run / "checkpoints").glob(".tmp-*")):
        problems.append("a temporary checkpoint folder was left behind")
    return problems


@pytest.mark.slow
def test_random_sigkills_resume_bit_exactly(tmp_path):
    pipeline = tiny_pipeline(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(kill_config(pipeline)))
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    out = run_to_end(config, clean)
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    rng = random.Random(0)
    run = tmp_path / "killed"  # two kills, then a resume to the end (more in benchmarks/fuzz_cli.py)
    report = kill_and_resume(config, run, [rng.uniform(0.3, 1.0) * wall for _ in range(2)])
    assert report["returncode"] == 0, report["stderr"][-2000:]
    assert same_result(clean, run) == [], report
