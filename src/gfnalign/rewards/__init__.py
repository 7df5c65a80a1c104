"""Rewards and prompt sets.

``build_reward(spec)`` makes a :class:`Reward` from a name ("jpeg-compressibility"), an options dict
({"name": "aesthetic", "head_path": ...}) or "package.module:function"; ``list_rewards()`` lists them all
without importing any model code. ``load_prompts(spec)`` gives a :class:`PromptSet` ("digits", "animals", or
a txt/json/csv file). See docs/rewards.md.
"""

from gfnalign.rewards.base import (
    CallableReward,
    MissingDependencyError,
    Reward,
    RewardOutputError,
    RewardUnreachableError,
    check_inputs,
    check_output,
)
from gfnalign.rewards.prompts import PromptSet, load_prompts, prompt_set_names
from gfnalign.rewards.registry import RewardInfo, build_reward, list_rewards, register_reward, reward_names

__all__ = [
    "CallableReward",
    "MissingDependencyError",
    "PromptSet",
    "Reward",
    "RewardInfo",
    "RewardOutputError",
    "RewardUnreachableError",
    "build_reward",
    "check_inputs",
    "check_output",
    "list_rewards",
    "load_prompts",
    "prompt_set_names",
    "register_reward",
    "reward_names",
]
