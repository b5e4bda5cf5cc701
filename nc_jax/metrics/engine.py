"""The two-pass Neural Collapse measurement over any iterable of batches, on the host.

What streamed training (``nc_jax.training.evaluate.StreamedEvaluator``) and ``nc_jax.collect`` share; the
in-memory suite (``neural_collapse``) runs the same passes inside one jitted graph. A batch is
(inputs (B, ...), labels (B,), mask (B,) bool: False for padding rows), and
``apply_fn(params, inputs) -> (logits (B, C), features (B, p) or (B, ...))`` (flattened to p):

  pass 1   class means     mu_c = (1/n_c) sum_{y_i = c} h_i          ``means_step`` (``update_class_means``)
  between  geometry        M = mu - mu_G = U S V^T, in units of 2^e  ``geometry_of`` (``finalize_class_means``)
  pass 2   deviations      d_i = h_i - mu_{y_i}, NCC / network decisions and, with a loss,
                           sum_i loss_i, #{argmax logits_i = y_i}, n   ``deviations_step`` -> ``DeviationPass``
  held-out the test set's deviations from the *training* geometry (same step)
  finalize ``finalize`` (``finalize_collapse``), ``transfer`` (``finalize_transfer``, the ``*_test`` keys),
           ``loss_keys`` ('<name>_loss' = (1/n) sum_i loss_i, '<name>_acc' = (1/n) #correct).

The loss sums come from pass 2: the same forward passes over the same batches as pass 1, so the sums are
the same additions in the same order. Each step is one jitted function of (state, ..., params, batch) with
the state donated, built once per (apply_fn, loss_fn, convention) and cached. ``measure`` is the plain
driver; callers that resume or merge processes (``collect``) run the same steps themselves.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import streaming
from nc_jax.metrics.options import NCOptions

Batches = Union[Iterable, Callable[[], Iterable]]


# ----------------------------------------------------------------------------
# States.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class LossSums:
  """Sums over the valid rows: loss_sum = sum_i loss(logits_i, y_i), correct = #{argmax logits_i = y_i}, count."""

  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array


