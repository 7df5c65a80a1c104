"""Every bad config or argument is one line naming the field, the value and the fix, before any model loads.

The CLI runs in-process (``gfnalign.cli.main.main``) so the table stays fast; each case asserts exit code 2,
a single stderr line that names the field, no traceback, and that no run folder was created.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gfnalign.cli.main import main

BASE = """\
method: {name: dag-db}
reward: ink
prompts: digits
"""

# (case id, --set overrides, text the one-line message must contain)
SET_CASES: list[tuple[str, list[str], str]] = [
    ("seed-negative", ["seed=-1"], "seed"),
    ("seed-float", ["seed=1.5"], "seed"),
    ("seed-text", ["seed=abc"], "seed"),
    ("run-name-empty", ["run_name="], "run_name"),
    ("run-name-slash", ["run_name=a/b"], "run_name"),
    ("backbone-kind", ["backbone.kind=vae"], "backbone.kind"),
    ("backbone-dtype", ["backbone.dtype=float64"], "backbone.dtype"),
    ("lora-rank-zero", ["backbone.lora_rank=0"], "backbone.lora_rank"),
    ("lora-rank-negative", ["backbone.lora_rank=-2"], "backbone.lora_rank"),
    ("lora-rank-float", ["backbone.lora_rank=2.5"], "backbone.lora_rank"),
    ("lora-alpha-zero", ["backbone.lora_alpha=0"], "backbone.lora_alpha"),
    ("lora-alpha-nan", ["backbone.lora_alpha=.nan"], "backbone.lora_alpha"),
    ("lora-targets-empty", ["backbone.lora_targets=[]"], "backbone.lora_targets"),
    ("lora-targets-numbers", ["backbone.lora_targets=[1, 2]"], "backbone.lora_targets"),
    ("lora-targets-string", ["backbone.lora_targets=to_q"], "backbone.lora_targets"),
    ("lora-targets-blank", ["backbone.lora_targets=['', to_q]"], "backbone.lora_targets"),
    ("backbone-heads", ["backbone.heads=magic"], "backbone.heads"),
    ("full-finetune-text", ["backbone.full_finetune=maybe"], "backbone.full_finetune"),
    ("sd-without-path", ["backbone.kind=sd"], "backbone.path"),
    ("python-path-shape", ["backbone.kind=python", "backbone.path=nocolon"], "backbone.path"),
    ("digits-path-missing", ["backbone.path=/nonexistent/pipeline"], "backbone.path"),
    ("method-unknown", ["method.name=ppo"], "method.name"),
    ("method-empty", ["method.name="], "method.name"),
    ("method-option-unknown", ["method.options.bogus=1"], "method.options.bogus"),
    ("method-option-value", ["method.options.fraction=2.0"], "method.options"),
    ("method-option-nan", ["method.options.trust_region=.nan"], "method.options.trust_region"),
    ("method-options-list", ["method.options=[1]"], "method.options"),
    ("method-not-mapping", ["method=dag-db"], "method"),
    ("beta-negative", ["beta.value=-1"], "beta.value"),
    ("beta-inf", ["beta.value=.inf"], "beta.value"),
    ("beta-schedule", ["beta.schedule=cosine"], "beta.schedule"),
    ("warmup-zero", ["beta.warmup_fraction=0"], "beta.warmup_fraction"),
    ("warmup-big", ["beta.warmup_fraction=1.5"], "beta.warmup_fraction"),
    ("steps-zero", ["sampling.num_steps=0"], "sampling.num_steps"),
    ("steps-float", ["sampling.num_steps=2.5"], "sampling.num_steps"),
    ("guidance-zero", ["sampling.guidance_scale=0"], "sampling.guidance_scale"),
    ("eta-zero", ["sampling.eta=0"], "sampling.eta"),
    ("eta-big", ["sampling.eta=1.5"], "sampling.eta"),
    ("eta-nan", ["sampling.eta=.nan"], "sampling.eta"),
    ("reduction", ["sampling.log_prob_reduction=max"], "sampling.log_prob_reduction"),
    ("batch-size-zero", ["sampling.batch_size=0"], "sampling.batch_size"),
    ("batch-size-text", ["sampling.batch_size=abc"], "sampling.batch_size"),
    ("batches-zero", ["sampling.batches_per_epoch=0"], "sampling.batches_per_epoch"),
    ("epochs-zero", ["training.epochs=0"], "training.epochs"),
    ("epochs-negative", ["training.epochs=-3"], "training.epochs"),
    ("micro-batch-zero", ["training.micro_batch=0"], "training.micro_batch"),
    ("grad-accum-zero", ["training.grad_accum=0"], "training.grad_accum"),
    ("lr-zero", ["training.lr=0"], "training.lr"),
    ("lr-negative", ["training.lr=-1e-3"], "training.lr"),
    ("lr-inf", ["training.lr=.inf"], "training.lr"),
    ("lr-heads-nan", ["training.lr_heads=.nan"], "training.lr_heads"),
    ("weight-decay-negative", ["training.weight_decay=-1"], "training.weight_decay"),
    ("adam-betas-one", ["training.adam_betas=[0.9]"], "training.adam_betas"),
    ("adam-betas-range", ["training.adam_betas=[0.9, 1.5]"], "training.adam_betas"),
    ("adam-betas-text", ["training.adam_betas=[a, b]"], "training.adam_betas"),
    ("adam-eps-zero", ["training.adam_eps=0"], "training.adam_eps"),
    ("mixed-precision", ["training.mixed_precision=fp8"], "training.mixed_precision"),
    ("max-updates-zero", ["training.max_updates_per_epoch=0"], "training.max_updates_per_epoch"),
    ("max-updates-float", ["training.max_updates_per_epoch=1.5"], "training.max_updates_per_epoch"),
    ("max-updates-text", ["training.max_updates_per_epoch=abc"], "training.max_updates_per_epoch"),
    ("clip-norm-nan", ["training.clip_norm=.nan"], "training.clip_norm"),
    ("clip-norm-text", ["training.clip_norm=abc"], "training.clip_norm"),
    ("lookahead-mode", ["lookahead.mode=lazy"], "lookahead.mode"),
    ("lookahead-model", ["lookahead.model=teacher"], "lookahead.model"),
    ("lookahead-guided", ["lookahead.guided=2"], "lookahead.guided"),
    ("log-every-zero", ["logging.log_every=0"], "logging.log_every"),
    ("checkpoint-every-zero", ["logging.checkpoint_every=0"], "logging.checkpoint_every"),
    ("keep-checkpoints-zero", ["logging.keep_checkpoints=0"], "logging.keep_checkpoints"),
    ("sample-every-negative", ["logging.sample_every=-1"], "logging.sample_every"),
    ("eval-samples-negative", ["logging.eval_samples=-5"], "logging.eval_samples"),
    ("grid-prompts-zero", ["logging.grid_prompts=0"], "logging.grid_prompts"),
    ("tensorboard-text", ["logging.tensorboard=sometimes"], "logging.tensorboard"),
    ("nan-streak-zero", ["reliability.max_nan_streak=0"], "reliability.max_nan_streak"),
    ("on-bad-reward", ["reliability.on_bad_reward=ignore"], "reliability.on_bad_reward"),
    ("skip-fraction", ["reliability.max_skipped_epoch_fraction=1.5"], "reliability.max_skipped_epoch_fraction"),
    ("reward-timeout-zero", ["reliability.reward_timeout_s=0"], "reliability.reward_timeout_s"),
    ("reward-wait-negative", ["reliability.reward_wait_s=-1"], "reliability.reward_wait_s"),
    ("reward-unknown", ["reward=no-such-reward"], "reward="),
    ("reward-no-attribute", ["reward=os:no_such_function"], "reward="),
    ("reward-no-module", ["reward=no_such_module_xyz:fn"], "reward="),
    ("reward-not-callable", ["reward=os:sep"], "reward="),
    ("reward-unknown-option", ["reward={name: ink, bogus: 1}"], "bogus"),
    ("reward-dict-without-name", ["reward={bogus: 1}"], "reward="),
    ("reward-empty", ["reward="], "reward="),
    ("prompts-missing-file", ["prompts=no-such-prompts.txt"], "prompts="),
    ("prompts-dict-bad-key", ["prompts={name: digits, wrong_key: 1}"], "prompts="),
    ("prompts-dict-empty", ["prompts={}"], "prompts="),
    ("prompts-number", ["prompts=123"], "prompts="),
    ("unknown-top-key", ["foo=1"], "foo"),
    ("unknown-nested-key", ["training.foo=1"], "training.foo"),
    ("section-not-mapping", ["sampling=5"], "sampling"),
    ("set-without-equals", ["training.epochs"], "--set"),
]


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _assert_one_line_error(code: int, lines: list[str], expect: str, out: Path) -> None:
    text = "\n".join(lines)
    assert code == 2, text
    assert len(lines) == 1, text
    assert "Traceback" not in text and expect in lines[0], text
    assert not out.exists(), "a run folder was created: the check ran too late"


@pytest.mark.parametrize("overrides,expect", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_bad_setting_is_one_named_line_before_any_model_loads(overrides, expect, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(BASE)
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--out", str(out)]
    for item in overrides:
        argv += ["--set", item]
    _assert_one_line_error(*_run(argv, capsys), expect, out)


FILE_CASES: list[tuple[str, str, str]] = [
    ("yaml-syntax", "method: {name: dag-db\nreward: [", "not valid YAML"),
    ("top-level-list", "- 1\n- 2\n", "mapping"),
    ("binary", "\udcff\udcfe", "config file"),
    ("empty-prompt-file", "EMPTY_PROMPTS", "empty"),
    ("missing-config", "MISSING", "does not exist"),
    ("out-is-a-file", "OUT_FILE", "--out"),
]


@pytest.mark.parametrize("content,expect", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file_is_one_named_line(content, expect, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    out = tmp_path / "run"
    if content == "EMPTY_PROMPTS":
        (tmp_path / "prompts.txt").write_text("\n\n")
        config.write_text(BASE.replace("prompts: digits", f"prompts: {tmp_path / 'prompts.txt'}"))
    elif content == "OUT_FILE":
        config.write_text(BASE)
        out = tmp_path / "a-file"
        out.write_text("not a folder")
    elif content == "MISSING":
        config = tmp_path / "nope.yaml"
    else:
        config.write_bytes(content.encode("utf-8", "surrogateescape"))
    code, lines = _run(["train", "--config", str(config), "--out", str(out)], capsys)
    if content == "OUT_FILE":
        assert code == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in lines[0]
    else:
        _assert_one_line_error(code, lines, expect, out)


def test_registered_methods_and_their_options_are_accepted(tmp_path, capsys):
    """Allowed values come from the registries: a method registered at run time validates."""
    import gfnalign.objectives  # noqa: F401
    from gfnalign.objectives.base import REGISTRY
    from gfnalign.training.config import TrainConfig

    factory = REGISTRY["dag-db"]
    REGISTRY["dag-db-copy-for-test"] = factory
    try:
        cfg = TrainConfig.from_dict({"method": {"name": "dag-db-copy-for-test", "options": {"fraction": 0.5}}})
        assert cfg.method.name == "dag-db-copy-for-test"
    finally:
        del REGISTRY["dag-db-copy-for-test"]


def test_count_of_cases():
    assert len(SET_CASES) + len(FILE_CASES) >= 60
    assert os.environ.get("GFNALIGN_DEBUG") != "1"  # the one-line guarantee is what is being tested
