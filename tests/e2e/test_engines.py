"""accelerate's DDP engine on two CPU processes (gloo): the same weights as one process with the doubled batch,
and an interrupted two-process run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.e2e.test_train_cli import REPO, _env, free_port
from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline, trainable

pytestmark = pytest.mark.e2e
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]


def _torchrun(*args: str) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *args]


@needs_torchrun
def test_two_process_ddp_equals_one_process_with_the_doubled_batch(pipeline, tmp_path):
    worker = ["-m", "tests.e2e._engine_worker", str(pipeline)]
    _run([sys.executable, *worker, str(tmp_path / "single.pt"), "--rows", "all"])
    _run([sys.executable, *worker, str(tmp_path / "half.pt"), "--rows", "half0"])
    _run(_torchrun(*worker, str(tmp_path / "ddp.pt"), "--rows", "rank"))
    single, half, ddp = (torch.load(tmp_path / f"{n}.pt") for n in ("single", "half", "ddp"))
    assert ddp["world"] == 2 and ddp["engine"] == "DistributedDataParallel"
    assert single["world"] == 1 and single["transitions"] >= 8
    assert set(ddp["state"]) == set(single["state"]) == set(half["state"])

    def max_diff(a: dict, b: dict) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    # float32 sums in another order; Adam turns the rounding of near-zero gradients into steps of up to ~lr.
    # Measured on the 2-core CPU: 4.2e-6 (DDP vs one process) and 1.8e-2 (one half alone vs one process).
    tol = 3e-5
    assert max_diff(ddp["state"], single["state"]) < tol
    # the comparison can fail: training on one half alone (no gradient averaging) lands elsewhere
    assert max_diff(half["state"], single["state"]) > 100 * tol


@needs_torchrun
def test_two_process_ddp_resume_matches_an_uninterrupted_run(pipeline, tmp_path):
    cfg = tiny_config(pipeline, "dag-db", {"fraction": 0.5, "flow_gradient": "target"},
                      sampling={"num_steps": 4, "guidance_scale": 1.0, "batch_size": 4, "batches_per_epoch": 1},
                      training={"epochs": 2, "micro_batch": 2, "grad_accum": 2, "max_updates_per_epoch": 2})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train = ["-m", "gfnalign", "train", "--config", str(config)]
    _run(_torchrun(*train, "--out", str(tmp_path / "clean")))
    _run(_torchrun(*train, "--out", str(tmp_path / "resumed"), "--stop-after-updates", "1"))
    state = yaml.safe_load((tmp_path / "resumed" / "checkpoints" / "step_1" / "state.json").read_text())
    assert state["mid_epoch"] and state["world_size"] == 2 and state["engine"] == "ddp"
    _run(_torchrun(*train, "--out", str(tmp_path / "resumed"), "--resume", "latest"))

    clean, resumed = trainable(tmp_path / "clean"), trainable(tmp_path / "resumed")
    assert set(clean) == set(resumed)
    for k in clean:
        torch.testing.assert_close(resumed[k], clean[k], rtol=0, atol=1e-6, msg=k)
    a, b = (metrics_rows(tmp_path / d) for d in ("clean", "resumed"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], rel=1e-5, abs=1e-7)
    final = yaml.safe_load((tmp_path / "resumed" / "checkpoints" / "step_4" / "state.json").read_text())
    assert final["rank_param_checksums"][0] == final["rank_param_checksums"][1]
    assert (tmp_path / "resumed" / "final" / "pytorch_lora_weights.safetensors").is_file()
