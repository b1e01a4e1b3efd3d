"""Training engine and evaluator."""
from .trainer import Diverged, Preempted, Trainer, load_run_config, train  # noqa: F401
