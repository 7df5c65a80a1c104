"""What a fine-tuned sampler samples, measured against its target on a real image pipeline.

GFlowNet alignment aims at π(x) ∝ p_#(x)·exp(β·r(x)), p_# the *pretrained sampler's* law. No density of p_#
is needed to measure π: the pretrained sampler's own draws x_1..x_M, weighted by w_i ∝ exp(β·r(x_i))
(self-normalised importance sampling), estimate every expectation under π. With a bounded reward the weights
are bounded, and the estimator's error shrinks as 1/√ESS, ESS = (Σw)²/Σw².

On a world with classes (the digits world: the shipped classifier's argmax) the target is a vector of class
masses, π(c) = Σ_i w_i·1{c_i = c} / Σ_i w_i, and a fine-tuned sampler is judged by the total variation between
its class masses and π(c) (:func:`class_mass_tv`, with a bootstrap interval over both sample sets). Where
classes do not apply (a reward that moves mass *within* a class), compare in a feature space with the
weighted energy distance (:func:`weighted_energy_distance`).

Shapes: ``[M]`` pretrained draws, ``[N]`` fine-tuned draws, ``[C]`` classes, ``[*, D]`` features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def self_normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Weights ``[M]`` summing to 1, proportional to ``exp(log_weights)`` (float64, overflow-safe)."""
    lw = torch.as_tensor(log_weights, dtype=torch.float64).reshape(-1)
    if lw.numel() == 0:
        raise ValueError("need at least one pretrained sample to weight")
    if not torch.isfinite(lw).all():
        raise ValueError("log-weights (beta * reward) must be finite; a reward returned NaN or inf")
    return torch.softmax(lw, dim=0)


def effective_sample_size(weights: torch.Tensor) -> float:
    """ESS = (Σw)² / Σw² of any non-negative weights: M for equal weights, 1 for a single dominant one."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return float(w.sum() ** 2 / (w**2).sum())


def class_masses(classes: torch.Tensor, n_classes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mass ``[C]`` of each class among the draws (weighted by ``weights`` when given), float64, sums to 1."""
    c = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    if c.numel() == 0:
        raise ValueError("need at least one sample to count classes")
    if int(c.min()) < 0 or int(c.max()) >= n_classes:
        raise ValueError(f"class labels must lie in 0..{n_classes - 1}, got range {int(c.min())}..{int(c.max())}")
    w = torch.ones(c.numel(), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    masses = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, c, w)
    return masses / masses.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """½ Σ |p − q| of two probability vectors."""
    return 0.5 * float((torch.as_tensor(p, dtype=torch.float64) - torch.as_tensor(q, dtype=torch.float64)).abs().sum())


@dataclass
class TiltTarget:
    """The tilted target estimated from pretrained draws.

    ``masses`` ``[C]`` π(c); ``standard_error`` ``[C]`` the delta-method standard error of each self-normalised
    mass, √(Σ_i w_i²·(1{c_i = c} − π(c))²) with Σw = 1; ``ess`` the effective sample size; ``pretrained_masses``
    the unweighted class masses; ``reward_mean`` / ``pretrained_reward_mean`` E_π[r] and E_#[r].
    """

    beta: float
    masses: torch.Tensor
    standard_error: torch.Tensor
    ess: float
    n: int
    pretrained_masses: torch.Tensor
    reward_mean: float
    pretrained_reward_mean: float

    def as_dict(self) -> dict:
        return {
            "beta": self.beta, "n": self.n, "ess": self.ess,
            "masses": self.masses.tolist(), "standard_error": self.standard_error.tolist(),
            "max_standard_error": float(self.standard_error.max()),
            "pretrained_masses": self.pretrained_masses.tolist(),
            "reward_mean": self.reward_mean, "pretrained_reward_mean": self.pretrained_reward_mean,
            "pretrained_tv": total_variation(self.pretrained_masses, self.masses),
        }


