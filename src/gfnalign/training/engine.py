"""How the trainer hands its trainable modules to accelerate's engines (single process, DDP, FSDP, DeepSpeed).

The objectives call the policy network several times per loss (the policy pass, a reference pass with the
adapters disabled, lookahead passes, heads on both ends of a transition) and take ∇_x through it. A
wrapper that hooks the network's own ``forward`` would see several forwards per backward, some of them
reference passes in which the adapters get no gradient. So the engine wraps one :class:`TrainStep` whose
``forward`` runs a closure: everything one loss does happens inside a single engine forward, and the
engine sees one forward and one backward per micro-batch, whatever the objective does inside.

What each engine needs, and why:

* **DDP** — ``find_unused_parameters=True``: a micro-batch may leave trainable parameters without a
  gradient (a head evaluated only on non-terminal rows, a micro-batch of terminal transitions), so the
  reducer must look for them. ``static_graph`` is *not* set, for the same reason: the set of parameters
  that get a gradient differs between micro-batches. ``broadcast_buffers=False``: the modules are
  initialised identically on every rank and have no running statistics, so the per-forward buffer
  broadcast would only add a collective. Network calls outside the loss (sampling, evaluation) use the
  unwrapped modules: the weights are replicated.
* **FSDP** (``fsdp_use_orig_params: true``, required because LoRA mixes frozen and trainable tensors in a
  flat parameter) and **DeepSpeed ZeRO-3** shard the weights: a network call outside the engine's forward
  would see a shard. Sampling therefore also runs through ``TrainStep`` (under ``no_grad``), every rank takes
  part in evaluation and export, and code that reads weights outside a forward (the final LoRA, an
  objective's ``after_optimizer_step`` such as DAG-DB's target network, the rank checksum) runs inside
  :func:`gathered_parameters`.
* **DeepSpeed** (ZeRO-2 and 3) owns clipping, the optimiser step and zeroing: accelerate's ``backward``
  steps the engine at the accumulation boundary, so ``training.clip_norm`` becomes DeepSpeed's single
  ``gradient_clipping`` over all parameters (not per group) and non-finite gradients are DeepSpeed's to
  handle (it skips fp16 overflow steps itself).

Frozen networks that are not part of the policy's trainable module (the VAE, the text encoder, a
full-fine-tuning reference copy, reward models) stay outside the engine and are replicated on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class TrainStep(nn.Module):
    """The one module handed to ``accelerator.prepare``: the policy's trainable network and the heads.

    ``forward(fn)`` returns ``fn()``; the engine's hooks (gradient buckets, parameter gathering) run around
    it, so every network call ``fn`` makes happens inside one engine forward.
    """

    def __init__(self, network: nn.Module | None, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        if network is not None:
            self.network = network
        self.heads = nn.ModuleDict(heads)

    def forward(self, fn: Callable[[], Any]) -> Any:  # type: ignore[override]
        return fn()


@dataclass(frozen=True)
class EngineTraits:
    """What the trainer must do differently under an engine (never what the objective does)."""

    name: str  # "single", "ddp", "fsdp" or "deepspeed"
    shards_parameters: bool  # weights are sharded: network calls go through the engine, reads gather first
    shards_state: bool  # checkpoints go through accelerator.save_state / load_state (one shard per rank)
    owns_step: bool  # the engine clips, steps and zeroes inside accelerator.backward


def engine_traits(accelerator: Any) -> EngineTraits:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        return EngineTraits("deepspeed", shards_parameters=stage >= 3, shards_state=True, owns_step=True)
    if kind == DistributedType.FSDP:
        if getattr(accelerator, "is_fsdp2", False):  # gathered_parameters speaks FSDP1's summon_full_params
            raise ValueError("fsdp_version: 2 is not supported yet; use fsdp_version: 1 "
                             "(configs/accelerate/fsdp.yaml)")
        return EngineTraits("fsdp", shards_parameters=True, shards_state=True, owns_step=False)
    if accelerator.num_processes > 1:
        return EngineTraits("ddp", shards_parameters=False, shards_state=False, owns_step=False)
    return EngineTraits("single", shards_parameters=False, shards_state=False, owns_step=False)


def make_accelerator(training: Any) -> Any:
    """An ``Accelerator`` for the ``training`` config section, with the engine choice left to the launcher
    (``accelerate launch --config_file configs/accelerate/<engine>.yaml``, or ``torchrun`` for DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = not torch.cuda.is_available() or os.environ.get("GFNALIGN_FORCE_CPU") == "1"
    acc = Accelerator(
        cpu=use_cpu,
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
    )
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:  # there is no dataloader to read these from; "auto" takes the run's values
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = int(training.micro_batch)
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = float(max(training.clip_norm, 0.0))
        if ds.get("train_batch_size") == "auto":  # accelerate derives it from the two above
            ds.pop("train_batch_size")
    return acc


@contextlib.contextmanager
def gathered_parameters(accelerator: Any, model: nn.Module, traits: EngineTraits) -> Iterator[None]:
    """Full (unsharded) weights of the prepared ``model`` on every rank, read-only; a no-op unless the engine
    shards parameters. Collective: every rank must enter it."""
    if not traits.shards_parameters:
        yield
        return
    if traits.name == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def group_grad_norms(groups: dict[str, list[nn.Parameter]], max_norm: float, *, sharded: bool) -> dict[str, float]:
    """Clip each parameter group to ``max_norm`` (<= 0: measure only) and return ``grad_norm/<group>``.

    With ``sharded`` gradients every rank holds a disjoint piece, so the squared norms are summed over ranks
    (a scalar per group; the gradients themselves were already reduced by the engine)."""
    out: dict[str, float] = {}
    for name, params in groups.items():
        if not params:
            continue
        grads = [p.grad for p in params if p.grad is not None]
        device = params[0].device
        norm = torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)
        if sharded:
            sq = norm.double().pow(2)
            torch.distributed.all_reduce(sq)
            norm = sq.sqrt().float()
        if not grads and not sharded:
            continue
        if max_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
        out[f"grad_norm/{name}"] = float(norm)
    return out
