"""Reward registry with lazy construction.

Nothing heavy is imported until a reward is built: each entry names its class as "module:attribute", so a
missing optional package (ImageReward, hpsv2) fails only when that reward is requested, with the pip command.

``build_reward(spec)`` accepts

* a registered name: ``"jpeg-compressibility"``;
* a dict ``{"name": "aesthetic", "head_path": "...", ...}`` (options go to the reward's constructor);
* ``"package.module:function"`` (or a dict with that as its name) for any ``f(images, prompts) -> scores``;
  such callables are non-differentiable unless the dict says ``differentiable: true``;
* an existing :class:`Reward` (returned as is) or any callable (wrapped).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gfnalign.rewards.base import CallableReward, Reward


@dataclass(frozen=True)
class RewardInfo:
    """One row of ``list_rewards()``."""

    name: str
    target: str  # "module:ClassName", imported only on build
    differentiable: bool
    inputs: str  # "image" or "image+prompt"
    needs_weights: bool
    extra: str | None = None  # pip extra / package needed beyond the default install
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # notable options and their defaults (for docs/CLI)


_REGISTRY: dict[str, RewardInfo] = {}


def register_reward(
    name: str,
    target: str | Callable[..., Reward],
    *,
    differentiable: bool,
    inputs: str = "image",
    needs_weights: bool = False,
    extra: str | None = None,
    description: str = "",
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Register a reward factory under ``name`` (``target`` is "module:attr" or a callable returning a Reward)."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward name {name!r} is already registered; pass overwrite=True to replace it")
    if inputs not in ("image", "image+prompt"):
        raise ValueError(f"inputs must be 'image' or 'image+prompt', got {inputs!r}")
    if callable(target) and not isinstance(target, str):
        # an attribute name for the target (a reward name may hold dots and colons: "pkg.mod:Class")
        key = "_direct_" + "".join(c if c.isalnum() else "_" for c in name) + f"_{zlib.crc32(name.encode()):08x}"
        _DIRECT[key] = target
        target = f"{__name__}:{key}"
    _REGISTRY[name] = RewardInfo(
        name, target, differentiable, inputs, needs_weights, extra, description, dict(options or {})
    )


_DIRECT: dict[str, Callable[..., Reward]] = {}


def __getattr__(attr: str):  # resolves targets registered as direct callables
    if attr in _DIRECT:
        return _DIRECT[attr]
    raise AttributeError(attr)


def list_rewards() -> list[RewardInfo]:
    """Every registered reward (sorted by name), without importing any of them."""
    _ensure_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def reward_names() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def _import_target(target: str, what: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what}: expected 'package.module:function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?") from err
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _call_with_options(factory: Callable[..., Reward], options: dict[str, Any], name: str) -> Reward:
    """Call ``factory(**options)``; an unknown option becomes an error listing the allowed ones."""
    _check_options(factory, options, name)
    return factory(**options)


def _check_options(factory: Callable[..., Reward], options: dict[str, Any], name: str) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        allowed = [p for p, v in sig.parameters.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ValueError(
                f"reward {name!r}: unknown option(s) {unknown}; allowed options: {', '.join(allowed) or '(none)'}"
            )


def check_reward_spec(spec: Any) -> None:
    """Everything :func:`build_reward` checks about ``spec`` without constructing the reward (no model loads):
    the name is registered or an importable ``module:function`` that is callable, and every option is known.
    Raises ``ValueError`` / ``TypeError`` with the same messages as :func:`build_reward`."""
    if isinstance(spec, Reward) or (callable(spec) and not isinstance(spec, str | Mapping)):
        return
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(f"reward spec dict needs a 'name' key (a registered reward or 'module:function'), "
                             f"got keys {sorted(options)}")
        name = options.pop("name")
    elif isinstance(spec, str):
        name, options = spec, {}
    else:
        raise TypeError(f"reward spec must be a name, a dict or a callable, got {type(spec).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    _ensure_builtins()
    if name in _REGISTRY:
        _check_options(_import_target(_REGISTRY[name].target, f"reward {name!r}"), options, name)
        return
    if ":" in name:
        fn = _import_target(name, f"reward {name!r}")
        if isinstance(fn, type) and issubclass(fn, Reward):
            _check_options(fn, options, name)
        elif not callable(fn):
            raise ValueError(f"reward {name!r} is a {type(fn).__name__}, not a callable f(images, prompts) -> scores")
        elif not isinstance(fn, Reward):
            unknown = sorted(set(options) - {"differentiable", "device", "display_name"})
            if unknown:
                raise ValueError(f"reward {name!r} (a callable): unknown option(s) {unknown}; allowed: "
                                 "['device', 'differentiable', 'display_name']")
        return
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}; or give "
                     "'package.module:function' for any f(images, prompts) -> scores.")


def build_reward(spec: str | Mapping[str, Any] | Reward | Callable[..., Any], **overrides: Any) -> Reward:
    """Construct a reward from a name, an options dict, a "module:function" path, a Reward or a callable."""
    if isinstance(spec, Reward):
        if overrides:
            raise ValueError("build_reward: options cannot be applied to an already-built Reward instance")
        return spec
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(
                f"reward spec dict needs a 'name' key (a registered reward or 'module:function'), got keys "
                f"{sorted(options)}"
            )
        name = options.pop("name")
    elif isinstance(spec, str):
        name, options = spec, {}
    elif callable(spec):
        return CallableReward(spec, **overrides)
    else:
        raise TypeError(f"reward spec must be a name, a dict or a callable, got {type(spec).__name__}")
    options.update(overrides)
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    _ensure_builtins()

    if name in _REGISTRY:
        info = _REGISTRY[name]
        factory = _import_target(info.target, f"reward {name!r}")
        reward = _call_with_options(factory, options, name)
        if not isinstance(reward, Reward):
            raise TypeError(f"reward {name!r}: factory {info.target} returned {type(reward).__name__}, not a Reward")
        return reward
    if ":" in name:
        fn = _import_target(name, f"reward {name!r}")
        if isinstance(fn, type) and issubclass(fn, Reward):
            return _call_with_options(fn, options, name)
        if isinstance(fn, Reward):
            return fn
        allowed = {"differentiable", "device", "display_name"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"reward {name!r} (a callable): unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        return CallableReward(
            fn,
            name=options.get("display_name", name),
            differentiable=bool(options.get("differentiable", False)),
            device=options.get("device"),
        )
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}; or give "
        "'package.module:function' for any f(images, prompts) -> scores."
    )


_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from gfnalign.rewards import builtins  # noqa: F401  (registers the built-in names)
