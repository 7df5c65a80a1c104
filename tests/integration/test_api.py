"""The Python API end to end on tiny models: a custom objective registered from this file trains on the
toy world and on a tiny digits pipeline (with a Python reward object, a prompt list and W&B offline
tracking); then sample() and evaluate() read the run back."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gfnalign
from gfnalign.objectives.common import TransitionObjective
from gfnalign.objectives.heads import make_log_flow_head
from tests.integration._train_utils import tiny_config, tiny_pipeline

pytestmark = pytest.mark.slow

NAME = "test-relative-db"


class RelativeDB(TransitionObjective):
    """F(x_t)·P_F^θ(x_next|x_t) = F(x_next)·P_F^#(x_next|x_t), terminal F = exp(β·r) (a user-written objective)."""

    needs_reference = True

    def __init__(self, *, state_shape, cond_dim=None, num_train_timesteps=1000, **common):
        super().__init__(**common)
        self.log_flow_head = make_log_flow_head(state_shape, cond_dim, num_train_timesteps=num_train_timesteps)

    def forward(self, batch, policy, lookahead, *, beta):
        batch = self.working_precision(batch)
        t, t_next, _, _ = policy.schedule.at_steps(batch.step, dtype=batch.x_t.dtype, device=batch.x_t.device)
        eps, kernel = self.policy_kernel(policy, batch)
        with torch.no_grad():
            _, kernel_ref = self.policy_kernel(policy, batch, reference=True)
        log_pf = kernel.log_prob(batch.x_next, self.log_prob_reduction)
        log_pf_ref = kernel_ref.log_prob(batch.x_next, self.log_prob_reduction)
        log_f_t = self.log_flow_head(batch.x_t, t, batch.cond)
        log_f_next = torch.where(batch.is_last, beta * batch.reward.to(log_f_t),
                                 self.log_flow_head(batch.x_next, t_next, batch.cond))
        delta = log_f_t + log_pf - log_f_next - log_pf_ref
        return self.output(delta**2 + self.trust_region_term(eps, batch), delta, {"db": delta**2})


class Brightness(gfnalign.Reward):
    name = "brightness"
    differentiable = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True)
def _registered():
    from gfnalign.objectives.base import REGISTRY

    gfnalign.register_objective(NAME, RelativeDB)
    yield
    REGISTRY.pop(NAME, None)


def test_custom_objective_trains_on_the_toy_world():
    mixture = {"weights": [0.5, 0.5], "means": [[2.0, 0.0], [-2.0, 0.0]], "stds": [0.5, 0.5]}
    before = gfnalign.train_toy(NAME, mixture=mixture, reward={"type": "linear", "a": [1.0, 0.0]}, beta=1.0,
                                steps=0, samples=2000, options={"batch_size": 64, "num_steps": 10})
    after = gfnalign.train_toy(NAME, mixture=mixture, reward={"type": "linear", "a": [1.0, 0.0]}, beta=1.0,
                               steps=60, samples=2000, options={"batch_size": 64, "num_steps": 10, "lr": 3e-3})
    assert after["updates"] == 60 and not after["diverged"]
    assert math.isfinite(after["config"]["objective"].get("trust_region", 0.0) + after["energy_distance"])
    # the target puts 1/(1+e^-4) = 0.982 of the mass on the right mode; 60 updates must move towards it
    right = lambda r: r["mode_mass"]["finetuned"][0]  # noqa: E731
    assert right(after) > right(before) + 0.05, (right(before), right(after))


def test_train_sample_evaluate_with_python_objects_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pipeline = tiny_pipeline(tmp_path)
    cfg = tiny_config(pipeline, NAME, {"trust_region": 1.0},
                      logging={"report": True, "eval_samples": 4, "sample_every": 1, "grid_prompts": 2,
                               "wandb": {"project": "gfnalign-test", "mode": "offline"}})
    prompts = ["a handwritten digit one", "a handwritten digit seven"]
    result = gfnalign.train(cfg, reward=Brightness(), prompts=prompts, out=tmp_path / "run")

    assert result.run_dir == tmp_path / "run" and result.final_dir == tmp_path / "run" / "final"
    assert not result.interrupted
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss/total"])
    assert "loss/db" in result.metrics
    assert result.before is not None and result.after is not None
    saved = gfnalign.load_config(result.run_dir / "config.yaml")
    assert saved.prompts == prompts and saved.method.name == NAME
    assert saved.reward == f"{__name__}:Brightness"  # an object is recorded by its import path

    # W&B offline: one run folder with the run file, the report and the sample grids
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((result.run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb"))
    files = runs[0] / "files"
    assert (files / "report.md").is_file() and (files / "eval_after.json").is_file()
    assert (result.run_dir / "wandb_run_id.txt").read_text().strip() in runs[0].name
    images = list(files.glob("media/images/samples/*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"before", "after"}, images

    samples = gfnalign.sample(result.run_dir, prompts=["a handwritten digit seven"], n=2, out=tmp_path / "s")
    assert samples.images.shape[0] == 2 and samples.prompts == ["a handwritten digit seven"] * 2
    assert float(samples.images.min()) >= 0 and float(samples.images.max()) <= 1
    assert len(samples.files) == 2 and (tmp_path / "s" / "grid.png").is_file()

    report = gfnalign.evaluate(result.run_dir, samples=2, reward=Brightness(), features="pixels:4", floor=False)
    assert report["method"] == NAME and math.isfinite(report["reward_mean"])
    assert math.isfinite(report["diversity"])
    json.dumps(report)  # serialisable, as `gfnalign eval --json` writes it
    assert "Evaluation" in gfnalign.markdown_report(report)


def test_train_checks_the_run_before_any_model_loads(tmp_path):
    cfg = tiny_config(tiny_pipeline(tmp_path))
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(gfnalign.RunExistsError, match="resume"):
        (run / "checkpoints" / "step_1" / "COMPLETE").write_text("")  # a finished checkpoint's marker
        gfnalign.train(cfg, out=run)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(gfnalign.ConfigError, match="is a file"):
        gfnalign.train(cfg, out=tmp_path / "a-file")
    with pytest.raises(gfnalign.ConfigError, match="prompts="):
        gfnalign.train(cfg, prompts=str(tmp_path / "missing.txt"), out=tmp_path / "other")
    with pytest.raises(gfnalign.ArgumentError, match="stop_after_updates=0"):
        gfnalign.train(cfg, out=tmp_path / "other", stop_after_updates=0)
    assert not (tmp_path / "other").exists()
