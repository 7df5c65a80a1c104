"""DAG-DB: detailed balance with a forward-looking learned log-flow (spec/dag.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.kernels import backward_kernel
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import (
    TransitionObjective,
    apply_two,
    approx_kl,
    check_terminal_reward,
    lookahead_pair,
)
from gfnalign.objectives.heads import make_log_flow_head


@register("dag-db")
class DAGDB(TransitionObjective):
    r"""DAG-DB (Zhang et al. 2024): squared log detailed-balance residual per transition.

    Loss per transition ``x_t -> x_next`` (diffusion timesteps t > t_next)::

        log F(x, t)   = f_phi(x, t, c) + beta * r_hat(x)        (forward_looking=True)
                      = f_phi(x, t, c)                          (forward_looking=False)
        log F(x_final) = beta * reward                          (terminal, is_last: overwritten)
        delta = log F(x_t) + log P_F^theta(x_next | x_t) - log P_B(x_t | x_next) - log F(x_next)
        L     = mean_N [ delta^2 + lambda * mean_dims(eps_theta - eps_old)^2 ]

    ``r_hat(x)`` is the RAW lookahead reward r(x̂0(x)) (cached on the batch or from the Lookahead,
    no gradient). P_B is the fixed noising kernel (no parameters).

    Fixed point: delta = 0 on every transition is detailed balance with terminal flow R = exp(beta*r),
    so the terminal marginal is ∝ exp(beta * r(x)) (Lebesgue measure in latent space; the prior is kept
    only through initialisation and the trust region). With ``log_prob_reduction="mean"`` the same
    holds for ``D·log P``, i.e. the target becomes ∝ exp(D·beta·r).

    Where gradients stop:

    ===========================  =============  =============
    term                         theta (policy) phi (f head)
    ===========================  =============  =============
    f_phi(x_t), f_phi(x_next)    --             yes
    beta * r_hat (lookahead)     no             no
    log P_F^theta                yes            --
    log P_B                      constant       constant
    beta * reward (terminal)     no             no
    trust region                 yes            --
    ===========================  =============  =============

    Terminal rows never evaluate f_phi at the terminal state (its value would be discarded).
    """

    name = "dag-db"
    needs_reward_gradient = False
    needs_reference = False

    def __init__(
        self,
        state_shape: Sequence[int] | None = None,
        cond_dim: int | None = None,
        *,
        forward_looking: bool = True,
        log_flow_head: nn.Module | None = None,
        head_hidden: int | None = None,
        head_zero_init: bool = True,
        num_train_timesteps: int = 1000,
        **common: Any,
    ):
        super().__init__(**common)
        self.forward_looking = bool(forward_looking)
        if log_flow_head is None:
            if state_shape is None:
                raise ValueError(f"{self.name}: pass state_shape (e.g. (4, 64, 64) or (2,)) or log_flow_head")
            log_flow_head = make_log_flow_head(
                state_shape, cond_dim, hidden=head_hidden, num_train_timesteps=num_train_timesteps,
                zero_init=head_zero_init,
            )
        self.log_flow_head = log_flow_head

    # -- the balance residual --------------------------------------------------------------------------
    def log_flows(
        self, batch: TransitionBatch, lookahead: Lookahead | None, beta: float, t: torch.Tensor, t_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log F(x_t) [N], log F(x_next) [N])``; the second is ``beta * reward`` on terminal rows."""
        x_t, x_next, cond = batch.x_t, batch.x_next, batch.cond
        dtype = x_t.dtype
        nonterminal = ~batch.is_last
        all_rows = torch.ones_like(batch.is_last)
        like = torch.zeros(len(batch), dtype=dtype, device=x_t.device)
        # one head pass over x_t (all rows) and x_next (non-terminal rows)
        log_f_t, log_f_next = apply_two(self.log_flow_head, x_t, t, all_rows, x_next, t_next, nonterminal, cond,
                                        like, like)
        if self.forward_looking:
            r_t, r_next = lookahead_pair("reward", lookahead, batch.lookahead_reward_t, batch.lookahead_reward_next,
                                         x_t, t, all_rows, x_next, t_next, nonterminal, batch.is_last, cond)
            log_f_t = log_f_t + beta * r_t
            log_f_next = log_f_next + beta * r_next
        terminal = beta * batch.reward.to(x_t.device, dtype)
        log_f_next = torch.where(batch.is_last, terminal, log_f_next)
        return log_f_t, log_f_next

    def delta(
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, beta: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(delta [N] with grad, log_pf [N], eps [N,...], metrics)``."""
        batch = self.working_precision(batch)
        check_terminal_reward(batch)
        sched = policy.schedule
        x_t = batch.x_t
        t, t_next, a, an = sched.at_steps(batch.step, dtype=x_t.dtype, device=x_t.device)
        eps, kernel = self.policy_kernel(policy, batch)
        red = self.log_prob_reduction
        log_pf = kernel.log_prob(batch.x_next, red)
        log_pb = backward_kernel(batch.x_next, a, an).log_prob(x_t, red)
        log_f_t, log_f_next = self.log_flows(batch, lookahead, beta, t, t_next)
        delta = log_f_t + log_pf - log_pb.detach() - log_f_next
        metrics = {
            "flow/log_flow_t_mean": float(log_f_t.detach().mean()),
            "policy/approx_kl": approx_kl(log_pf, self.old_log_pf(batch, log_pf)),
            "policy/log_pf_mean": float(log_pf.detach().mean()),
        }
        return delta, log_pf, eps, metrics

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        delta, _, eps, metrics = self.delta(batch, policy, lookahead, beta)
        db = delta**2
        tr = self.trust_region_term(eps, batch)
        return self.output(db + tr, delta, {"db": db, "trust_region": tr}, metrics)
