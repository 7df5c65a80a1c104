"""A small on-policy training loop for the analytic toy world, and its evaluation against the exact target.

One update (``--steps`` counts these):

    x_init ~ N(0, I)                                 [B, d]
    traj   = rollout(policy, None, x_init)           (DDPM, eta = 1, summed log-probs; with ``schedule=flow``
                                                      the Flow-GRPO SDE at noise level ``eta``, default √2)
    traj.reward = r_eff(traj.final)                  (r; r + log p_f / β for the Lebesgue-target methods:
                                                      dag-db / dag-kl without ``relative``, nabla-db)
    traj   = objective.prepare(traj)
    batch  = objective.select_transitions(traj, generator)
    batch.lookahead_reward_t/_next = r_eff(x̂0(x))   (cached lookahead, only for objectives whose
                                                      ``lookahead_reads`` has "reward", only at the selected
                                                      transitions' states: as the trainer does)
    loss   = objective(batch, policy, lookahead, beta=β_e).loss  -> AdamW step (policy MLP lr, heads lr)

Evaluation: M samples of the fine-tuned chain, of the exact-ε (pretrained) chain, of the exact tilted
terminal mixture and of the exact untilted terminal mixture. See :func:`evaluate` for the OUT.json keys.

This loop is deliberately independent of ``gfnalign.training`` (accelerate, checkpoints, logging).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.toy.metrics import energy_distance, mode_mass, total_variation
from gfnalign.toy.mixture import DTYPE, GaussianMixture
from gfnalign.toy.rewards import ToyReward, bind_final_alpha_bar
from gfnalign.toy.world import (
    NOISE_SCHEDULES,
    ToyLookahead,
    ToyPolicy,
    final_alpha_bar,
    oracle_mixture,
    sample_chain,
    toy_schedule,
)

METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "grpo", "reward-backprop")
#: methods whose fixed point is ∝ R alone (Lebesgue target): the toy hands them r + log p_f / β so the target
#: is p_f·exp(βr). dag-db / dag-kl with ``objective.relative: true`` are prior-relative and get the plain r.
PRIOR_IN_REWARD = ("dag-db", "dag-kl", "nabla-db")
#: methods that maximise the reward (no exact target; the toy reports their drift)
BASELINES = ("ddpo", "grpo", "reward-backprop")

# Per-method defaults, tuned on two shared CPU cores for about two minutes per method (see BENCHMARKS.md).
# "objective": options for build_objective; the rest drives this loop.
DEFAULTS: dict[str, dict[str, Any]] = {
    # The learned flow-score head, decoupled from the policy (BENCHMARKS.md "Residual ∇-DB: decoupling the
    # head"): the head learns ψ by temporal differences, ψ(x_t) ≈ J_#(x_t)ᵀψ(x_next) (bootstrap), and the
    # policy fits ε_# − √(1−ᾱ_t)ψ(x_t) (forward_at current). The paper's coupling (head_target both,
    # sampled reverse, forward_at next) reached TV 0.17–0.29 here; no_flow (the guess alone) 0.031 / 0.037.
    "residual-nabla-db": {
        "objective": {"gamma": "one", "head_target": "reverse", "reverse_estimator": "bootstrap",
                      "forward_at": "current"},
        "updates": 1200, "batch_size": 256, "lr": 3e-3, "head_lr": 1e-2, "lookahead_model": "reference",
    },
    # flow_gradient="target": log F(x_next) from a Polyak copy of the head (τ = 0.1), no gradient through
    # it. With the papers' full gradient the learned flow drifts away from the exact solution on grid9
    # (benchmarks/dag_flow_drift.py) and the sampler over-tilts (TV 0.107 / 0.111 at these budgets).
    # flow_loss="exponential": the head fits log E[exp] (the exact flow) instead of E[log], which sits below
    # it by KL(P_F ‖ P*). exp_clamp=0.7 (the loss is linear for δ < −0.7) against the heavy tail of e^{−δ}:
    # over training seeds 0–2 the worst ED / contract floor is 3.1 (squared: 6.3; clamp 0.5: 4.7; 1: 4.1).
    # BENCHMARKS.md "DAG's flow: the exponential loss".
    "dag-db": {
        "objective": {"fraction": 0.1, "stratified": True, "flow_gradient": "target", "target_ema": 0.1,
                      "flow_loss": "exponential", "exp_clamp": 0.7},
        "updates": 1500, "batch_size": 256, "lr": 1e-3, "head_lr": 3e-3, "lookahead_model": "reference",
    },
    # rloo_group 0: the toy's single-call update is one leave-one-out group (its measured setting; the
    # authors' and the library's default is 8 trajectories at permuted steps per group)
    "dag-kl": {
        "objective": {"rloo_group": 0, "fraction": 0.1, "stratified": True, "flow_gradient": "target", "target_ema": 0.1,
                      "flow_loss": "exponential", "exp_clamp": 0.7},
        "updates": 1500, "batch_size": 256, "lr": 1e-3, "head_lr": 3e-3, "lookahead_model": "reference",
    },
    # γ = 1: the reward's guess is not damped (the prior's ∇log p_t never is, see ToyLookahead's gamma).
    # forward_control="antithetic" removes the O(1/σ_t) z-odd noise of the forward residual from the policy
    # gradient (unbiased, same fixed point); with it lr 1e-3 (3e-3 over-tilts). See BENCHMARKS.md.
    "nabla-db": {
        "objective": {"gamma": "one", "forward_control": "antithetic"},
        "updates": 1200, "batch_size": 256, "lr": 1e-3, "head_lr": 1e-3, "lookahead_model": "reference",
    },
    # relative trajectory balance: the gradient through 20% of each trajectory's steps (×K/J), the others read
    # from the rollout (exact: one update per rollout, on-policy); log Z is one scalar (unconditional world)
    "rtb": {
        "objective": {"grad_fraction": 0.2, "detached_log_pf": "recorded"},
        "updates": 1500, "batch_size": 256, "lr": 1e-3, "head_lr": 3e-2, "lookahead_model": "reference",
    },
    # reward maximisers: the linear reward is unbounded, so a small lr and few updates keep the drift finite
    "ddpo": {
        "objective": {"clip_range": 0.2, "fraction": 0.2},
        "updates": 300, "batch_size": 256, "lr": 1e-4, "head_lr": 1e-3, "lookahead_model": "reference",
    },
    # Flow-GRPO with DDPO's toy budget (one prompt: the group is the whole batch)
    "grpo": {
        "objective": {"clip_range": 0.2, "fraction": 0.2},
        "updates": 300, "batch_size": 256, "lr": 1e-4, "head_lr": 1e-3, "lookahead_model": "reference",
    },
    "reward-backprop": {
        "objective": {"variant": "draft-k", "k": 10},
        "updates": 300, "batch_size": 256, "lr": 1e-4, "head_lr": 1e-3, "lookahead_model": "reference",
    },
}
#: loop defaults for an objective registered from user code (gfnalign.register_objective); its target is
#: taken to be the pretrained sampler tilted by exp(β·r) unless ``prior_in_reward: true`` says it is ∝ R alone
CUSTOM_DEFAULTS: dict[str, Any] = {
    "objective": {}, "updates": 1000, "batch_size": 256, "lr": 1e-3, "head_lr": 3e-3, "lookahead_model": "reference",
}
_LOOP_KEYS = ("updates", "prior_in_reward", "batch_size", "lr", "head_lr", "lookahead_model", "anneal_updates", "grad_clip",
              "prior_flow", "updates_per_rollout", "weight_decay", "hidden", "depth", "num_steps",
              "parametrization", "lr_decay", "noise_schedule", "start", "start_candidates", "schedule", "eta")
#: "noise": the fine-tuned chain starts from N(0, I) (as trained); "tilted": evaluation draws its start
#: ∝ N(0, I)·G(x_start) with the objective's learned start value (sampling-importance-resampling over
#: ``start_candidates`` proposals per sample), which removes the value-function bias (gfnalign.sampling.start)
STARTS = ("noise", "tilted")

#: the sampler's noise level per schedule: DDPM (eta 1) for VP; for flow, Flow-GRPO's SDE at a = √2, whose
#: chain keeps almost no memory of its start (tests/unit/test_core_flow.py: the start-to-end correlation on
#: unit Gaussian data is < 1e-4 at 10-160 steps, against 0.13-0.18 at Flow-GRPO's a = 0.7), so the GFlowNet
#: fixed points are the global tilt rather than a per-start one (DESIGN.md §5)
DEFAULT_ETA = {"vp": 1.0, "flow": math.sqrt(2)}


def method_config(method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of ``method`` with ``overrides`` applied (``objective`` options are merged)."""
    if method in DEFAULTS:
        cfg = copy.deepcopy(DEFAULTS[method])
    else:
        import gfnalign.objectives  # noqa: F401  (registers the built-ins)
        from gfnalign.objectives.base import REGISTRY

        if method not in REGISTRY:
            raise ValueError(f"method={method!r} is not known; choose one of {', '.join(sorted(REGISTRY))} "
                             "(or register one with gfnalign.register_objective)")
        cfg = copy.deepcopy(CUSTOM_DEFAULTS)
    cfg.setdefault("anneal_updates", 0)
    cfg.setdefault("grad_clip", 1.0)
    cfg.setdefault("prior_flow", "marginal")
    cfg.setdefault("updates_per_rollout", 1)
    cfg.setdefault("weight_decay", 0.0)
    cfg.setdefault("hidden", 128)
    cfg.setdefault("depth", 3)
    cfg.setdefault("num_steps", 50)
    cfg.setdefault("parametrization", "score")
    cfg.setdefault("lr_decay", "cosine")
    cfg.setdefault("noise_schedule", "linear")
    cfg.setdefault("start", "noise")
    cfg.setdefault("start_candidates", 16)
    cfg.setdefault("schedule", "vp")
    for key, value in (overrides or {}).items():
        if key == "objective":
            cfg["objective"].update(value)
        elif key in _LOOP_KEYS:
            cfg[key] = value
        else:
            raise ValueError(f"unknown toy training option {key!r}; allowed: objective, {', '.join(_LOOP_KEYS)}")
    if cfg["start"] not in STARTS:
        raise ValueError(f"start={cfg['start']!r} is not allowed; use one of {', '.join(STARTS)}")
    if isinstance(cfg["start_candidates"], bool) or not isinstance(cfg["start_candidates"], int) \
            or cfg["start_candidates"] < 1:
        raise ValueError(f"start_candidates={cfg['start_candidates']!r} must be a positive integer (proposals per sample)")
    if cfg["start"] == "tilted" and not (method in ("dag-db", "dag-kl")
                                         or (method == "rtb" and cfg["objective"].get("log_z") == "start")):
        raise ValueError(f"start='tilted' needs an objective that learns a value at the start state (dag-db, dag-kl, "
                         f"or rtb with objective.log_z=start); {method} with {cfg['objective']} learns none")
    if cfg["noise_schedule"] not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule={cfg['noise_schedule']!r} is not allowed; use one of {', '.join(NOISE_SCHEDULES)}")
    if cfg["schedule"] not in DEFAULT_ETA:
        raise ValueError(f"schedule={cfg['schedule']!r} is not supported; use one of {', '.join(DEFAULT_ETA)}")
    if cfg["schedule"] == "flow" and cfg["noise_schedule"] != "linear":
        raise ValueError(f"noise_schedule={cfg['noise_schedule']!r} is a VP beta grid; schedule=flow has its own "
                         "sigmas (drop noise_schedule or use schedule=vp)")
    cfg.setdefault("eta", DEFAULT_ETA[cfg["schedule"]])
    return cfg


