"""The contracts between layers: what a policy and a lookahead must provide.

Backbones (Stable Diffusion, the digits world) and the analytic toy implement :class:`PolicyModel`;
the trainer (or the toy runner) builds a :class:`Lookahead`. Objectives only see these protocols and
never know which backbone or reward sits behind them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from gfnalign.core.schedule import NoiseSchedule


@runtime_checkable
class PolicyModel(Protocol):
    """A denoiser with an optional frozen reference.

    ``eps`` returns the *guided* noise prediction (classifier-free guidance lives here, objectives never
    see it), shape like ``x``. ``t`` is an int64 tensor ``[N]`` of diffusion timesteps and ``cond`` the
    per-row conditioning (a tensor ``[N, ...]`` or ``None``). With ``reference=True`` the pretrained
    model answers (adapters disabled) and no gradient reaches the trainable parameters; it must still be
    differentiable with respect to ``x`` (do not wrap it in ``torch.no_grad``): residual ∇-DB takes
    ∇_{x_t} of the reference's log P_F. Callers that need no graph detach or use ``no_grad`` themselves.
    """

    schedule: NoiseSchedule

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, reference: bool = False) -> torch.Tensor: ...


@runtime_checkable
class Lookahead(Protocol):
    """The reward of the predicted clean sample x0_hat(x) at any state ("forward-looking" flow).

    Values are the *raw* reward r (not multiplied by beta); objectives apply beta and any gamma_t.
    ``terminal`` ([N] bool) marks states that are already final, where x0_hat(x) = x.
    ``log_reward`` carries no gradient; ``grad_log_reward`` returns ∇_x r(x0_hat(x)), detached.
    """

    def log_reward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, terminal: torch.Tensor) -> torch.Tensor: ...

    def grad_log_reward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Any, *, terminal: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class SharedPassLookahead(Lookahead, Protocol):
    """A :class:`Lookahead` whose x0_hat(x) an objective can read from a network pass it makes anyway.

    ``x0_pass(policy)`` names the pass: ``"policy"`` when x0_hat(x) is Tweedie's estimate from
    ``policy.eps(x, t, cond)`` (the guided ε, adapters on), ``"reference"`` when it is from
    ``policy.eps(x, t, cond, reference=True)``, ``None`` when it is neither (e.g. another network, or an
    unguided x0_hat under guidance). ``grad_log_reward_x0(x0, cond)`` is ∇_{x0} r(decode(x0)) at given clean
    latents, detached. An objective that holds ε(x) with a graph from x then gets ∇_x r(x0_hat(x)) as the
    vector-Jacobian product J_{x0_hat}(x)ᵀ ∇_{x0} r, which equals ``grad_log_reward`` without a second pass.
    """

    def x0_pass(self, policy: Any) -> str | None: ...

    def grad_log_reward_x0(self, x0: torch.Tensor, cond: Any) -> torch.Tensor: ...
