"""nc_jax.training: the pure train step, in-graph evaluation, checkpoints, the run directory and the loop."""

from nc_jax.training.loop import Diverged, Preempted, train_and_evaluate

__all__ = ["Diverged", "Preempted", "train_and_evaluate"]