def needs_prior_in_reward(method: str, cfg: dict[str, Any]) -> bool:
    """True when the method targets exp(β·r) against Lebesgue measure, so the toy adds log p_f/β to its
    reward; False for the prior-relative methods (their target is the pretrained sampler tilted by exp(β·r))
    and the reward maximisers."""
    if cfg.get("prior_in_reward") is not None:  # set explicitly (e.g. for an objective registered by a user)
        return bool(cfg["prior_in_reward"])
    return method in PRIOR_IN_REWARD and not cfg["objective"].get("relative", False)


def reward_description(method: str, cfg: dict[str, Any]) -> str:
    """One line for ``gfnalign toy``: which reward the method is trained on, and why."""
    if needs_prior_in_reward(method, cfg):
        return ("reward handed to the method: r + log p_f/β (its fixed point is ∝ exp(β·r) against Lebesgue "
                "measure, so the toy supplies the prior's log-density; on images there is none)")
    if method in BASELINES:
        return "reward handed to the method: plain r (a reward maximiser: no exact target)"
    return ("reward handed to the method: plain r (prior-relative: its fixed point is the pretrained sampler "
            "tilted by exp(β·r), as on images)")


def _beta_at(update: int, beta: float, anneal_updates: int) -> float:
    if anneal_updates <= 0:
        return beta
    return beta * min(1.0, (update + 1) / anneal_updates)


