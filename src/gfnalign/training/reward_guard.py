"""Every reward call the trainer makes goes through :class:`GuardedReward`, which turns failures into the
two outcomes the trainer knows how to handle:

* the reward raised anything, or did not answer within ``reliability.reward_timeout_s``
  -> :class:`~gfnalign.rewards.base.RewardOutputError` (a bad reward: the epoch is skipped and counted, or the
  run stops with a checkpoint, per ``reliability.on_bad_reward``);
* the reward's service is unreachable (:class:`~gfnalign.rewards.base.RewardUnreachableError`, e.g. a reward
  server that is down, or a ``ConnectionError``) -> wait with exponential backoff and call again, up to
  ``reliability.reward_wait_s`` in total; then :class:`RewardUnavailableError` (the trainer saves a checkpoint
  and stops; ``--resume latest`` continues once the service is back).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from gfnalign.rewards.base import RewardOutputError, RewardUnreachableError


class RewardUnavailableError(RuntimeError):
    """The reward's service stayed unreachable for longer than ``reliability.reward_wait_s``."""


def _name(reward: Any) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


class GuardedReward:
    """Wraps ``reward(images, prompts) -> [N]``; attributes (``name``, ``differentiable``, ...) pass through."""

    def __init__(self, reward: Any, *, timeout_s: float | None, wait_s: float, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None) -> None:
        self._reward = reward
        self._timeout_s = float(timeout_s) if timeout_s else None
        self._wait_s = float(wait_s)
        self._backoff_s = float(backoff_s)
        self._max_backoff_s = float(max_backoff_s)
        self._sleep = sleep
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.waits = 0  # how many times a call waited for an unreachable service (for tests / metrics)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._reward, attr)

    @property
    def wrapped(self) -> Any:
        return self._reward

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        deadline = None
        attempt = 0
        while True:
            try:
                return self._call_once(images, prompts)
            except RewardOutputError:
                raise
            except (RewardUnreachableError, ConnectionError) as err:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._wait_s
                if now >= deadline:
                    raise RewardUnavailableError(
                        f"reward {_name(self._reward)!r} unreachable for {self._wait_s:g} s "
                        f"(reliability.reward_wait_s); last error: {type(err).__name__}: {err}") from None
                delay = min(self._max_backoff_s, self._backoff_s * 2 ** attempt, deadline - now)
                self._log(f"[gfnalign] reward {_name(self._reward)!r} unreachable ({type(err).__name__}); "
                          f"retrying in {delay:.1f} s (gives up {deadline - now:.0f} s from now)")
                self.waits += 1
                self._sleep(delay)
                attempt += 1
            except Exception as err:  # a crashing reward is a bad reward, never a traceback
                raise RewardOutputError(_name(self._reward),
                                        f"the reward raised {type(err).__name__}: {err}") from None

    def _call_once(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self._timeout_s is None:
            return self._reward(images, prompts)
        box: dict[str, Any] = {}
        grad = torch.is_grad_enabled()  # grad mode is thread-local: carry it into the worker

        def work() -> None:
            try:
                with torch.set_grad_enabled(grad):
                    box["out"] = self._reward(images, prompts)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = err

        worker = threading.Thread(target=work, name="gfnalign-reward", daemon=True)
        worker.start()
        worker.join(self._timeout_s)
        if worker.is_alive():
            raise RewardOutputError(_name(self._reward), f"no answer within reliability.reward_timeout_s="
                                    f"{self._timeout_s:g} s (the call is abandoned)")
        if "err" in box:
            raise box["err"]
        return box["out"]
