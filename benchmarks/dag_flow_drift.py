"""Does DAG-DB stay at the exact solution? A drift test of the learned log-flow's gradient choice.

Start DAG-DB *at* the exact answer of a toy case: the policy is the exact ε of the tilted target
(:func:`gfnalign.toy.world.oracle_mixture`) and the log-flow head is the exact tilted log-marginal
``log p*_t`` (minus the forward-looking guess) plus a zero-initialised learned MLP. Then train as usual and
watch the mode-mass TV to the exact target. A correct objective keeps the sampler near its discretisation
floor; a biased one drifts away.

With finite steps the Gaussian kernels cannot satisfy detailed balance exactly. With
``flow_gradient="full"`` (the papers), the head is also fitted to each state's *incoming* residuals,
whose average differs between modes (transitions that move mass between modes at mid noise). The
learned part then grows in the direction of the tilt and the policy follows it. ``"semi"`` /
``"target"`` only fit each state's outgoing residuals, which are the same for every mode at the exact
solution.

    .venv/bin/python benchmarks/dag_flow_drift.py --case grid9-quadratic --flow-gradient full target
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_exactness import CASES  # noqa: E402

from gfnalign.objectives.base import build_objective  # noqa: E402
from gfnalign.objectives.heads import make_log_flow_head  # noqa: E402
from gfnalign.sampling import rollout  # noqa: E402
from gfnalign.toy.metrics import mode_mass, total_variation  # noqa: E402
from gfnalign.toy.mixture import DTYPE, GaussianMixture  # noqa: E402
from gfnalign.toy.rewards import reward_from_spec  # noqa: E402
from gfnalign.toy.world import (  # noqa: E402
    ToyLookahead,
    ToyPolicy,
    final_alpha_bar,
    oracle_mixture,
    sample_chain,
    toy_schedule,
)


class ExactPlusLearnedLogFlow(nn.Module):
    """``f(x, t) = log p*_t(x) − log p_t(x) − β r(x̂0(x)) + c + MLP(x, t)``: exact at start (MLP output 0)."""

    def __init__(self, target, pretrained: ToyPolicy, reward, beta: float, schedule):
        super().__init__()
        self.target, self.pretrained, self.reward, self.beta = target, pretrained, reward, beta
        self.schedule, self.abf = schedule, final_alpha_bar(schedule)
        self.log_z = nn.Parameter(torch.zeros((), dtype=DTYPE))
        self.learned = make_log_flow_head((target.dim,)).to(DTYPE)

    def forward(self, x, t, cond=None):
        ab = self.schedule.alphas_cumprod[t.cpu()].to(DTYPE)
        exact = (self.target.log_prob(x, ab / self.abf) - self.pretrained.mixture.log_prob(x, ab)
                 - self.beta * self.reward(self.pretrained.x0_hat(x, t, reference=True)))
        return exact + self.log_z + self.learned(x, t)


def run(case: str, flow_gradient: str, updates: int, every: int, seed: int) -> list[tuple[int, float, float]]:
    mix_spec, reward_spec, beta = CASES[case]
    torch.manual_seed(seed)
    mixture = GaussianMixture.from_spec(mix_spec)
    reward = reward_from_spec(reward_spec, mixture.dim)
    schedule = toy_schedule(50)
    target = reward.tilt(mixture.noised(final_alpha_bar(schedule)), beta)
    pretrained = ToyPolicy(mixture, schedule)
    policy = ToyPolicy(oracle_mixture(target, schedule), schedule)  # exact tilted ε + zero correction
    lookahead = ToyLookahead(pretrained, reward, model="reference", prior_scale=1.0 / beta)
    head = ExactPlusLearnedLogFlow(target, pretrained, reward, beta, schedule)
    objective = build_objective("dag-db", state_shape=(mixture.dim,), log_flow_head=head, fraction=0.1,
                                stratified=True, flow_gradient=flow_gradient).to(DTYPE)
    opt = torch.optim.AdamW([{"params": list(policy.correction.parameters()), "lr": 5e-4},
                             {"params": list(head.parameters()), "lr": 3e-3}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    mass_target = mode_mass(target.sample(200_000, torch.Generator().manual_seed(7)), target)
    B, K = 256, schedule.num_steps
    t_all = torch.cat([schedule.timesteps, schedule.next_timesteps[-1:]]).repeat(B)
    terminal = torch.zeros(K + 1, dtype=torch.bool)
    terminal[-1] = True
    terminal = terminal.repeat(B)
    out = []
    for u in range(updates + 1):
        if u % every == 0:
            x = sample_chain(policy, 10_000, torch.Generator().manual_seed(12345))
            out.append((u, total_variation(mode_mass(x, target), mass_target), float(reward(x).mean())))
            print(f"{case} {flow_gradient:6s} update {u:5d}  TV {out[-1][1]:.4f}  reward {out[-1][2]:.3f}", flush=True)
        if u == updates:
            break
        x_init = torch.randn(B, mixture.dim, dtype=DTYPE, generator=gen)
        traj = rollout(policy, None, x_init, eta=1.0, reduction="sum", generator=gen,
                       prompt_id=torch.zeros(B, dtype=torch.int64))
        states = traj.states.reshape(B * (K + 1), mixture.dim)
        cached = lookahead.log_reward(states, t_all, None, terminal=terminal).reshape(B, K + 1)
        traj = objective.prepare(replace(traj, reward=lookahead.terminal_reward(traj.final), lookahead_reward=cached))
        loss = objective(objective.select_transitions(traj, gen), policy, lookahead, beta=beta).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        objective.after_optimizer_step()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="grid9-quadratic", choices=list(CASES))
    ap.add_argument("--flow-gradient", nargs="+", default=["full", "target"], choices=["full", "semi", "target"])
    ap.add_argument("--updates", type=int, default=1600)
    ap.add_argument("--every", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = {}
    for fg in args.flow_gradient:
        start = time.perf_counter()
        rows[fg] = run(args.case, fg, args.updates, args.every, args.seed)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n| update | {' | '.join(f'TV ({fg})' for fg in rows)} |")
    print("|---|" + "---|" * len(rows))
    for i, (u, _, _) in enumerate(next(iter(rows.values()))):
        print(f"| {u} | " + " | ".join(f"{rows[fg][i][1]:.3f}" for fg in rows) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