def train(
    method: str,
    mixture: GaussianMixture,
    reward: ToyReward,
    beta: float,
    *,
    steps: int | None = None,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 50,
) -> tuple[ToyPolicy, dict[str, Any]]:
    """Fine-tune the toy policy with ``method``; returns ``(policy, info)`` (info: seconds, last metrics)."""
    from gfnalign.objectives.base import REGISTRY, build_objective
    from gfnalign.sampling import rollout

    cfg = method_config(method, config)
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    updates = int(cfg["updates"] if steps is None else steps)
    if updates < 0:
        raise ValueError(f"steps={updates} must be >= 0")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = toy_schedule(cfg["num_steps"], noise_schedule=cfg["noise_schedule"], kind=cfg["schedule"])
    eta = schedule.check_noise_level(cfg["eta"])
    reward = bind_final_alpha_bar(reward, final_alpha_bar(schedule))
    policy = ToyPolicy(mixture, schedule, hidden=cfg["hidden"], depth=cfg["depth"],
                       parametrization=cfg["parametrization"], eta=eta)
    prior = needs_prior_in_reward(method, cfg)
    if method not in REGISTRY:  # registers the objective if the package __init__ does not yet
        import importlib

        importlib.import_module(f"gfnalign.objectives.{method.replace('-', '_')}")
    objective = build_objective(method, state_shape=(mixture.dim,), **{"eta": eta, **cfg["objective"]}).to(DTYPE)
    lookahead = ToyLookahead(
        policy, reward, model=cfg["lookahead_model"], prior_scale=(1.0 / beta) if prior else 0.0,
        prior_flow=cfg["prior_flow"], gamma=getattr(objective, "gamma", "one") if prior else "one",
    )
    start_sampler = None
    if cfg["start"] == "tilted":
        from gfnalign.sampling.start import resample_start

        if objective.log_start_weight(policy, lookahead, torch.zeros(1, mixture.dim, dtype=DTYPE), None,
                                      beta=beta) is None:
            raise ValueError(f"start='tilted' needs an objective that learns a value at the start state "
                             f"(dag-db / dag-kl, rtb with objective.log_z=start); {method} with "
                             f"{cfg['objective']} learns none")
        M = int(cfg["start_candidates"])

        def start_sampler(m: int, generator: torch.Generator | None) -> torch.Tensor:
            cand = torch.randn(m * M, mixture.dim, dtype=DTYPE, generator=generator)
            log_w = objective.log_start_weight(policy, lookahead, cand, None, beta=beta)
            return resample_start(cand, log_w, M, generator)

    groups = [{"params": list(policy.correction.parameters()), "lr": cfg["lr"]}]
    head_params = [p for m in objective.trainable_modules().values() for p in m.parameters()]
    if head_params:
        groups.append({"params": head_params, "lr": cfg["head_lr"]})
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    all_params = [p for g in groups for p in g["params"]]
    if cfg["lr_decay"] not in ("cosine", "none"):
        raise ValueError(f"lr_decay={cfg['lr_decay']!r}; use 'cosine' (to 10% at the end) or 'none'")

    def lr_factor(u: int) -> float:
        if cfg["lr_decay"] == "none" or updates <= 1:
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u / (updates - 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    B, d = int(cfg["batch_size"]), mixture.dim
    reads_lookahead = "reward" in objective.lookahead_reads
    # the timestep of every recorded state: slot k < K is before step k, slot K is the terminal state
    state_timesteps = torch.cat([schedule.timesteps, schedule.next_timesteps[-1:]])
    last: dict[str, float] = {}
    skipped = 0
    start = time.perf_counter()
    traj = None
    for u in range(updates):
        beta_u = _beta_at(u, beta, int(cfg["anneal_updates"]))
        if prior:
            lookahead.prior_scale = 1.0 / beta_u
        if traj is None or u % int(cfg["updates_per_rollout"]) == 0:
            x_init = torch.randn(B, d, dtype=DTYPE, generator=gen)
            # one (unconditional) prompt: DDPO-style per-prompt statistics pool the whole batch
            traj = rollout(policy, None, x_init, eta=eta, reduction="sum", generator=gen,
                           prompt_id=torch.zeros(B, dtype=torch.int64))
            final = traj.final
            traj = objective.prepare(replace(traj, reward=lookahead.terminal_reward(final)))
        batch = objective.select_transitions(traj, gen)
        if reads_lookahead:  # cached lookahead, as the trainer's: r(x̂0) of the selected transitions' states only
            batch = _cache_lookahead(batch, traj, lookahead, state_timesteps)
        out = objective(batch, policy, lookahead, beta=beta_u)
        if not torch.isfinite(out.loss):
            skipped += 1
            if skipped > 20:
                raise RuntimeError(f"{method}: the loss was not finite for {skipped} updates; lower the learning rates")
            continue
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(all_params, float(cfg["grad_clip"]))
        opt.step()
        objective.after_optimizer_step()
        sched.step()
        last = {"loss/total": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}}
        if log is not None and (u % log_every == 0 or u == updates - 1):
            last["reward/mean"] = float(lookahead.reward(final.to(DTYPE)).mean())
            log(u, last)
    seconds = time.perf_counter() - start
    return policy, {"train_seconds": seconds, "updates": updates, "skipped": skipped, "last": last, "config": cfg,
                    "start": start_sampler}


