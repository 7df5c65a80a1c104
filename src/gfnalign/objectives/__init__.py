"""Objectives: one file each, registered by name in :data:`gfnalign.objectives.base.REGISTRY`."""

from gfnalign.objectives.base import (
    REGISTRY,
    SINGLE_PROCESS,
    Collective,
    LossOutput,
    Objective,
    build_objective,
    register,
)
from gfnalign.objectives.dag_db import DAGDB
from gfnalign.objectives.dag_kl import DAGKL
from gfnalign.objectives.ddpo import DDPO
from gfnalign.objectives.grpo import GRPO
from gfnalign.objectives.heads import make_flow_score_head, make_log_flow_head
from gfnalign.objectives.nabla_db import NablaDB
from gfnalign.objectives.residual_nabla_db import ResidualNablaDB
from gfnalign.objectives.reward_backprop import RewardBackprop
from gfnalign.objectives.rtb import RTB

__all__ = [
    "DAGDB",
    "DAGKL",
    "DDPO",
    "GRPO",
    "REGISTRY",
    "LossOutput",
    "Collective",
    "SINGLE_PROCESS",
    "NablaDB",
    "Objective",
    "ResidualNablaDB",
    "RTB",
    "RewardBackprop",
    "build_objective",
    "make_flow_score_head",
    "make_log_flow_head",
    "register",
]
