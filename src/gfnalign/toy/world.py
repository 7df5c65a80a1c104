"""The analytic toy world: exact pretrained denoiser + zero-initialised correction, a lookahead, a sampler.

**Terminal state.** The sampling grid is the Stable-Diffusion-like DDPM grid: linear betas 1e-4..0.02 over
T = 1000 training steps, K = 50 "leading" inference steps with ``steps_offset = 1`` (timesteps
981, 961, ..., 1) and a final alpha-bar of ``alphas_cumprod[0] = 1 - 1e-4`` (diffusers'
``set_alpha_to_one=False``). Every step, the last one included, is therefore a proper Gaussian with
positive variance (log-probs and scores exist), and the terminal state ``x_final`` sits at timestep 0.
We do **not** step to alpha-bar = 1. Instead the toy's "data" at the end of the chain is the mixture
noised to the final alpha-bar, ``p_f = noised(p_data, alphas_cumprod[0])`` — itself a Gaussian mixture
(variance + 1e-4 per axis) — and every target is defined on it: ``p*(x) ∝ p_f(x) exp(β r(x))``, whose
closed form comes from the reward's ``tilt``. The exact-ε sampler differs from p_f by discretisation
error only; the toy measures that floor.

**One target for all methods.** Methods whose fixed point is ``∝ R`` against Lebesgue measure (dag-db,
dag-kl, nabla-db) get ``log R = log p_f + β r``: objectives compute ``β · reward``, so the reward handed to
them is ``r + log p_f / β`` (``prior_scale = 1/β``), which no image model could supply. The prior-relative
methods (residual-nabla-db, rtb, dag-db / dag-kl with ``relative: true``; fixed point ``∝ p_#-sampler · R``),
ddpo and reward-backprop get the plain r, as on images.

**The start.** With the default linear betas the first state keeps √ᾱ ≈ 0.008 of the data, so a fixed
N(0, I) start is practically memoryless. ``noise_schedule="sd"`` uses Stable Diffusion's scaled-linear grid
(√ᾱ ≈ 0.08 at the first state), where the per-noise tilt of a fixed start (the value-function bias) shows.

**Lookahead.** ``r(x̂0(x))`` with x̂0 from the frozen exact model (``model="reference"``, the
prototype's best setting) or from the current policy (``model="policy"``, the papers' code). With a
``prior_scale`` c > 0 the lookahead adds ``c · log p_t(x)``, the exact log-marginal of the pretrained
chain at the state's own noise level: that is the pretrained model's own (approximately DB-consistent)
log-flow, so the forward-looking flow ``log F = f_φ + β(r(x̂0) + c log p_t)`` leaves only the tilt's
correction to the head. At the terminal state it is exactly ``r + c log p_f``. ``prior_flow="x0hat"``
instead uses ``c · log p_f(x̂0(x))`` (a literal "reward of the predicted sample").

**Flow schedule** (``toy_schedule(kind="flow")``, ``gfnalign toy --schedule flow``): the same world under
the rectified-flow interpolant ``x = (1 − σ) x0 + σ ε`` with K uniform sigmas 1, 1 − 1/K, ..., 1/K,
landing on σ = 0 (the clean mixture, so ``p_f = p_data``), sampled with Flow-GRPO's SDE. The policy then
returns the exact **velocity** ``ε − x0`` (plus the correction) and every kernel, P_B and objective is
the same code as for VP. A flow state is a VP state scaled by ``c = √(α² + σ²)`` with ᾱ = α²/c², which is
how the mixture's closed forms are reused (at σ = 1 the marginal is N(0, I) and E[x0 | x] = E[x0]).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gfnalign.core.schedule import NoiseSchedule, make_betas
from gfnalign.toy.mixture import DTYPE, GaussianMixture
from gfnalign.toy.rewards import ToyReward

LOOKAHEAD_MODELS = ("reference", "policy")
PRIOR_FLOWS = ("marginal", "x0hat")


#: "linear": betas 1e-4..0.02 (DDPM's; the first state keeps √ᾱ ≈ 0.008 of the data at 50 steps, so the start
#: is practically memoryless); "sd": Stable Diffusion 1.x's scaled-linear 0.00085..0.012 (also the digits
#: world's), whose first state keeps √ᾱ ≈ 0.076 (50 steps) / 0.090 (20 steps): the value-function bias shows.
NOISE_SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "sd": ("scaled_linear", 0.00085, 0.012)}
#: the interpolant: "vp" (the DDPM grid above) or "flow" (rectified flow, Flow-GRPO's SDE)
SCHEDULES = ("vp", "flow")


def toy_schedule(num_steps: int = 50, num_train_timesteps: int = 1000, noise_schedule: str = "linear",
                 kind: str = "vp") -> NoiseSchedule:
    """VP: leading spacing with steps_offset=1, final alpha-bar = alphas_cumprod[0], betas per ``noise_schedule``.
    Flow: uniform sigmas 1, 1 − 1/K, ..., 1/K to σ = 0 with the Flow-GRPO SDE kernel (``noise_schedule`` is a
    VP option and must stay "linear")."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is not supported; use one of {', '.join(SCHEDULES)}")
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule={noise_schedule!r}; use one of {', '.join(NOISE_SCHEDULES)}")
    if kind == "flow":
        if noise_schedule != "linear":
            raise ValueError(f"noise_schedule={noise_schedule!r} is a VP beta grid; the flow schedule has its own "
                             "sigmas (drop noise_schedule or use schedule=vp)")
        sigmas = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
        return NoiseSchedule.rectified_flow(sigmas, num_train_timesteps=num_train_timesteps, kernel="flow_sde")
    beta_kind, start, end = NOISE_SCHEDULES[noise_schedule]
    betas = make_betas(beta_kind, num_train_timesteps, start, end)
    alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
    return NoiseSchedule.from_alphas_cumprod(
        alphas_cumprod, num_steps, timestep_spacing="leading", steps_offset=1, final_alpha_cumprod=None
    )