def _cache_lookahead(batch: TransitionBatch, traj: TrajectoryBatch, lookahead: ToyLookahead,
                     state_timesteps: torch.Tensor) -> TransitionBatch:
    """``batch`` with ``lookahead_reward_t`` / ``_next`` filled: r_eff(x̂0) at its x_t and x_next (the terminal
    state scored as such), the values a cache of every recorded state would hold at those slots."""
    slot = batch.step.to(torch.int64) - int(traj.steps[0])
    n = len(batch)
    states = torch.cat([batch.x_t, batch.x_next])
    slots = torch.cat([slot, slot + 1])
    values = lookahead.log_reward(states, state_timesteps[slots], None, terminal=slots == traj.num_steps)
    return batch.with_fields(lookahead_reward_t=values[:n], lookahead_reward_next=values[n:])


def evaluate(
    policy: ToyPolicy,
    mixture: GaussianMixture,
    reward: ToyReward,
    beta: float,
    *,
    samples: int = 100_000,
    seed: int = 0,
    target_mass_samples: int = 200_000,
    start: Callable[[int, torch.Generator | None], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Mode masses, energy distances and reward means of the fine-tuned sampler vs the exact target.

    ``mode_mass.target`` uses ``target_mass_samples`` exact samples under the same assignment rule, so
    the TV of an exact sampler is zero up to its own sampling noise. ``energy_distance`` compares
    ``samples`` fine-tuned vs ``samples`` exact target draws; ``energy_distance_floor`` (the DESIGN §6
    contract) compares the exact-ε chain vs the exact untilted terminal mixture at the same sample size.

    ``*_oracle`` keys: the same statistics for the chain run with the exact ε of the *tilted* target
    (:func:`oracle_mixture`), i.e. the discretisation floor of the problem actually solved. It shares
    the fine-tuned chain's noise (same generator seed) and the same exact target draws, so the
    difference ``energy_distance - energy_distance_oracle`` is measured with common random numbers.
    """
    if samples < 2:
        raise ValueError(f"samples={samples} must be at least 2")
    chain_seed = seed + 1_000_003
    gen = torch.Generator().manual_seed(chain_seed)
    p_final = mixture.noised(final_alpha_bar(policy.schedule))
    reward = bind_final_alpha_bar(reward, final_alpha_bar(policy.schedule))
    target = reward.tilt(p_final, beta)
    finetuned = sample_chain(policy, samples, gen, start=start)
    pretrained = sample_chain(policy, samples, gen, reference=True)
    target_x = target.sample(samples, gen)
    untilted_x = p_final.sample(samples, gen)
    big = target.sample(max(target_mass_samples, samples), gen)
    mass = {
        "target": mode_mass(big, target),
        "finetuned": mode_mass(finetuned, target),
        "pretrained": mode_mass(pretrained, target),
    }
    result: dict[str, Any] = {
        "mode_mass": mass,
        "mode_mass_tv": total_variation(mass["finetuned"], mass["target"]),
        "energy_distance": energy_distance(finetuned, target_x),
        "energy_distance_floor": energy_distance(pretrained, untilted_x),
        "reward_mean": {
            "target": float(reward(big).mean()),
            "finetuned": float(reward(finetuned).mean()),
            "pretrained": float(reward(pretrained).mean()),
        },
        "samples": samples,
    }
    oracle_data = oracle_mixture(target, policy.schedule)
    if oracle_data is not None:
        oracle = ToyPolicy(oracle_data, policy.schedule, eta=policy.eta)
        oracle_x = sample_chain(oracle, samples, torch.Generator().manual_seed(chain_seed), reference=True)
        mass["oracle"] = mode_mass(oracle_x, target)
        result["mode_mass_tv_oracle"] = total_variation(mass["oracle"], mass["target"])
        result["energy_distance_oracle"] = energy_distance(oracle_x, target_x)
        result["reward_mean"]["oracle"] = float(reward(oracle_x).mean())
    return result


def run_toy(
    method: str,
    mixture: GaussianMixture,
    reward: ToyReward,
    beta: float,
    *,
    steps: int | None = None,
    seed: int = 0,
    samples: int = 100_000,
    config: dict[str, Any] | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train then evaluate; returns the OUT.json dict of ``gfnalign toy`` (DESIGN.md §6) plus extras."""
    policy, info = train(method, mixture, reward, beta, steps=steps, seed=seed, config=config, log=log)
    result = {"method": method, "beta": float(beta), "train_seconds": info["train_seconds"]}
    result.update(evaluate(policy, mixture, reward, beta, samples=samples, seed=seed, start=info["start"]))
    if info["start"] is not None:  # the same fine-tuned chain from N(0, I): what the tilted start removes
        plain = evaluate(policy, mixture, reward, beta, samples=samples, seed=seed)
        result["noise_start"] = {"mode_mass_tv": plain["mode_mass_tv"], "energy_distance": plain["energy_distance"],
                                 "mode_mass": plain["mode_mass"]["finetuned"]}
    result["updates"] = info["updates"]
    result["seed"] = seed
    result["skipped_updates"] = info["skipped"]
    result["config"] = info["config"]
    result["prior_in_reward"] = needs_prior_in_reward(method, info["config"])
    # a diverged policy yields NaN samples; report it rather than hide it
    result["diverged"] = not all(math.isfinite(v) for v in (result["energy_distance"], result["mode_mass_tv"]))
    return result
