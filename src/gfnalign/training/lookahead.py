"""The forward-looking reward r(decode(x0_hat(x))) that the objectives see through ``core.Lookahead``.

``RewardLookahead`` glues a backbone (``predict_x0``, ``decode``) to a reward (``reward(images, prompts)``):

* ``log_reward(x, t, cond, terminal)``: raw reward of the predicted clean image, no gradient. Terminal
  states use x itself (x0_hat(x) = x). x0_hat comes from ``model: policy | reference`` (the reference is
  the pretrained network, adapters off) and is CFG-guided when ``guided``.
* ``grad_log_reward``: ∇_x r(decode(x0_hat(x))) by autograd through the reward, the decoder and the
  x0_hat network (only with respect to x; no parameter gradient is accumulated); detached result. It is
  J_{x0_hat}(x)ᵀ·∇_{x0} r: ``grad_log_reward_x0`` differentiates the decoder and the reward, then one
  vector-Jacobian product goes through the x0_hat network. Terminal rows skip the network.
* ``x0_pass(policy)`` (``core.SharedPassLookahead``): the ∇-DB objectives already run the policy (and
  residual ∇-DB the reference) at x_t with a graph from x_t; when the lookahead's x0_hat comes from that
  same network (``model`` and guidance match), they read ∇r(x0_hat(x_t)) from their own pass with
  ``grad_log_reward_x0`` and one VJP, and the lookahead runs its network at x_next only.

Rewards take prompt strings, while objectives pass the encoded conditioning. The trainer registers the
epoch's prompts with :meth:`RewardLookahead.set_prompts`; each conditioning row is matched back to its
prompt by exact (else nearest) equality of the encoded tensors.

``cache_transitions`` implements ``lookahead: cached``: after transition selection, r(x0_hat) of exactly
the states the selected transitions hold (each once), from the x0_hat the rollout already produced
(guided eps of the behaviour policy), or with one extra no-grad pass of the reference network per state
when ``model: reference``. The trainer calls it only for objectives whose ``lookahead_reads`` include
``"reward"``. In ``recompute`` mode (the authors' DAG code) the objectives call :meth:`log_reward` per
transition with the current policy. ``cache_trajectory`` scores every recorded state (benchmarks, tests).

Chunk sizes: every batched pass (x0_hat network, decode + reward, both with gradient, the cache and the
trainer's terminal decode via :meth:`RewardLookahead.decode_chunked`) takes as many rows as fit in the
:class:`~gfnalign.training.memory.MemoryBudget` (``memory.budget_gb``), from the activation bytes of one row
measured on first use; ``chunk_size`` fixes them instead. ``enable_checkpointing`` recomputes the decoder's
and the reward's blocks in the backward (``memory.checkpoint_decoder`` / ``checkpoint_reward``).

:class:`Counters` counts network evaluations (rows) for the throughput benchmark (the one-row probes of the
memory budget are not counted).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.training.memory import MemoryBudget, enable_block_checkpointing, resident_modules, saved_bytes


@dataclass
class Counters:
    """Rows processed by each network since the last reset (a CFG pass counts as one row per image)."""

    unet: int = 0
    unet_reference: int = 0
    decode: int = 0
    reward: int = 0
    reward_grad: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "nfe/") -> dict[str, float]:
        out = {f"{prefix}unet": float(self.unet), f"{prefix}unet_reference": float(self.unet_reference),
               f"{prefix}decode": float(self.decode), f"{prefix}reward": float(self.reward),
               f"{prefix}reward_grad": float(self.reward_grad)}
        out.update({f"{prefix}{k}": float(v) for k, v in self.extra.items()})
        return out

    def reset(self) -> None:
        self.unet = self.unet_reference = self.decode = self.reward = self.reward_grad = 0
        self.extra.clear()


class CountingPolicy:
    """Wraps a backbone so every ``eps`` / ``predict_x0`` / ``decode`` call is counted; all else delegates."""

    def __init__(self, backbone: Any, counters: Counters) -> None:
        object.__setattr__(self, "_backbone", backbone)
        object.__setattr__(self, "_counters", counters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    @property
    def unwrapped(self) -> Any:
        """The wrapped backbone (lookaheads built on it recognise the counted policy as theirs)."""
        return self._backbone

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, reference: bool = False, **kw: Any) -> torch.Tensor:
        self._count(x, reference)
        return self._backbone.eps(x, t, cond, reference=reference, **kw)

    def predict_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, reference: bool = False, **kw: Any) -> torch.Tensor:
        self._count(x, reference)
        return self._backbone.predict_x0(x, t, cond, reference=reference, **kw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._counters.decode += int(latents.shape[0])
        return self._backbone.decode(latents)

    def _count(self, x: torch.Tensor, reference: bool) -> None:
        if reference:
            self._counters.unet_reference += int(x.shape[0])
        else:
            self._counters.unet += int(x.shape[0])


def _at_least_fp32(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in float32, or float64 when the decoder runs in float64 (exactness tests)."""
    return images.to(torch.promote_types(images.dtype, torch.float32))


