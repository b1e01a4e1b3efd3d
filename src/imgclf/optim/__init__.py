"""Optimizers (torch's SGD/Adam/AMSGrad, our LARS), parameter groups, LR schedules."""
from imgclf.optim.build import OPTIMIZERS, build_optimizer
from imgclf.optim.lars import LARS
from imgclf.optim.param_groups import decayed_parameter_names, param_groups
from imgclf.optim.schedules import PerIterationLR, SchedulePlan, build_scheduler, lr_factor

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "PerIterationLR",
    "SchedulePlan",
    "build_optimizer",
    "build_scheduler",
    "decayed_parameter_names",
    "lr_factor",
    "param_groups",
]
