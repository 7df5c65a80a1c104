"""Evaluate a fine-tuned model against its pretrained self: reward, diversity, prior drift, CLIP score.

:func:`evaluate_backbone` takes a backbone (anything with ``schedule``, ``latent_shape``,
``encode_prompts``, ``eps(x, t, cond, reference=...)`` and ``decode``) whose adapters hold the fine-tuned
weights, and samples ``samples_per_prompt`` images per prompt twice from **the same initial noise and the
same per-step noise**: once with the adapters on (fine-tuned) and once with ``reference=True`` (pretrained).
Both sample sets are scored with every reward and embedded by one feature extractor; then

* ``reward_mean`` / ``reward_std``: over all fine-tuned samples (first reward; all rewards in ``rewards``);
* ``diversity``: per-prompt mean pairwise feature distance, averaged over prompts (:mod:`.metrics`);
* ``prior_drift``: per-prompt Fréchet distance between fine-tuned and pretrained features, averaged;
* ``prior_drift_floor``: the same distance between two *independent* pretrained sample sets (a second
  noise seed). ``prior_drift`` uses common random numbers (both models start from the same noise), so
  identical models score exactly 0 and methods are compared with low variance; the floor is the scale
  of the estimator's sampling noise when the noise is *not* shared (large at few samples per prompt).
  A drift approaching the floor means the model moved about as far as redrawing the noise does;
* ``clip_score``: when the feature extractor can embed text (``clip:PATH``).

The same numbers for the pretrained samples sit under ``pretrained`` and per prompt under ``per_prompt``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gfnalign.evaluation import metrics as M
from gfnalign.evaluation.features import FeatureExtractor


class ReferencePolicy:
    """Presents a backbone's frozen pretrained network (adapters off) as a policy for ``rollout``."""

    def __init__(self, backbone: Any):
        self.backbone = backbone
        self.schedule = backbone.schedule

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, reference: bool = False) -> torch.Tensor:
        return self.backbone.eps(x, t, cond, reference=True)


@dataclass
class SampleSet:
    """Images ``[M, 3, H, W]`` with their prompt index ``[M]`` and prompt strings (length M)."""

    images: torch.Tensor
    prompt_ids: torch.Tensor
    prompts: list[str]


def _initial_noise(backbone: Any, n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if callable(getattr(backbone, "initial_noise", None)):
        return backbone.initial_noise(n, generator).to(device)
    shape = (n, *tuple(backbone.latent_shape))
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _backbone_device_dtype(backbone: Any) -> tuple[torch.device, torch.dtype]:
    device = getattr(backbone, "device", None)
    dtype = getattr(backbone, "latent_dtype", None) or torch.float32
    return torch.device(device) if device is not None else torch.device("cpu"), dtype


@torch.no_grad()
def sample_images(
    backbone: Any,
    prompts: Sequence[str],
    samples_per_prompt: int,
    *,
    reference: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    eta: float = 1.0,
) -> SampleSet:
    """``samples_per_prompt`` images for each prompt, prompt-major order.

    Batch ``b`` of the flattened (prompt, sample) list uses a generator seeded with ``(seed, b)`` for its
    initial noise and every step's noise, so the fine-tuned and the pretrained pass (``reference``) see
    identical noise for the same ``seed`` and ``batch_size``.
    """
    from gfnalign.sampling.rollout import rollout

    if samples_per_prompt < 1:
        raise ValueError(f"samples per prompt={samples_per_prompt} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rows = [(p, s) for p in range(len(prompts)) for s in range(samples_per_prompt)]
    policy = ReferencePolicy(backbone) if reference else backbone
    device, dtype = _backbone_device_dtype(backbone)
    images, ids = [], []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        texts = [prompts[p] for p, _ in chunk]
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + b)
        x_init = _initial_noise(backbone, len(chunk), gen, device, dtype)
        cond = backbone.encode_prompts(texts)
        traj = rollout(policy, cond, x_init, eta=eta, generator=gen)
        images.append(backbone.decode(traj.states[:, -1]).float().clamp(0, 1).cpu())
        ids.extend(p for p, _ in chunk)
    return SampleSet(
        images=torch.cat(images), prompt_ids=torch.tensor(ids, dtype=torch.int64), prompts=[prompts[i] for i in ids]
    )


def pretrained_samples(
    backbone: Any, prompts: Sequence[str], samples_per_prompt: int, *, floor: bool = True, seed: int = 0,
    batch_size: int = 64, eta: float = 1.0,
) -> tuple[SampleSet, SampleSet | None]:
    """The pretrained model's samples (same noise as the fine-tuned pass) and, with ``floor``, a second set
    from independent noise (seed + 7919) for the drift floor."""
    prompts = list(dict.fromkeys(prompts))
    kw = {"seed": seed, "batch_size": batch_size, "eta": eta}
    pre = sample_images(backbone, prompts, samples_per_prompt, reference=True, **kw)
    pre2 = None
    if floor:
        pre2 = sample_images(backbone, prompts, samples_per_prompt, reference=True, **{**kw, "seed": seed + 7919})
    return pre, pre2


def _reward_name(reward: Any, i: int) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or f"reward{i}")


