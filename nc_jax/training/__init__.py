"""nc_jax.training: the pure train step, in-graph evaluation, checkpoints and the training loop."""

from nc_jax.training.loop import Preempted, train_and_evaluate

__all__ = ["Preempted", "train_and_evaluate"]
