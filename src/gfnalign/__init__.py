"""gfnalign: align text-to-image diffusion models to rewards with GFlowNets.

The Python API (:mod:`gfnalign.api`), re-exported here::

    import gfnalign
    cfg = gfnalign.load_config("demo", {"training.epochs": 2})
    result = gfnalign.train(cfg, out="runs/demo")

Layers (lower never import higher): core -> objectives / sampling / toy -> backbones / rewards ->
training / evaluation -> api -> cli. Only ``backbones`` imports diffusers/peft; accelerate is used by
``training`` and ``cli`` alone. The names below load on first use, so ``import gfnalign`` (and any lower
layer) imports neither torch models nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first access
_LAZY: dict[str, str] = {
    "load_config": "gfnalign.api:load_config",
    "list_presets": "gfnalign.api:list_presets",
    "train": "gfnalign.api:train",
    "TrainResult": "gfnalign.api:TrainResult",
    "RunExistsError": "gfnalign.api:RunExistsError",
    "ArgumentError": "gfnalign.api:ArgumentError",
    "check_run": "gfnalign.api:check_run",
    "sample": "gfnalign.api:sample",
    "SampleResult": "gfnalign.api:SampleResult",
    "evaluate": "gfnalign.api:evaluate",
    "markdown_report": "gfnalign.api:markdown_report",
    "train_toy": "gfnalign.api:train_toy",
    "register_objective": "gfnalign.api:register_objective",
    "register_reward": "gfnalign.api:register_reward",
    "TrainConfig": "gfnalign.training.config:TrainConfig",
    "ConfigError": "gfnalign.training.config:ConfigError",
    "WeightsError": "gfnalign.training.weights:WeightsError",
    "CheckpointError": "gfnalign.training.checkpoint:CheckpointError",
    "Objective": "gfnalign.objectives.base:Objective",
    "LossOutput": "gfnalign.objectives.base:LossOutput",
    "Reward": "gfnalign.rewards.base:Reward",
    "PromptSet": "gfnalign.rewards.prompts:PromptSet",
}

__all__ = [
    "__version__",
    "ArgumentError",
    "CheckpointError",
    "ConfigError",
    "LossOutput",
    "Objective",
    "PromptSet",
    "Reward",
    "RunExistsError",
    "SampleResult",
    "TrainConfig",
    "TrainResult",
    "WeightsError",
    "check_run",
    "evaluate",
    "list_presets",
    "load_config",
    "markdown_report",
    "register_objective",
    "register_reward",
    "sample",
    "train",
    "train_toy",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'gfnalign' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - static names for type checkers and IDEs
    from gfnalign.api import (
        ArgumentError,
        RunExistsError,
        SampleResult,
        TrainResult,
        check_run,
        evaluate,
        list_presets,
        load_config,
        markdown_report,
        register_objective,
        register_reward,
        sample,
        train,
        train_toy,
    )
    from gfnalign.objectives.base import LossOutput, Objective
    from gfnalign.rewards.base import Reward
    from gfnalign.rewards.prompts import PromptSet
    from gfnalign.training.checkpoint import CheckpointError
    from gfnalign.training.config import ConfigError, TrainConfig
    from gfnalign.training.weights import WeightsError
