"""The trainer: sample -> reward -> prepare -> select transitions -> micro-batches -> update, per epoch.

One epoch (DESIGN.md §9)::

    beta = schedule(epoch)
    reseed torch/python/numpy from (seed, rank, epoch)          # per-rank seeds differ
    for each of `batches_per_epoch` batches: draw prompts (whole groups of `images_per_prompt` per epoch),
        encode, rollout (no grad), decode, reward
    traj = objective.prepare(traj, collective); shuffle; batch = objective.select_transitions(traj, generator)
    lookahead: cached and "reward" in objective.lookahead_reads -> r(x0_hat) of the selected states, once each
    any NaN/inf reward or RewardOutputError on any rank -> the epoch's updates are skipped and counted
    for each update: for each of `grad_accum` micro-batches (all but the last under accelerator.no_sync):
        loss = engine(lambda: objective(mb, policy, lookahead, beta)); accelerator.backward(loss / n_micro)
        clip each parameter group separately, AdamW step

The trainer never branches on the objective type. The policy's trainable network and the objective's heads
are handed to accelerate's engine (DDP, FSDP or DeepSpeed, chosen by the launcher) inside one
:class:`~gfnalign.training.engine.TrainStep`, so the engine reduces (and, for FSDP/ZeRO, shards) the
gradients while the objective calls the policy however it likes; see ``engine.py`` for what each engine needs.

Exact resume. Every epoch reseeds all RNGs from (seed, rank, epoch) and draws its noise from explicit
generators, so a checkpoint at an epoch boundary needs only weights, optimiser, step and counters; a
mid-epoch checkpoint (SIGINT/SIGTERM) also stores the epoch's selected transitions, the position and the
RNG states, so `--resume latest` continues bit-exactly on a single CPU process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.objectives.base import Collective
from gfnalign.rewards.base import RewardOutputError
from gfnalign.training import checkpoint as ckpt
from gfnalign.training.build import Components, build_components
from gfnalign.training.config import DIGITS_KINDS, TrainConfig
from gfnalign.training.engine import (
    TrainStep,
    engine_traits,
    gathered_parameters,
    group_grad_norms,
    make_accelerator,
)
from gfnalign.training.lookahead import Counters, CountingPolicy, RewardLookahead
from gfnalign.training.memory import MemoryBudget, parts, resident_modules, update_need, update_rows
from gfnalign.training.reward_guard import GuardedReward, RewardUnavailableError
from gfnalign.training.tracking import NullTracker, open_tracker


class NanLossError(RuntimeError):
    """Too many non-finite losses in a row; the last checkpoint is left intact."""


class BadRewardError(RuntimeError):
    """A reward was NaN/inf or malformed and ``reliability.on_bad_reward: stop``."""


class TrainingFailedError(RuntimeError):
    """The run trained nothing, or skipped more epochs than ``reliability.max_skipped_epoch_fraction``
    allows; nothing is exported as a result (the last checkpoint is kept for a resume)."""


def derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def beta_at(cfg: TrainConfig, epoch: int) -> float:
    """Inverse temperature for ``epoch`` (0-based). ``linear`` is DAG's: beta * min(1, e / (f * E))."""
    b = cfg.beta
    if b.schedule == "constant":
        return float(b.value)
    ramp = b.warmup_fraction * cfg.training.epochs
    return float(b.value) * min(1.0, epoch / ramp) if ramp > 0 else float(b.value)


def prompt_list(prompt_set: Any) -> list[str]:
    for attr in ("prompts", "texts"):
        value = getattr(prompt_set, attr, None)
        if value is not None and not callable(value):
            return [str(p) for p in value]
    return [str(p) for p in list(prompt_set)]