def final_alpha_bar(schedule: NoiseSchedule) -> float:
    return float(schedule.alpha_bars_next[-1])


def oracle_mixture(tilted_final: GaussianMixture, schedule: NoiseSchedule) -> GaussianMixture | None:
    """The clean mixture whose noising to the final alpha-bar is exactly ``tilted_final``, or None.

    A :class:`ToyPolicy` built on it has the exact ε of the *tilted* target at every noise level: the
    best any sampler of this Gaussian-kernel family can do without changing the step count. Its
    distance to the target is the discretisation floor of the tilted problem. (The floor of the
    untilted, symmetric mixture can be far lower: symmetric mode masses cancel the discretisation
    error that unequal tilted masses keep.) None when a tilted component is narrower than the
    final noise, which only extreme tilts produce.
    """
    ab = final_alpha_bar(schedule)
    eigvals = (tilted_final.eigvals - (1 - ab)) / ab
    if not bool((eigvals > 0).all()):
        return None
    return GaussianMixture(weights=tilted_final.weights, means=tilted_final.means / math.sqrt(ab),
                           eigvals=eigvals, eigvecs=tilted_final.eigvecs)


class Correction(nn.Module):
    """A small MLP ``(x, t) -> Δε``; its last layer starts at zero so the policy starts exact."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_train_timesteps: int = 1000):
        super().__init__()
        self.T = num_train_timesteps
        self.freqs = (1.0, 2.0, 4.0, 8.0)
        in_dim = dim + 2 + 2 * len(self.freqs)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.to(DTYPE)

    def features(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        s = t.to(DTYPE)[:, None] / self.T
        ang = torch.cat([2 * math.pi * f * s for f in self.freqs], dim=1)
        ab = alpha_bar[:, None]
        return torch.cat([x, ab.sqrt(), (1 - ab).sqrt(), ang.sin(), ang.cos()], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x, t, alpha_bar))


PARAMETRIZATIONS = ("score", "std", "eps")


def flow_preconditioner(schedule: NoiseSchedule, eta: float, power: float = 2.0) -> torch.Tensor:
    """[K] the factor of :func:`score_preconditioner` per step of any schedule: ``std^power / c`` with
    ``c = ∂mean/∂output`` of the schedule's kernel (0 where the step has no variance)."""
    K = schedule.num_steps
    kern = schedule.forward_kernel(torch.zeros(K, 1, dtype=DTYPE), torch.ones(K, 1, dtype=DTYPE),
                                   torch.arange(K), eta)
    c, std = kern.mean.flatten(), kern.std.flatten().expand(K)
    ok = (std > 0) & (c.abs() > 1e-12)
    return torch.where(ok, std**power / torch.where(ok, c, torch.ones_like(c)), torch.zeros_like(c))


