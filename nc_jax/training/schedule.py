"""The paper's optimisation protocol: SGD with momentum, coupled weight decay, step decay; when to measure.

Variants: torch's Adam (coupled L2) and AdamW (decoupled decay), on the same lr schedule.
"""

from __future__ import annotations

from typing import Sequence

import optax

from nc_jax.names import OPTIMIZERS

NOTEBOOK_EPOCHS = 350
NOTEBOOK_MEASURE_EPOCHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 29, 32, 35,
                           38, 42, 45, 50, 54, 59, 65, 71, 77, 85, 92, 101, 110, 121, 132, 144, 158, 172, 188,
                           206, 225, 245, 268, 293, 320, 350)


def measurement_epochs(num_epochs: int, explicit: Sequence[int] = ()) -> tuple[int, ...]:
  """Epochs (1-based) at which NC is measured: ``explicit``, or the notebook's list scaled to num_epochs."""
  if explicit:
    epochs = sorted(set(int(e) for e in explicit))
    if epochs[0] < 1 or epochs[-1] > num_epochs:
      raise ValueError(f"measure_epochs {tuple(epochs)} must lie in [1, num_epochs={num_epochs}]")
    return tuple(epochs)
  scaled = {max(1, round(e * num_epochs / NOTEBOOK_EPOCHS)) for e in NOTEBOOK_MEASURE_EPOCHS}
  return tuple(sorted(scaled | {num_epochs}))


def decay_epochs(num_epochs: int, explicit: Sequence[int] = ()) -> tuple[int, ...]:
  """Epochs after which the learning rate is multiplied by the decay factor: (n//3, 2n//3) by default."""
  return tuple(int(e) for e in explicit) if explicit else (num_epochs // 3, 2 * num_epochs // 3)


def learning_rate(base: float, steps_per_epoch: int, decay_after: Sequence[int], factor: float) -> optax.Schedule:
  """lr(step): ``base`` until epoch decay_after[0] ends, then x factor after each listed epoch.

  With 350 epochs: epochs 1-116 at lr, 117-233 at lr/10, 234-350 at lr/100 (the
  notebook's MultiStepLR stepped once per epoch).
  """
  return optax.piecewise_constant_schedule(base, {epoch * steps_per_epoch: factor for epoch in decay_after})


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay): g <- g + wd * w; buf <- m * buf + g; w <- w - lr * buf.

  Weight decay is coupled (added to the gradient before momentum) and applies to
  every parameter, BatchNorm and biases included, as in the paper's PyTorch setup.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


def optimizer(name: str, schedule: optax.Schedule, *, momentum: float, weight_decay: float,
              betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim's SGD (the paper's), Adam or AdamW, with weight decay on every parameter.

  'sgd': ``sgd`` above. 'adam': torch.optim.Adam(betas, eps, weight_decay), decay coupled as L2:
  g <- g + wd w; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
  w <- w - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
  'adamw': torch.optim.AdamW, decay decoupled: w <- w - lr wd w - lr (Adam's step on g alone).
  momentum is SGD's only; betas and eps are Adam's.
  """
  b1, b2 = betas
  if name == "sgd":
    return sgd(schedule, momentum, weight_decay)
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  if name == "adamw":
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
