"""Sample grids with captions, the reward-curve plot, a diversity number and ``report.md``.

Diversity is the mean pairwise Euclidean distance between feature vectors of images that share a prompt,
averaged over prompts. Features come from ``feature_fn`` when one is given (the digits classifier's
penultimate layer in the digits world), else from 16x16 grey-scale pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] floats in [0,1] -> [N,H,W,3] uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, captions: list[str], path: Path, *, cols: int | None = None,
              cell: int = 96) -> Path:
    """A PNG grid; every image is upscaled (nearest) to ``cell`` px with its caption underneath."""
    from PIL import Image, ImageDraw, ImageFont

    arr = to_uint8(images)
    n = len(arr)
    cols = cols or min(n, 8)
    rows = max(1, math.ceil(n / cols))
    cap_h = 26
    grid = Image.new("RGB", (cols * cell, rows * (cell + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, cols)
        img = Image.fromarray(arr[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(img, (c * cell, r * (cell + cap_h)))
        lines = _wrap(captions[i] if i < len(captions) else "", 16)[:2]
        for j, line in enumerate(lines):
            draw.text((c * cell + 2, r * (cell + cap_h) + cell + 1 + 12 * j), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    grey = images.detach().float().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, 16).flatten(1)


def diversity(images: torch.Tensor, prompts: list[str], feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> float:
    """Mean pairwise feature distance within each prompt, averaged over prompts with >= 2 images."""
    with torch.no_grad():
        feats = (feature_fn or pixel_features)(images).detach().float().flatten(1).cpu()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    values = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        d = torch.cdist(feats[idx], feats[idx])
        m = len(idx)
        values.append(float(d.sum() / (m * (m - 1))))
    return float(np.mean(values)) if values else float("nan")


def plot_reward_curve(metrics_path: Path, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = read_metrics(metrics_path)
    rows = [r for r in rows if "reward/mean" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    mean = np.array([r["reward/mean"] for r in rows])
    std = np.array([r.get("reward/std", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, mean, alpha=0.5, lw=1, label="reward per epoch (sampled, training prompts)")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.12)
    w = max(1, len(mean) // 10)
    if w > 1:
        smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=2, label=f"moving average ({w} updates)")
    ax.set_xlabel("optimiser update")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_report(run_dir: Path, *, config: Any, before: dict[str, Any] | None, after: dict[str, Any] | None,
                 wall_s: float | None, counters: dict[str, Any]) -> Path:
    """``report.md`` with the reward curve, before/after grids and numbers."""
    run_dir = Path(run_dir)
    curve = plot_reward_curve(run_dir / "metrics.jsonl", run_dir / "reward_curve.png")
    rows = read_metrics(run_dir / "metrics.jsonl")
    lines = [f"# gfnalign run report: {config.run_name}", ""]
    lines += [
        f"- method: `{config.method.name}` (options: `{json.dumps(config.method.options)}`)",
        f"- backbone: `{config.backbone.kind}` {config.backbone.path or ''}",
        f"- reward: `{config.reward}`, prompts: `{config.prompts}`, beta: {config.beta.value} ({config.beta.schedule})",
        f"- epochs: {config.training.epochs}, trajectories per epoch and process: "
        f"{config.sampling.batch_size * config.sampling.batches_per_epoch}, steps: {config.sampling.num_steps}, "
        f"guidance: {config.sampling.guidance_scale}, lookahead: {config.lookahead.mode}/{config.lookahead.model}",
        f"- optimiser updates: {rows[-1]['step'] if rows else 0}" + (f", wall time: {wall_s:.0f} s" if wall_s else ""),
        f"- skipped: {json.dumps(counters)}",
        "",
        "## Before and after (same prompts and seeds)",
        "",
        "| | reward mean | reward std | diversity (within-prompt feature distance) |",
        "|---|---|---|---|",
    ]
    for name, ev in (("pretrained (before)", before), ("fine-tuned (after)", after)):
        if ev:
            lines.append(f"| {name} | {_fmt(ev['reward_mean'])} | {_fmt(ev['reward_std'])} | {_fmt(ev['diversity'])} |")
    if before and after:
        dr = after["reward_mean"] - before["reward_mean"]
        dd = (after["diversity"] / before["diversity"]) if before["diversity"] else float("nan")
        lines += ["", f"Reward change: {dr:+.4g}; diversity kept: {100 * dd:.0f}% of the pretrained model's "
                  f"(features: {after.get('features', 'pixels')}, {after.get('n', '?')} images per model)."]
        if "accuracy" in after and "accuracy" in before:
            lines += [f"Digit classifier accuracy (p(prompted digit) > 0.5): {100 * before['accuracy']:.1f}% -> "
                      f"{100 * after['accuracy']:.1f}%."]
        if after.get("prior_drift") is not None:
            lines += [f"Prior drift (per-prompt Fréchet distance of the features, fine-tuned vs pretrained, same "
                      f"seeds): {after['prior_drift']:.4g}."]
        pb, pa = before.get("reward_per_prompt") or {}, after.get("reward_per_prompt") or {}
        if pb and pa:
            lines += ["", "| prompt | reward before | reward after |", "|---|---|---|"]
            lines += [f"| {p} | {_fmt(pb.get(p))} | {_fmt(pa.get(p))} |" for p in pa]
    lines.append("")
    if curve:
        lines += ["## Reward during training", "", "![reward curve](reward_curve.png)", ""]
    for name, ev in (("Before", before), ("After", after)):
        if ev and ev.get("grid"):
            lines += [f"### {name}", "", f"![{name.lower()}]({ev['grid']})", ""]
    if rows:
        keys = [k for k in rows[-1] if k.startswith(("loss/", "reward/"))]
        lines += ["## Last update", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(rows[-1][k])} |" for k in keys]
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
