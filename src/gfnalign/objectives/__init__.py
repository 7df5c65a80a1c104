"""Objectives: one file each, registered by name in :data:`gfnalign.objectives.base.REGISTRY`."""

from gfnalign.objectives.base import REGISTRY, LossOutput, Objective, build_objective, register
from gfnalign.objectives.dag_db import DAGDB
from gfnalign.objectives.heads import make_flow_score_head, make_log_flow_head
from gfnalign.objectives.residual_nabla_db import ResidualNablaDB

__all__ = [
    "DAGDB",
    "REGISTRY",
    "LossOutput",
    "Objective",
    "ResidualNablaDB",
    "build_objective",
    "make_flow_score_head",
    "make_log_flow_head",
    "register",
]