def tilt_target(classes: torch.Tensor, rewards: torch.Tensor, beta: float, n_classes: int) -> TiltTarget:
    """π(c) ∝ E_#[1{c}·exp(β·r)] from pretrained draws' classes ``[M]`` and rewards ``[M]``."""
    if not math.isfinite(beta):
        raise ValueError(f"beta={beta!r} must be finite")
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    c = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    if r.numel() != c.numel():
        raise ValueError(f"{c.numel()} class labels but {r.numel()} rewards; give one of each per draw")
    w = self_normalised_weights(beta * r)
    masses = class_masses(c, n_classes, w)
    onehot = torch.nn.functional.one_hot(c, n_classes).to(torch.float64)
    se = ((w[:, None] ** 2) * (onehot - masses[None, :]) ** 2).sum(0).sqrt()
    return TiltTarget(
        beta=float(beta), masses=masses, standard_error=se, ess=effective_sample_size(w), n=int(c.numel()),
        pretrained_masses=class_masses(c, n_classes), reward_mean=float((w * r).sum()),
        pretrained_reward_mean=float(r.mean()),
    )


def class_mass_tv(
    target_classes: torch.Tensor, target_rewards: torch.Tensor, beta: float, sample_classes: torch.Tensor,
    n_classes: int, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict:
    """TV between a sampler's class masses and the tilted target, with a percentile bootstrap interval.

    Each bootstrap replicate resamples the pretrained draws (re-estimating the target) and the sampler's draws
    independently, so the interval covers the noise of both estimates.
    """
    c_pre = torch.as_tensor(target_classes, dtype=torch.int64).reshape(-1)
    r_pre = torch.as_tensor(target_rewards, dtype=torch.float64).reshape(-1)
    c_fin = torch.as_tensor(sample_classes, dtype=torch.int64).reshape(-1)
    target = tilt_target(c_pre, r_pre, beta, n_classes)
    masses = class_masses(c_fin, n_classes)
    tv = total_variation(masses, target.masses)
    gen = torch.Generator().manual_seed(int(seed))
    reps = []
    for _ in range(int(n_boot)):
        i = torch.randint(c_pre.numel(), (c_pre.numel(),), generator=gen)
        j = torch.randint(c_fin.numel(), (c_fin.numel(),), generator=gen)
        t_b = class_masses(c_pre[i], n_classes, self_normalised_weights(beta * r_pre[i]))
        reps.append(total_variation(class_masses(c_fin[j], n_classes), t_b))
    lo, hi = (None, None)
    if reps:
        q = torch.tensor(reps, dtype=torch.float64)
        lo = float(torch.quantile(q, (1 - level) / 2))
        hi = float(torch.quantile(q, 1 - (1 - level) / 2))
    return {"tv": tv, "tv_low": lo, "tv_high": hi, "masses": masses.tolist(), "n": int(c_fin.numel())}


def weighted_energy_distance(x: torch.Tensor, y: torch.Tensor, y_log_weights: torch.Tensor | None = None) -> float:
    """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ between samples ``x`` ``[N, D]`` and a weighted sample ``y``.

    ``y`` are pretrained draws weighted by ``exp(y_log_weights)`` (self-normalised; equal weights when None):
    the target π. Within-sample terms exclude the diagonal (U-statistics; the weighted one is normalised by
    1 − Σw², which makes it unbiased for independent draws from the weighted law in the equal-weight case).
    Zero in expectation when x ~ π; computed in float64.
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten(1)
    y = torch.as_tensor(y, dtype=torch.float64).flatten(1)
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need >= 2 samples of equal dimension on each side, got {tuple(x.shape)} and {tuple(y.shape)}")
    w = (torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64) if y_log_weights is None
         else self_normalised_weights(y_log_weights))
    if w.numel() != y.shape[0]:
        raise ValueError(f"{w.numel()} weights for {y.shape[0]} samples")
    n = x.shape[0]
    cross = (torch.cdist(x, y) @ w).mean()
    within_x = torch.cdist(x, x).sum() / (n * (n - 1))
    d_yy = torch.cdist(y, y)
    within_y = (w @ d_yy @ w) / (1.0 - float((w**2).sum()))
    return float(2 * cross - within_x - within_y)


# -- on a pipeline ------------------------------------------------------------------------------------------


@dataclass
class Draws:
    """Samples of one sampler for one prompt: classifier classes ``[M]``, rewards ``[M]``, features ``[M, D]``."""

    classes: torch.Tensor
    rewards: torch.Tensor
    features: torch.Tensor

    def as_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.classes": self.classes, f"{prefix}.rewards": self.rewards, f"{prefix}.features": self.features}


@torch.no_grad()
def draw(
    backbone, prompt: str, n: int, reward, classifier, *, reference: bool, seed: int, batch_size: int = 256,
    eta: float = 1.0,
) -> Draws:
    """``n`` images of ``prompt`` from the fine-tuned (``reference=False``) or pretrained sampler, scored.

    ``classifier`` maps images ``[N, 3, H, W]`` to logits ``[N, C]`` and has ``features(images)`` (the digits
    world's :class:`~gfnalign.backbones.digits.DigitClassifier`).
    """
    from gfnalign.evaluation.evaluate import sample_images

    classes, rewards, feats = [], [], []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        s = sample_images(backbone, [prompt], k, reference=reference, seed=seed * 7_919 + start, batch_size=k, eta=eta)
        classes.append(classifier(s.images).argmax(-1).cpu())
        feats.append(classifier.features(s.images).double().cpu())
        rewards.append(torch.as_tensor(reward(s.images, s.prompts)).detach().double().reshape(-1).cpu())
    return Draws(torch.cat(classes), torch.cat(rewards), torch.cat(feats))


def compare(target: Draws, sample: Draws, beta: float, n_classes: int, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every number of the image-world benchmark for one sampler against the importance-weighted target."""
    tgt = tilt_target(target.classes, target.rewards, beta, n_classes)
    tv = class_mass_tv(target.classes, target.rewards, beta, sample.classes, n_classes, n_boot=n_boot, seed=seed)
    n_ed = min(2000, target.features.shape[0])  # the O(M^2) within-target term on a subsample
    ed = weighted_energy_distance(sample.features[:n_ed], target.features[:n_ed], beta * target.rewards[:n_ed])
    ed_pretrained = weighted_energy_distance(target.features[n_ed : 2 * n_ed], target.features[:n_ed],
                                             beta * target.rewards[:n_ed]) if target.features.shape[0] >= 2 * n_ed else None
    return {
        "class_mass_tv": tv["tv"], "class_mass_tv_interval": [tv["tv_low"], tv["tv_high"]],
        "class_masses": tv["masses"], "reward_mean": float(sample.rewards.mean()),
        "target_reward_mean": tgt.reward_mean, "diversity": _diversity(sample.features),
        "weighted_energy_distance": ed, "pretrained_weighted_energy_distance": ed_pretrained, "n": tv["n"],
        "prior_drift": _prior_drift(sample.features, target.features),
    }


def _prior_drift(features: torch.Tensor, pretrained_features: torch.Tensor) -> float:
    from gfnalign.evaluation.metrics import feature_frechet

    return feature_frechet(features, pretrained_features)


def _diversity(features: torch.Tensor) -> float:
    from gfnalign.evaluation.metrics import mean_pairwise_distance

    return float(mean_pairwise_distance(features[:1000].float(), metric="l2"))


def measure_tilt(
    backbone, prompts: list[str], reward, beta: float, classifier, *, target_samples: int = 4000,
    samples: int = 1000, seed: int = 0, eta: float = 1.0, n_classes: int = 10, n_boot: int = 1000,
) -> dict:
    """The image-world benchmark for one fine-tuned backbone (adapters on) and its pretrained self (off).

    Per prompt: ``target_samples`` pretrained draws give the target (see :func:`tilt_target`), ``samples``
    fine-tuned and ``samples`` independent pretrained draws are compared with it (:func:`compare`).
    Returns ``{"per_prompt": {prompt: {"target", "finetuned", "pretrained"}}, "mean": {...}}``, where ``mean``
    averages the fine-tuned and pretrained class-mass TV and reward over prompts.
    """
    if target_samples < 2 or samples < 2:
        raise ValueError(f"target_samples={target_samples} and samples={samples} must both be >= 2")
    per: dict[str, dict] = {}
    for i, prompt in enumerate(prompts):
        kw = {"eta": eta}
        tgt = draw(backbone, prompt, target_samples, reward, classifier, reference=True, seed=seed * 1000 + 3 * i, **kw)
        pre = draw(backbone, prompt, samples, reward, classifier, reference=True, seed=seed * 1000 + 3 * i + 1, **kw)
        fin = draw(backbone, prompt, samples, reward, classifier, reference=False, seed=seed * 1000 + 3 * i + 2, **kw)
        per[prompt] = {
            "target": tilt_target(tgt.classes, tgt.rewards, beta, n_classes).as_dict(),
            "finetuned": compare(tgt, fin, beta, n_classes, n_boot=n_boot, seed=seed),
            "pretrained": compare(tgt, pre, beta, n_classes, n_boot=n_boot, seed=seed),
        }
    mean = {
        key: sum(v[who][field] for v in per.values()) / len(per)
        for key, who, field in [
            ("finetuned_tv", "finetuned", "class_mass_tv"), ("pretrained_tv", "pretrained", "class_mass_tv"),
            ("finetuned_reward", "finetuned", "reward_mean"), ("pretrained_reward", "pretrained", "reward_mean"),
            ("target_reward", "target", "reward_mean"),
        ]
    }
    return {"beta": float(beta), "target_samples": int(target_samples), "samples": int(samples),
            "per_prompt": per, "mean": mean}


def plot_class_masses(result: dict, path) -> None:
    """Bar chart per prompt: the pretrained, target and fine-tuned class masses (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_prompt"]
    fig, axes = plt.subplots(1, len(per), figsize=(6 * len(per), 3.0), squeeze=False)
    for ax, (prompt, r) in zip(axes[0], per.items()):
        series = [("pretrained", r["target"]["pretrained_masses"]), ("target", r["target"]["masses"]),
                  ("fine-tuned", r["finetuned"]["class_masses"])]
        n = len(series[0][1])
        width = 0.8 / len(series)
        for k, (label, masses) in enumerate(series):
            ax.bar([c + k * width for c in range(n)], masses, width, label=label)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(n)], [str(c) for c in range(n)])
        ax.set_title(f"{prompt!r}: TV to target {r['finetuned']['class_mass_tv']:.3f} "
                     f"(pretrained {r['pretrained']['class_mass_tv']:.3f})", fontsize=9)
        ax.set_xlabel("class (classifier argmax)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(result: dict, image: str | None = None) -> str:
    """A report.md section: the target's ESS and standard error, then TV and reward per prompt."""
    lines = [f"## What it samples: class masses against the tilted target (β = {result['beta']:g})", "",
             "Target p_pretrained·exp(β·r) from the pretrained sampler's own draws, self-normalised by exp(β·r) "
             f"({result['target_samples']} draws per prompt; {result['samples']} draws per sampler).", "",
             "| prompt | target ESS | max s.e. | TV fine-tuned (95% CI) | TV pretrained | reward fine-tuned / pretrained / target |",
             "|---|---|---|---|---|---|"]
    for prompt, r in result["per_prompt"].items():
        t, f, p = r["target"], r["finetuned"], r["pretrained"]
        lo, hi = f["class_mass_tv_interval"]
        lines.append(f"| {prompt} | {t['ess']:.0f} | {t['max_standard_error']:.3f} | {f['class_mass_tv']:.3f} "
                     f"({lo:.3f}–{hi:.3f}) | {p['class_mass_tv']:.3f} | {f['reward_mean']:.3f} / "
                     f"{p['reward_mean']:.3f} / {t['reward_mean']:.3f} |")
    if image:
        lines += ["", f"![class masses: pretrained, target, fine-tuned]({image})"]
    return "\n".join(lines) + "\n"