@torch.no_grad()
def score_rewards(rewards: Sequence[Any], samples: SampleSet, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Each reward's scores ``[M]`` (float64 on the CPU); composite rewards add their components."""
    out: dict[str, torch.Tensor] = {}
    for i, reward in enumerate(rewards):
        name = _reward_name(reward, i)
        parts, comps = [], {}
        for s in range(0, samples.images.shape[0], batch_size):
            r = reward(samples.images[s : s + batch_size], samples.prompts[s : s + batch_size])
            parts.append(torch.as_tensor(r).detach().reshape(-1).double().cpu())
            for label, v in (getattr(reward, "last_components", None) or {}).items():
                comps.setdefault(label, []).append(torch.as_tensor(v).detach().reshape(-1).double().cpu())
        out[name] = torch.cat(parts)
        for label, vs in comps.items():
            out[f"{name}/{label}"] = torch.cat(vs)
    return out


def _group_mean(values: torch.Tensor, prompt_ids: torch.Tensor, k: int) -> float:
    return float(values[prompt_ids == k].mean())


def evaluate_backbone(
    backbone: Any,
    prompts: Sequence[str],
    rewards: Sequence[Any],
    features: FeatureExtractor,
    *,
    samples_per_prompt: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    eta: float = 1.0,
    metric: str | None = None,
    floor: bool = True,
    shrinkage: float | None = None,
    pretrained: tuple[SampleSet, SampleSet | None] | None = None,
) -> dict[str, Any]:
    """Sample, score and compare; returns the JSON-ready result described in the module docstring.

    ``pretrained``: the ``(pretrained, floor)`` sample sets from :func:`pretrained_samples` with the same
    prompts, samples, seed, batch size and eta, to reuse across evaluations of one base model.
    """
    prompts = list(dict.fromkeys(prompts))  # unique, in order: per-prompt metrics group by string
    if not prompts:
        raise ValueError("evaluation needs at least one prompt; check --prompts")
    if samples_per_prompt < 2:
        raise ValueError(f"--samples={samples_per_prompt}: diversity and prior drift need at least 2 per prompt")
    if not rewards:
        raise ValueError("evaluation needs at least one reward")
    metric = metric or features.metric
    t0 = time.perf_counter()
    kw = {"seed": seed, "batch_size": batch_size, "eta": eta}
    fine = sample_images(backbone, prompts, samples_per_prompt, reference=False, **kw)
    if pretrained is None:
        pretrained = pretrained_samples(backbone, prompts, samples_per_prompt, floor=floor, **kw)
    pre, pre2 = pretrained
    if pre.prompts != fine.prompts:
        raise ValueError("evaluate_backbone: the given pretrained samples were drawn for other prompts/sample counts")
    t_sample = time.perf_counter() - t0

    r_fine, r_pre = score_rewards(rewards, fine, batch_size), score_rewards(rewards, pre, batch_size)
    f_fine, f_pre = features(fine.images), features(pre.images)
    div_fine, div_fine_pp = M.diversity(f_fine, fine.prompt_ids, metric)
    div_pre, div_pre_pp = M.diversity(f_pre, pre.prompt_ids, metric)
    drift, drift_pp = M.prior_drift(f_fine, f_pre, fine.prompt_ids, pre.prompt_ids, shrinkage=shrinkage)
    floor_val, floor_pp = None, {}
    if pre2 is not None:
        floor_val, floor_pp = M.prior_drift(features(pre2.images), f_pre, pre2.prompt_ids, pre.prompt_ids,
                                            shrinkage=shrinkage)

    clip = None
    if hasattr(features, "text_features"):
        try:
            text = features.text_features(prompts)
            cs_f = M.clip_score(f_fine, text[fine.prompt_ids])
            cs_p = M.clip_score(f_pre, text[pre.prompt_ids])
            clip = {"finetuned": float(cs_f.mean()), "pretrained": float(cs_p.mean())}
        except (FileNotFoundError, OSError, ValueError) as err:
            clip = {"unavailable": str(err)}

    reward_table = {}
    for name in r_fine:
        fm, fs = M.reward_stats(r_fine[name])
        pm, ps = M.reward_stats(r_pre[name])
        reward_table[name] = {"finetuned": {"mean": fm, "std": fs}, "pretrained": {"mean": pm, "std": ps}}
    main = next(iter(r_fine))
    per_prompt = []
    for k, p in enumerate(prompts):
        per_prompt.append({
            "prompt": p,
            "reward_mean": _group_mean(r_fine[main], fine.prompt_ids, k),
            "reward_mean_pretrained": _group_mean(r_pre[main], pre.prompt_ids, k),
            "diversity": div_fine_pp[k],
            "diversity_pretrained": div_pre_pp[k],
            "prior_drift": drift_pp[k],
            **({"prior_drift_floor": floor_pp[k]} if floor_pp else {}),
        })
    return {
        "reward": main,
        "reward_mean": reward_table[main]["finetuned"]["mean"],
        "reward_std": reward_table[main]["finetuned"]["std"],
        "diversity": div_fine,
        "prior_drift": drift,
        "prior_drift_floor": floor_val,
        "clip_score": clip,
        "pretrained": {
            "reward_mean": reward_table[main]["pretrained"]["mean"],
            "reward_std": reward_table[main]["pretrained"]["std"],
            "diversity": div_pre,
        },
        "rewards": reward_table,
        "features": features.describe(),
        "diversity_metric": metric,
        "samples_per_prompt": int(samples_per_prompt),
        "num_prompts": len(prompts),
        "seed": int(seed),
        "eta": float(eta),
        "per_prompt": per_prompt,
        "seconds": {"sampling": t_sample, "total": time.perf_counter() - t0},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def markdown_report(result: dict[str, Any], title: str = "Evaluation") -> str:
    """A markdown section: summary table (fine-tuned vs pretrained), then per-prompt rows."""
    pre = result["pretrained"]
    lines = [
        f"## {title}",
        "",
        f"{result['samples_per_prompt']} samples per prompt × {result['num_prompts']} prompts, seed {result['seed']}, "
        f"same noise for both models; features `{result['features']}` ({result['diversity_metric']} distance). "
        "Prior drift compares the two models' samples from the same noise (identical models give 0).",
        "",
        "| metric | fine-tuned | pretrained |",
        "|---|---|---|",
    ]
    for name, row in result["rewards"].items():
        f, p = row["finetuned"], row["pretrained"]
        lines.append(f"| reward `{name}` (mean ± std) | {_fmt(f['mean'])} ± {_fmt(f['std'])} | "
                     f"{_fmt(p['mean'])} ± {_fmt(p['std'])} |")
    lines.append(f"| diversity (mean pairwise distance per prompt) | {_fmt(result['diversity'])} | {_fmt(pre['diversity'])} |")
    lines.append(f"| prior drift (per-prompt Fréchet vs pretrained) | {_fmt(result['prior_drift'])} | "
                 f"independent-noise reference {_fmt(result['prior_drift_floor'])} (pretrained vs pretrained, fresh noise) |")
    clip = result.get("clip_score")
    if isinstance(clip, dict) and "finetuned" in clip:
        lines.append(f"| CLIP score | {_fmt(clip['finetuned'])} | {_fmt(clip['pretrained'])} |")
    lines += ["", "| prompt | reward | reward (pretrained) | diversity | diversity (pretrained) | prior drift |",
              "|---|---|---|---|---|---|"]
    for row in result["per_prompt"]:
        lines.append(f"| {row['prompt']} | {_fmt(row['reward_mean'])} | {_fmt(row['reward_mean_pretrained'])} | "
                     f"{_fmt(row['diversity'])} | {_fmt(row['diversity_pretrained'])} | {_fmt(row['prior_drift'])} |")
    return "\n".join(lines) + "\n"
