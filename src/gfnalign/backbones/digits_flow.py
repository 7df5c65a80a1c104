"""The tiny flow-matching digits world: an SD3-style pipeline on the digits, and its loader.

A real diffusers ``StableDiffusion3Pipeline`` with tiny configs (an ``SD3Transformer2DModel``, two frozen
random-init tiny CLIP text encoders with projection sharing the digits world's offline tokenizer, no T5, the
digits world's VAE with SD3's latent shift and scale, a ``FlowMatchEulerDiscreteScheduler``), pretrained with
the rectified-flow loss by :mod:`gfnalign.backbones.digits_flow_pretrain` on scikit-learn's digits. Its
weights ship in ``gfnalign/assets/digits_flow/pipeline`` (plain diffusers loads that folder); it shares the
digits world's prompts, classifier and rewards (:mod:`gfnalign.backbones.digits`).

Without T5, ``StableDiffusion3Pipeline`` appends ``max_sequence_length`` zero rows to the prompt (256 by
default). The model was trained for any count from 1 to 256 (they are identical tokens, so the count only
shifts their attention logit by its log), so plain ``pipe(prompt)`` works and gfnalign samples with one
zero row (:data:`T5_PLACEHOLDER_TOKENS`), which is cheaper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gfnalign.backbones.digits import ASSET_DIR as DIGITS_ASSET_DIR

ASSET_DIR = DIGITS_ASSET_DIR.parent / "digits_flow"
PIPELINE_DIR = ASSET_DIR / "pipeline"
#: zero T5 rows gfnalign appends to each prompt (any count 1-256 gives the same model up to training error)
T5_PLACEHOLDER_TOKENS = 1
#: the world's sampler defaults (gfnalign's policy): steps, guidance, Flow-GRPO SDE noise level a
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.0
DEFAULT_NOISE_LEVEL = 0.7


def load_digits_flow_backbone(path: str | Path | None = None, **kwargs: Any):
    """The shipped flow digits pipeline as a :class:`~gfnalign.backbones.sd3.SD3Backbone`.

    Defaults: 20 steps of Flow-GRPO's SDE with noise level a = 0.7, guidance 1.0, one zero T5 row, LoRA rank 4
    on the attention projections, float32. Every keyword of :meth:`SD3Backbone.from_pretrained` can be
    overridden.
    """
    from gfnalign.backbones.sd3 import SD3Backbone

    d = Path(path) if path is not None else PIPELINE_DIR
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(
            f"flow digits pipeline not found at {d} (no model_index.json); run "
            "`python scripts/pretrain_digits_flow.py` or pass path= to a folder written by "
            "StableDiffusion3Pipeline.save_pretrained"
        )
    opts: dict[str, Any] = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
                            "eta": DEFAULT_NOISE_LEVEL, "lora_rank": 4, "max_sequence_length": T5_PLACEHOLDER_TOKENS}
    opts.update(kwargs)
    return SD3Backbone.from_pretrained(d, **opts)
