"""The shipped presets, written from one source of truth: ``python -m gfnalign.training.presets``.

* ``DEMO``: the embedded default of ``gfnalign demo`` (prior-relative DAG-DB on the shipped digits model with
  the digit-preference reward and the open prompt; sized to finish in a few minutes on two CPU cores).
* ``digits-<method>``: every method on the digits world at an equal budget (the methods table in miniature).
* ``digits-flow-<method>``: the same (``rtb`` included) on the shipped flow-matching digits world (SD3-style,
  Flow-GRPO's SDE kernel), plus ``grpo`` (:func:`digits_flow_preset`).
* ``sdxl-<reward>-<method>``: the same rewards and methods on SDXL base at 1024 px (:func:`sdxl_preset`).
* ``sd35m-<reward>-<method>`` / ``flux1-<reward>-<method>``: SD3.5 Medium and FLUX.1-dev with Flow-GRPO's
  published recipes (:func:`flow_preset`): ``grpo`` for every reward, and relative DAG-DB / residual ∇-DB at
  the same sampling budget.
* ``sd15-<reward>-<method>``: Stable Diffusion 1.5 presets mirroring the papers' defaults
  (spec/dag.md §5, spec/nabla_gfn.md §6.3, DDPO and DRaFT/ReFL where stated). The authors' code averages
  log-probs over the latent (``log_prob_reduction: mean``), so their β is kept together with that reduction
  (β·D with D = 16384 is the equivalent summed-log-prob temperature).

``configs/`` (repository) and ``src/gfnalign/configs/`` (installed with the package) hold identical copies;
a test checks they match this module.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "ddpo", "reward-backprop")

# -- the digits world ----------------------------------------------------------------------------------
_DIGITS_BASE: dict[str, Any] = {
    "seed": 0,
    "backbone": {"kind": "digits", "lora_rank": 4, "lora_alpha": 4.0},
    "reward": "digit-alignment",
    "prompts": "digits",
    "beta": {"value": 10.0, "schedule": "constant"},
    "sampling": {"num_steps": 20, "guidance_scale": 1.0, "eta": 1.0, "log_prob_reduction": "sum",
                 "batch_size": 16, "batches_per_epoch": 1},
    "training": {"epochs": 80, "micro_batch": 32, "grad_accum": 1, "lr": 3e-3, "lr_heads": 3e-3,
                 "weight_decay": 1e-4, "weight_decay_heads": 1e-4, "adam_betas": [0.9, 0.999],
                 "clip_norm": 1.0, "mixed_precision": "no", "max_updates_per_epoch": 2},
    # x0_hat of the pretrained (reference) model, as the toy experiments recommend; in the digits world
    # it gave a clearly larger reward gain than the policy's own x0_hat with gamma = 1 (see README)
    "lookahead": {"mode": "cached", "model": "reference", "guided": True},
    "logging": {"sample_every": 10, "checkpoint_every": 10, "keep_checkpoints": 2, "eval_samples": 200,
                "grid_prompts": 10},
    "reliability": {"max_nan_streak": 5, "on_bad_reward": "skip"},
}

_DIGITS_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "dag-db": {"fraction": 0.1, "stratified": True, "trust_region": 1.0},
    "dag-kl": {"fraction": 0.1, "stratified": True, "trust_region": 1.0},
    "nabla-db": {"fraction": 0.1, "stratified": True, "trust_region": 10.0, "gamma": "one", "prior_score": True},
    "residual-nabla-db": {"fraction": 0.1, "stratified": True, "trust_region": 1.0, "gamma": "one"},
    "ddpo": {"fraction": 0.1, "stratified": True, "clip_range": 1e-4, "adv_clip": 5.0},
    "reward-backprop": {"variant": "draft-k", "k": 1},
    "rtb": {"log_z": "prompt", "grad_fraction": 1.0},
}
#: the digits world also has an ``rtb`` preset (trajectory balance against the pretrained chain)
DIGITS_METHODS = (*METHODS, "rtb")


#: Learning rates tuned on the digits world (short runs, 100 evaluation images); the others keep 3e-3.
#: residual ∇-DB takes a larger LoRA step (40-epoch runs). ∇-DB diverged at 1e-2 (reward −18 after 30
#: updates) and drifted at 1e-3 (−2.1 → −2.8 after 30) and at 3e-4 (−2.1 → −4.5 after 160): its target
#: exp(β·r) has no prior term (Lebesgue measure), so only a small step keeps it near the pretrained model
#: over the 160-update budget: 1e-4, trust region 10, pretrained score as the flow's base (``prior_score``)
#: gave −2.11 → −2.00, drift 20. reward-backprop (DRaFT-K, a reward maximiser) collapsed after 10 updates
#: at 3e-3 and degraded at 3e-4 over 80 updates (−2.11 → −2.48); 1e-4 holds (−2.11 → −2.05, drift 7).
#: DAG-DB / DAG-KL (target exp(β·r), no prior term either) wrecked the model at 3e-3 over the 160 updates
#: (dag-db −1.93 → −14.4, prior drift 2969; dag-kl → −4.54, drift 695; 200 evaluation images, seed 0);
#: 3e-4 keeps it (dag-db −1.94, drift 7.3; dag-kl −1.96, drift 7.1) without a gain beyond the evaluation's
#: noise (standard error ≈ 0.43). BENCHMARKS.md, "DAG-DB flow gradient".
_DIGITS_LR = {"residual-nabla-db": 1e-2, "nabla-db": 1e-4, "reward-backprop": 1e-4, "dag-db": 3e-4, "dag-kl": 3e-4}


def digits_preset(method: str) -> dict[str, Any]:
    cfg = copy.deepcopy(_DIGITS_BASE)
    cfg["run_name"] = f"digits-{method}"
    cfg["method"] = {"name": method, "options": copy.deepcopy(_DIGITS_METHOD_OPTIONS[method])}
    if method in _DIGITS_LR:
        cfg["training"]["lr"] = _DIGITS_LR[method]
    if method == "rtb":
        # whole trajectories per micro-batch: 8 of 20 transitions each, so that the updates of an epoch
        # cover every sampled trajectory
        cfg["training"]["micro_batch"] = 8 * cfg["sampling"]["num_steps"]
        # log Z is one number per prompt that must travel to log E_#[exp(beta r)]: a larger step than the policy's
        cfg["training"]["lr_heads"] = 1e-2  # 0.1 swung log Z by +-8 within 3 updates (its MLP moves too)
    return cfg


#: ``gfnalign demo``'s embedded default: prior-relative DAG-DB on a reward that tilts *across* classes, so the
#: report can show what it samples against its target p_pretrained·exp(β·r) (class masses, ``gfnalign tilt``).
#: Relative DAG-DB closed the most of that distance among the prior-relative methods measured at this budget
#: (BENCHMARKS.md, "Image world"): lr 3e-3 (1e-2 diverged), a quarter of each trajectory's 20 transitions
#: (stratified), 32 trajectories and 4 updates of 32 transitions per epoch, 60 epochs (240 updates).
DEMO: dict[str, Any] = digits_preset("dag-db")
DEMO["run_name"] = "demo"
DEMO["reward"] = "digit-preference"  # 1 for even digits, 0 for odd (classifier probabilities)
DEMO["prompts"] = "digits-open"  # "a handwritten digit": the pretrained model picks the digit
DEMO["beta"]["value"] = 2.0
DEMO["method"]["options"].update({"relative": True, "fraction": 0.25})
DEMO["training"]["lr"] = 3e-3
DEMO["sampling"]["batch_size"] = 32
DEMO["training"]["epochs"] = 60
DEMO["training"]["max_updates_per_epoch"] = 4
DEMO["logging"]["eval_samples"] = 100

# -- the flow-matching digits world ----------------------------------------------------------------------
#: Flow-GRPO's SDE noise level a of the flow digits world's sampler (its default; SD3.5-M's recipe value)
DIGITS_FLOW_NOISE_LEVEL = 0.7
#: every digits method (rtb included) plus the Flow-GRPO baseline
DIGITS_FLOW_METHODS = (*DIGITS_METHODS, "grpo")


def digits_flow_preset(method: str) -> dict[str, Any]:
    """``digits-flow-<method>``: the digits preset of ``method`` on the shipped SD3-style digits world, sampled
    with Flow-GRPO's SDE (a = 0.7, 20 steps, guidance 1). Same reward, β, budget, options and learning rates
    as the UNet world's presets (tuned there, not on the flow world; ``rtb`` keeps ``digits-rtb``'s whole
    trajectories per micro-batch and log Z step). ``grpo`` takes the DDPO preset's budget
    with groups of 8 images per prompt (two prompts per epoch) and flow_grpo's clip range, advantage clip,
    mean-reduced log-probs and KL β 0.01 (its SD3.5 PickScore recipe)."""
    cfg = digits_preset("ddpo" if method == "grpo" else method)
    cfg["run_name"] = f"digits-flow-{method}"
    cfg["backbone"]["kind"] = "digits-flow"
    cfg["sampling"].update({"kernel": "flow_sde", "eta": DIGITS_FLOW_NOISE_LEVEL})
    if method == "grpo":
        cfg["sampling"]["images_per_prompt"] = 8
        cfg["method"] = {"name": "grpo", "options": {"clip_range": 1e-4, "adv_clip": 5.0, "kl_beta": 0.01,
                                                     "fraction": 0.1, "stratified": True,
                                                     "log_prob_reduction": "mean"}}
    return cfg


# -- Stable Diffusion 1.5 ------------------------------------------------------------------------------
# Prompt sets as in the authors' code (spec/nabla_gfn.md §7.2, spec/dag.md §6.2); the files are not shipped
# (put them beside the config or give absolute paths). ImageReward: DrawBench minus the Misspellings and
# Rare Words categories (183), minus the first 2 of each remaining category (held out): 165. HPSv2: the HPDv2
# benchmark's photo and paintings styles (∇-GFlowNet's `hpd_photo_painting`), the first 10 of each held out:
# 1 580.
#
# λ (trust region) of the ∇-GFlowNet presets: the values in the authors' code and README (aesthetic 2e3 from
# the README run, HPSv2 1e2 from hpsv2.py, ImageReward 1e3, the code default). The camera-ready paper reports
# 2000 / 5000 / 5000 (spec/nabla_gfn.md §7.5); we keep the code's values because they are the ones the
# released configs ran. Override with method.options.trust_region.
_SD_REWARDS: dict[str, dict[str, Any]] = {
    # reward spec, prompt set, DAG beta (reward_exp), nabla beta (reward_scale), nabla lambda, nabla batch x accum
    "aesthetic": {"reward": "aesthetic", "prompts": "animals", "dag_beta": 100.0, "nabla_beta": 1e4,
                  "nabla_lambda": 2e3, "nabla_micro": 4, "nabla_accum": 8},
    "imagereward": {"reward": "imagereward",
                    "prompts": {"path": "prompts/drawbench_prompts.json", "skip_first_per_category": 2,
                                "exclude_categories": ["Misspellings", "Rare Words"]},
                    "dag_beta": 100.0, "nabla_beta": 1e3, "nabla_lambda": 1e3, "nabla_micro": 4, "nabla_accum": 8},
    "hpsv2": {"reward": "hpsv2",
              "prompts": {"sets": [{"path": "prompts/hpdv2_benchmark_photo_prompts.json", "skip_first": 10},
                                   {"path": "prompts/hpdv2_benchmark_paintings_prompts.json", "skip_first": 10}]},
              "dag_beta": 100.0, "nabla_beta": 1e4, "nabla_lambda": 1e2, "nabla_micro": 2, "nabla_accum": 16},
    "jpeg-compressibility": {"reward": "jpeg-compressibility", "prompts": "animals", "dag_beta": 100.0,
                             "nabla_beta": 1e3, "nabla_lambda": 1e3, "nabla_micro": 4, "nabla_accum": 8},
}
_SD_METHODS_FOR = {
    # black-box JPEG cannot drive the gradient-based methods
    "jpeg-compressibility": ("dag-db", "dag-kl", "ddpo"),
}


def sd15_preset(reward: str, method: str) -> dict[str, Any]:
    r = _SD_REWARDS[reward]
    cfg: dict[str, Any] = {
        "run_name": f"sd15-{reward}-{method}",
        "seed": 0,
        "backbone": {"kind": "sd", "path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "dtype": "bfloat16",
                     "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"],
                     "gradient_checkpointing": False, "heads": "backbone"},
        "reward": r["reward"],
        "prompts": r["prompts"],
        "sampling": {"num_steps": 50, "guidance_scale": 5.0, "eta": 1.0, "log_prob_reduction": "mean",
                     "batch_size": 16, "batches_per_epoch": 4},
        "lookahead": {"mode": "cached", "model": "policy", "guided": True},
        "logging": {"sample_every": 5, "checkpoint_every": 5, "keep_checkpoints": 3, "eval_samples": 32,
                    "grid_prompts": 8},
        "reliability": {"max_nan_streak": 5, "on_bad_reward": "skip"},
    }
    if method in ("dag-db", "dag-kl"):  # spec/dag.md §5: 64 traj/GPU/epoch, micro 8 x (4 x 50 slots), 100 epochs
        # the authors' forward-looking reward: recomputed per transition with the current θ and the
        # conditional-only ε (no CFG); and their flow network (≈6.5 M parameters). docs/fidelity.md.
        cfg["lookahead"] = {"mode": "recompute", "model": "policy", "guided": False}
        cfg["backbone"]["log_flow_head"] = "dag"
        cfg["beta"] = {"value": r["dag_beta"], "schedule": "linear", "warmup_fraction": 0.5}
        cfg["training"] = {"epochs": 100, "micro_batch": 8, "grad_accum": 200, "lr": 3e-4, "lr_heads": 3e-4,
                           "weight_decay": 1e-4, "weight_decay_heads": 1e-4, "adam_betas": [0.9, 0.999],
                           "clip_norm": 1.0, "mixed_precision": "bf16"}
        # the authors' DAG code averages log-probs over the latent: keep β = 100 with that reduction
        opts: dict[str, Any] = {"trust_region": 1.0, "fraction": 1.0, "log_prob_reduction": "mean"}
        if method == "dag-kl":  # leave-one-out groups: the per-GPU micro-batch of 8 trajectories
            opts.update({"clip_range": 1e-4, "adv_clip": 5.0, "rloo_group": 8})
        cfg["method"] = {"name": method, "options": opts}
    elif method in ("nabla-db", "residual-nabla-db"):  # spec/nabla_gfn.md §6.3: 6 transitions/traj, 200 updates
        cfg["backbone"]["lora_rank"], cfg["backbone"]["lora_alpha"] = 8, 8.0
        cfg["beta"] = {"value": r["nabla_beta"], "schedule": "constant"}
        cfg["training"] = {"epochs": 100, "micro_batch": r["nabla_micro"], "grad_accum": 6 * r["nabla_accum"],
                           "lr": 1e-3, "lr_heads": 1e-3, "weight_decay": 1e-4, "weight_decay_heads": 1e-2,
                           "adam_betas": [0.9, 0.999], "clip_norm": 1.0, "mixed_precision": "bf16"}
        # lr 1e-3 with one AdamW step per update: the authors' code takes two steps per update (a bug,
        # spec/nabla_gfn.md §6.3), ≈ 2e-3 early in training; set training.lr: 2.0e-3 to approximate it.
        cfg["method"] = {"name": method, "options": {"trust_region": r["nabla_lambda"], "fraction": 0.1,
                                                     "stratified": True, "gamma": "alpha_bar"}}
        if method == "nabla-db":
            # ∇-DB's forward residual carries a θ-free noise term κ_t·z (≈ 24 per element at SD's last steps):
            # the antithetic control removes it from the policy gradient; the pretrained score as the flow's
            # base leaves the head only the correction to learn (both keep the fixed point)
            cfg["method"]["options"].update({"prior_score": True, "forward_control": "antithetic"})
    elif method == "ddpo":  # DDPO: 32 samples/GPU/epoch, 2 updates, clip 1e-4, lr 3e-4
        cfg["beta"] = {"value": 1.0, "schedule": "constant"}
        cfg["sampling"].update({"batch_size": 8, "batches_per_epoch": 4, "guidance_scale": 5.0,
                                "log_prob_reduction": "mean"})
        cfg["training"] = {"epochs": 100, "micro_batch": 8, "grad_accum": 100, "lr": 3e-4, "lr_heads": 3e-4,
                           "weight_decay": 1e-4, "adam_betas": [0.9, 0.999], "clip_norm": 1.0,
                           "mixed_precision": "bf16"}
        # ddpo-pytorch's per-prompt stat tracker: 16 rewards per prompt across epochs, gathered over processes
        cfg["method"] = {"name": "ddpo", "options": {"clip_range": 1e-4, "adv_clip": 5.0, "fraction": 1.0,
                                                     "log_prob_reduction": "mean", "per_prompt_buffer": 16,
                                                     "per_prompt_min_count": 16}}
    elif method == "reward-backprop":  # DRaFT-LV as the ∇-GFlowNet baseline
        cfg["beta"] = {"value": 1.0, "schedule": "constant"}
        cfg["training"] = {"epochs": 100, "micro_batch": 4, "grad_accum": 8, "lr": 1e-4, "lr_heads": 1e-4,
                           "weight_decay": 1e-4, "adam_betas": [0.9, 0.999], "clip_norm": 1.0,
                           "mixed_precision": "bf16"}
        cfg["backbone"]["gradient_checkpointing"] = True
        cfg["method"] = {"name": "reward-backprop", "options": {"variant": "draft-lv", "lv_samples": 2}}
    else:
        raise ValueError(f"method={method!r} has no SD1.5 preset; use one of {', '.join(METHODS)}")
    return cfg


# -- Stable Diffusion XL --------------------------------------------------------------------------------
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
#: Transitions per optimiser step stay those of the SD1.5 preset; SDXL's micro-batches are smaller
#: (a 2.6 B-parameter UNet on 4×128×128 latents; CFG doubles every pass): trained transitions per micro-batch.
_SDXL_MICRO = {"dag-db": 2, "dag-kl": 2, "ddpo": 2, "nabla-db": 1, "residual-nabla-db": 1, "reward-backprop": 1}
_SDXL_SAMPLING_BATCH = 4  # trajectories per sampling batch and process (latents 4× SD1.5's area)


def sdxl_preset(reward: str, method: str) -> dict[str, Any]:
    """The SD1.5 preset of ``(reward, method)`` moved to SDXL base at 1024 px.

    Same objective, options, β, learning rates and epochs, and the same trajectories per epoch and
    transitions per optimiser step (smaller sampling and micro-batches, more of them). The faithful choices
    of the SD1.5 presets carry over (DAG: the authors' recomputed, unguided policy lookahead and flow network;
    DDPO: the per-prompt stat tracker; ∇-DB: ``prior_score`` and the antithetic control); DAG-KL's
    leave-one-out group stays the per-GPU micro-batch, as the authors' (2 here). Memory: frozen weights
    in bf16, LoRA in fp32, gradient checkpointing on (docs/sdxl.md). With ``log_prob_reduction: mean`` β means
    what it means for SD1.5; with ``sum`` the latent has D = 4·128·128 = 65536 dimensions (4× SD1.5's).
    The values are the SD1.5 papers' and were not tuned for SDXL.
    """
    cfg = sd15_preset(reward, method)
    cfg["run_name"] = f"sdxl-{reward}-{method}"
    cfg["backbone"].update({"kind": "sdxl", "path": SDXL_BASE, "image_size": 1024, "dtype": "bfloat16",
                            "gradient_checkpointing": True})
    sampling, training = cfg["sampling"], cfg["training"]
    trajectories = sampling["batch_size"] * sampling["batches_per_epoch"]
    sampling["batch_size"] = min(_SDXL_SAMPLING_BATCH, trajectories)
    sampling["batches_per_epoch"] = -(-trajectories // sampling["batch_size"])
    per_step = training["micro_batch"] * training["grad_accum"]
    training["micro_batch"] = min(_SDXL_MICRO[method], training["micro_batch"])
    training["grad_accum"] = -(-per_step // training["micro_batch"])
    if method == "dag-kl":
        # the authors' leave-one-out group is the per-GPU micro-batch; a group is cut at each micro-batch
        # (dag_kl.rloo_groups), so it follows SDXL's smaller one
        cfg["method"]["options"]["rloo_group"] = training["micro_batch"]
    return cfg


# -- flow-matching models: SD3.5 Medium and FLUX.1-dev (Flow-GRPO's published recipes) ----------------------
#: Flow-GRPO (yifan123/flow_grpo, ``config/base.py`` + ``config/grpo.py``, the 32-GPU recipes ``pickscore_sd3``,
#: ``clipscore_sd3``, ``pickscore_flux``): steps, guidance, noise level a of the SDE, resolution, group size
#: (images per prompt), T5 prompts of 128 tokens, and the LoRA of ``scripts/train_sd3.py`` (r 32, alpha 64 on the
#: joint attention's eight projections; the FLUX script uses the same). lr 3e-4, AdamW weight decay 1e-4, gradient clip 1.0, PPO clip
#: 1e-4, advantage clip 5, per-prompt groups with the std of all rewards (``global_std``), bf16.
FLOW_MODELS: dict[str, dict[str, Any]] = {
    "sd35m": {"kind": "sd3", "path": "stabilityai/stable-diffusion-3.5-medium", "num_steps": 10,
              "guidance_scale": 4.5, "eta": 0.7, "image_size": 512, "sampling_batch": 8, "micro_batch": 8},
    # FLUX.1-dev: 6 sampling steps, guidance embedding 3.5, a = 0.9 (``pickscore_flux``); 12 B parameters, so
    # smaller sampling and training micro-batches than SD3.5-M (2.5 B) at the same epoch size
    "flux1": {"kind": "flux", "path": "black-forest-labs/FLUX.1-dev", "num_steps": 6, "guidance_scale": 3.5,
              "eta": 0.9, "image_size": 512, "sampling_batch": 4, "micro_batch": 4},
}
FLOW_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"]
FLOW_GROUP = 24  # sample.num_image_per_prompt
#: Flow-GRPO's KL β (``train.beta``) per reward: published for PickScore (0.01), CLIP score (0.02) and JPEG
#: compressibility (0, the ``compressibility`` config); the other human-preference rewards take PickScore's.
#: Its FLUX.1 recipes train without KL (β = 0) for every reward.
_FLOW_KL = {"pickscore": 0.01, "clip-score": 0.02, "jpeg-compressibility": 0.0, "aesthetic": 0.01, "hpsv2": 0.01,
            "imagereward": 0.01}
_FLOW_PROMPTS = {"pickscore": "animals", "clip-score": "animals", "jpeg-compressibility": "animals",
                 "aesthetic": "animals", "hpsv2": _SD_REWARDS["hpsv2"]["prompts"],
                 "imagereward": _SD_REWARDS["imagereward"]["prompts"]}
#: the GFlowNet objectives at the same sampling budget: relative DAG-DB (target p_#-sampler·exp(β·r), no
#: reward gradient needed) and residual ∇-DB (differentiable rewards), with the β of the SD1.5 preset of the
#: same reward (the papers' values; not tuned for flow models). grpo for every reward.
FLOW_METHODS = ("grpo", "dag-db", "residual-nabla-db")


def flow_methods_for(reward: str) -> tuple[str, ...]:
    if reward not in _SD_REWARDS:  # no paper β for a GFlowNet target with this reward
        return ("grpo",)
    return tuple(m for m in FLOW_METHODS if m in _SD_METHODS_FOR.get(reward, METHODS) or m == "grpo")


def flow_preset(model: str, reward: str, method: str) -> dict[str, Any]:
    """``sd35m-<reward>-<method>`` / ``flux1-<reward>-<method>``: Flow-GRPO's recipe for ``model`` (see
    :data:`FLOW_MODELS`).

    One process holds whole groups of 24 images of a prompt (48 trajectories per epoch: two prompts);
    Flow-GRPO draws 48 prompts per epoch over 32 GPUs, so scale ``sampling.batches_per_epoch`` or the process
    count for its prompt throughput. Two optimiser steps per epoch (its ``gradient_accumulation_steps`` =
    half the sampling batches), every step of every trajectory trained (its ``timestep_fraction=0.99`` trains
    ⌊0.99·K⌋ = K − 1 of K steps); grpo's groups gather every process's rewards, as Flow-GRPO's. Not
    mirrored: its EMA of the LoRA and separate evaluation step counts (SD3.5: 40, FLUX: 28). The GFlowNet
    methods take the SD1.5 preset's faithful choices too (DAG-DB: the authors' recomputed, unguided
    lookahead and flow network).
    """
    m = FLOW_MODELS[model]
    per_epoch = 2 * FLOW_GROUP
    transitions = per_epoch * m["num_steps"]
    cfg: dict[str, Any] = {
        "run_name": f"{model}-{reward}-{method}",
        "seed": 0,
        "backbone": {"kind": m["kind"], "path": m["path"], "dtype": "bfloat16", "lora_rank": 32, "lora_alpha": 64.0,
                     "lora_targets": list(FLOW_LORA_TARGETS), "gradient_checkpointing": True, "heads": "backbone",
                     "image_size": m["image_size"], "max_sequence_length": 128},
        "reward": reward,
        "prompts": copy.deepcopy(_FLOW_PROMPTS[reward]),
        "sampling": {"num_steps": m["num_steps"], "guidance_scale": m["guidance_scale"], "eta": m["eta"],
                     "kernel": "flow_sde", "log_prob_reduction": "mean", "batch_size": m["sampling_batch"],
                     "batches_per_epoch": per_epoch // m["sampling_batch"], "images_per_prompt": FLOW_GROUP},
        "lookahead": {"mode": "cached", "model": "policy", "guided": True},
        "logging": {"sample_every": 5, "checkpoint_every": 5, "keep_checkpoints": 3, "eval_samples": 32,
                    "grid_prompts": 8},
        "reliability": {"max_nan_streak": 5, "on_bad_reward": "skip"},
        "training": {"epochs": 100, "micro_batch": m["micro_batch"],
                     "grad_accum": transitions // 2 // m["micro_batch"], "lr": 3e-4, "lr_heads": 3e-4,
                     "weight_decay": 1e-4, "weight_decay_heads": 1e-4, "adam_betas": [0.9, 0.999],
                     "clip_norm": 1.0, "mixed_precision": "bf16"},
    }
    if method == "grpo":
        kl = 0.0 if model == "flux1" else _FLOW_KL[reward]
        cfg["beta"] = {"value": 1.0, "schedule": "constant"}
        cfg["method"] = {"name": "grpo", "options": {"clip_range": 1e-4, "adv_clip": 5.0, "kl_beta": kl,
                                                     "global_std": True, "fraction": 1.0,
                                                     "log_prob_reduction": "mean"}}
        return cfg
    sd = sd15_preset(reward, method)  # the paper's β and objective options for this reward
    cfg["beta"] = sd["beta"]
    options = copy.deepcopy(sd["method"]["options"])
    if method == "dag-db":
        options["relative"] = True  # p_#-sampler·exp(β·r): the prior kept (README "What each method samples")
        cfg["lookahead"] = copy.deepcopy(sd["lookahead"])  # the DAG authors' recomputed, unguided lookahead
        cfg["backbone"]["log_flow_head"] = sd["backbone"]["log_flow_head"]  # and their flow network
    cfg["method"] = {"name": method, "options": options}
    cfg["training"]["lr"] = cfg["training"]["lr_heads"] = sd["training"]["lr"]
    # two optimiser steps over the transitions the objective selects (residual ∇-DB trains a tenth of them)
    selected = round(transitions * float(options.get("fraction", 1.0)))
    cfg["training"]["grad_accum"] = max(1, selected // 2 // m["micro_batch"])
    return cfg


def all_presets() -> dict[str, dict[str, Any]]:
    out = {f"digits-{m}": digits_preset(m) for m in DIGITS_METHODS}
    out.update({f"digits-flow-{m}": digits_flow_preset(m) for m in DIGITS_FLOW_METHODS})
    for reward in _SD_REWARDS:
        for m in _SD_METHODS_FOR.get(reward, METHODS):
            out[f"sd15-{reward}-{m}"] = sd15_preset(reward, m)
    for reward in _SD_REWARDS:
        for m in _SD_METHODS_FOR.get(reward, METHODS):
            out[f"sdxl-{reward}-{m}"] = sdxl_preset(reward, m)
    for model in FLOW_MODELS:
        for reward in _FLOW_KL:
            for m in flow_methods_for(reward):
                out[f"{model}-{reward}-{m}"] = flow_preset(model, reward, m)
    return out


def render(cfg: dict[str, Any]) -> str:
    head = f"# gfnalign preset {cfg['run_name']} (generated by `python -m gfnalign.training.presets`; edit there)\n"
    return head + yaml.safe_dump(cfg, sort_keys=False)


def write_all(*dirs: Path) -> list[Path]:
    written = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, cfg in all_presets().items():
            path = d / f"{name}.yaml"
            path.write_text(render(cfg))
            written.append(path)
    return written


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[3]
    targets = [Path(a) for a in sys.argv[1:]] or [root / "configs", root / "src" / "gfnalign" / "configs"]
    for p in write_all(*targets):
        print(p)
