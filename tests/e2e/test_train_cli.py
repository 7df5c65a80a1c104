"""End-to-end: the `gfnalign` command line (train / resume / SIGTERM / sample / list / demo config) and a
two-process CPU run through torchrun (gloo)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _gfnalign(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gfnalign", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def free_port() -> int:
    """A TCP port nobody listens on now (other test runs share the machine; a fixed port collides)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_list_shows_methods_rewards_prompts_presets():
    out = _gfnalign("list")
    assert out.returncode == 0, out.stderr
    for word in ("residual-nabla-db", "reward-backprop", "digit-alignment", "digits", "sd15-aesthetic-dag-db",
                 "sdxl-aesthetic-dag-db", "sdxl-hpsv2-residual-nabla-db"):
        assert word in out.stdout


def test_bad_config_fails_before_loading_models(tmp_path):
    out = _gfnalign("train", "--config", "digits-residual-nabla-db", "--set", "lookahead.model=oracle",
                    "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "lookahead.model='oracle'" in out.stderr and "policy, reference" in out.stderr
    assert not (tmp_path / "r").exists()


def test_train_sigterm_resume_and_sample(pipeline, tmp_path):
    cfg = tiny_config(pipeline, "dag-kl", {"fraction": 0.5},
                      training={"epochs": 3, "micro_batch": 2, "max_updates_per_epoch": 2},
                      logging={"report": True, "tensorboard": True, "progress": False, "sample_every": 1,
                               "checkpoint_every": 1, "eval_samples": 4, "grid_prompts": 2})
    config = _write(cfg, tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gfnalign", "train", "--config", str(config), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.2)
    interrupted = proc.poll() is None
    if interrupted:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    if interrupted:
        assert "resume latest" in err or "done" in err
    out = _gfnalign("train", "--out", str(run), "--resume", "latest")
    assert out.returncode == 0, out.stderr
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for name in ("config.yaml", "metrics.jsonl", "report.md", "reward_curve.png", "final/pytorch_lora_weights.safetensors",
                 "final/README.md", "samples/before.png", "samples/after.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    report = (run / "report.md").read_text()
    assert "reward mean" in report and "diversity" in report
    out = _gfnalign("sample", "--run", str(run), "--prompt", "a handwritten digit seven", "--n", "2",
                    "--out", str(tmp_path / "png"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "png").glob("0*.png"))) == 2


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
# dag-db with a target network runs on two processes in test_engines.py (resume and equivalence); ddpo's stat
# tracker updates on rewards gathered from both processes and must stay identical on both
@pytest.mark.parametrize(("method", "options"), [("residual-nabla-db", {}), ("ddpo", {"per_prompt_min_count": 2})])
def test_two_process_cpu_run_keeps_ranks_identical(pipeline, tmp_path, method, options):
    cfg = tiny_config(pipeline, method, options, training={"epochs": 1, "max_updates_per_epoch": 1})
    config = _write(cfg, tmp_path / "cfg.yaml")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    run = tmp_path / "ddp"
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "gfnalign", "train",
                          "--config", str(config), "--out", str(run)],
                         capture_output=True, text=True, timeout=240, env=_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    state = yaml.safe_load((run / "checkpoints" / "step_1" / "state.json").read_text())
    assert state["world_size"] == 2
    a, b = state["rank_param_checksums"]
    assert a == b
    rows = metrics_rows(run)
    assert rows[0]["train/transitions"] >= 2  # summed over both ranks


def test_demo_embedded_config_is_valid():
    out = _gfnalign("demo", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["method"]["name"] == "dag-db" and cfg["method"]["options"]["relative"] is True
    assert cfg["reward"] == "digit-preference" and cfg["prompts"] == "digits-open"


def test_demo_smoke_on_the_shipped_digits_model(tmp_path):
    """A minute-sized version of `gfnalign demo` (the full one is `make demo`)."""
    from gfnalign.backbones.digits import CLASSIFIER_DIR, PIPELINE_DIR

    if not (PIPELINE_DIR / "model_index.json").is_file() or not (CLASSIFIER_DIR / "model.safetensors").is_file():
        pytest.skip("shipped digits assets are not present")
    out = _gfnalign("demo", "--out", str(tmp_path / "demo"), "--set", "training.epochs=1", "--set",
                    "sampling.num_steps=5", "--set", "sampling.batch_size=4", "--set", "logging.eval_samples=20",
                    "--set", "logging.progress=false", "--target-samples", "48", "--tilt-samples", "24")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo finished" in out.stdout and "class-mass TV to the target" in out.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "pretrained (before)" in report and "fine-tuned (after)" in report
    # the class masses (pretrained, target, fine-tuned) sit beside the before/after grids, before the last table
    section = report.index("class masses against the tilted target")
    assert report.index("### After") < section < report.index("## Last update")
    if "tilt_class_masses.png" in report:  # the chart needs matplotlib (the report extra)
        assert (tmp_path / "demo" / "tilt_class_masses.png").is_file()
