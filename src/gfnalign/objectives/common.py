"""Shared pieces of the objectives: common options, the trust-region penalty, lookahead access.

Every objective accepts these keyword options (validated with errors naming the field):

* ``eta`` (1.0): DDIM eta of the forward kernel; must equal the sampler's.
* ``log_prob_reduction`` (``"sum"`` for the GFlowNets): how log-densities (and, for the ∇ objectives,
  their scores) are reduced over the D state dimensions. ``"mean"`` divides every log P_F / log P_B by
  D (the authors' code); the balance conditions then hold for ``D * log P`` with log-reward
  ``D * beta * r``, i.e. ``mean`` samples ∝ exp(D·β·r): the effective inverse temperature is β·D
  (1.6e6 for SD1.5 at β = 100). Use ``sum`` with β/D to keep a ``mean``-tuned fixed point.
* ``trust_region`` λ (0.0): adds ``λ · mean_dims(ε_θ(x_t) − ε_old(x_t))²`` per transition, where ε_old is
  the guided eps recorded at sampling time (both papers' "unetreg"). It is always a per-dimension mean.
* ``fraction`` / ``stratified`` / ``include_last``: transition selection, see
  :mod:`gfnalign.sampling.subsample`.

Lookahead values are RAW rewards r (and ∇_x r(x̂0(x))); objectives multiply by beta. Cached values on the
batch (``lookahead_reward_t/_next``, ``lookahead_grad_t/_next``) are used when present; otherwise the
``Lookahead`` is called, only on the rows that need it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.kernels import REDUCTIONS, GaussianKernel
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, Objective
from gfnalign.sampling.rollout import transition_kernel
from gfnalign.sampling.subsample import select_transitions

GAMMAS = ("one", "alpha_bar", "sqrt_alpha_bar")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; use one of {', '.join(repr(a) for a in allowed)}")


def check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name}={value} must be a non-negative number")
    return value


def index_rows(value: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a cond-like value (tensor, list or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, list | tuple):
        return [value[int(i)] for i in idx.tolist()]
    raise TypeError(f"cannot index conditioning of type {type(value).__name__}")


def mean_dims(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension -> ``[N]``."""
    return x.flatten(1).mean(dim=1)


def state_dim(x: torch.Tensor) -> int:
    return int(x[0].numel())