def draw_prompts(prompt_set: Any, all_prompts: list[str], n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts from the set (``prompt_set.sample`` when it exists) and their indices ``[n]``."""
    drawn = prompt_set.sample(n, generator) if hasattr(prompt_set, "sample") else None
    if drawn is None:
        idx = torch.randint(len(all_prompts), (n,), generator=generator)
        return [all_prompts[i] for i in idx.tolist()], idx
    if isinstance(drawn, torch.Tensor):
        drawn = drawn.tolist()
    if isinstance(drawn, tuple) and len(drawn) == 2 and isinstance(drawn[0], list | tuple):
        texts, ids = drawn
        return [str(p) for p in texts], torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
    drawn = list(drawn)
    if drawn and isinstance(drawn[0], int):
        return [all_prompts[i] for i in drawn], torch.tensor(drawn, dtype=torch.int64)
    lookup = {p: i for i, p in enumerate(all_prompts)}
    return [str(p) for p in drawn], torch.tensor([lookup.get(str(p), -1) for p in drawn], dtype=torch.int64)


def cat_trajectories(parts: list[TrajectoryBatch]) -> TrajectoryBatch:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for f in fields(TrajectoryBatch):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "steps" or isinstance(values[0], str):  # per-batch metadata (e.g. the log-prob reduction)
            out[f.name] = values[0]
        elif any(v is None for v in values):
            out[f.name] = None
        elif isinstance(values[0], torch.Tensor):
            out[f.name] = torch.cat(values, dim=0)
        else:
            out[f.name] = [x for v in values for x in v]
    return TrajectoryBatch(**out)


def _batch_to_dict(batch: TransitionBatch) -> dict[str, Any]:
    return {f.name: getattr(batch, f.name) for f in fields(TransitionBatch)}


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:
        return float("nan")


class Trainer:
    """Runs one training job into ``run_dir`` (see DESIGN.md §9 for the layout)."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        components: Components | Callable[[TrainConfig, Any], Components] | None = None,
        resume: str | None = None,
        stop_after_updates: int | None = None,
        accelerator: Any = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._components = components
        self.resume = resume
        self.stop_after_updates = stop_after_updates
        self._accelerator = accelerator
        self._stop_signal: int | None = None
        self.step = 0
        self.epoch = 0
        self.counts = {"skipped_reward_epochs": 0, "skipped_updates": 0, "nan_streak": 0}
        self._resume_epoch_state: dict[str, Any] | None = None
        self.tracker: NullTracker = NullTracker()

    # ---------------------------------------------------------------------------------------------
    # set-up
    # ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if self._accelerator is None:
            self._accelerator = make_accelerator(cfg.training)
        acc = self.accelerator = self._accelerator
        self.engine = engine_traits(acc)
        self.device = acc.device
        self.rank = acc.process_index
        self.world = acc.num_processes
        self.is_main = acc.is_main_process
        # what objectives see of the other processes for epoch statistics (DDPO's reward normalisation)
        self.collective = Collective(rank=self.rank, world=self.world, gather=self._gather)

        resume_from = ckpt.resolve_resume(self.run_dir, self.resume) if self.resume else None
        if self.resume and resume_from is None and self.is_main:
            print(f"[gfnalign] --resume {self.resume}: no complete checkpoint under {self.run_dir / 'checkpoints'} "
                  "yet; starting fresh", file=sys.stderr)
        self.resume = self.resume if resume_from is not None else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            ckpt.remove_stale(self.run_dir / "checkpoints")  # a kill mid-write leaves a half checkpoint
            if not self.resume:  # a fresh run: drop leftovers of an earlier attempt that never checkpointed
                for name in ("metrics.jsonl", "eval_before.json", "eval_after.json", "report.md"):
                    (self.run_dir / name).unlink(missing_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        self._barrier()

        seed_everything(derive_seed(cfg.seed, "init"))  # identical model / head init on every rank
        comps = self._components or build_components
        if callable(comps):  # a factory (cfg, device) -> Components, called after seeding
            comps = comps(cfg, self.device)
        self.backbone, self.prompt_set, self.objective = comps.backbone, comps.prompts, comps.objective
        rel = cfg.reliability  # a crashing / hanging reward is a bad reward; an unreachable one is waited for
        self.reward = GuardedReward(comps.reward, timeout_s=rel.reward_timeout_s, wait_s=rel.reward_wait_s)
        self.all_prompts = prompt_list(self.prompt_set)
        self.objective.to(self.device)
        self.objective.train()
        if cfg.sampling.start == "tilted" and not getattr(self.objective, "learns_start_value", False):
            raise ValueError(f"sampling.start=tilted needs an objective that learns a value at the start state "
                             f"(dag-db / dag-kl, rtb with log_z: start); method {cfg.method.name!r} with options "
                             f"{cfg.method.options} learns none: use sampling.start: noise")
        self._beta = beta_at(cfg, self.epoch)
        self.counters = Counters()
        self.policy = CountingPolicy(self.backbone, self.counters)
        self.memory = MemoryBudget(cfg.memory.budget_gb, self.device)
        self._update_part_rows: int | None = None  # transitions per backward, from the budget at the first update
        self.lookahead = RewardLookahead(self.backbone, self.reward, model=cfg.lookahead.model,
                                         guided=cfg.lookahead.guided, counters=self.counters, memory=self.memory,
                                         auto_checkpointing=cfg.memory.auto_checkpointing)
        self.lookahead.enable_checkpointing(decoder=cfg.memory.checkpoint_decoder, reward=cfg.memory.checkpoint_reward)

        self.policy_params = [p for p in self.backbone.trainable_parameters() if p.requires_grad]
        seen = {id(p) for p in self.policy_params}
        self.head_params = []
        for module in self.objective.trainable_modules().values():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.head_params.append(p)
        if not self.policy_params and not self.head_params:
            raise ValueError("nothing to train: the backbone has no trainable parameters and the objective no heads; "
                             "set backbone.lora_rank > 0 or backbone.full_finetune: true")
        self._broadcast_objective_state()
        t = cfg.training
        groups = []
        if self.policy_params:
            groups.append({"params": self.policy_params, "lr": t.lr, "weight_decay": t.weight_decay, "name": "policy"})
        if self.head_params:
            groups.append({"params": self.head_params, "lr": t.lr_heads, "weight_decay": t.weight_decay_heads,
                           "name": "heads"})
        optimizer = torch.optim.AdamW(groups, betas=tuple(t.adam_betas), eps=t.adam_eps)
        # One engine module for the policy's trainable network and the heads (engine.py says why); the engine
        # replicates (DDP, from rank 0) or shards (FSDP, ZeRO) it, the optimiser follows.
        heads = {name: m for name, m in self.objective.trainable_modules().items()
                 if any(p.requires_grad for p in m.parameters())}
        self.model, self.optimizer = acc.prepare(TrainStep(self.backbone.trainable_module(), heads), optimizer)

        self.tb = None
        if self.is_main and cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:
                self.tb = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self.tracker = open_tracker(cfg, self.run_dir, is_main=self.is_main)  # no-op unless logging.wandb is set

    # ---------------------------------------------------------------------------------------------
    # distributed helpers (no-ops on one process)
    # ---------------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _all_max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def _all_min(self, value: float) -> float:
        return -self._all_max(-value)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return x
        x = x.to(self.device).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts)

    def _broadcast_objective_state(self) -> None:
        """Rank 0's untrained objective state (e.g. DAG-DB's target flow network) to every rank, before the
        engine takes the trainable modules (which it synchronises itself)."""
        if not self.distributed:
            return
        for tensor in self.objective.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    def _in_engine(self, fn: Any) -> Any:
        """Run a network-calling ``fn`` where the weights are whole: inside the engine's forward when it shards
        them (FSDP, ZeRO-3; every rank must call), directly otherwise."""
        return self.model(fn) if self.engine.shards_parameters else fn()

    def _gathered(self) -> Any:
        return gathered_parameters(self.accelerator, self.model, self.engine)

    # ---------------------------------------------------------------------------------------------
    # signals
    # ---------------------------------------------------------------------------------------------
    def _install_signals(self) -> dict[int, Any]:
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second signal: give up at once
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                print(f"\n[gfnalign] got signal {signum}: finishing the current update, then saving a checkpoint",
                      file=sys.stderr, flush=True)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    # ---------------------------------------------------------------------------------------------
    # sampling
    # ---------------------------------------------------------------------------------------------
    def _generator(self, *parts: Any) -> torch.Generator:
        dev = self.device if self.device.type == "cuda" else "cpu"
        return torch.Generator(device=dev).manual_seed(derive_seed(self.cfg.seed, *parts))

    @torch.no_grad()
    def _tilted_start(self, texts: list[str], cond: Any, gen: torch.Generator) -> torch.Tensor:
        """Start states ∝ N(0, I)·G(x_start): ``start_candidates`` noises per prompt, resampled by the objective's
        learned start value (gfnalign.sampling.start)."""
        from gfnalign.sampling.start import resample_start

        M = self.cfg.sampling.start_candidates
        cand = self.backbone.initial_noise(len(texts) * M, gen)
        cond_rep = cond.repeat_interleave(M, dim=0) if isinstance(cond, torch.Tensor) else cond
        self.lookahead.set_prompts(cond, list(texts))
        with self.accelerator.autocast():
            log_w = self.objective.log_start_weight(self.policy, self.lookahead, cand, cond_rep, beta=self._beta)
        if log_w is None:  # setup() checked learns_start_value
            raise RuntimeError(f"{self.cfg.method.name}: log_start_weight returned None")
        return resample_start(cand, log_w.float(), M, gen)

    @torch.no_grad()
    def _rollout(self, texts: list[str], prompt_ids: torch.Tensor, traj_ids: torch.Tensor,
                 gen: torch.Generator, *, progress: bool) -> tuple[TrajectoryBatch, torch.Tensor]:
        from gfnalign.sampling import rollout

        cond = self.backbone.encode_prompts(texts)
        def sample() -> tuple[TrajectoryBatch, torch.Tensor]:
            if self.cfg.sampling.start == "tilted" and not getattr(self, "_pretrained_eval", False):
                x_init = self._tilted_start(texts, cond, gen)
            else:
                x_init = self.backbone.initial_noise(len(texts), gen)
            with self.accelerator.autocast():
                traj = rollout(self.policy, cond, x_init, eta=self.cfg.sampling.eta,
                               reduction=self.cfg.sampling.log_prob_reduction, generator=gen,
                               show_progress=progress, prompt_id=prompt_ids.to(x_init.device),
                               traj_id=traj_ids.to(x_init.device), prompts=list(texts))
                return traj, self.lookahead.decode_chunked(traj.final, cond)

        traj, images = self._in_engine(sample)
        self.counters.decode += len(texts)
        return traj, images.float()

    def _score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor | None:
        """Rewards ``[N]`` float32, or None when the reward failed or returned NaN/inf/wrong shape."""
        try:
            r = self.reward(images, texts)
        except Exception as err:  # RewardOutputError and friends: counted, never trained on
            name = type(err).__name__
            if name == "RewardOutputError" or isinstance(err, ValueError | FloatingPointError):
                self._last_reward_error = f"{name}: {err}"
                return None
            raise
        self.counters.reward += len(texts)
        r = torch.as_tensor(r).detach().float().reshape(-1)
        if r.shape != (len(texts),) or not _finite(r):
            self._last_reward_error = f"reward returned shape {tuple(r.shape)} with non-finite values" \
                if r.shape == (len(texts),) else f"reward returned shape {tuple(r.shape)}, expected [{len(texts)}]"
            return None
        return r

    def sample_epoch(self, epoch: int) -> tuple[TrajectoryBatch | None, dict[str, float]]:
        """All trajectories of this epoch on this rank, scored; None when a reward was bad."""
        s = self.cfg.sampling
        gen = self._generator("sample", self.rank, epoch)
        prompt_gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "prompts", self.rank, epoch))
        parts = []
        self.counters.reset()
        t0 = time.perf_counter()
        groups = None
        if s.images_per_prompt > 1:  # whole groups of one prompt in the epoch, cut into sampling batches
            g_texts, g_ids = draw_prompts(self.prompt_set, self.all_prompts,
                                          s.batch_size * s.batches_per_epoch // s.images_per_prompt, prompt_gen)
            groups = ([t for t in g_texts for _ in range(s.images_per_prompt)],
                      g_ids.repeat_interleave(s.images_per_prompt))
        for b in range(s.batches_per_epoch):
            if groups is None:
                texts, ids = draw_prompts(self.prompt_set, self.all_prompts, s.batch_size, prompt_gen)
            else:
                cut = slice(b * s.batch_size, (b + 1) * s.batch_size)
                texts, ids = groups[0][cut], groups[1][cut]
            base = (self.rank * s.batches_per_epoch + b) * s.batch_size
            traj_ids = torch.arange(base, base + s.batch_size, dtype=torch.int64)
            traj, images = self._rollout(texts, ids, traj_ids, gen, progress=False)  # the run's one bar
            r = self._score(images, texts)
            if r is None:
                return None, {"perf/sample_s": time.perf_counter() - t0}
            traj = replace(traj, reward=r.to(traj.states.device))
            parts.append(traj)
        return cat_trajectories(parts), {"perf/sample_s": time.perf_counter() - t0}

    def cache_lookahead(self, traj: TrajectoryBatch, batch: TransitionBatch) -> TransitionBatch | None:
        """``lookahead: cached``: r(x0_hat) of the selected transitions' states, only when the objective reads
        it (``objective.lookahead_reads``); None when the reward failed there (the epoch is skipped)."""
        if self.cfg.lookahead.mode != "cached" or "reward" not in self.objective.lookahead_reads:
            return batch
        try:
            batch = self._in_engine(lambda: self.lookahead.cache_transitions(traj, batch))
        except Exception as err:
            if type(err).__name__ == "RewardOutputError" or isinstance(err, ValueError):
                self._last_reward_error = f"{type(err).__name__} in the cached lookahead: {err}"
                return None
            raise
        if not (_finite(batch.lookahead_reward_t) and _finite(batch.lookahead_reward_next)):
            self._last_reward_error = "the cached lookahead reward r(x0_hat) is NaN/inf"
            return None
        return batch

    # ---------------------------------------------------------------------------------------------
    # one optimiser update
    # ---------------------------------------------------------------------------------------------
    def _update_parts(self, micro: list[TransitionBatch], beta: float) -> list[list[TransitionBatch]]:
        """Each micro-batch cut into the parts one backward may take within the memory budget (see
        :func:`~gfnalign.training.memory.update_rows`); the cut is measured once and agreed across ranks (the
        same number of backward passes everywhere)."""
        if self._update_part_rows is None:
            mb = micro[0].to(self.device)

            def loss_of(part: TransitionBatch) -> torch.Tensor:
                with self.accelerator.autocast():
                    return self.objective(part, self.policy, self.lookahead, beta=beta).loss

            resident = resident_modules(self.backbone, self.objective, self.reward)

            def agreed_rows() -> int:  # the smallest cut over the ranks: the same number of backward passes
                rows = update_rows(self.objective, mb, loss_of, self.memory, resident, backbone=self.backbone)
                return max(1, int(-self._all_max(-float(rows))))

            self._update_part_rows = agreed_rows()
            # the smallest part still over the budget: recompute the denoiser's activations in the backward
            auto = self.cfg.memory.auto_checkpointing
            need = (update_need(self.objective, mb, loss_of, self.memory, resident, self._update_part_rows,
                                backbone=self.backbone) if auto else 0.0)
            if self._all_max(float(need > self.memory.budget_bytes)):
                enable = getattr(self.backbone, "enable_gradient_checkpointing", None)
                if enable is not None and enable():
                    self._update_part_rows = agreed_rows()  # checkpointed parts hold fewer bytes each
                    if self.is_main:
                        print(f"[gfnalign] memory: an update part needs {need / 2**30:.2f} GB of activations, over "
                              f"the budget of {self.memory.budget_bytes / 2**30:.2f} GB (memory.budget_gb); gradient "
                              "checkpointing of the denoiser is on (memory.auto_checkpointing), parts of "
                              f"{self._update_part_rows} transitions", file=sys.stderr)
        return [parts(mb, self._update_part_rows) for mb in micro]

    def _update(self, micro: list[TransitionBatch], beta: float) -> dict[str, float]:
        t0 = time.perf_counter()
        cut = self._update_parts(micro, beta)
        self.counters.reset()
        acc = self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        n_total = sum(len(mb) for mb in micro)
        # accelerator.backward divides by its gradient_accumulation_steps (DeepSpeed by its own, the same
        # number); each micro-batch's mean loss counts 1/len(micro) of the update, also for a short last update
        scale = acc.gradient_accumulation_steps / len(micro)
        bad = 0.0
        # a micro-batch's parts (the memory budget's cut) backpropagate one after another: part j of size n_j
        # weighs n_j / len(mb) of its micro-batch's mean loss, so the gradient is the uncut one
        steps = [(mb_parts[j], len(mb_parts[j]) / sum(len(p) for p in mb_parts),
                  i == len(cut) - 1 and j == len(mb_parts) - 1)
                 for i, mb_parts in enumerate(cut) for j in range(len(mb_parts))]
        for part, share, last in steps:
            part = part.to(self.device)
            acc.sync_gradients = last  # the accumulation boundary: gradients are reduced (DeepSpeed steps) here
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                try:
                    with acc.autocast():
                        out = self.model(lambda mb=part: self.objective(mb, self.policy, self.lookahead, beta=beta))
                    local_bad = 0.0 if _finite(out.loss.detach()) else 1.0
                except RewardOutputError as err:  # a bad lookahead reward: skip this update like a NaN loss
                    self._last_reward_error = str(err)
                    local_bad = 1.0
                # every rank takes the same branch: a backward on some ranks only would hang the reduction
                bad = self._all_max(local_bad)
                if bad:
                    break
                acc.backward(out.loss * (scale * share))
            w = len(part) / n_total
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
        acc.sync_gradients = True
        metrics: dict[str, float] = {}
        if not bad and not self.engine.owns_step:
            acc.unscale_gradients()  # fp16 loss scaling, if any, before the checks and the clipping
            grads_ok = all(p.grad is None or _finite(p.grad) for p in self.policy_params + self.head_params)
            bad = self._all_max(0.0 if grads_ok else 1.0)
        if bad:
            if acc.scaler is not None and not self.engine.owns_step:
                self.optimizer.step()  # the fp16 scaler skips this step itself and lowers its scale
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad()  # DeepSpeed keeps its accumulated gradients in the engine
            self.counts["skipped_updates"] += 1
            self.counts["nan_streak"] += 1
            metrics["train/skipped"] = 1.0
        else:
            if self.engine.owns_step:  # DeepSpeed clipped and stepped inside the last backward
                norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.training.clip_norm)
                if norm is not None:
                    metrics["grad_norm/all"] = float(norm)
            else:
                metrics.update(group_grad_norms({"policy": self.policy_params, "heads": self.head_params},
                                                self.cfg.training.clip_norm,
                                                sharded=self.engine.shards_parameters))
                self.optimizer.step()
            with self._gathered():
                self.objective.after_optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
            self.counts["nan_streak"] = 0
            metrics["train/skipped"] = 0.0
        metrics.update(sums)
        dt = time.perf_counter() - t0
        metrics["perf/update_s"] = dt
        metrics["perf/transitions_per_s"] = n_total * self.world / dt if dt > 0 else float("nan")
        metrics["train/transitions"] = float(n_total * self.world)
        train_unet = self.counters.unet + self.counters.unet_reference
        metrics["nfe/train_unet_per_transition"] = train_unet / max(n_total, 1)
        metrics["nfe/train_decode_per_transition"] = self.counters.decode / max(n_total, 1)
        metrics["nfe/train_reward_per_transition"] = (self.counters.reward + self.counters.reward_grad) / max(n_total, 1)
        return metrics

    # ---------------------------------------------------------------------------------------------
    # logging
    # ---------------------------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in row.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step" and math.isfinite(float(v)):
                    self.tb.add_scalar(k, v, row["step"])
        self.tracker.log_metrics(row)

    def _epoch_reward_metrics(self, traj: TrajectoryBatch) -> dict[str, float]:
        r = self._gather(traj.reward.float().to(self.device)).cpu()
        m = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
             "reward/min": float(r.min()), "reward/max": float(r.max())}
        return m

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch_state: dict[str, Any] | None = None) -> Path | None:
        root = self.run_dir / "checkpoints"
        tmp = root / f".tmp-{ckpt.STEP_PREFIX}{self.step}"
        if self.is_main:
            tmp = ckpt.begin(root, self.step)
        self._barrier()
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if epoch_state is not None:
            torch.save(epoch_state, tmp / f"epoch_rank{self.rank}.pt")
        self._barrier()
        with self._gathered():
            checksum = self._param_checksum()
        checksums = self._gather(checksum.to(self.device)).cpu().tolist()
        if self.engine.shards_state:  # every rank writes its shard of the weights and the optimiser state
            self.accelerator.save_state(str(tmp / ckpt.ENGINE_DIR))
        final = None
        if self.is_main:
            if self.engine.shards_state:  # the objective's state outside the engine (e.g. a target network)
                torch.save(self._objective_state_outside_engine(), tmp / "objective_state.pt")
            else:
                torch.save(self.backbone.trainable_state_dict(), tmp / "trainable.pt")
                torch.save(self.objective.state_dict(), tmp / "heads.pt")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            ckpt.write_json(tmp / "state.json", {
                "step": self.step, "epoch": self.epoch, "mid_epoch": epoch_state is not None,
                "counts": self.counts, "world_size": self.world, "method": self.cfg.method.name,
                "beta": beta_at(self.cfg, self.epoch), "rank_param_checksums": checksums,
                "engine": self.engine.name,
            })
            final = ckpt.commit(root, tmp, self.step, self.cfg.logging.keep_checkpoints)
        self._barrier()
        return final

    def _objective_state_outside_engine(self) -> dict[str, torch.Tensor]:
        inside = {id(p) for m in self.objective.trainable_modules().values()
                  for p in list(m.parameters()) + list(m.buffers())}
        named = dict(self.objective.named_parameters())
        named.update(dict(self.objective.named_buffers()))
        return {k: v.detach().cpu().clone() for k, v in named.items() if id(v) not in inside}

    def _param_checksum(self) -> torch.Tensor:
        """[1] float64 sum of |p| and p over all trainable parameters, plus |·| of the objective's state
        (ranks must agree exactly)."""
        total = torch.zeros(1, dtype=torch.float64)
        for i, p in enumerate(self.policy_params + self.head_params):
            total += p.detach().double().cpu().sum() * (1 + 1e-3 * (i % 7)) + p.detach().double().cpu().abs().sum()
        for tensor in self.objective.state_dict().values():  # also untrained state (a target network)
            if tensor.is_floating_point():
                total += tensor.detach().double().cpu().abs().sum()
        return total

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_json(path / "state.json")
        if int(state.get("world_size", 1)) != self.world:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; resume with the same "
                             f"number (got {self.world}) or start a new run")
        try:
            step, epoch, counts = int(state["step"]), int(state["epoch"]), dict(state["counts"])
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt.CheckpointError(f"{path / 'state.json'}: missing or malformed field ({err}); "
                                       "resume from another checkpoint") from None
        saved_engine = "sharded" if (path / ckpt.ENGINE_DIR).is_dir() else "replicated"
        wanted = "sharded" if self.engine.shards_state else "replicated"
        if saved_engine != wanted:
            raise ValueError(f"checkpoint {path} holds {saved_engine} engine state (engine {state.get('engine', '?')}) "
                             f"but this run uses {self.engine.name}; resume under the engine that wrote it")
        # tensors are read onto the CPU and copied to their parameters' devices (accelerate's CPU device is
        # "cpu:0" under gloo, which torch.load cannot map storages to); every file is read with
        # weights_only=True, so nothing in a checkpoint can execute code
        try:
            if self.engine.shards_state:
                self.accelerator.load_state(str(path / ckpt.ENGINE_DIR))
                outside = ckpt.load_tensors(path / "objective_state.pt")
                with torch.no_grad():
                    own = dict(self.objective.named_parameters())
                    own.update(dict(self.objective.named_buffers()))
                    for k, v in outside.items():
                        own[k].copy_(v)
            else:
                self.backbone.load_trainable_state_dict(ckpt.load_tensors(path / "trainable.pt"))
                self.objective.load_state_dict(ckpt.load_tensors(path / "heads.pt"))
                self.optimizer.load_state_dict(ckpt.load_tensors(path / "optimizer.pt"))
        except (RuntimeError, KeyError, ValueError) as err:
            if isinstance(err, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointError(f"{path}: the weights do not match this config's model "
                                       f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        self.step, self.epoch = step, epoch
        self.counts = {**self.counts, **counts}
        rng_file = path / f"rng_rank{self.rank}.pt"
        self._resume_rng = ckpt.load_tensors(rng_file) if rng_file.is_file() else None
        ep_file = path / f"epoch_rank{self.rank}.pt"
        if state.get("mid_epoch") and ep_file.is_file():
            self._resume_epoch_state = ckpt.load_tensors(ep_file)
        if self.is_main:  # drop metrics logged after the checkpoint so the resumed file matches a clean run
            mpath = self.run_dir / "metrics.jsonl"
            if mpath.is_file():  # a kill mid-append leaves a torn last line: read_jsonl drops it
                keep = [row for row in ckpt.read_jsonl(mpath) if int(row.get("step", 0)) <= self.step]
                mpath.write_text("".join(json.dumps(row, sort_keys=False) + "\n" for row in keep))
            print(f"[gfnalign] resumed from {path} (step {self.step}, epoch {self.epoch})", file=sys.stderr)

    # ---------------------------------------------------------------------------------------------
    # evaluation, grids, final export
    # ---------------------------------------------------------------------------------------------
    def _eval_prompts(self, n: int) -> list[str]:
        uniq = list(dict.fromkeys(self.all_prompts))[:10]
        per = max(2, math.ceil(n / max(len(uniq), 1))) if n > 0 else 1
        return [p for p in uniq for _ in range(per)]

    @torch.no_grad()
    def generate(self, prompts: list[str], seed_tag: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (and rewards) for ``prompts`` with fixed noise: the same seeds before and after training."""
        gen = self._generator("eval", seed_tag)
        bs = self.cfg.sampling.batch_size
        images, rewards = [], []
        for s in range(0, len(prompts), bs):
            texts = prompts[s:s + bs]
            ids = torch.zeros(len(texts), dtype=torch.int64)
            _, imgs = self._rollout(texts, ids, ids, gen, progress=False)
            images.append(imgs.cpu())
            r = self._score(imgs, texts)
            rewards.append(r.cpu() if r is not None else torch.full((len(texts),), float("nan")))
        return torch.cat(images), torch.cat(rewards)

    def _feature_fn(self) -> Any:
        kind = "digits" if self.cfg.backbone.kind in DIGITS_KINDS else "pixels:16"
        try:
            from gfnalign.evaluation.features import build_features

            fx = build_features(kind)
            fx.name = getattr(fx, "name", kind)
            return fx
        except Exception:
            return None

    def evaluate(self, tag: str) -> dict[str, Any]:
        from gfnalign.training.report import diversity, save_grid

        prompts = self._eval_prompts(self.cfg.logging.eval_samples)
        # the "before" report shows the pretrained sampler, whose start is N(0, I) (no learned start value yet)
        self._pretrained_eval = tag == "before"
        try:
            images, rewards = self.generate(prompts, "report")
        finally:
            self._pretrained_eval = False
        if not self.is_main:  # took part in the sampling of sharded weights; rank 0 reports
            return {}
        fx = self._feature_fn()
        div = diversity(images, prompts, fx)
        drift = None
        try:
            from gfnalign.evaluation.metrics import prior_drift

            feats = (fx or (lambda im: im.flatten(1)))(images).float().cpu()
            ids = torch.tensor([prompts.index(p) for p in prompts])
            fpath = self.run_dir / "eval_before_features.pt"
            if tag == "before":
                torch.save({"features": feats, "ids": ids}, fpath)
            elif fpath.is_file():
                ref = ckpt.load_tensors(fpath)
                drift = prior_drift(feats, ref["features"], ids, ref["ids"])[0]
        except Exception as err:  # the report still works without the evaluation package
            print(f"[gfnalign] prior drift not computed: {err}", file=sys.stderr)
        by_prompt = {}
        for p in dict.fromkeys(prompts):
            vals = rewards[[i for i, q in enumerate(prompts) if q == p]]
            by_prompt[p] = float(vals[torch.isfinite(vals)].mean()) if torch.isfinite(vals).any() else float("nan")
        per_prompt = len(prompts) // max(len(set(prompts)), 1)
        captions = [f"{p.replace('a handwritten digit ', '')} r={float(r):.2f}" for p, r in zip(prompts, rewards)]
        # one row per prompt, wrapped at 20 images (one open prompt would otherwise give a single long row)
        grid = save_grid(images, captions, self.run_dir / "samples" / f"{tag}.png", cols=min(per_prompt, 20))
        self.tracker.log_grid(tag, grid, "; ".join(captions), self.step)
        finite = rewards[torch.isfinite(rewards)]
        extra = {}
        if self.cfg.reward == "digit-alignment":  # r = log p(prompted digit): report the classifier's accuracy too
            extra["accuracy"] = float((finite > math.log(0.5)).float().mean()) if finite.numel() else float("nan")
        return {**extra, "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
                "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                "diversity": div, "n": len(prompts), "features": getattr(fx, "name", "pixels:16"),
                "prior_drift": drift, "reward_per_prompt": by_prompt,
                "grid": str(grid.relative_to(self.run_dir))}

    def _sample_grid(self, name: str) -> None:
        from gfnalign.training.report import save_grid

        n = self.cfg.logging.grid_prompts
        uniq = list(dict.fromkeys(self.all_prompts))
        prompts = [uniq[i % len(uniq)] for i in range(n)]
        images, rewards = self.generate(prompts, "grid")
        if not self.is_main:
            return
        captions = [f"{p} r={float(r):.2f}" for p, r in zip(prompts, rewards)]
        grid = save_grid(images, captions, self.run_dir / "samples" / f"{name}.png")
        self.tracker.log_grid(name, grid, "; ".join(captions), self.step)

    def export_final(self) -> Path:
        """``final/``: the LoRA (or full network) in diffusers' format and the heads. Every rank calls it: a
        sharded engine gathers the weights collectively; rank 0 writes."""
        final = self.run_dir / "final"
        with self._gathered():
            if self.is_main:
                self._write_final(final)
        self._barrier()
        return final

    def _write_final(self, final: Path) -> None:
        tmp = self.run_dir / ".tmp-final"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if hasattr(self.backbone, "save_adapter"):
            self.backbone.save_adapter(tmp)
        else:
            torch.save(self.backbone.trainable_state_dict(), tmp / "trainable.pt")
        heads = self.objective.state_dict()
        if heads:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
        (tmp / "README.md").write_text(self._model_card())
        self.cfg.save(tmp / "training_config.yaml")
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)

    def _model_card(self) -> str:
        c = self.cfg
        base = c.backbone.path or (f"gfnalign shipped {c.backbone.kind} pipeline" if c.backbone.kind in DIGITS_KINDS
                                   else c.backbone.kind)
        pipeline_class = str(getattr(self.backbone, "pipeline_class_name", "StableDiffusionPipeline"))
        return "\n".join([
            "---", "library_name: diffusers", "tags: [lora, text-to-image, gflownet, gfnalign]", "---", "",
            f"# LoRA: {c.run_name}", "",
            f"Fine-tuned with gfnalign, method `{c.method.name}`, reward `{c.reward}`, beta {c.beta.value} "
            f"({c.beta.schedule}), {self.step} optimiser updates over {self.epoch} epochs.", "",
            f"Base model: `{base}`. LoRA rank {c.backbone.lora_rank}, alpha {c.backbone.lora_alpha}, "
            f"targets {', '.join(c.backbone.lora_targets)}.", "",
            "```python", f"from diffusers import {pipeline_class}",
            f"pipe = {pipeline_class}.from_pretrained({base!r})",
            "pipe.load_lora_weights('path/to/this/folder')  # pytorch_lora_weights.safetensors", "```", "",
            "`heads.safetensors` holds the objective's flow heads (only needed to continue training).", "",
        ])

    # ---------------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------------
    def _split(self, batch: TransitionBatch) -> list[list[TransitionBatch]]:
        t = self.cfg.training
        n = len(batch)
        size = t.micro_batch
        if getattr(self.objective, "whole_trajectories", False):
            # a declared requirement (trajectory balance): cut only at trajectory boundaries, rounding the
            # micro-batch down to whole trajectories (at least one)
            counts = torch.unique_consecutive(batch.traj_id, return_counts=True)[1]
            per = int(counts[0])
            if bool((counts != per).any()):
                raise ValueError("the objective needs whole trajectories but its transitions are not grouped in "
                                 "runs of equal length per trajectory")
            size = max(1, size // per) * per
        micro = [batch.index(torch.arange(s, min(s + size, n))) for s in range(0, n, size)]
        updates = [micro[i:i + t.grad_accum] for i in range(0, len(micro), t.grad_accum)]
        if t.max_updates_per_epoch is not None:
            updates = updates[: t.max_updates_per_epoch]
        return updates

    def train(self) -> int:
        """Run to the configured number of epochs. Returns 0 (finished or interrupted-and-saved)."""
        self.setup()
        cfg = self.cfg
        t_start = time.perf_counter()
        previous = self._install_signals()
        try:
            if self._samples_here and cfg.logging.report and \
                    ckpt.read_json_or_none(self.run_dir / "eval_before.json") is None:
                before = self.evaluate("before")
                if self.is_main:
                    ckpt.write_json(self.run_dir / "eval_before.json", before)
                    print(f"[gfnalign] pretrained: reward {before['reward_mean']:.4g} ± {before['reward_std']:.3g}, "
                          f"diversity {before['diversity']:.4g}", file=sys.stderr)
            self._barrier()
            interrupted = self._loop()
            self._check_trained_something()
            if interrupted:
                if self.is_main:
                    print(f"[gfnalign] stopped at step {self.step}; checkpoint saved. Continue with "
                          f"`gfnalign train --out {self.run_dir} --resume latest`", file=sys.stderr)
                return 0
            final = self.export_final()
            after = self.evaluate("after") if cfg.logging.report and self._samples_here else None
            if self.is_main:
                if cfg.logging.report:
                    from gfnalign.training.report import write_report

                    ckpt.write_json(self.run_dir / "eval_after.json", after)
                    bpath = self.run_dir / "eval_before.json"
                    before = ckpt.read_json_or_none(bpath)
                    write_report(self.run_dir, config=cfg, before=before, after=after,
                                 wall_s=time.perf_counter() - t_start, counters=self._public_counts())
                    self.tracker.log_report(self.run_dir, before, after)
                print(f"[gfnalign] done: {self.step} updates; LoRA in {final}", file=sys.stderr)
            self._barrier()
            return 0
        finally:
            self._restore_signals(previous)
            if self.tb is not None:
                self.tb.close()
            self.tracker.finish()

    @property
    def _samples_here(self) -> bool:
        """Whether this rank runs evaluation and grid sampling: rank 0, and every rank when weights are sharded."""
        return self.is_main or self.engine.shards_parameters

    def _check_trained_something(self) -> None:
        """Raise :class:`TrainingFailedError` when the finished run made no optimiser step that counted."""
        if self.epoch < self.cfg.training.epochs:
            return  # interrupted: resumable, judged when it finishes
        good = self.step - self.counts["skipped_updates"]
        if good <= 0:
            reason = getattr(self, "_last_reward_error", None)
            raise TrainingFailedError(
                f"trained nothing: {self.step} updates, {self.counts['skipped_updates']} skipped (non-finite loss), "
                f"{self.counts['skipped_reward_epochs']} of {self.epoch} epochs skipped for bad rewards"
                + (f" (last: {reason})" if reason else "") + "; no model was exported")

    def _check_skip_share(self) -> None:
        """Stop (checkpoint kept) once more epochs were skipped than ``max_skipped_epoch_fraction`` allows."""
        rel = self.cfg.reliability
        allowed = rel.max_skipped_epoch_fraction * self.cfg.training.epochs
        skipped = self.counts["skipped_reward_epochs"]
        if skipped > allowed:
            self.save_checkpoint()
            reason = getattr(self, "_last_reward_error", "bad rewards")
            raise TrainingFailedError(
                f"{skipped} of {self.cfg.training.epochs} epochs skipped for bad rewards, more than "
                f"reliability.max_skipped_epoch_fraction={rel.max_skipped_epoch_fraction} allows (last: {reason}); "
                f"fix the reward or raise the fraction, then continue with --resume latest; no model was exported")

    def _public_counts(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k != "nan_streak"}

    def _should_stop(self) -> bool:
        flag = self._stop_signal is not None or (
            self.stop_after_updates is not None and self.step >= self.stop_after_updates)
        return bool(self._all_max(1.0 if flag else 0.0))

    def _loop(self) -> bool:
        """The epochs, under one progress bar for the whole run (epochs done; the postfix says the phase)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.training.epochs, initial=self.epoch, desc="training", unit="epoch",
                   disable=not (self.cfg.logging.progress and self.is_main), dynamic_ncols=True)
        try:
            return self._epochs(bar)
        finally:
            bar.close()

    def _epochs(self, bar: Any) -> bool:
        cfg = self.cfg
        while self.epoch < cfg.training.epochs:
            epoch = self.epoch
            beta = beta_at(cfg, epoch)
            self._beta = beta
            resume_state, self._resume_epoch_state = self._resume_epoch_state, None
            if resume_state is not None:
                updates = [[TransitionBatch(**d) for d in mbs] for mbs in resume_state["updates"]]
                start = int(resume_state["next_update"])
                epoch_metrics = resume_state["epoch_metrics"]
                self.lookahead.set_prompts(resume_state["prompt_cond"], resume_state["prompt_texts"])
                self._epoch_prompts = (resume_state["prompt_cond"], resume_state["prompt_texts"])
                ckpt.set_rng_state(self._resume_rng)
            else:
                seed_everything(derive_seed(cfg.seed, "epoch", self.rank, epoch))
                bar.set_postfix_str("sampling", refresh=True)
                try:
                    traj, epoch_metrics = self.sample_epoch(epoch)
                except RewardUnavailableError as err:
                    self.save_checkpoint()  # at the start of this epoch: a resume samples it again
                    raise RewardUnavailableError(f"epoch {epoch}: {err}; checkpoint saved, continue with "
                                                 "--resume latest once the reward is reachable") from None
                bad = self._all_max(1.0 if traj is None else 0.0)
                batch = None
                if not bad:
                    epoch_metrics.update(self._epoch_reward_metrics(traj))
                    epoch_metrics.update({"nfe/sample_unet": float(self.counters.unet + self.counters.unet_reference),
                                          "nfe/sample_decode": float(self.counters.decode),
                                          "nfe/sample_reward": float(self.counters.reward)})
                    self.lookahead.set_prompts(traj.cond, traj.prompts or [""] * traj.batch_size)
                    traj = self.objective.prepare(traj, self.collective)
                    sel_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "select", self.rank, epoch))
                    # shuffle whole trajectories (objectives may rely on the row order within one trajectory)
                    traj = traj.index(torch.randperm(traj.batch_size, generator=sel_gen).to(traj.states.device))
                    batch = self.objective.select_transitions(traj, sel_gen)
                    self.counters.reset()
                    try:
                        batch = self.cache_lookahead(traj, batch)
                    except RewardUnavailableError as err:
                        self.save_checkpoint()  # at the start of this epoch: a resume samples it again
                        raise RewardUnavailableError(f"epoch {epoch}: {err} (cached lookahead); checkpoint saved, "
                                                     "continue with --resume latest once the reward is reachable") from None
                    epoch_metrics.update({"nfe/lookahead_unet": float(self.counters.unet + self.counters.unet_reference),
                                          "nfe/lookahead_decode": float(self.counters.decode),
                                          "nfe/lookahead_reward": float(self.counters.reward)})
                    bad = self._all_max(1.0 if batch is None else 0.0)
                if bad:
                    msg = getattr(self, "_last_reward_error", "a reward on another rank was bad")
                    if cfg.reliability.on_bad_reward == "stop":
                        self.save_checkpoint()  # at the start of this epoch: a resume retries it
                        raise BadRewardError(f"epoch {epoch}: {msg} (reliability.on_bad_reward=stop); checkpoint "
                                             f"saved, continue with --resume latest once the reward works")
                    self.counts["skipped_reward_epochs"] += 1
                    if self.is_main:
                        print(f"[gfnalign] epoch {epoch}: skipped ({msg})", file=sys.stderr)
                    self.epoch += 1
                    bar.update(1)
                    self._check_skip_share()
                    if self._after_epoch():
                        return True
                    continue
                updates = self._split(batch)
                n_up = int(self._all_min(float(len(updates))))
                updates = updates[:n_up]
                start = 0
                self._epoch_prompts = (traj.cond, traj.prompts)
            for u in range(start, len(updates)):
                rng_before = ckpt.rng_state() if cfg.lookahead.mode == "recompute" else None
                try:
                    m = self._update(updates[u], beta)
                except RewardUnavailableError as err:  # (lookahead: recompute) keep the epoch, redo this update
                    if rng_before is not None:
                        ckpt.set_rng_state(rng_before)
                    self.save_checkpoint({
                        "updates": [[_batch_to_dict(mb) for mb in mbs] for mbs in updates],
                        "next_update": u, "epoch_metrics": epoch_metrics,
                        "prompt_cond": self._epoch_prompts[0], "prompt_texts": list(self._epoch_prompts[1] or []),
                    })
                    raise RewardUnavailableError(f"epoch {epoch}, update {u}: {err}; checkpoint saved, continue "
                                                 "with --resume latest once the reward is reachable") from None
                self.step += 1
                row = {"step": self.step, "epoch": epoch, "update_in_epoch": u, "beta": beta}
                row.update(m)
                row.update(epoch_metrics)
                row["train/skipped_updates"] = self.counts["skipped_updates"]
                row["train/skipped_reward_epochs"] = self.counts["skipped_reward_epochs"]
                row["perf/peak_mem_mb"] = peak_mem_mb(self.device)
                if self.step % cfg.logging.log_every == 0 or u == len(updates) - 1:
                    self._log(row)
                bar.set_postfix(update=f"{u + 1}/{len(updates)}",
                                reward=f"{epoch_metrics.get('reward/mean', float('nan')):.3g}",
                                loss=f"{m.get('loss/total', float('nan')):.3g}")
                if self.counts["nan_streak"] >= cfg.reliability.max_nan_streak:
                    raise NanLossError(
                        f"{self.counts['nan_streak']} non-finite losses in a row (reliability.max_nan_streak="
                        f"{cfg.reliability.max_nan_streak}); stopped at step {self.step}. The last checkpoint under "
                        f"{self.run_dir / 'checkpoints'} is intact; lower training.lr or raise trust_region")
                if u < len(updates) - 1 and self._should_stop():
                    self.save_checkpoint({
                        "updates": [[_batch_to_dict(mb) for mb in mbs] for mbs in updates],
                        "next_update": u + 1, "epoch_metrics": epoch_metrics,
                        "prompt_cond": self._epoch_prompts[0], "prompt_texts": list(self._epoch_prompts[1] or []),
                    })
                    return True
            self.epoch += 1
            bar.update(1)
            if self._after_epoch():
                return True
        return False

    def _after_epoch(self) -> bool:
        """Grids and checkpoints at epoch ends; returns True when a stop was requested (checkpoint saved)."""
        cfg = self.cfg
        last = self.epoch >= cfg.training.epochs
        if self._samples_here and cfg.logging.sample_every and (self.epoch % cfg.logging.sample_every == 0 or last):
            self._sample_grid(f"step_{self.step}")
        self._barrier()
        stop = self._should_stop()
        if stop or last or self.epoch % cfg.logging.checkpoint_every == 0:
            self.save_checkpoint()
        return stop and not last