def score_preconditioner(schedule: NoiseSchedule, eta: float = 1.0, power: float = 2.0) -> torch.Tensor:
    """[T] factor ``w(t) = σ_t^power / c_t`` with ``c_t = ∂mean/∂ε`` of the step that starts at timestep t.

    ``power=2``: with ``Δε = w(t) h`` the kernel's mean moves by ``σ_t² h``, i.e. ``h`` is a correction of
    the *score* ∇ log P_F (the quantity the ∇-DB objectives balance, and ∇ log F̃ of the tilt).
    ``power=1``: the mean moves by ``σ_t h`` (h in units of the step's noise). Rows where the step has no
    variance (t = 0, the terminal level) get 0.
    """
    ac = schedule.alphas_cumprod.to(DTYPE)
    T = ac.shape[0]
    stride = T // schedule.num_steps
    t = torch.arange(T)
    a = ac
    an = torch.where(t - stride >= 0, ac[(t - stride).clamp(min=0)], schedule.alpha_bars_next[-1].to(DTYPE))
    var = eta**2 * ((1 - an) / (1 - a) * (1 - a / an)).clamp(min=0)
    c = (1 - an - var).clamp(min=0).sqrt() - an.sqrt() * (1 - a).sqrt() / a.sqrt()
    ok = (var > 0) & (c.abs() > 1e-12)
    return torch.where(ok, var ** (power / 2) / torch.where(ok, c, torch.ones_like(c)), torch.zeros_like(c))