def _device_of(backbone: Any) -> torch.device:
    device = getattr(backbone, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class RewardLookahead:
    """``core.Lookahead`` over a backbone and a reward. See the module docstring."""

    def __init__(
        self,
        backbone: Any,
        reward: Any,
        *,
        model: str = "reference",
        guided: bool = True,
        counters: Counters | None = None,
        chunk_size: int | None = None,
        memory: MemoryBudget | None = None,
        auto_checkpointing: bool = False,
    ) -> None:
        if model not in ("policy", "reference"):
            raise ValueError(f"lookahead.model={model!r} is not allowed; use policy or reference")
        self.backbone = backbone
        self.reward = reward
        self.model = model
        self.guided = guided
        self.counters = counters if counters is not None else Counters()
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (or None: from the memory budget)")
        self.chunk_size = chunk_size
        self.memory = memory if memory is not None else MemoryBudget(None, _device_of(backbone))
        # recompute the decoder's / reward's blocks when one row of their graph exceeds the budget
        self.auto_checkpointing = bool(auto_checkpointing)
        self._image_checkpointed = False
        self._cond_table: torch.Tensor | None = None
        self._prompt_table: list[str] = []

    # -- prompt bookkeeping ----------------------------------------------------------------------------
    def set_prompts(self, cond: torch.Tensor | None, prompts: list[str]) -> None:
        """Register encoded prompts ``cond`` ([P, ...]) and their strings, so rows can be matched back."""
        uniq: dict[str, int] = {}
        rows = []
        for i, p in enumerate(prompts):
            if p not in uniq:
                uniq[p] = len(uniq)
                rows.append(i)
        self._prompt_table = list(uniq)
        self._cond_table = None if cond is None else cond[rows].detach().flatten(1).float()

    def prompts_for(self, cond: torch.Tensor | None, n: int) -> list[str]:
        if not self._prompt_table:
            return [""] * n
        if cond is None or self._cond_table is None or len(self._prompt_table) == 1:
            return [self._prompt_table[0]] * n
        flat = cond.detach().flatten(1).float().to(self._cond_table.device)
        dist = torch.cdist(flat, self._cond_table)
        return [self._prompt_table[int(i)] for i in dist.argmin(dim=1).tolist()]

    # -- x0_hat ---------------------------------------------------------------------------------------
    def _x0(self, x: torch.Tensor, t: torch.Tensor, cond: Any, terminal: torch.Tensor) -> torch.Tensor:
        """x0_hat(x): the network runs only on the non-terminal rows (terminal rows are their own x0_hat)."""
        term = terminal.to(x.device)
        live = (~term).nonzero(as_tuple=True)[0]
        if live.numel() == 0:
            return x
        if live.numel() == x.shape[0]:
            return self._predict_x0(x, t, cond)
        c = None if cond is None else cond[live.to(cond.device)]
        return x.index_put((live,), self._predict_x0(x[live], t[live], c))

    def _predict_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self._count_unet(x.shape[0])
        return self.backbone.predict_x0(x, t, cond, reference=self.model == "reference", guided=self.guided)

    def _count_unet(self, n: int) -> None:
        if self.model == "reference":
            self.counters.unet_reference += int(n)
        else:
            self.counters.unet += int(n)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.counters.reward += int(images.shape[0])
        return self.reward(images, prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.counters.decode += int(latents.shape[0])
        return self.backbone.decode(latents)

    # -- chunk sizes ----------------------------------------------------------------------------------
    def _reward_modules(self) -> list[torch.nn.Module]:
        return resident_modules(self.reward)

    def _resident(self) -> list[torch.nn.Module]:
        """The networks' own weights (left out of the activation bytes)."""
        return resident_modules(self.backbone, self.reward)

    def _x0_bytes(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> float:
        c = None if cond is None else cond[:1]
        x1 = x[:1].detach().requires_grad_(True)
        return saved_bytes(lambda: self.backbone.predict_x0(x1, t[:1], c, reference=self.model == "reference",
                                                            guided=self.guided), self._resident())

    def _decode_bytes(self, x0: torch.Tensor) -> float:
        z = x0[:1].detach().requires_grad_(True)
        return saved_bytes(lambda: self.backbone.decode(z), self._resident())

    def _image_bytes(self, x0: torch.Tensor, cond: Any) -> float:
        """Decoder bytes per row, plus the reward's (probed on a decoded image) when it is differentiable."""
        total = self.memory.per_row("decode", lambda: self._decode_bytes(x0))
        if getattr(self.reward, "differentiable", False):
            with torch.no_grad():
                images = _at_least_fp32(self.backbone.decode(x0[:1].detach()))
            c = None if cond is None else cond[:1]
            total += saved_bytes(lambda: self.reward(images.requires_grad_(True), self.prompts_for(c, 1)),
                                 self._resident())
        return total

    def rows_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Any, total: int | None = None) -> int:
        """Rows per x0_hat network pass (CFG included) within the memory budget, for ``total`` rows
        (default ``x.shape[0]``; ``x`` may be a one-row probe of them)."""
        if self.chunk_size is not None:
            return self.chunk_size
        n = x.shape[0] if total is None else total
        return self.memory.rows("lookahead/x0", n, lambda: self._x0_bytes(x, t, cond))

    def rows_image(self, x0: torch.Tensor, cond: Any, total: int | None = None) -> int:
        """Rows per decode + reward pass within the memory budget (``total`` as in :meth:`rows_x0`)."""
        if self.chunk_size is not None:
            return self.chunk_size
        self._fit_image_pass(x0, cond)
        n = x0.shape[0] if total is None else total
        return self.memory.rows("lookahead/decode+reward", n, lambda: self._image_bytes(x0, cond))

    def _fit_image_pass(self, x0: torch.Tensor, cond: Any) -> None:
        """With ``auto_checkpointing``: when one row's decode + reward graph is over the budget (the VAE decoder
        at 512 px keeps several GB for its backward), recompute their blocks in the backward instead, once, and
        measure again."""
        if not self.auto_checkpointing or self._image_checkpointed:
            return
        self._image_checkpointed = True
        per_row = self.memory.per_row("lookahead/decode+reward", lambda: self._image_bytes(x0, cond))
        if per_row <= self.memory.budget_bytes:
            return
        has_vae = isinstance(getattr(self.backbone, "vae", None), torch.nn.Module)
        wrapped = self.enable_checkpointing(decoder=has_vae, reward=bool(getattr(self.reward, "differentiable", False)))
        if not any(wrapped.values()):
            return
        self.memory.forget("decode", "lookahead/decode+reward", "lookahead/x0+decode+reward")
        after = self.memory.per_row("lookahead/decode+reward", lambda: self._image_bytes(x0, cond))
        print(f"[gfnalign] memory: one row of the decoder + reward graph needs {per_row / 2**30:.2f} GB, over the "
              f"budget of {self.memory.budget_bytes / 2**30:.2f} GB (memory.budget_gb); their blocks are recomputed "
              f"in the backward now ({after / 2**30:.2f} GB per row; memory.auto_checkpointing)", file=sys.stderr)

    def rows_all(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> int:
        """Rows per x0_hat + decode + reward pass (the graph of all three alive at once)."""
        if self.chunk_size is not None:
            return self.chunk_size
        n = x.shape[0]
        self._fit_image_pass(x, cond)
        return self.memory.rows("lookahead/x0+decode+reward", n, lambda: (
            self.memory.per_row("lookahead/x0", lambda: self._x0_bytes(x, t, cond))
            + self.memory.per_row("lookahead/decode+reward", lambda: self._image_bytes(x, cond))))

    def enable_checkpointing(self, *, decoder: bool = False, reward: bool = False) -> dict[str, int]:
        """Block gradient checkpointing (``memory.checkpoint_decoder`` / ``checkpoint_reward``) of the VAE decoder
        and of the reward's networks; returns the blocks wrapped per part. No-grad passes are unaffected."""
        wrapped: dict[str, int] = {}
        if decoder:
            vae = getattr(self.backbone, "vae", None)
            target = getattr(vae, "decoder", vae)
            if not isinstance(target, torch.nn.Module):
                raise ValueError("memory.checkpoint_decoder=true needs a backbone with a `vae` module; set it to false")
            wrapped["decoder"] = enable_block_checkpointing(target)
        if reward:
            wrapped["reward"] = sum(enable_block_checkpointing(m) for m in self._reward_modules())
        return wrapped

    @torch.no_grad()
    def decode_chunked(self, latents: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``backbone.decode`` without gradient, in chunks within the memory budget (float32 images)."""
        rows = self.chunk_size or self.memory.rows("decode", latents.shape[0], lambda: self._decode_bytes(latents))
        return torch.cat([_at_least_fp32(self.backbone.decode(latents[s:s + rows]))
                          for s in range(0, latents.shape[0], rows)])

    # -- the Lookahead protocol -----------------------------------------------------------------------
    @torch.no_grad()
    def log_reward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, terminal: torch.Tensor) -> torch.Tensor:
        out = []
        rows = min(self.rows_x0(x, t, cond), self.rows_image(x, cond)) if x.shape[0] else 1
        for s in range(0, x.shape[0], rows):
            sl = slice(s, s + rows)
            c = None if cond is None else cond[sl]
            x0 = self._x0(x[sl], t[sl], c, terminal[sl])
            r = self.score_images(_at_least_fp32(self.decode(x0)), self.prompts_for(c, x0.shape[0]))
            out.append(torch.as_tensor(r, dtype=torch.float32, device=x.device).reshape(-1))
        return torch.cat(out) if out else x.new_zeros(0)

    def grad_log_reward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, terminal: torch.Tensor) -> torch.Tensor:
        """∇_x r(x0_hat(x)) = J_{x0_hat}(x)ᵀ ∇_{x0} r: the decoder and the reward are differentiated by
        :meth:`grad_log_reward_x0` (in their own chunks), then one VJP through the x0_hat network."""
        self._check_differentiable()
        grads = []
        rows = self.rows_all(x, t, cond) if x.shape[0] else 1
        for s in range(0, x.shape[0], rows):
            sl = slice(s, s + rows)
            c = None if cond is None else cond[sl]
            with torch.enable_grad():
                xs = x[sl].detach().requires_grad_(True)
                x0 = self._x0(xs, t[sl], c, terminal[sl])
                g0 = self.grad_log_reward_x0(x0.detach(), c)
                (g,) = torch.autograd.grad(x0, xs, grad_outputs=g0.to(x0.dtype))
            grads.append(g.detach())
        return torch.cat(grads) if grads else torch.zeros_like(x)

    def grad_log_reward_x0(self, x0: torch.Tensor, cond: Any) -> torch.Tensor:
        """∇_{x0} r(decode(x0)) at clean latents ``x0`` (detached), through the decoder and the reward."""
        self._check_differentiable()
        grads = []
        rows = self.rows_image(x0, cond) if x0.shape[0] else 1
        for s in range(0, x0.shape[0], rows):
            sl = slice(s, s + rows)
            c = None if cond is None else cond[sl]
            with torch.enable_grad():
                z = x0[sl].detach().requires_grad_(True)
                r = self.reward(_at_least_fp32(self.decode(z)), self.prompts_for(c, z.shape[0]))
                self.counters.reward_grad += int(z.shape[0])
                (g,) = torch.autograd.grad(torch.as_tensor(r).sum(), z)
            grads.append(g.detach())
        return torch.cat(grads) if grads else torch.zeros_like(x0)

    def x0_pass(self, policy: Any) -> str | None:
        """``"policy"`` / ``"reference"`` when this lookahead's x0_hat is Tweedie's estimate from the guided ε
        of ``policy`` (adapters on / off), so an objective may read it from its own pass; else None."""
        if getattr(policy, "unwrapped", policy) is not self.backbone:
            return None
        if not self.guided and float(getattr(self.backbone, "guidance_scale", 1.0)) != 1.0:
            return None  # the unguided x0_hat is not the guided ε the objectives compute
        return self.model

    def _check_differentiable(self) -> None:
        if not getattr(self.reward, "differentiable", False):
            name = getattr(self.reward, "name", type(self.reward).__name__)
            raise ValueError(
                f"reward {name!r} is not differentiable, but this method needs ∇r; use a differentiable "
                "reward (e.g. digit-alignment, ink, aesthetic) or a gradient-free method (dag-db, dag-kl, ddpo)"
            )

    # -- lookahead: cached ----------------------------------------------------------------------------
    @torch.no_grad()
    def state_values(self, traj: TrajectoryBatch, row: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """r(x0_hat) ``[M]`` of the recorded states ``traj.states[row, slot]`` (slot K: the terminal state,
        whose value is the trajectory's reward). With ``model: policy`` and ``guided`` x0_hat is the
        rollout's own (from the recorded guided output, no network call); otherwise one no-grad pass per
        state. Network passes and decode + reward passes are chunked within the memory budget."""
        K = traj.num_steps
        schedule = self.backbone.schedule
        device = traj.states.device
        row, slot = row.to(device), slot.to(device)
        values = torch.empty(row.shape[0], dtype=torch.float32, device=device)
        terminal = slot == K
        values[terminal] = traj.reward.to(values)[row[terminal]]
        live = (~terminal).nonzero().reshape(-1)
        if live.numel() == 0:
            return values
        prompts = traj.prompts or self.prompts_for(traj.cond, traj.batch_size)
        steps = traj.steps.to(device)
        own_x0 = self.model == "policy" and self.guided

        def inputs(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
            r, k = row[idx], slot[idx]
            cond = None if traj.cond is None else traj.cond[r.to(traj.cond.device)]
            return traj.states[r, k], steps[k], cond

        # chunk sizes for all the live states, measured on one of them (a one-row total would mean one row per pass)
        x1, step1, cond1 = inputs(live[:1])
        if own_x0:
            outer = self.rows_image(x1, cond1, total=live.shape[0])
        else:
            outer = self.rows_x0(x1, schedule.timesteps.to(device)[step1], cond1, total=live.shape[0])
        for s in range(0, live.shape[0], outer):
            idx = live[s:s + outer]
            x, step, cond = inputs(idx)
            if own_x0:
                x0 = schedule.predict_x0(x, traj.eps[row[idx], slot[idx]].to(x.dtype), step)  # the rollout's own
            else:
                x0 = self._predict_x0(x, schedule.timesteps.to(device)[step], cond)
            inner = self.rows_image(x0, cond)
            for u in range(0, idx.shape[0], inner):
                part = idx[u:u + inner]
                out = self.score_images(_at_least_fp32(self.decode(x0[u:u + inner])),
                                        [prompts[i] for i in row[part].tolist()])
                values[part] = torch.as_tensor(out, dtype=torch.float32, device=device).reshape(-1)
        return values

    def cache_transitions(self, traj: TrajectoryBatch, batch: TransitionBatch) -> TransitionBatch:
        """``lookahead: cached`` after transition selection: r(x0_hat) of exactly the states ``batch`` reads
        (x_t of every row, x_next of every row; a state shared by two selected transitions is scored
        once), filled into ``lookahead_reward_t`` / ``lookahead_reward_next``."""
        K = traj.num_steps
        pos = {int(tid): i for i, tid in enumerate(traj.traj_id.tolist())}
        row = torch.tensor([pos[int(tid)] for tid in batch.traj_id.tolist()], dtype=torch.int64)
        slot = batch.step.cpu().to(torch.int64) - int(traj.steps[0])
        keys = torch.cat([row * (K + 1) + slot, row * (K + 1) + slot + 1])
        unique, inverse = torch.unique(keys, return_inverse=True)
        values = self.state_values(traj, unique // (K + 1), unique % (K + 1))
        per_row = values[inverse.to(values.device)].to(batch.x_t.device)
        n = len(batch)
        return batch.with_fields(lookahead_reward_t=per_row[:n], lookahead_reward_next=per_row[n:])

    def cache_trajectory(self, traj: TrajectoryBatch) -> TrajectoryBatch:
        """``traj.lookahead_reward`` ([B, K+1]) of every recorded state; the last column is the reward."""
        B, K = traj.batch_size, traj.num_steps
        row = torch.arange(B).repeat_interleave(K + 1)
        slot = torch.arange(K + 1).repeat(B)
        return replace(traj, lookahead_reward=self.state_values(traj, row, slot).reshape(B, K + 1))
