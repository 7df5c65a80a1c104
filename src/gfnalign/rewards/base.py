"""The reward contract: ``reward(images [N,3,H,W] in [0,1], prompts) -> [N] float32``.

A :class:`Reward` subclass implements :meth:`Reward.score` and gets, for free, from :meth:`Reward.__call__`:

* input checks (a 4-d float tensor with 3 channels, values in [0, 1] up to a small tolerance, finite, one
  prompt per image), each failure a ``ValueError``/``TypeError`` naming the field, the bad value and the fix;
* device and dtype handling: the reward runs in float32 on its own device (``device=None`` follows the
  images), inputs are moved there (differentiably), and the scores come back on the images' device;
* output checks: a float32 tensor of shape ``[N]`` with finite values, or :class:`RewardOutputError`, which
  the trainer catches to skip (and count) the step instead of training on garbage;
* no autograd graph for non-differentiable rewards (they run under ``torch.no_grad``).

:class:`CallableReward` wraps any ``f(images, prompts) -> scores`` (a tensor, numpy array or list).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# Values this far outside [0, 1] are accepted (and clamped): VAE decodes and bicubic resizes overshoot a little.
RANGE_TOLERANCE = 1e-3


class RewardOutputError(ValueError):
    """A reward produced unusable scores (NaN/inf, wrong shape, length or dtype).

    The trainer catches this to skip the step; ``reward_name`` and ``reason`` are kept for its log.
    """

    def __init__(self, reward_name: str, reason: str):
        self.reward_name = reward_name
        self.reason = reason
        super().__init__(f"reward '{reward_name}' returned unusable scores: {reason}")


class RewardUnreachableError(RuntimeError):
    """The reward's service (e.g. a reward server) cannot be reached right now; a later call may succeed.

    Raise it (or a subclass) from a reward that talks to a service: the trainer then waits with backoff up to
    ``reliability.reward_wait_s`` instead of skipping the epoch.
    """


class MissingDependencyError(ImportError):
    """An optional package needed by one reward is not installed; the message holds the pip command."""


def missing_dependency(reward_name: str, module: str, pip_name: str, err: BaseException | None = None):
    """Build the error raised when ``reward_name`` needs ``module`` (installed by ``pip install pip_name``)."""
    detail = f" ({err})" if err is not None else ""
    return MissingDependencyError(
        f"reward '{reward_name}' needs the optional package '{module}', which could not be imported{detail}. "
        f"Install it with: pip install {pip_name}"
    )


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None``/"auto" -> None (follow the inputs); "cuda" without a GPU -> a clear error."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"reward device={str(device)!r} but CUDA is not available; use device='cpu' or 'auto'")
    return device


class Reward:
    """Base class of every reward.

    Subclasses set ``name``, ``differentiable`` and ``inputs`` ("image" or "image+prompt"), keep their networks
    as ``torch.nn.Module`` attributes (moved by :meth:`to`, frozen by :meth:`freeze`) and implement
    :meth:`score`, which receives float32 images already on :attr:`device`, clamped to [0, 1].
    """

    name: str = "reward"
    differentiable: bool = False
    inputs: str = "image"

    def __init__(self, device: str | torch.device | None = None):
        self.device: torch.device | None = resolve_device(device)
        self._placed_on: torch.device | None = None

    # -- to implement ----------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores ``[N]`` float32 for ``images`` ``[N,3,H,W]`` (float32, in [0,1], on the reward's device)."""
        raise NotImplementedError

    # -- devices -----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks this reward owns (attributes that are ``nn.Module``)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.nn.Module)}

    def to(self, device: str | torch.device) -> Reward:
        device = torch.device(device)
        for module in self.modules().values():
            module.to(device=device, dtype=torch.float32)
        self.device = device
        self._placed_on = device
        return self

    def freeze(self) -> Reward:
        """Eval mode and no parameter gradients: gradients reach only the input images."""
        for module in self.modules().values():
            module.eval()
            module.requires_grad_(False)
        return self

    def _target_device(self, images: torch.Tensor) -> torch.device:
        device = self.device if self.device is not None else images.device
        if self._placed_on != device:
            for module in self.modules().values():
                module.to(device=device, dtype=torch.float32)
            self._placed_on = device
        return device

    # -- the checked call --------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_inputs(images, prompts, self.name)
        device = self._target_device(images)
        x = images.to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
        if self.differentiable:
            out = self.score(x, prompts)
        else:
            with torch.no_grad():
                out = self.score(x.detach(), prompts)
        out = check_output(out, len(prompts), self.name)
        return out.to(images.device)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "differentiable": self.differentiable, "inputs": self.inputs}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def check_inputs(images: Any, prompts: Any, reward_name: str = "reward") -> list[str]:
    """Validate a reward call's arguments; return the prompts as a list."""
    where = f"reward '{reward_name}'"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: images must be a torch.Tensor [N,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"{where}: images must have 4 dims [N,3,H,W], got shape {tuple(images.shape)}"
            + ("; add a batch dim with images[None]" if images.ndim == 3 else "")
        )
    if images.shape[1] != 3:
        hint = "; repeat grey images with images.expand(-1, 3, -1, -1)" if images.shape[1] == 1 else ""
        hint = hint or ("; channels-last input? use images.permute(0, 3, 1, 2)" if images.shape[-1] == 3 else "")
        raise ValueError(f"{where}: images must have 3 channels (RGB) in dim 1, got shape {tuple(images.shape)}{hint}")
    if not images.is_floating_point():
        raise TypeError(
            f"{where}: images must be a float tensor in [0,1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if isinstance(prompts, str):
        raise TypeError(f"{where}: prompts must be a list of strings (one per image), got a single string")
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"{where}: prompts must be a list of strings, got {type(prompts).__name__}") from None
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"{where}: got {images.shape[0]} images but {len(prompts)} prompts; pass exactly one prompt per image"
        )
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{where}: prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if images.numel():
        with torch.no_grad():
            finite = torch.isfinite(images)
            if not bool(finite.all()):
                rows = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
                raise ValueError(f"{where}: images contain NaN/inf (rows {rows[:8]})")
            lo, hi = float(images.min()), float(images.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            hint = ""
            if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
                hint = "; images in [-1,1] (VAE output)? use (images + 1) / 2"
            elif hi > 2 and lo >= -RANGE_TOLERANCE:
                hint = "; uint8-scaled? divide by 255"
            raise ValueError(f"{where}: image values must lie in [0,1], got range [{lo:.4g}, {hi:.4g}]{hint}")
    return prompts


def check_output(out: Any, n: int, reward_name: str = "reward") -> torch.Tensor:
    """Validate scores: a float32 tensor of shape [n], all finite. Raises :class:`RewardOutputError`."""
    if not isinstance(out, torch.Tensor):
        raise RewardOutputError(reward_name, f"expected a torch.Tensor of shape [{n}], got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise RewardOutputError(
            reward_name, f"dtype must be torch.float32, got {out.dtype}; return scores.float()"
        )
    if out.ndim != 1:
        raise RewardOutputError(
            reward_name, f"shape must be [N] = [{n}], got {tuple(out.shape)}"
            + ("; squeeze the last dim" if out.ndim == 2 and out.shape[-1] == 1 else "")
        )
    if out.shape[0] != n:
        raise RewardOutputError(reward_name, f"got {out.shape[0]} scores for {n} images (wrong length)")
    finite = torch.isfinite(out.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise RewardOutputError(reward_name, f"non-finite scores (NaN/inf) at rows {bad[:8]}")
    return out


def as_score_tensor(value: Any, reward_name: str) -> torch.Tensor:
    """Turn a callable's output (tensor, numpy array, list of numbers) into a tensor, float32 when floating.

    Tensors pass unchanged (their dtype is checked later); lists and arrays of real numbers become float32.
    """
    if isinstance(value, torch.Tensor):
        return value
    try:
        import numpy as np

        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - anything unconvertible is an output error
        raise RewardOutputError(reward_name, f"could not convert output of type {type(value).__name__}: {err}") from err
    if arr.dtype.kind not in "fiu":
        raise RewardOutputError(reward_name, f"output must hold real numbers, got numpy dtype {arr.dtype}")
    return torch.from_numpy(arr.astype("float32", copy=True))


class CallableReward(Reward):
    """Any ``fn(images, prompts) -> scores`` as a reward (non-differentiable unless told otherwise).

    ``fn`` receives float32 images in [0,1] on the reward's device (or the inputs' device when ``device`` is
    None) and returns a tensor, numpy array or list with one score per image.
    """

    inputs = "image+prompt"

    def __init__(
        self,
        fn: Callable[[torch.Tensor, list[str]], Any],
        *,
        name: str | None = None,
        differentiable: bool = False,
        device: str | torch.device | None = None,
    ):
        super().__init__(device)
        if not callable(fn):
            raise TypeError(f"CallableReward needs a callable f(images, prompts) -> scores, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__))
        self.differentiable = bool(differentiable)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return as_score_tensor(self.fn(images, prompts), self.name)
