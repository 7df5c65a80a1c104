"""Worker for the engine equivalence test: N optimiser updates on a fixed, shared set of transitions.

    python -m tests.e2e._engine_worker PIPELINE OUT.pt --rows all|half0     (one process)
    torchrun --nproc_per_node 2 -m tests.e2e._engine_worker PIPELINE OUT.pt --rows rank    (DDP, gloo)
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m tests.e2e._engine_worker ...

Every process samples the *same* 2B trajectories (a generator that does not depend on the rank, replicated
initial weights) and selects the same transitions. ``--rows all`` trains on all of them, ``--rows rank``
trains rank r on the r-th half, ``--rows half0`` on the first half only (what a rank would reach if the
engine did not average gradients). Updates: one with a single micro-batch, then two of two micro-batches
each (gradient accumulation; the single process's k-th micro-batch is the two ranks' k-th micro-batches
together). Rank 0 saves the trainable tensors (policy and heads) and the engine's class name.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import Trainer, derive_seed, seed_everything
from tests.integration._train_utils import tiny_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("out")
    ap.add_argument("--rows", choices=("all", "rank", "half0"), required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(tiny_config(
        Path(args.pipeline), "dag-db", {"flow_gradient": "target"},
        sampling={"num_steps": 4, "guidance_scale": 1.0, "batch_size": 4, "batches_per_epoch": 1},
        training={"epochs": 1, "micro_batch": 8, "grad_accum": 1, "lr": 3e-3, "lr_heads": 3e-3},
    ))
    trainer = Trainer(cfg, Path(args.out).with_suffix(".run"))
    trainer.setup()

    # the same trajectories and transitions on every process
    seed_everything(derive_seed("engine-test"))
    gen = torch.Generator().manual_seed(7)
    texts = [trainer.all_prompts[i % len(trainer.all_prompts)] for i in range(cfg.sampling.batch_size)]
    ids = torch.arange(len(texts))
    traj, images = trainer._rollout(texts, ids, ids, gen, progress=False)
    traj = replace(traj, reward=trainer._score(images, texts))
    trainer.lookahead.set_prompts(traj.cond, texts)
    traj = trainer.objective.prepare(trainer._in_engine(lambda: trainer.lookahead.cache_trajectory(traj)))
    batch = trainer.objective.select_transitions(traj, torch.Generator().manual_seed(11))
    n = len(batch) - len(batch) % 4
    quarters = [batch.index(torch.arange(q * n // 4, (q + 1) * n // 4)) for q in range(4)]

    def rows(parts: list[int]):
        from gfnalign.core.batches import TransitionBatch

        picked = [quarters[q] for q in parts]
        if len(picked) == 1:
            return picked[0]
        fields = {}
        for name in TransitionBatch.__dataclass_fields__:
            values = [getattr(p, name) for p in picked]
            fields[name] = None if values[0] is None else (
                torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v])
        return TransitionBatch(**fields)

    # quarters 0,1 = rank 0's half; 2,3 = rank 1's half
    if args.rows == "all":
        whole, micro = rows([0, 1, 2, 3]), [rows([0, 2]), rows([1, 3])]
    else:
        r = trainer.rank if args.rows == "rank" else 0
        whole, micro = rows([2 * r, 2 * r + 1]), [rows([2 * r]), rows([2 * r + 1])]
    metrics = [trainer._update([whole], beta=1.0), trainer._update(micro, beta=1.0), trainer._update(micro, beta=1.0)]
    if any(m["train/skipped"] for m in metrics):
        print(f"an update was skipped: {metrics}", file=sys.stderr)
        return 1
    with trainer._gathered():  # whole weights under a sharding engine (FSDP, ZeRO-3); every rank enters
        state = {f"policy.{k}": v for k, v in trainer.backbone.trainable_state_dict().items()}
        state.update({f"objective.{k}": v.detach().cpu().clone() for k, v in trainer.objective.state_dict().items()})
    if trainer.is_main:
        torch.save({"state": state, "engine": type(trainer.model).__name__, "world": trainer.world,
                    "transitions": n}, args.out)
    trainer._barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