def scatter_rows(mask: torch.Tensor, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like`` that holds ``values`` at the rows of ``mask`` and zeros elsewhere
    (differentiable in ``values``)."""
    out = torch.zeros_like(like, dtype=values.dtype)
    idx = mask.nonzero(as_tuple=True)[0]
    return out.index_put((idx,), values)


def apply_rows(fn: Any, mask: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond: Any, like: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
    """``fn(x[mask], t[mask], cond[mask], **kwargs)`` scattered back into zeros shaped like ``like``."""
    if bool(mask.all()):
        return fn(x, t, cond, **kwargs)
    if not bool(mask.any()):
        return torch.zeros_like(like)
    idx = mask.nonzero(as_tuple=True)[0]
    vals = fn(x[idx], t[idx], index_rows(cond, idx), **{k: v[idx] for k, v in kwargs.items()})
    return scatter_rows(mask, vals.to(like.dtype), like)


def cat_cond(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    return list(a) + list(b)


def apply_two(
    fn: Any, x_a: torch.Tensor, t_a: torch.Tensor, mask_a: torch.Tensor, x_b: torch.Tensor, t_b: torch.Tensor,
    mask_b: torch.Tensor, cond: Any, like_a: torch.Tensor, like_b: torch.Tensor,
    terminal_a: torch.Tensor | None = None, terminal_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of ``fn`` on the rows ``mask_a`` of ``x_a`` and ``mask_b`` of ``x_b`` together (one network
    pass instead of two), scattered back into zeros shaped like ``like_a`` / ``like_b``."""
    ia = mask_a.nonzero(as_tuple=True)[0]
    ib = mask_b.nonzero(as_tuple=True)[0]
    na = int(ia.numel())
    if na + int(ib.numel()) == 0:
        return torch.zeros_like(like_a), torch.zeros_like(like_b)
    x = torch.cat([x_a[ia], x_b[ib]], dim=0)
    t = torch.cat([t_a[ia], t_b[ib]], dim=0)
    c = cat_cond(index_rows(cond, ia), index_rows(cond, ib))
    kwargs = {}
    if terminal_a is not None and terminal_b is not None:
        kwargs["terminal"] = torch.cat([terminal_a[ia], terminal_b[ib]], dim=0)
    out = fn(x, t, c, **kwargs)
    return (scatter_rows(mask_a, out[:na].to(like_a.dtype), like_a),
            scatter_rows(mask_b, out[na:].to(like_b.dtype), like_b))


def gamma_weight(mode: str, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward-looking weight γ(ᾱ): ``one`` -> 1, ``alpha_bar`` -> ᾱ (the ∇-GFlowNet code's default
    "squared" mode), ``sqrt_alpha_bar`` -> √ᾱ."""
    if mode == "one":
        return torch.ones_like(alpha_bar)
    if mode == "alpha_bar":
        return alpha_bar
    if mode == "sqrt_alpha_bar":
        return alpha_bar.sqrt()
    raise ValueError(f"gamma={mode!r} is not allowed; use one of {', '.join(GAMMAS)}")


def _need_lookahead(lookahead: Lookahead | None, what: str) -> Lookahead:
    if lookahead is None:
        raise ValueError(
            f"this objective needs {what} but the batch has no cached values and lookahead=None; "
            "pass a Lookahead or fill the batch's lookahead cache"
        )
    return lookahead


def lookahead_reward(
    lookahead: Lookahead | None, cached: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor, cond: Any,
    terminal: torch.Tensor, rows: torch.Tensor,
) -> torch.Tensor:
    """Raw r(x̂0(x)) ``[N]`` (detached) on ``rows`` (zeros elsewhere), from the cache when present."""
    like = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if not bool(rows.any()):
        return like
    if cached is not None:
        return torch.where(rows, cached.to(like), like).detach()
    la = _need_lookahead(lookahead, "lookahead rewards r(x̂0(x))")
    with torch.no_grad():
        out = apply_rows(lambda xx, tt, cc, terminal: la.log_reward(xx, tt, cc, terminal=terminal),
                         rows, x, t, cond, like, terminal=terminal)
    return out.to(like).detach()


def lookahead_grad(
    lookahead: Lookahead | None, cached: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor, cond: Any,
    terminal: torch.Tensor, rows: torch.Tensor,
) -> torch.Tensor:
    """Raw ∇_x r(x̂0(x)) like x (detached) on ``rows`` (zeros elsewhere), from the cache when present."""
    if not bool(rows.any()):
        return torch.zeros_like(x).detach()
    if cached is not None:
        m = rows.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(m, cached.to(x), torch.zeros_like(x)).detach()
    la = _need_lookahead(lookahead, "reward gradients ∇r(x̂0(x))")
    out = apply_rows(lambda xx, tt, cc, terminal: la.grad_log_reward(xx, tt, cc, terminal=terminal),
                     rows, x.detach(), t, cond, x, terminal=terminal)
    return out.to(x).detach()


def lookahead_pair(
    kind: str, lookahead: Lookahead | None, cached_t: torch.Tensor | None, cached_next: torch.Tensor | None,
    x_t: torch.Tensor, t: torch.Tensor, rows_t: torch.Tensor, x_next: torch.Tensor, t_next: torch.Tensor,
    rows_next: torch.Tensor, terminal_next: torch.Tensor, cond: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookahead values (``kind="reward"``, ``[N]``) or gradients (``kind="grad"``, like x) at x_t and x_next,
    from the caches when present, otherwise with a single Lookahead call for both states."""
    single = lookahead_reward if kind == "reward" else lookahead_grad
    no_term = torch.zeros_like(terminal_next)
    need_t = bool(rows_t.any()) and cached_t is None
    need_next = bool(rows_next.any()) and cached_next is None
    if not (need_t and need_next):
        return (single(lookahead, cached_t, x_t, t, cond, no_term, rows_t),
                single(lookahead, cached_next, x_next, t_next, cond, terminal_next, rows_next))
    if kind == "reward":
        la = _need_lookahead(lookahead, "lookahead rewards r(x̂0(x))")
        like = torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        with torch.no_grad():
            a, b = apply_two(lambda x, tt, c, terminal: la.log_reward(x, tt, c, terminal=terminal),
                             x_t, t, rows_t, x_next, t_next, rows_next, cond, like, like, no_term, terminal_next)
    else:
        la = _need_lookahead(lookahead, "reward gradients ∇r(x̂0(x))")
        a, b = apply_two(lambda x, tt, c, terminal: la.grad_log_reward(x, tt, c, terminal=terminal),
                         x_t.detach(), t, rows_t, x_next.detach(), t_next, rows_next, cond, x_t, x_next,
                         no_term, terminal_next)
    return a.detach(), b.detach()


def check_terminal_reward(batch: TransitionBatch) -> None:
    bad = batch.is_last & ~torch.isfinite(batch.reward)
    if bool(bad.any()):
        raise ValueError(
            f"batch.reward is NaN/inf for {int(bad.sum())} terminal transitions; the trainer must fill "
            "traj.reward with finite rewards before selecting transitions"
        )


class TransitionObjective(Objective):
    """Base for objectives trained on individual transitions; holds the common options."""

    default_reduction = "sum"
    default_fraction = 1.0
    default_stratified = False

    def __init__(
        self,
        *,
        eta: float = 1.0,
        log_prob_reduction: str | None = None,
        trust_region: float = 0.0,
        fraction: float | None = None,
        stratified: bool | None = None,
        include_last: bool = True,
    ):
        super().__init__()
        if not float(eta) > 0:
            raise ValueError(f"eta={eta} must be > 0 (the kernels need a density; 1.0 = DDPM)")
        self.eta = float(eta)
        self.log_prob_reduction = self.default_reduction if log_prob_reduction is None else log_prob_reduction
        check_choice("log_prob_reduction", self.log_prob_reduction, REDUCTIONS)
        self.trust_region = check_nonneg("trust_region", trust_region)
        self.fraction = self.default_fraction if fraction is None else float(fraction)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1]")
        self.stratified = self.default_stratified if stratified is None else bool(stratified)
        self.include_last = bool(include_last)

    # -- hooks the trainer calls ----------------------------------------------------------------------
    def select_transitions(self, traj: TrajectoryBatch, generator: torch.Generator | None = None) -> TransitionBatch:
        return select_transitions(
            traj, fraction=self.fraction, stratified=self.stratified, include_last=self.include_last,
            generator=generator,
        )

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def working_precision(batch: TransitionBatch) -> TransitionBatch:
        """The batch with states in at least float32: balance residuals are differences of large summed
        log-probabilities, which half precision cannot represent."""
        dtype = torch.promote_types(batch.x_t.dtype, torch.float32)
        if batch.x_t.dtype == dtype and batch.x_next.dtype == dtype:
            return batch
        changes = {"x_t": batch.x_t.to(dtype), "x_next": batch.x_next.to(dtype), "eps_old": batch.eps_old.to(dtype)}
        for name in ("lookahead_grad_t", "lookahead_grad_next"):
            if getattr(batch, name) is not None:
                changes[name] = getattr(batch, name).to(dtype)
        return batch.with_fields(**changes)

    def policy_kernel(
        self, policy: PolicyModel, batch: TransitionBatch, *, reference: bool = False, x_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, GaussianKernel]:
        return transition_kernel(policy, batch, eta=self.eta, reference=reference, x_t=x_t)

    def trust_region_term(self, eps: torch.Tensor, batch: TransitionBatch) -> torch.Tensor:
        """``λ · mean_dims(ε_θ − ε_old)²`` ``[N]`` (zeros when λ = 0)."""
        if self.trust_region == 0.0:
            return torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        return self.trust_region * mean_dims((eps - batch.eps_old.to(eps)) ** 2)

    def old_log_pf(self, batch: TransitionBatch, like: torch.Tensor) -> torch.Tensor:
        """``batch.log_pf_old`` converted to this objective's reduction (exact: mean = sum / D) when the
        batch says how it was reduced."""
        old = batch.log_pf_old.to(like)
        rec = batch.log_prob_reduction
        if rec is None or rec == self.log_prob_reduction:
            return old
        D = state_dim(batch.x_t)
        return old / D if self.log_prob_reduction == "mean" else old * D

    def reduction_scale(self, x: torch.Tensor) -> float:
        """1 for ``sum``; 1/D for ``mean`` (applied to log-densities and their scores)."""
        return 1.0 if self.log_prob_reduction == "sum" else 1.0 / state_dim(x)

    @staticmethod
    def output(per_transition: torch.Tensor, residual: torch.Tensor, terms: dict[str, torch.Tensor],
               extra: dict[str, float] | None = None) -> LossOutput:
        """Mean over transitions; ``terms`` are ``[N]`` tensors logged as ``loss/<name>`` means."""
        loss = per_transition.mean()
        metrics = {"loss/total": float(loss.detach())}
        for name, value in terms.items():
            metrics[f"loss/{name}"] = float(value.detach().mean())
        metrics["residual/abs_mean"] = float(residual.detach().abs().mean())
        if extra:
            metrics.update(extra)
        return LossOutput(loss=loss, residual=residual.detach(), metrics=metrics)


def ppo_clip_options(objective: TransitionObjective, clip_range: float, adv_clip: float) -> tuple[float, float]:
    """Validated ``(clip_range, adv_clip)`` of a PPO-style surrogate; warns when a tiny clip range meets
    summed log-probs (it would clip almost every ratio)."""
    clip_range, adv_clip = float(clip_range), float(adv_clip)
    if not clip_range > 0:
        raise ValueError(f"clip_range={clip_range} must be > 0 (1e-4 with mean reduction, ~0.2 with sum)")
    if not adv_clip > 0:
        raise ValueError(f"adv_clip={adv_clip} must be > 0 (e.g. 5)")
    if objective.log_prob_reduction == "sum" and clip_range < 1e-2:
        warnings.warn(
            f"{objective.name}: clip_range={clip_range} with log_prob_reduction='sum' clips almost every ratio "
            "(the 1e-4 of DDPO's code is for per-dimension mean log-ratios); use clip_range ~0.2 with 'sum' or "
            "log_prob_reduction='mean'", stacklevel=3,
        )
    return clip_range, adv_clip


def approx_kl(log_pf: torch.Tensor, log_pf_old: torch.Tensor) -> float:
    """DDPO's ``mean ½(log π − log π_old)²``."""
    return float((0.5 * (log_pf.detach() - log_pf_old.to(log_pf)) ** 2).mean())
