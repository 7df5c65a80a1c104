"""Weighted sum of rewards, with each component's scores kept for logging.

``{"name": "composite", "components": [{"reward": "aesthetic", "weight": 1.0},
                                       {"reward": {"name": "jpeg-compressibility"}, "weight": 0.1, "label": "jpeg"}]}``
or ``{"name": "composite", "components": {"aesthetic": 1.0, "jpeg-compressibility": 0.1}}``.

After each call ``last_components`` maps each label to its (detached, unweighted) ``[N]`` scores, for metrics
such as ``reward/<label>/mean``. The composite is differentiable iff every component is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gfnalign.rewards.base import Reward


class CompositeReward(Reward):
    inputs = "image+prompt"

    def __init__(self, components: Sequence[Any] | Mapping[str, float], *, name: str = "composite", device=None):
        super().__init__(device)
        from gfnalign.rewards.registry import build_reward

        if isinstance(components, Mapping):
            components = [{"reward": k, "weight": w} for k, w in components.items()]
        if not isinstance(components, Sequence) or isinstance(components, str) or not components:
            raise ValueError(
                "composite reward: 'components' must be a non-empty list of {reward: SPEC, weight: W} "
                f"or a dict name -> weight, got {components!r}"
            )
        self.rewards: list[Reward] = []
        self.weights: list[float] = []
        self.labels: list[str] = []
        for i, comp in enumerate(components):
            if isinstance(comp, Reward):
                comp = {"reward": comp}
            if not isinstance(comp, Mapping) or "reward" not in comp:
                raise ValueError(f"composite reward: components[{i}] must be a dict with a 'reward' key, got {comp!r}")
            unknown = set(comp) - {"reward", "weight", "label"}
            if unknown:
                raise ValueError(f"composite reward: components[{i}] has unknown keys {sorted(unknown)}; "
                                 "allowed: reward, weight, label")
            weight = comp.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
                raise ValueError(f"composite reward: components[{i}].weight must be a number, got {weight!r}")
            reward = build_reward(comp["reward"])
            label = comp.get("label") or reward.name
            if label in self.labels:
                label = f"{label}_{i}"
            self.rewards.append(reward)
            self.weights.append(float(weight))
            self.labels.append(label)
        self.name = name
        self.differentiable = all(r.differentiable for r in self.rewards)
        if any(r.inputs == "image+prompt" for r in self.rewards):
            self.inputs = "image+prompt"
        else:
            self.inputs = "image"
        self.last_components: dict[str, torch.Tensor] = {}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        components = {}
        for label, weight, reward in zip(self.labels, self.weights, self.rewards):
            value = reward(images, prompts)  # each component checks its own output
            components[label] = value.detach()
            total = total + weight * value.to(total.device)
        self.last_components = components
        return total

    def to(self, device) -> CompositeReward:
        for reward in self.rewards:
            if reward.device is not None:
                continue  # components pinned to a device stay there
            reward.to(device)
        self.device = torch.device(device)
        return self

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["components"] = [{"label": l, "weight": w, **r.info()} for l, w, r in zip(self.labels, self.weights, self.rewards)]
        return out