def init_loss() -> LossSums:
  """Zero sums (float32 loss, int32 counts)."""
  return LossSums(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def merge_loss(a: LossSums, b: LossSums) -> LossSums:
  """The sums of two disjoint sets of rows."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def batch_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, loss_fn: Callable) -> LossSums:
  """One batch's ``LossSums`` over its valid rows (mask True, 0 <= y_i < C): invalid rows' losses are
  computed on label 0 and dropped, so a padding row's label never reaches ``loss_fn``."""
  valid = mask & (labels >= 0) & (labels < logits.shape[-1])
  losses = jnp.where(valid, loss_fn(logits, jnp.where(valid, labels, 0)), 0.0)
  return LossSums(jnp.sum(losses, dtype=jnp.float32), jnp.sum(valid & (jnp.argmax(logits, -1) == labels),
                                                              dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32))


@flax.struct.dataclass
class DeviationPass:
  """A deviation pass's state: the NC sums (``streaming.DeviationState``) and the loss/accuracy sums."""

  nc: streaming.DeviationState
  loss: LossSums


def init_deviation_pass(geometry: streaming.ClassGeometry) -> DeviationPass:
  """Zero sums of pass 2 against ``geometry``, each leaf its own buffer (the steps donate the state, and a
  buffer cannot be donated twice)."""
  shapes = jax.eval_shape(lambda: DeviationPass(streaming.init_deviations(geometry), init_loss()))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def merge_deviation_pass(a: DeviationPass, b: DeviationPass) -> DeviationPass:
  """The state of two disjoint sets of rows (``streaming.merge_deviations`` and ``merge_loss``)."""
  return DeviationPass(streaming.merge_deviations(a.nc, b.nc), merge_loss(a.loss, b.loss))


# ----------------------------------------------------------------------------
# The jitted steps (cached: repeated measurements reuse the compiled code).
# ----------------------------------------------------------------------------


def _flat(features: jax.Array) -> jax.Array:
  """(B, ...) -> (B, p)."""
  return jnp.reshape(features, (features.shape[0], -1))


@functools.lru_cache(maxsize=16)
def means_step(apply_fn: Callable, track_max_abs: bool = True) -> Callable:
  """Pass 1, jitted, state donated: (ClassMeansState, params, inputs, labels, mask) -> the state with the batch's
  features h = apply_fn(params, inputs)[1], flattened to (B, p), folded in.

  ``track_max_abs``: also keep max |h_ij| (one more read of each batch), so pass 2 measures in units where no
  finite row overflows; False: units of the largest |class mean| (what ``neural_collapse`` tries first). The
  two give bit-identical results unless a row is ~1e18 times larger than every class mean."""
  def step(state, params, inputs, labels, mask):
    _, features = apply_fn(params, inputs)
    return streaming.update_class_means(state, _flat(features), labels, mask.astype(bool),
                                        track_max_abs=track_max_abs)
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _deviations_step(apply_fn: Callable, loss_fn: Optional[Callable], ncc_use_bias: bool) -> Callable:
  def step(state: DeviationPass, geometry, params, inputs, labels, mask):
    logits, features = apply_fn(params, inputs)
    mask = mask.astype(bool)
    nc = streaming.update_deviations(state.nc, geometry, _flat(features), labels, mask, ncc_use_bias=ncc_use_bias)
    loss = state.loss if loss_fn is None else merge_loss(state.loss, batch_loss(logits, labels, mask, loss_fn))
    return DeviationPass(nc, loss)
  return jax.jit(step, donate_argnums=0)


def deviations_step(apply_fn: Callable, loss_fn: Optional[Callable], options: NCOptions = NCOptions()) -> Callable:
  """Pass 2, jitted, state donated: (DeviationPass, ClassGeometry, params, inputs, labels, mask) -> the state with
  the batch's deviations h_i - mu_{y_i} folded in (``update_deviations``, NC4 against argmax(W h [+ b]) as
  ``options.ncc_use_bias``) and, with ``loss_fn`` (logits (B, C), labels (B,)) -> (B,), its ``batch_loss``."""
  return _deviations_step(apply_fn, loss_fn, options.ncc_use_bias)


@functools.lru_cache(maxsize=32)
def jitted(function: Callable, **static) -> Callable:
  """``jax.jit(partial(function, **static))``, one per (function, static arguments)."""
  return jax.jit(functools.partial(function, **static))


# ----------------------------------------------------------------------------
# Between and after the passes.
# ----------------------------------------------------------------------------


def geometry_of(means: streaming.ClassMeansState, weights: Optional[jax.Array], bias: Optional[jax.Array],
                options: NCOptions = NCOptions()) -> streaming.ClassGeometry:
  """Pass 1's means scaled by 2^-e, centred (mu_G as ``options.global_mean``) and factorised (``options.solver``,
  ``rcond``; classes with fewer than ``min_count`` samples dropped): the reference of pass 2. e is the power of
  two of max(max |h_ij| tracked in pass 1 (0 if not), max |mu_cj|)."""
  return jitted(streaming.finalize_class_means, options=options)(means, weights, bias)


def finalize(main: DeviationPass, geometry: streaming.ClassGeometry, options: NCOptions = NCOptions(),
             mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """``neural_collapse``'s keys from pass 2's sums (``finalize_collapse``); ``mesh``: devices that share the
  pair statistics' tiles, or None."""
  return jitted(streaming.finalize_collapse, options=options, mesh=mesh)(main.nc, geometry)


def transfer(heldout: DeviationPass, geometry: streaming.ClassGeometry, options: NCOptions = NCOptions()) -> dict:
  """The ``*_test`` keys: held-out deviations against the training geometry (``finalize_transfer``)."""
  return jitted(streaming.finalize_transfer, options=options)(heldout.nc, geometry)


def loss_keys(sums: LossSums, name: str) -> dict:
  """{'<name>_loss': (1/n) sum_i loss_i, '<name>_acc': (1/n) #{argmax logits_i = y_i}} as float32 numbers
  (n = 0 counts as 1: both 0)."""
  sums = jax.device_get(sums)
  count = np.float32(max(int(sums.count), 1))
  return {f"{name}_loss": np.float32(sums.loss_sum) / count, f"{name}_acc": np.float32(sums.correct) / count}


# ----------------------------------------------------------------------------
# The plain driver.
# ----------------------------------------------------------------------------


def feature_spec(apply_fn: Callable, params, inputs) -> tuple[int, np.dtype]:
  """(p, dtype) of the accumulators for ``apply_fn``'s features on ``inputs``: p = prod of the feature shape
  after the batch axis; float32 at least (bf16 features are summed in float32)."""
  features = jax.eval_shape(apply_fn, params, inputs)[1]
  return math.prod(features.shape[1:]), accumulator_dtype(features.dtype)


def accumulator_dtype(feature_dtype) -> np.dtype:
  """The accumulators' dtype for features of ``feature_dtype``: float32 at least (bf16 is summed in float32)."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(feature_dtype, jnp.float32))


def _read(batches: Batches) -> Iterable:
  """A fresh iterable over ``batches`` (a zero-argument callable is called)."""
  return batches() if callable(batches) else batches


def fold(step: Callable, state, batches: Batches, *leading):
  """state <- step(state, *leading, inputs, labels, mask) over the batches, in order."""
  for inputs, labels, mask in _read(batches):
    state = step(state, *leading, inputs, labels, mask)
  return state


def class_means(apply_fn: Callable, params, batches: Batches, num_classes: int, *, feature_dim: Optional[int] = None,
                track_max_abs: bool = True) -> streaming.ClassMeansState:
  """Pass 1 over ``batches``. The accumulators' p and dtype come from the first batch (``feature_spec``) or, with
  ``feature_dim``, are (feature_dim, float32)."""
  step, state = means_step(apply_fn, track_max_abs), None
  for inputs, labels, mask in _read(batches):
    if state is None:
      shape = (feature_dim, jnp.float32) if feature_dim is not None else feature_spec(apply_fn, params, inputs)
      state = streaming.init_class_means(num_classes, *shape)
    state = step(state, params, inputs, labels, mask)
  if state is None:
    raise ValueError("batches yielded no batch: pass 1 needs at least one (inputs, labels, mask)")
  return state


def measure(apply_fn: Callable, params, batches: Batches, num_classes: int, *, weights=None, bias=None,
            test_batches: Optional[Batches] = None, loss_fn: Optional[Callable] = None,
            options: NCOptions = NCOptions(), mesh: Optional[jax.sharding.Mesh] = None,
            feature_dim: Optional[int] = None, track_max_abs: bool = True) -> dict:
  """Neural Collapse of ``apply_fn``'s features over ``batches`` in two passes (and one over ``test_batches``).

  Args:
    apply_fn: (params, inputs (B, ...)) -> (logits (B, C), features (B, p) or (B, ...)); jitted here (keep the
      same function object across calls to reuse the compiled steps).
    params: its first argument.
    batches, test_batches: re-iterables of (inputs, labels (B,), mask (B,) bool), or zero-argument callables
      returning a fresh iterator; ``batches`` is read twice in the same order.
    num_classes: C.
    weights, bias: the classifier W (C, p), b (C,) (logits = W h + b), or None: then the keys that need W are absent.
    loss_fn: per-example loss (logits, labels) -> (B,): adds 'train_loss', 'train_acc' (and 'test_...').
    options: the metric conventions (``NCOptions``).
    mesh: devices that share the pair statistics' tiles (``finalize``), or None.
    feature_dim, track_max_abs: as ``class_means``.

  Returns:
    {key: scalar array}: ``neural_collapse``'s keys, the ``*_test`` keys with ``test_batches``, the loss keys.
  """
  means = class_means(apply_fn, params, batches, num_classes, feature_dim=feature_dim, track_max_abs=track_max_abs)
  geometry = geometry_of(means, weights, bias, options)
  step = deviations_step(apply_fn, loss_fn, options)
  main = fold(step, init_deviation_pass(geometry), batches, geometry, params)
  result = dict(finalize(main, geometry, options, mesh))
  if loss_fn is not None:
    result |= loss_keys(main.loss, "train")
  if test_batches is not None:
    heldout = fold(step, init_deviation_pass(geometry), test_batches, geometry, params)
    result |= transfer(heldout, geometry, options)
    if loss_fn is not None:
      result |= loss_keys(heldout.loss, "test")
  return result
