"""training/engine.py on one process: the per-group clipping, the TrainStep module, the engine traits."""

from __future__ import annotations

import torch
from torch import nn

from gfnalign.training.engine import TrainStep, engine_traits, gathered_parameters, group_grad_norms


def _params_with_grads(seed: int, shapes: list[tuple[int, ...]], scale: float) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = scale * torch.randn(shape, generator=g, dtype=torch.float64)
        out.append(p)
    return out


def test_each_group_is_clipped_to_its_own_norm():
    policy = _params_with_grads(0, [(3, 4), (5,)], scale=2.0)
    heads = _params_with_grads(1, [(7,)], scale=0.01)
    want = {name: torch.sqrt(sum((p.grad ** 2).sum() for p in ps)) for name, ps in (("policy", policy), ("heads", heads))}
    before = [p.grad.clone() for p in policy + heads]
    norms = group_grad_norms({"policy": policy, "heads": heads, "empty": []}, 1.0, sharded=False)
    assert set(norms) == {"grad_norm/policy", "grad_norm/heads"}
    for name in ("policy", "heads"):
        assert abs(norms[f"grad_norm/{name}"] - float(want[name])) < 1e-12 * float(want[name])
    # policy (norm > 1) scaled down to norm 1; heads (norm < 1) untouched
    assert abs(float(torch.sqrt(sum((p.grad ** 2).sum() for p in policy))) - 1.0) < 1e-5
    coef = 1.0 / (float(want["policy"]) + 1e-6)
    for p, g in zip(policy, before[:2]):
        torch.testing.assert_close(p.grad, g * coef)
    for p, g in zip(heads, before[2:]):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_non_positive_clip_only_measures():
    policy = _params_with_grads(2, [(10,)], scale=5.0)
    before = policy[0].grad.clone()
    norms = group_grad_norms({"policy": policy}, 0.0, sharded=False)
    assert norms["grad_norm/policy"] > 1.0
    torch.testing.assert_close(policy[0].grad, before, rtol=0, atol=0)


def test_train_step_runs_the_closure_and_owns_network_and_heads():
    net, head = nn.Linear(2, 2), nn.Linear(2, 1)
    step = TrainStep(net, {"log_flow_head": head})
    assert {id(p) for p in step.parameters()} == {id(p) for p in [*net.parameters(), *head.parameters()]}
    x = torch.ones(1, 2)
    assert torch.equal(step(lambda: head(net(x))), head(net(x)))
    assert list(TrainStep(None, {"h": head}).parameters()) == list(head.parameters())


def test_one_process_is_the_single_engine():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    traits = engine_traits(acc)
    assert traits.name == "single" and not (traits.shards_parameters or traits.shards_state or traits.owns_step)
    with gathered_parameters(acc, nn.Linear(1, 1), traits):  # a no-op that still enters
        pass
