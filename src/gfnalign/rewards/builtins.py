"""The built-in reward table. Imports nothing heavy: each target is imported only when that reward is built."""

from gfnalign.rewards.registry import register_reward

_R = "gfnalign.rewards"

register_reward(
    "jpeg-compressibility", f"{_R}.jpeg:jpeg_compressibility", differentiable=False,
    description="minus the JPEG size (quality 95) in kB, as in DDPO/DAG", options={"quality": 95},
)
register_reward(
    "jpeg-incompressibility", f"{_R}.jpeg:jpeg_incompressibility", differentiable=False,
    description="JPEG size (quality 95) in kB", options={"quality": 95},
)
register_reward(
    "aesthetic", f"{_R}.clip:AestheticReward", differentiable=True, needs_weights=True,
    description="LAION aesthetic predictor v2 (linear MLP head) on L2-normalised CLIP ViT-L/14 image embeddings",
    options={"clip_model": "openai/clip-vit-large-patch14", "head_path": "$GFNALIGN_AESTHETIC_HEAD"},
)
register_reward(
    "pickscore", f"{_R}.clip:PickScoreReward", differentiable=True, inputs="image+prompt", needs_weights=True,
    description="PickScore: logit_scale * cos(image, text) of the PickScore_v1 CLIP-H model",
    options={"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
)
register_reward(
    "clip-score", f"{_R}.clip:ClipScoreReward", differentiable=True, inputs="image+prompt", needs_weights=True,
    description="scale * cos(image, text) of a CLIP model (scale 100, no clamp at 0)",
    options={"model": "openai/clip-vit-large-patch14", "scale": 100.0},
)
register_reward(
    "imagereward", f"{_R}.external:ImageRewardReward", differentiable=True, inputs="image+prompt",
    needs_weights=True, extra="image-reward",
    description="ImageReward v1.0 (BLIP), differentiable path, standardised score; needs `pip install image-reward`",
    options={"model": "ImageReward-v1.0"},
)
register_reward(
    "hpsv2", f"{_R}.external:HPSv2Reward", differentiable=True, inputs="image+prompt", needs_weights=True,
    extra="hpsv2", description="HPSv2/HPSv2.1 (OpenCLIP ViT-H-14) cos(image, text); needs `pip install hpsv2`",
    options={"version": "v2.1", "checkpoint": None},
)
register_reward(
    "digit-alignment", f"{_R}.digits:DigitAlignmentReward", differentiable=True, inputs="image+prompt",
    description="log p(prompted digit | image) under the digits world's shipped classifier",
)
register_reward(
    "digit-preference", f"{_R}.digits:DigitPreferenceReward", differentiable=True,
    description="expected preference value sum_c v_c p(c | image) under the digits classifier (bounded; "
    "default prefers even digits)",
    options={"values": None},
)
register_reward(
    "ink", f"{_R}.digits:InkReward", differentiable=True,
    description="stroke mass: mean ink, or -(mean ink - target)^2 / scale^2 with a target",
    options={"target": None},
)
register_reward(
    "composite", f"{_R}.composite:CompositeReward", differentiable=True, inputs="image+prompt",
    description="weighted sum of rewards (differentiable iff all components are); per-component logging",
    options={"components": "[{reward: SPEC, weight: W}, ...]"},
)
register_reward(
    "http", f"{_R}.http:HttpReward", differentiable=False, inputs="image+prompt",
    description="a reward served over HTTP (PNG or safetensors + JSON prompts; `gfnalign rewards serve`)",
    options={"url": "http://127.0.0.1:8765/score", "format": "png", "timeout": 60.0, "retries": 3},
)
