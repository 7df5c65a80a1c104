"""What rtb's memory/variance options cost: activation memory kept for backward and seconds per loss+backward.

    python benchmarks/rtb_memory.py [--trajectories 4] [--steps 20] [--repeats 2]

On the shipped digits world (UNet + LoRA, 20 steps) one batch of whole trajectories is rolled out, then the rtb
loss and its backward are run for each ``grad_fraction`` × ``detached_log_pf``. "saved MB" is the total size of
the tensors autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``; on a GPU this is the
activation memory the options trade), exact and independent of the machine's load; seconds are wall time on
this (shared) machine. "grad rows" is how many transitions carry the graph.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gfnalign.objectives import build_objective
    from gfnalign.sampling import rollout
    from gfnalign.training.build import build_backbone
    from gfnalign.training.config import TrainConfig

    cfg = TrainConfig.from_dict({"backbone": {"kind": "digits"}, "reward": "ink", "prompts": "digits",
                                 "method": {"name": "rtb"}, "sampling": {"num_steps": args.steps}})
    torch.manual_seed(0)
    backbone = build_backbone(cfg, torch.device("cpu"))
    texts = ["a handwritten digit seven"] * args.trajectories
    cond = backbone.encode_prompts(texts)
    gen = torch.Generator().manual_seed(0)
    traj = rollout(backbone, cond, backbone.initial_noise(len(texts), gen), generator=gen)
    traj = replace(traj, reward=torch.zeros(len(texts)))
    rows = []
    for fraction in (1.0, 0.5, 0.1):
        for detached in ("recompute", "recorded"):
            if fraction == 1.0 and detached == "recorded":
                continue  # nothing is detached
            obj = build_objective("rtb", grad_fraction=fraction, detached_log_pf=detached)
            batch = obj.select_transitions(traj, torch.Generator().manual_seed(1))
            grad_rows = len(batch) if batch.grad_mask is None else int(batch.grad_mask.sum())
            saved, secs = [], []
            for _ in range(args.repeats):
                total = [0]

                def pack(t: torch.Tensor, total=total) -> torch.Tensor:
                    total[0] += t.numel() * t.element_size()
                    return t

                backbone.zero_grad(set_to_none=True) if hasattr(backbone, "zero_grad") else None
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = obj(batch, backbone, None, beta=1.0)
                out.loss.backward()
                secs.append(time.perf_counter() - start)
                saved.append(total[0] / 2**20)
            rows.append((fraction, detached, grad_rows, len(batch), statistics.median(saved), statistics.median(secs)))
    print(f"rtb on the digits world: {args.trajectories} trajectories x {args.steps} steps, CPU, 1 thread")
    print("| grad_fraction | detached_log_pf | grad rows / rows | saved for backward (MB) | seconds (loss + backward) |")
    print("|---|---|---|---|---|")
    for f, d, g, n, mb, s in rows:
        print(f"| {f} | {d if f < 1 else '-'} | {g} / {n} | {mb:.1f} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
