"""GuardedReward: a crashing or hanging reward is a bad reward; an unreachable one is waited for, then stops."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from gfnalign.rewards.base import RewardOutputError, RewardUnreachableError
from gfnalign.training.reward_guard import GuardedReward, RewardUnavailableError

IMAGES = torch.rand(2, 3, 4, 4)
PROMPTS = ["a", "b"]


def _guard(fn, **kw):
    kw.setdefault("timeout_s", None)
    kw.setdefault("wait_s", 5.0)
    return GuardedReward(fn, log=lambda msg: None, **kw)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("scores"), ZeroDivisionError()])
def test_any_exception_becomes_a_bad_reward(error):
    def reward(images, prompts):
        raise error

    with pytest.raises(RewardOutputError, match=type(error).__name__):
        _guard(reward)(IMAGES, PROMPTS)


def test_a_hanging_reward_times_out():
    def reward(images, prompts):
        time.sleep(3.0)
        return torch.zeros(len(prompts))

    t0 = time.monotonic()
    with pytest.raises(RewardOutputError, match="reward_timeout_s=0.2"):
        _guard(reward, timeout_s=0.2)(IMAGES, PROMPTS)
    assert time.monotonic() - t0 < 2.0


def test_gradients_and_grad_mode_pass_through_the_timeout_thread():
    def reward(images, prompts):
        return images.flatten(1).sum(1) * 2.0

    guarded = _guard(reward, timeout_s=5.0)
    x = IMAGES.clone().requires_grad_(True)
    guarded(x, PROMPTS).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    with torch.no_grad():
        assert not guarded(x, PROMPTS).requires_grad


def test_unreachable_service_is_waited_for_with_backoff():
    calls = {"n": 0}
    delays = []

    def reward(images, prompts):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RewardUnreachableError("connection refused")
        return torch.ones(len(prompts))

    guarded = _guard(reward, wait_s=100.0, backoff_s=1.0, max_backoff_s=3.0, sleep=delays.append)
    assert torch.equal(guarded(IMAGES, PROMPTS), torch.ones(2))
    assert delays == [1.0, 2.0, 3.0] and guarded.waits == 3


def test_unreachable_past_the_deadline_stops_with_a_named_error():
    def reward(images, prompts):
        raise ConnectionRefusedError("nobody home")

    t0 = time.monotonic()
    with pytest.raises(RewardUnavailableError, match="reward_wait_s.*ConnectionRefusedError"):
        _guard(reward, wait_s=0.3, backoff_s=0.05)(IMAGES, PROMPTS)
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_http_reward_on_a_closed_port_counts_as_unreachable():
    from gfnalign.rewards.http import HttpReward

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = HttpReward(url=f"http://127.0.0.1:{port}/score", retries=0, timeout=1.0)
    with pytest.raises(RewardUnavailableError, match="unreachable"):
        _guard(reward, wait_s=0.2, backoff_s=0.05)(IMAGES, PROMPTS)
