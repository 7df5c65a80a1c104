"""DAG-DB: detailed balance with a forward-looking learned log-flow (spec/dag.md §2)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import (
    GAMMAS,
    TransitionObjective,
    apply_rows,
    apply_two,
    approx_kl,
    check_choice,
    check_terminal_reward,
    gamma_weight,
    lookahead_pair,
    lookahead_reward,
)
from gfnalign.objectives.heads import make_log_flow_head

#: "full": the head gets the gradient of δ² through f_phi(x_t) and f_phi(x_next) (the papers);
#: "semi": only through f_phi(x_t), with f_phi(x_next) a fixed target (semi-gradient TD);
#: "target": as "semi", with f(x_next) from a Polyak-averaged copy of the head (a target network).
FLOW_GRADIENTS = ("full", "semi", "target")
#: "squared": the head minimises δ² like the policy (the papers); "exponential": the head minimises
#: 2(e^{−δ} + δ − 1), whose minimiser is log E[exp(·)] rather than E[log(·)] (see the class docstring).
FLOW_LOSSES = ("squared", "exponential")
#: "squared": θ minimises δ² (the papers); "forward_kl": θ minimises −2(e^{−δ} − 1)·log P_F with the weight
#: detached, a moment-matching (forward-KL) fit of the balanced kernel (see the class docstring).
POLICY_LOSSES = ("squared", "forward_kl")


@register("dag-db")
class DAGDB(TransitionObjective):
    r"""DAG-DB (Zhang et al. 2024): squared log detailed-balance residual per transition.

    Loss per transition ``x_t -> x_next`` (diffusion timesteps t > t_next)::

        log F(x, t)   = f_phi(x, t, c) + beta * gamma_t * r_hat(x) (forward_looking=True)
                      = f_phi(x, t, c)                          (forward_looking=False)
        log F(x_final) = beta * reward                          (terminal, is_last: overwritten)
        delta = log F(x_t) + log P_F^theta(x_next | x_t) - log P_B(x_t | x_next) - log F(x_next)
        L     = mean_N [ delta^2 + lambda * mean_dims(eps_theta - eps_old)^2 ]

    ``gamma_t`` (option ``gamma``: ``"one"`` (default, the DAG code), ``"alpha_bar"`` or ``"sqrt_alpha_bar"``
    of the state's noise level, as in ∇-GFlowNet) damps the forward-looking guess where x̂0 is
    uncertain; the terminal flow is never damped. It does not move the fixed point (f_phi absorbs it).
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
    f_phi(x_t)                   --             yes
    f_phi(x_next)                --             "full" only
    beta * r_hat (lookahead)     no             no
    log P_F^theta                yes            --
    log P_B                      constant       constant
    beta * reward (terminal)     no             no
    trust region                 yes            --
    ===========================  =============  =============

    Terminal rows never evaluate f_phi at the terminal state (its value would be discarded).

    ``relative`` (default False): **prior-relative detailed balance**. P_B is replaced by the frozen
    pretrained model's own forward kernel P_F^# (the policy with ``reference=True``, under no-grad)::

        delta = log G(x_t) + log P_F^theta(x_next | x_t) - log P_F^#(x_next | x_t) - log G(x_next)
        log G(x_final) = beta * reward,   log G(x) = f_phi(x, t, c) + beta * gamma_t * r_hat(x) elsewhere

    Fixed point: delta = 0 on every transition telescopes along a trajectory to
    P^theta(tau | x_start) = P^#(tau | x_start) * exp(beta * r(x_final)) / G(x_start), with
    G(x) = E_#[exp(beta * r(x_final)) | x] the pretrained chain's soft value (what the head learns, on top of
    the forward-looking guess beta * r(x̂0(x)), which is exactly log G when the pretrained x̂0 is
    deterministic). No log p is needed and P_B does not appear. The terminal law is
    ∫ N(x_start) p_#(x_final | x_start) R(x_final) / G(x_start) dx_start: the pretrained **sampler's** terminal
    marginal tilted by R = exp(beta * r) exactly when G(x_start) does not depend on x_start (a start that
    carries no memory of the image), a per-noise tilt otherwise (the value-function bias of Adjoint
    Matching, arXiv 2409.08861; DESIGN.md §5). On images this is the only DAG form whose
    target keeps the prior: ∝ p_#-sampler(x) * exp(beta * r(x)) (``mean`` reduction: exp(D * beta * r)).
    Costs one extra no-grad pass of the frozen model per trained transition (``needs_reference`` is True).
    Gradient table: as above, with ``log P_F^#`` in place of ``log P_B`` (a constant for θ and φ; the
    reference is never trained).

    ``flow_gradient`` (how the head φ is fitted; θ's gradient is the same in all three):

    * ``"full"`` (default, the papers): through f_phi(x_t) and f_phi(x_next);
    * ``"semi"``: through f_phi(x_t) only; f_phi(x_next) is a fixed target (semi-gradient TD);
    * ``"target"``: as ``"semi"``, with log F(x_next) from a Polyak-averaged copy of the head
      (``target ← (1 − τ)·target + τ·head`` after each optimizer step, ``τ = target_ema``, default 0.1),
      as in DQN. The copy is part of ``state_dict()`` (checkpoints), never of ``trainable_modules()``.

    All three vanish at δ = 0, so the exact fixed point is the same. They differ when the Gaussian
    kernels cannot satisfy detailed balance exactly (finite steps): the full gradient also fits each
    state's *incoming* residuals, whose average over the transitions that move mass between modes is not
    the same for every mode, so the learned flow grows in the direction of the tilt and the policy
    follows it. Started at the exact solution of the toy's grid9 case (exact tilted ε, exact flow plus a
    zero learned head), ``"full"`` drifts steadily from mode-mass TV 0.021 to 0.140 in 1600 updates
    (0.038, 0.065, 0.104 on the way) while ``"target"`` stays between 0.030 and 0.046
    (benchmarks/dag_flow_drift.py). Plain ``"semi"`` removes the drift too but oscillated when started
    from the pretrained model on ring4; the target network damps that.

    ``flow_loss`` (how the head is fitted, with ``"semi"`` or ``"target"``; θ's loss stays δ²):

    * ``"squared"`` (default, the papers): δ². With f(x_next) held fixed the head's minimiser is
      f(x_t) = E_{P_F}[ℓ], ℓ = log F(x_next) + log P_B − log P_F, i.e. log F*(x_t) − KL(P_F ‖ P*), where
      F*(x_t) = ∫ F(x_next) P_B(x_t | x_next) dx_next is the exact flow and P* = P_B·F(x_next)/F*(x_t) the
      balanced kernel. A Gaussian policy with finitely many steps cannot equal P*, so the learned flow sits
      below the exact one by a state-dependent KL (the Jensen gap of a mean of logs).
    * ``"exponential"``: 2(e^{−δ} + δ − 1), the curvature of δ² at 0. Its gradient in f(x_t),
      2(1 − e^{−δ}), vanishes in expectation at f(x_t) = log E_{P_F}[e^ℓ] = log F*(x_t) whatever the
      policy: a single-sample fit of the exact flow (importance sampling with P_F as the proposal; exact
      when x_next was sampled by the policy being scored, i.e. on-policy).
      Beyond ``exp_clamp`` nats (δ < −exp_clamp, default 0.7) the loss continues linearly: e^{−δ} is
      heavy-tailed far from balance. On the toy (three training seeds) the clamp trades the two 2-D cases
      against each other: ring4 under-tilts more the closer the fit is to the exact flow, grid9 needs the
      exact flow (worst energy distance over the seeds, in units of the discretisation floor: squared 6.3,
      clamp 0.5 4.7, 0.7 3.1, 1 4.1; BENCHMARKS.md "DAG's flow: the exponential loss"). The fit is exact
      only for residuals inside the clamp. With ``log_prob_reduction="mean"`` e^{−δ} is no longer an
      importance weight (δ holds log-probabilities divided by D), so the "exact flow" reading does not
      hold; the loss still vanishes at exact balance.

    ``policy_loss`` (how θ is fitted):

    * ``"squared"`` (default, the papers): δ². On-policy, with a fixed-variance Gaussian P_F, its gradient
      in the mean μ is 2·E_{P_F}[δ·(x_next − μ)]/σ², which vanishes when E_{P_F}[∇ log P*] = 0: the
      reverse-KL projection of the balanced kernel P* (for the mean; the variance is fixed).
    * ``"forward_kl"``: −2·(e^{−δ} − 1)·log P_F with the weight detached (and clamped at ``exp_clamp``):
      e^{−δ} = P*/P_F·F*(x_t)/F(x_t) is an importance weight to P*, so the gradient is the forward-KL one,
      −E_{P*}[∇ log P_F], which vanishes when μ is the mean of P* (moment matching). The − 1 is a baseline
      (E_{P_F}[∇ log P_F] = 0 on-policy); near balance the gradient equals the squared loss's to first
      order. Use it with ``flow_loss="exponential"`` (the weight needs the exact flow's normalisation).
      Measured on the toy it changes nothing (ring4 ED 2.7× / 3.8× the floor against 2.8× / 4.1× with
      ``squared``, exp_clamp 1, two seeds), so it is an option for experiments, not a default anywhere.
    """

    name = "dag-db"
    transition_separable = True  # δ² or its exponential form per transition, averaged
    needs_reward_gradient = False
    needs_reference = False
    learns_start_value = True

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
        flow_gradient: str = "full",
        target_ema: float = 0.1,
        gamma: str = "one",
        flow_loss: str = "squared",
        exp_clamp: float = 0.7,
        policy_loss: str = "squared",
        relative: bool = False,
        **common: Any,
    ):
        super().__init__(**common)
        if not isinstance(relative, bool):
            raise ValueError(f"relative={relative!r} must be true or false (true: balance against the frozen "
                             "pretrained forward kernel instead of the noising P_B)")
        self.relative = relative
        # the frozen pretrained kernel P_F^# replaces P_B: the trainer must keep the reference available
        self.needs_reference = relative
        check_choice("flow_loss", flow_loss, FLOW_LOSSES)
        if flow_loss == "exponential" and flow_gradient == "full":
            raise ValueError("flow_loss='exponential' fits log F(x_t) with log F(x_next) held fixed; it needs "
                             "flow_gradient='target' or 'semi' (got 'full')")
        self.flow_loss = flow_loss
        check_choice("policy_loss", policy_loss, POLICY_LOSSES)
        if policy_loss == "forward_kl" and flow_loss != "exponential":
            raise ValueError(f"policy_loss='forward_kl' weights transitions by e^(-delta), which is an importance "
                             f"weight only with the exact flow: it needs flow_loss='exponential' (got {flow_loss!r})")
        self.policy_loss = policy_loss
        if not exp_clamp > 0:  # also rejects NaN
            raise ValueError(f"exp_clamp={exp_clamp} must be > 0 (nats)")
        self.exp_clamp = float(exp_clamp)
        self.forward_looking = bool(forward_looking)
        self.lookahead_reads = frozenset({"reward"}) if self.forward_looking else frozenset()
        check_choice("flow_gradient", flow_gradient, FLOW_GRADIENTS)
        self.flow_gradient = flow_gradient
        check_choice("gamma", gamma, GAMMAS)
        if gamma != "one" and not self.forward_looking:
            raise ValueError(f"gamma={gamma!r} weights the forward-looking term; it needs forward_looking=True")
        self.gamma = gamma
        if log_flow_head is None:
            if state_shape is None:
                raise ValueError(f"{self.name}: pass state_shape (e.g. (4, 64, 64) or (2,)) or log_flow_head")
            log_flow_head = make_log_flow_head(
                state_shape, cond_dim, hidden=head_hidden, num_train_timesteps=num_train_timesteps,
                zero_init=head_zero_init,
            )
        self.log_flow_head = log_flow_head
        self.target_ema = float(target_ema)
        if not 0.0 < self.target_ema <= 1.0:
            raise ValueError(f"target_ema={target_ema} must be in (0, 1] (the share of the head moved into the "
                             "target network after each optimizer step)")
        # a child module so that checkpoints (objective.state_dict()) carry it; never trained
        self.target_log_flow_head = (
            copy.deepcopy(log_flow_head).requires_grad_(False) if flow_gradient == "target" else None
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"log_flow_head": self.log_flow_head}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Polyak update ``target ← (1 − τ)·target + τ·head`` (``flow_gradient="target"`` only)."""
        if self.target_log_flow_head is None:
            return
        for tgt, src in zip(self.target_log_flow_head.parameters(), self.log_flow_head.parameters(), strict=True):
            tgt.lerp_(src.detach().to(tgt.dtype), self.target_ema)
        for tgt, src in zip(self.target_log_flow_head.buffers(), self.log_flow_head.buffers(), strict=True):
            tgt.copy_(src)

    # -- the balance residual --------------------------------------------------------------------------
    def log_flows(
        self, batch: TransitionBatch, lookahead: Lookahead | None, beta: float, t: torch.Tensor, t_next: torch.Tensor,
        alpha_bar: torch.Tensor | None = None, alpha_bar_next: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log F(x_t) [N], log F(x_next) [N])``; the second is ``beta * reward`` on terminal rows.

        ``alpha_bar`` / ``alpha_bar_next`` are needed when ``gamma`` is not ``"one"``."""
        x_t, x_next, cond = batch.x_t, batch.x_next, batch.cond
        dtype = x_t.dtype
        nonterminal = ~batch.is_last
        all_rows = torch.ones_like(batch.is_last)
        like = torch.zeros(len(batch), dtype=dtype, device=x_t.device)
        if self.target_log_flow_head is not None:
            log_f_t = self.log_flow_head(x_t, t, cond).to(like.dtype)
            with torch.no_grad():
                log_f_next = apply_rows(self.target_log_flow_head, nonterminal, x_next, t_next, cond, like)
            log_f_next = log_f_next.to(like.dtype)
        else:
            # one head pass over x_t (all rows) and x_next (non-terminal rows)
            log_f_t, log_f_next = apply_two(self.log_flow_head, x_t, t, all_rows, x_next, t_next, nonterminal, cond,
                                            like, like)
            if self.flow_gradient == "semi":
                log_f_next = log_f_next.detach()
        if self.forward_looking:
            r_t, r_next = lookahead_pair("reward", lookahead, batch.lookahead_reward_t, batch.lookahead_reward_next,
                                         x_t, t, all_rows, x_next, t_next, nonterminal, batch.is_last, cond)
            if self.gamma != "one":
                if alpha_bar is None or alpha_bar_next is None:
                    raise ValueError(f"{self.name}: gamma={self.gamma!r} needs the alpha-bars of both states")
                r_t = gamma_weight(self.gamma, alpha_bar.to(r_t.dtype)) * r_t
                r_next = gamma_weight(self.gamma, alpha_bar_next.to(r_next.dtype)) * r_next
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
        if self.relative:  # log P_F^#(x_next | x_t) of the frozen pretrained model, never trained
            with torch.no_grad():
                _, ref_kernel = self.policy_kernel(policy, batch, reference=True)
                log_pb = ref_kernel.log_prob(batch.x_next, red)
        else:
            log_pb = sched.backward_kernel(batch.x_next, batch.step).log_prob(x_t, red)
        log_f_t, log_f_next = self.log_flows(batch, lookahead, beta, t, t_next, a, an)
        delta = log_f_t + log_pf - log_pb.detach() - log_f_next
        metrics = {
            "flow/log_flow_t_mean": float(log_f_t.detach().mean()),
            "policy/approx_kl": approx_kl(log_pf, self.old_log_pf(batch, log_pf)),
            "policy/log_pf_mean": float(log_pf.detach().mean()),
        }
        return delta, log_pf, eps, metrics

    @torch.no_grad()
    def log_start_weight(
        self, policy: PolicyModel, lookahead: Lookahead | None, x: torch.Tensor, cond: Any, *, beta: float
    ) -> torch.Tensor:
        """``[N]`` importance log-weight of start states ``x`` against N(0, I) for the law the balanced chain needs
        at its first step: ``relative``: log G(x) (the start ∝ N(0, I)·G gives the pretrained path measure tilted
        by exp(β·r)); otherwise log F(x) + ½‖x‖² (the start ∝ F gives the target ∝ R). ``mean`` reduction: the
        learned flow is in units of 1/D and is multiplied back by D."""
        n = x.shape[0]
        step = torch.zeros(n, dtype=torch.int64, device=x.device)
        t, _, a, _ = policy.schedule.at_steps(step, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        log_f = self.log_flow_head(x, t, cond).to(a.dtype)
        if self.forward_looking:
            no_term = torch.zeros(n, dtype=torch.bool, device=x.device)
            r = lookahead_reward(lookahead, None, x, t, cond, no_term, torch.ones_like(no_term)).to(a.dtype)
            log_f = log_f + beta * gamma_weight(self.gamma, a) * r
        log_f = log_f / self.reduction_scale(x)
        if self.relative:
            return log_f
        return log_f + 0.5 * x.detach().to(a.dtype).flatten(1).pow(2).sum(1)

    def flow_fit(self, delta_head: torch.Tensor) -> torch.Tensor:
        """[N] the head's loss on a residual that carries only φ's gradient (``flow_loss``)."""
        if self.flow_loss == "squared":
            return delta_head**2
        # beyond the clamp the loss continues linearly (its gradient in f(x_t) stays 2(1 − e^{clamp}))
        neg = -delta_head
        clamped = neg.clamp(max=self.exp_clamp)
        return 2 * (clamped.exp() * (1 + neg - clamped) - neg - 1)

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        delta, log_pf, eps, metrics = self.delta(batch, policy, lookahead, beta)
        tr = self.trust_region_term(eps, batch)
        if self.flow_loss == "squared" and self.policy_loss == "squared":  # the papers: one δ² for θ and φ
            db = delta**2
            return self.output(db + tr, delta, {"db": db, "trust_region": tr}, metrics)
        # the same residual twice: one carries only θ's gradient (through log P_F), one only φ's
        # (written so that both keep exactly δ's value in float32)
        pf_grad_only = log_pf - log_pf.detach()
        delta_policy = delta.detach() + pf_grad_only
        delta_head = delta - pf_grad_only
        if self.policy_loss == "squared":
            db = delta_policy**2
        else:
            # weight e^{−δ} = P*/P_F (an importance weight to the balanced kernel), detached and clamped like
            # the flow's exponential; minus 1 as a baseline (E_{P_F}[∇ log P_F] = 0 on-policy)
            weight = (-delta.detach()).clamp(max=self.exp_clamp).exp() - 1
            db = -2 * weight * log_pf
        flow_fit = self.flow_fit(delta_head)
        name = "db" if self.policy_loss == "squared" else "forward_kl"
        return self.output(db + flow_fit + tr, delta, {name: db, "flow_fit": flow_fit, "trust_region": tr}, metrics)
