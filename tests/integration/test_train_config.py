"""Config loading, overrides and validation: named errors before any model loads; every preset validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gfnalign.training.config import ConfigError, TrainConfig, apply_overrides
from gfnalign.training.presets import all_presets, render

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override, field, value_text",
    [
        ("sampling.eta=0", "sampling.eta", "0.0"),
        ("method.name=ppo", "method.name", "'ppo'"),
        ("lookahead.mode=sometimes", "lookahead.mode", "'sometimes'"),
        ("training.lr=-1", "training.lr", "-1.0"),
        ("beta.schedule=cosine", "beta.schedule", "'cosine'"),
        ("training.epochs=2.5", "training.epochs", "2.5"),
        ("sampling.colour=red", "sampling.colour", None),
        ("method.options.not_an_option=1", "method.options.not_an_option", "1"),
        ("reward=no-such-reward", "reward", "'no-such-reward'"),
        ("sampling.start=fixed", "sampling.start", "'fixed'"),
        ("sampling.start_candidates=0", "sampling.start_candidates", "0"),
        ("backbone.image_size=0", "backbone.image_size", "0"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, field, value_text):
    base = yaml.safe_load((REPO / "configs" / "digits-residual-nabla-db.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(apply_overrides(base, [override]))
    msg = str(err.value)
    assert field in msg
    if value_text is not None:
        assert value_text in msg
    assert any(w in msg for w in ("use one of", "allowed", "must", "use "))


def test_overrides_parse_yaml_values():
    cfg = TrainConfig.from_dict(apply_overrides({"method": {"name": "dag-db"}},
                                                ["training.lr=1e-3", "logging.tensorboard=false",
                                                 "training.adam_betas=[0.9, 0.95]", "method.options.trust_region=2"]))
    assert cfg.training.lr == 1e-3 and cfg.logging.tensorboard is False
    assert cfg.training.adam_betas == [0.9, 0.95] and cfg.method.options == {"trust_region": 2}


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig.from_dict({"method": {"name": "ddpo", "options": {"clip_range": 0.2}}, "seed": 3})
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


def test_every_preset_validates_and_files_match_the_generator():
    presets = all_presets()
    methods = {"dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "ddpo", "reward-backprop"}
    assert {f"digits-{m}" for m in methods} <= set(presets)
    for reward in ("aesthetic", "imagereward", "hpsv2", "jpeg-compressibility"):
        assert any(name.startswith(f"sd15-{reward}-") for name in presets)
    for name, data in presets.items():
        TrainConfig.from_dict(data)
        for folder in (REPO / "configs", REPO / "src" / "gfnalign" / "configs"):
            path = folder / f"{name}.yaml"
            assert path.is_file(), f"{path} missing: run python -m gfnalign.training.presets"
            assert path.read_text() == render(data), f"{path} is stale: run python -m gfnalign.training.presets"
            TrainConfig.load(path)



def test_sdxl_presets_are_the_sd15_methods_at_1024px_with_equal_budgets():
    presets = all_presets()
    sdxl = {n for n in presets if n.startswith("sdxl-")}
    assert sdxl == {"sdxl-" + n[len("sd15-"):] for n in presets if n.startswith("sd15-")}
    for name in sdxl:
        xl, sd = presets[name], presets["sd15-" + name[len("sdxl-"):]]
        b = xl["backbone"]
        assert (b["kind"], b["image_size"], b["dtype"], b["gradient_checkpointing"]) == ("sdxl", 1024, "bfloat16", True)
        xl_opts, sd_opts = dict(xl["method"]["options"]), dict(sd["method"]["options"])
        if "rloo_group" in sd_opts:  # DAG-KL: the leave-one-out group is the per-GPU micro-batch (the authors')
            assert xl_opts.pop("rloo_group") == xl["training"]["micro_batch"]
            assert sd_opts.pop("rloo_group") == sd["training"]["micro_batch"]
        assert xl["method"]["name"] == sd["method"]["name"] and xl_opts == sd_opts
        assert xl["beta"] == sd["beta"] and xl["reward"] == sd["reward"]
        # the faithful choices of the SD1.5 presets carry over (DAG lookahead and flow network)
        assert xl["lookahead"] == sd["lookahead"] and b.get("log_flow_head") == sd["backbone"].get("log_flow_head")
        assert xl["training"]["lr"] == sd["training"]["lr"] and xl["training"]["epochs"] == sd["training"]["epochs"]
        s_xl, s_sd = xl["sampling"], sd["sampling"]
        assert s_xl["batch_size"] * s_xl["batches_per_epoch"] == s_sd["batch_size"] * s_sd["batches_per_epoch"]
        t_xl, t_sd = xl["training"], sd["training"]
        assert t_xl["micro_batch"] * t_xl["grad_accum"] == t_sd["micro_batch"] * t_sd["grad_accum"]
        assert t_xl["micro_batch"] <= 2 and s_xl["batch_size"] <= 4


def test_backbone_kind_sdxl_rejects_a_folder_declaring_another_pipeline(tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConfigError, match="backbone.kind: sd"):
        TrainConfig.from_dict({"backbone": {"kind": "sdxl", "path": str(folder)}})
    with pytest.raises(ConfigError, match="backbone.path"):
        TrainConfig.from_dict({"backbone": {"kind": "sdxl"}})
    assert TrainConfig.from_dict({"backbone": {"kind": "sd", "path": str(folder)}}).backbone.kind == "sd"


def _preset(name):
    from gfnalign.training.config import TrainConfig
    from gfnalign.training.presets import all_presets

    return TrainConfig.from_dict(all_presets()[name])


def test_prompt_mapping_applies_the_papers_split(shared_data):
    """``prompts: {path, skip_first_per_category}`` (the SD presets' form) gives DrawBench's 165 training prompts."""
    import dataclasses

    from gfnalign.training.build import build_prompts

    preset = _preset("sd15-imagereward-dag-db")
    cfg = dataclasses.replace(preset, prompts={**preset.prompts, "path": str(shared_data / "drawbench_prompts.json")})
    assert len(build_prompts(cfg).prompts) == 165  # this file already lacks Misspellings / Rare Words
    with pytest.raises(ValueError, match="needs 'path'"):
        build_prompts(dataclasses.replace(cfg, prompts={"skip_first": 2}))


def test_preset_prompt_splits_drop_drawbench_categories_and_join_hpd_styles(shared_data, tmp_path):
    """ImageReward: the full DrawBench (with Misspellings and Rare Words) gives the same 165; HPSv2: photo and
    paintings, the first 10 of each held out, 1 580 prompts."""
    import dataclasses
    import json

    from gfnalign.training.build import build_prompts

    bench = json.loads((shared_data / "drawbench_prompts.json").read_text())
    bench.update({f"misspelled prompt {i}": {"category": "Misspellings"} for i in range(10)})
    bench.update({f"rare word prompt {i}": {"category": "Rare Words"} for i in range(7)})
    (tmp_path / "drawbench200.json").write_text(json.dumps(bench))
    preset = _preset("sd15-imagereward-dag-db")
    cfg = dataclasses.replace(preset, prompts={**preset.prompts, "path": str(tmp_path / "drawbench200.json")})
    prompts = build_prompts(cfg)
    assert len(bench) == 200 and len(prompts.prompts) == 165
    assert not {"Misspellings", "Rare Words"} & set(prompts.categories)

    photo = json.loads((shared_data / "hpdv2_benchmark_photo_prompts.json").read_text())
    (tmp_path / "paintings.json").write_text(json.dumps([f"a painting of {p}" for p in photo]))
    hps = _preset("sd15-hpsv2-dag-db")
    sets = hps.prompts["sets"]
    assert [s["skip_first"] for s in sets] == [10, 10] and "paintings" in sets[1]["path"]
    spec = {"sets": [{**sets[0], "path": str(shared_data / "hpdv2_benchmark_photo_prompts.json")},
                     {**sets[1], "path": str(tmp_path / "paintings.json")}]}
    joined = build_prompts(dataclasses.replace(hps, prompts=spec)).prompts
    assert len(joined) == 1580 and joined[0] == photo[10] and joined[790] == f"a painting of {photo[10]}"
    with pytest.raises(ValueError, match="union"):
        build_prompts(dataclasses.replace(hps, prompts={"sets": []}))


def test_objectives_keep_their_own_reduction_unless_the_method_sets_it():
    from gfnalign.training.build import objective_options

    assert "log_prob_reduction" not in objective_options(_preset("digits-ddpo"), object())
    assert _preset("sd15-aesthetic-dag-db").method.options["log_prob_reduction"] == "mean"


def test_flow_presets_mirror_flow_grpo():
    """sd35m-* / flux1-*: Flow-GRPO's published recipes (config/grpo.py pickscore_sd3, clipscore_sd3,
    pickscore_flux; base.py; scripts/train_sd3.py's LoRA) for every reward, grpo among the methods."""
    presets = all_presets()
    for reward in ("pickscore", "clip-score", "aesthetic", "hpsv2", "imagereward", "jpeg-compressibility"):
        for model in ("sd35m", "flux1"):
            assert f"{model}-{reward}-grpo" in presets
    sd3, flux = presets["sd35m-pickscore-grpo"], presets["flux1-pickscore-grpo"]
    for cfg, kind, steps, guidance, a, kl in ((sd3, "sd3", 10, 4.5, 0.7, 0.01), (flux, "flux", 6, 3.5, 0.9, 0.0)):
        b, s, t, o = cfg["backbone"], cfg["sampling"], cfg["training"], cfg["method"]["options"]
        assert (b["kind"], b["image_size"], b["lora_rank"], b["lora_alpha"], b["max_sequence_length"]) == \
            (kind, 512, 32, 64.0, 128)
        assert (s["num_steps"], s["guidance_scale"], s["eta"], s["kernel"], s["images_per_prompt"]) == \
            (steps, guidance, a, "flow_sde", 24)
        assert s["batch_size"] * s["batches_per_epoch"] % 24 == 0
        assert (t["lr"], t["weight_decay"], t["clip_norm"]) == (3e-4, 1e-4, 1.0)
        assert (o["clip_range"], o["adv_clip"], o["kl_beta"], o["global_std"]) == (1e-4, 5.0, kl, True)
        # two optimiser steps per epoch over every transition
        assert t["micro_batch"] * t["grad_accum"] * 2 == s["batch_size"] * s["batches_per_epoch"] * steps
    assert presets["sd35m-clip-score-grpo"]["method"]["options"]["kl_beta"] == 0.02
    assert presets["sd35m-jpeg-compressibility-grpo"]["method"]["options"]["kl_beta"] == 0.0
    assert presets["flux1-aesthetic-dag-db"]["method"]["options"]["relative"] is True
    for model in ("sd35m", "flux1"):  # the DAG authors' lookahead and flow network, as the sd15/sdxl presets
        dag = presets[f"{model}-aesthetic-dag-db"]
        assert dag["lookahead"] == {"mode": "recompute", "model": "policy", "guided": False}
        assert dag["backbone"]["log_flow_head"] == "dag"