class ToyPolicy(nn.Module):
    """PolicyModel: ``ε_θ(x, t) = ε*(x, t) + w(t)·MLP_θ(x, t)``; ``reference=True`` gives the exact ε*.

    ``parametrization="score"`` (default): ``w(t) = σ_t²/c_t`` (:func:`score_preconditioner`), so the MLP
    outputs a correction of the transition's score ∇ log P_F (equivalently of the residual flow score
    ∇ log F̃ of the tilt). This is a fixed per-timestep preconditioning of a zero-initialised additive
    correction, like choosing ε- or v-prediction for a real network: it does not change what the policy
    can express, only how the objectives' per-step residuals weigh the MLP's output. With
    ``"eps"`` (``w = 1``) a score-space residual weighs the late, low-noise steps ~10⁴× more than the
    early ones (``(c_t/σ_t²)²``), and the early steps, which decide the mode masses, barely train.
    ``"std"`` (``w = σ_t/c_t``, mean shift ``σ_t h``) balances the *noise* of score residuals that involve
    P_B (plain ∇-DB: at the last, tiny DDPM steps the Gaussian P_F's variance is ~0.45× the true reverse
    variance, so ∇[log P_F − log P_B] carries O(1/σ_t) noise no mean can cancel).

    ``x`` is ``[N, d]``, ``t`` int64 diffusion timesteps ``[N]`` (or a scalar), ``cond`` is ignored.
    The exact part keeps its graph with respect to ``x`` (lookahead gradients and reverse scores need it).
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        schedule: NoiseSchedule,
        *,
        hidden: int = 128,
        depth: int = 3,
        parametrization: str = "score",
        eta: float = 1.0,
    ):
        super().__init__()
        self.eta = float(eta)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization={parametrization!r}; use one of {', '.join(PARAMETRIZATIONS)}")
        self.mixture = mixture
        self.schedule = schedule
        self.parametrization = parametrization
        self.correction = Correction(mixture.dim, hidden, depth, int(schedule.alphas_cumprod.shape[0]))
        T = int(schedule.alphas_cumprod.shape[0])
        power = 2.0 if parametrization == "score" else 1.0
        self.flow = schedule.interpolant == "rectified_flow"
        if self.flow:  # per step: flow timesteps are floats, looked up on the grid
            precond = (flow_preconditioner(schedule, self.eta, power) if parametrization != "eps"
                       else torch.ones(schedule.num_steps, dtype=DTYPE))
        else:
            precond = (score_preconditioner(schedule, eta=self.eta, power=power) if parametrization != "eps"
                       else torch.ones(T, dtype=DTYPE))
        self.register_buffer("precond", precond, persistent=False)

    def timesteps_of(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """``t`` as an ``[n]`` tensor: int64 for VP, float64 (sigma * T) for the flow schedule."""
        t = torch.as_tensor(t, dtype=DTYPE if self.flow else torch.int64)
        return t.expand(n) if t.dim() == 0 else t

    def alpha_bar(self, t: torch.Tensor, n: int) -> torch.Tensor:
        t = self.timesteps_of(t, n)
        if self.flow:
            return self.schedule.alpha_bar_of_timestep(t.cpu(), dtype=DTYPE)
        return self.schedule.alphas_cumprod[t.cpu()].to(DTYPE)

    def _precond(self, t: torch.Tensor) -> torch.Tensor:
        if not self.flow:
            return self.precond[t.cpu()].to(DTYPE)
        grid = self.schedule.timesteps.to(DTYPE)
        match = t.cpu()[:, None] == grid[None]  # off-grid times (the terminal σ = 0) get no correction
        return torch.where(match.any(1), self.precond[match.to(torch.int64).argmax(1)], torch.zeros(len(t), dtype=DTYPE))

    def _flow_x0_eps(self, xd: torch.Tensor, t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (E[x0|x], E[ε|x]) under the flow interpolant, via the VP state x/c at ᾱ = α²/c²."""
        sigma = self.schedule.sigma_of_timestep(t.cpu()).to(DTYPE)[:, None]
        alpha = 1 - sigma
        scale = (alpha**2 + sigma**2).sqrt()
        pure = sigma == 1
        # at σ = 1 the VP level is 0 and Tweedie divides by it: evaluate those rows at a harmless level and
        # overwrite them (no NaN in either branch, so gradients stay finite)
        ab = torch.where(pure, torch.ones_like(alpha), alpha**2 / scale**2).squeeze(1)
        xv = xd / scale
        eps = self.mixture.eps(xv, ab)
        abc = ab[:, None]
        x0 = (xv - (1 - abc).sqrt() * eps) / abc.sqrt()  # mixture.x0_mean's Tweedie, without a second score
        x0 = torch.where(pure, self.mixture.mean().to(DTYPE).expand_as(xd), x0)
        eps = torch.where(pure, xd, eps)
        return x0, eps

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, reference: bool = False) -> torch.Tensor:
        """The exact ε (VP) or flow velocity ε − x0 (flow schedule), plus the correction."""
        n = x.shape[0]
        t = self.timesteps_of(t, n)
        ab = self.alpha_bar(t, n)
        xd = x.to(DTYPE)
        if self.flow:
            x0, eps = self._flow_x0_eps(xd, t, n)
            out = eps - x0
        else:
            out = self.mixture.eps(xd, ab)
        if not reference:
            out = out + self._precond(t)[:, None] * self.correction(xd, t, ab)
        return out.to(x.dtype)

    def x0_hat(self, x: torch.Tensor, t: torch.Tensor, *, reference: bool) -> torch.Tensor:
        n = x.shape[0]
        if self.flow:
            t = self.timesteps_of(t, n)
            sigma = self.schedule.sigma_of_timestep(t.cpu()).to(DTYPE)[:, None]
            return x.to(DTYPE) - sigma * self.eps(x, t, None, reference=reference).to(DTYPE)
        ab = self.alpha_bar(t, n)[:, None]
        return (x.to(DTYPE) - (1 - ab).sqrt() * self.eps(x, t, None, reference=reference).to(DTYPE)) / ab.sqrt()

    def log_marginal(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[N] exact log p_t(x) of the pretrained chain's marginal at timestep ``t`` (differentiable in x)."""
        n = x.shape[0]
        ab = self.alpha_bar(t, n)
        if not self.flow:
            return self.mixture.log_prob(x, ab)
        sigma = self.schedule.sigma_of_timestep(self.timesteps_of(t, n).cpu()).to(DTYPE)
        scale = ((1 - sigma) ** 2 + sigma**2).sqrt()
        # x = scale · x_vp: the density picks up the Jacobian scale^-d
        return self.mixture.log_prob(x / scale[:, None], ab.clamp(min=1e-300)) - self.mixture.dim * scale.log()


class ToyLookahead:
    """Lookahead: raw (effective) reward of the predicted clean sample, and its gradient w.r.t. x.

    ``value(x) = r(x̂0(x)) + prior_scale · log p(x)`` (see the module docstring); at terminal rows
    ``x̂0(x) = x``. ``gamma`` is the forward-looking weight γ_t the objective applies to the whole
    lookahead (dag-db / nabla-db option ``gamma``): the prior term is divided by it at non-terminal
    rows, so the flow gets ``γ_t·β·r(x̂0) + log p_t`` (the prior is the pretrained flow, not a guess). ``prior_scale`` may be changed between epochs (β annealing: keep it at 1/β_e).
    """

    def __init__(
        self,
        policy: ToyPolicy,
        reward: ToyReward,
        *,
        model: str = "reference",
        prior_scale: float = 0.0,
        prior_flow: str = "marginal",
        gamma: str = "one",
    ):
        if model not in LOOKAHEAD_MODELS:
            raise ValueError(f"lookahead_model={model!r}; use one of {', '.join(LOOKAHEAD_MODELS)}")
        if prior_flow not in PRIOR_FLOWS:
            raise ValueError(f"prior_flow={prior_flow!r}; use one of {', '.join(PRIOR_FLOWS)}")
        self.policy = policy
        self.reward = reward
        self.model = model
        self.prior_scale = float(prior_scale)
        self.prior_flow = prior_flow
        if gamma not in ("one", "alpha_bar", "sqrt_alpha_bar"):
            raise ValueError(f"gamma={gamma!r}; use 'one', 'alpha_bar' or 'sqrt_alpha_bar'")
        self.gamma = gamma
        self.final_mixture = policy.mixture.noised(final_alpha_bar(policy.schedule))

    def _value(self, x: torch.Tensor, t: torch.Tensor, terminal: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = self.policy.timesteps_of(t, n)
        terminal = torch.as_tensor(terminal, dtype=torch.bool).expand(n)
        xd = x.to(DTYPE)
        x0 = self.policy.x0_hat(xd, t, reference=self.model == "reference")
        x0 = torch.where(terminal[:, None], xd, x0)
        value = self.reward(x0)
        if self.prior_scale:
            ab = self.policy.alpha_bar(t, n)
            if self.prior_flow == "marginal":
                logp = self.policy.log_marginal(xd, t)
            else:
                logp = self.final_mixture.log_prob(x0)
            if self.gamma != "one":
                # the objective multiplies the whole lookahead by γ_t; the prior's log-flow must reach
                # the flow undamped (it is the pretrained model's own flow, not a guess)
                g = ab if self.gamma == "alpha_bar" else ab.sqrt()
                logp = torch.where(terminal, logp, logp / g)
            value = value + self.prior_scale * logp
        return value

    def log_reward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, terminal: Any = False) -> torch.Tensor:
        with torch.no_grad():
            return self._value(x.detach(), t, terminal).to(x.dtype)

    def grad_log_reward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, terminal: Any = False) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().to(DTYPE).requires_grad_(True)
            value = self._value(xg, t, terminal)
            (g,) = torch.autograd.grad(value.sum(), xg)
        return g.detach().to(x.dtype)

    def terminal_reward(self, x: torch.Tensor) -> torch.Tensor:
        """[N] effective reward of final states: ``r(x) + prior_scale · log p_f(x)``."""
        with torch.no_grad():
            xd = x.detach().to(DTYPE)
            value = self.reward(xd)
            if self.prior_scale:
                value = value + self.prior_scale * self.final_mixture.log_prob(xd)
        return value


@torch.no_grad()
def sample_chain(
    policy: ToyPolicy,
    n: int,
    generator: torch.Generator | None = None,
    *,
    reference: bool = False,
    eta: float | None = None,
    batch_size: int = 8192,
    start: Any = None,
) -> torch.Tensor:
    """[n, d] final states of the ancestral sampler (the schedule's kernel at noise level ``eta``, default
    the policy's) with the policy or the exact model.

    ``start(m, generator) -> [m, d]`` draws the first states (default: N(0, I))."""
    sched = policy.schedule
    eta = policy.eta if eta is None else eta
    d = policy.mixture.dim
    out = []
    for offset in range(0, n, batch_size):
        m = min(batch_size, n - offset)
        x = torch.randn(m, d, dtype=DTYPE, generator=generator) if start is None else start(m, generator)
        for k in range(sched.num_steps):
            t = sched.timesteps[k].expand(m)
            eps = policy.eps(x, t, None, reference=reference)
            kern = sched.forward_kernel(x, eps, torch.full((m,), k, dtype=torch.int64), eta)
            x = kern.sample(torch.randn(m, d, dtype=DTYPE, generator=generator))
        out.append(x)
    return torch.cat(out)
