"""Population training: K runs of one config that differ only in learning rate, as one jitted program.

The paper's sweep trains every cell at 25 learning rates. For small nets each run leaves the device (or the
CPU's vector units) mostly idle, and each would compile its own program and draw its own copy of the batches.
Here the K members are one program: every leaf of the ``TrainState`` gains a leading member axis (K, ...)
(params, optimizer state, BatchNorm statistics, step), the train step is ``jax.vmap``-ed over it with the
batch shared (``in_axes=(0, None, 0)``: state, batch, lr) or, for exact equality with single runs, unrolled
member by member (``MEMBER_LOOPS``), and an epoch is one ``lax.scan`` over the batches
``device.epoch_batches`` draws for the config's seed: the batches of every member's single run, drawn once.

Where the members live: a 2-D mesh ('member', 'data') over the run's devices (``population_mesh``). The
member axis takes gcd(K, D) of the D devices (all of them when K is a multiple of D, none when K and D are
coprime), 'data' the rest: every leaf of the state is split along its member axis over 'member' (each device
group holds K / M members), each batch is split over 'data' and shared by the member groups, and the vmaps
name 'member' as their ``spmd_axis_name`` so the sharding constraints inside a member's step and evaluation
keep the member axis split. With M = 1 this is the single run's data parallelism for all members at once.
("unroll" keeps M = 1: its members are separate carries.)

How the learning rate enters: member k's optimizer is built *inside* its step from its base lr, a
traced scalar, by the single run's own functions, ``schedule.learning_rate(lr_k, ...)`` and
``schedule.optimizer``. optax's piecewise-constant schedule is arithmetic on its ``init_value`` (lr(t) =
lr_k * prod of the decay factors passed), so the schedule, the optimizer state (its structure does not depend
on the lr) and every update are the single run's operations on the same values. The lrs are an argument
of the jitted functions (a (K,) float32 array), so one compiled program serves every sweep of K members.

Members see the same batches, so seed is *not* a member axis: a single run's seed also orders its batches,
and a member that changed only its init would equal no single run. Members fail alone: one whose loss or
state turns non-finite, or whose measurement fails as the single run's would, stops being measured
(``Member.diverged`` says why and what to change) while the others go on; it still rides in the program.
Several processes (multi-host) train one population as they train one run: every process runs the same
program on its devices, what the host reads (epoch totals, steps, measurements) is replicated, and process 0
writes the files (``population_disk``). Not yet here: streamed input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nc_jax import schema
from nc_jax.data import device
from nc_jax.training import evaluate as evaluate_lib, loop, population_disk, preemption, program as program_lib
from nc_jax.training import schedule
from nc_jax.training import step as step_lib

MEMBER_AXIS = 0  # the leading axis of every leaf of a population state
MEMBER_MESH_AXIS = "member"  # the mesh axis the members are split over (``population_mesh``)
# How the members' computations are laid out in the program (``member_loop``):
# "vmap": batched (one (K, B, h) matmul per layer: what fills an accelerator). Its batched matmuls and
#   reductions round differently from the single run's: measured 1e-8 in the params after one step, ~1e-7
#   after an epoch, ~1e-6 relative in the NC metrics (tests/test_population.py states the tolerance).
# "unroll": K copies of the single run's step side by side in the scan body, each member a separate carry:
#   each member runs the single run's own HLO, so on one device its records equal the single run's bit for
#   bit; compile time grows with K. On a multi-device mesh both layouts differ from the single run by the
#   same few ulps (measured, cause not pinned down: the partitioner's collectives for K members).
# ("map", lax.map over the members, was measured too: ~1e-7 after an epoch even on one device, and sequential.)
MEMBER_LOOPS = ("vmap", "unroll")


class Population(NamedTuple):
  """What a config and K learning rates compile to.

  ``init()`` -> the population state (every leaf (K, ...)); ``train_epoch(state, inputs, labels, epoch)``
  -> (state, {'loss': (K,), 'correct': (K,), 'count': ()}) summed over the epoch, state donated;
  (``'step'``: (K,) each member's step count after the epoch; every total replicated: readable on every process)
  ``evaluate(state, due, train_inputs, train_labels, test_inputs, test_labels, deepfool_inputs)`` ->
  {k: the single run's measurement dict of member k} for k in ``due``; ``all_finite(state)`` -> (K,) bool;
  ``learning_rates[k]`` member k's schedule (step -> lr), as the single run's; ``program`` the single-run
  program of the config (its model and compiled evaluation); ``mesh`` the ('member', 'data') mesh and
  ``state_sharding`` every state leaf's sharding on it (leading axis over 'member').
  """

  lrs: tuple
  mesh: jax.sharding.Mesh
  state_sharding: jax.sharding.NamedSharding
  program: program_lib.Program
  init: Callable
  train_epoch: Callable
  evaluate: Callable
  all_finite: Callable
  learning_rates: tuple


def member(state, k):
  """Member k's state as a single run's ``TrainState`` (every leaf's member axis indexed at k)."""
  return jax.tree_util.tree_map(lambda x: x[k], state)


def stack(states: Sequence):
  """The inverse of ``unstack``: K single-run states -> one population state (leaves (K, ...))."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def check_lrs(lrs: Sequence[float]) -> tuple:
  """The lrs as a tuple of floats, or one line naming the bad value (finite, > 0, at least one)."""
  lrs = tuple(lrs)
  if not lrs:
    raise schema.ConfigError("a population needs at least one learning rate; pass lrs=(0.01, ...)")
  for value in lrs:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise schema.ConfigError(f"population lr {value!r}: every learning rate must be a finite number > 0")
  return tuple(float(v) for v in lrs)


def population_mesh(devices, size: int, member_loop: str = "vmap") -> jax.sharding.Mesh:
  """The ('member', 'data') mesh of ``size`` members on ``devices`` (a sequence or an array of D devices):
  M = gcd(size, D) device groups along 'member' ("unroll": M = 1), D / M devices each along 'data'."""
  devices = np.asarray(devices).reshape(-1)
  groups = 1 if member_loop == "unroll" else math.gcd(size, devices.size)
  return jax.sharding.Mesh(devices.reshape(groups, devices.size // groups), (MEMBER_MESH_AXIS, device.DATA_AXIS))


def _optimizer(config, base_lr, steps_per_epoch: int):
  """The single run's optimizer (``program.optimizer`` on ``program.lr_schedule``) with ``base_lr`` as its base lr:
  a Python float for the single run, a traced scalar for a member."""
  return program_lib.optimizer(config, program_lib.lr_schedule(config, base_lr, steps_per_epoch))


def _check_member_loop(member_loop: str) -> None:
  if member_loop not in MEMBER_LOOPS:
    raise ValueError(f"member_loop={member_loop!r}: choose one of {', '.join(MEMBER_LOOPS)}")


def unstack(state, size: int) -> list:
  """A population state (leaves (K, ...)) as the list of its K single-run states."""
  return [member(state, k) for k in range(size)]


def _member_step(state, batch, lr, *, config, model, loss_fn, steps_per_epoch, num_train):
  """``step.train_step`` of one member, its optimizer built from its own lr (a traced scalar)."""
  return step_lib.train_step(state, batch, model=model, tx=_optimizer(config, lr, steps_per_epoch),
                             loss_fn=loss_fn, feature_decay=config.feature_decay, num_train=num_train)


def _vmapped_step(state, batch, lrs, *, one):
  """``one`` (a member's step) vmapped: (state (K, ...), batch shared, lrs (K,)) -> (state, metrics (K,))."""
  return jax.vmap(one, in_axes=(0, None, 0), spmd_axis_name=MEMBER_MESH_AXIS)(state, batch, lrs)


def _unrolled_step(states: list, batch, lrs, *, one):
  """``one`` on each member's own state (a list): (states, batch, lrs (K,)) -> (states, [metrics])."""
  outputs = [one(s, batch, lrs[k]) for k, s in enumerate(states)]
  return [o[0] for o in outputs], [o[1] for o in outputs]


def _population_epoch(state, lrs, inputs, labels, epoch, *, one, member_loop, seed, batch_size, mesh):
  """The epoch's batches (the single run's, drawn once) as one lax.scan of every member's step.

  -> (state, {'loss': (K,), 'correct': (K,), 'count': ()}). Each member's totals are the single run's sum
  over its (steps,) metrics: summed per member ("unroll") or along each row of the (K, steps) transpose.
  """
  batches = device.epoch_batches(inputs, labels, seed, epoch, batch_size, mesh)
  if member_loop == "vmap":
    state, per_step = jax.lax.scan(functools.partial(_vmapped_step, lrs=lrs, one=one), state, batches)
    totals = jax.tree_util.tree_map(lambda x: jnp.sum(x.T, axis=-1), per_step)
  else:
    step = lambda states, batch: _unrolled_step(states, batch, lrs, one=one)
    states, per_step = jax.lax.scan(step, unstack(state, lrs.shape[0]), batches)
    state = stack(states)
    totals = stack([jax.tree_util.tree_map(jnp.sum, m) for m in per_step])
  totals["count"] = jnp.asarray(batches[1].size, jnp.int32)
  totals["step"] = state.step
  return state, totals


def _stepwise_population_epoch(state, lrs, inputs, labels, epoch, *, step, steps, draw_batches):
  """``step.stepwise_epoch`` (conv nets on CPU) with the vmapped step: host loop, batches drawn on device."""
  state, totals = step_lib.stepwise_epoch(state, inputs, labels, epoch, draw_batches=draw_batches,
                                          step=lambda s, batch: step(s, batch, lrs))
  return state, {**totals, "step": steps(state)}


def build_population(config: ml_collections.ConfigDict, lrs: Sequence[float], mesh, num_classes: int,
                     input_shape: tuple, steps_per_epoch: int, num_train: int = 0,
                     member_loop: str = "vmap") -> Population:
  """The ``Population`` of ``config`` at ``lrs`` (config.lr itself is ignored): the single run's program
  (``program.build_program``, shared and cached) plus its vmapped init, epoch and evaluation.

  ``mesh``'s devices become the ('member', 'data') mesh of ``population_mesh``: each state leaf split along
  its member axis over 'member', batches split over 'data' as in the single run. ``member_loop`` (``MEMBER_LOOPS``): "vmap" batches the members' steps and measures
  their NC in one vmapped call of the single run's ``evaluate`` (DeepFool member by member); "unroll" runs the
  single run's step per member and its compiled ``evaluate`` member by member (bit-identical to single runs on
  one device).
  """
  lrs = check_lrs(lrs)
  _check_member_loop(member_loop)
  mesh = population_mesh(mesh.devices, len(lrs), member_loop)
  program = program_lib.build_program(config, mesh, num_classes, input_shape, steps_per_epoch, num_train)
  model = program.model
  loss_fn = step_lib.loss_function(config.loss)
  members_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MEMBER_MESH_AXIS))
  replicated = device.replicated(mesh)
  lr_array = jax.device_put(np.asarray(lrs, np.float32), members_split)

  def create(lr):
    return step_lib.create_state(model, _optimizer(config, lr, steps_per_epoch), input_shape, config.seed)

  init_fn = jax.jit(jax.vmap(create, spmd_axis_name=MEMBER_MESH_AXIS), out_shardings=members_split)
  one = functools.partial(_member_step, config=config, model=model, loss_fn=loss_fn,
                          steps_per_epoch=steps_per_epoch, num_train=num_train)
  if program_lib.epoch_loop(config) == "scan":  # the single run's choice
    epoch_fn = jax.jit(functools.partial(_population_epoch, one=one, member_loop=member_loop, seed=config.seed,
                                         batch_size=config.batch_size, mesh=mesh),
                       out_shardings=(members_split, replicated), donate_argnums=0)
  else:  # the host loop steps the vmapped members (one layout: exactness is the scan's business here)
    epoch_fn = functools.partial(
        _stepwise_population_epoch, step=jax.jit(functools.partial(_vmapped_step, one=one),
                                                 out_shardings=(members_split, replicated), donate_argnums=0),
        steps=jax.jit(lambda state: state.step, out_shardings=replicated),
        draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=config.seed,
                                               batch_size=config.batch_size, mesh=mesh)))
  if member_loop == "vmap":  # one call measures every member's NC; only those asked for are kept
    batched = jax.jit(jax.vmap(program.evaluate, in_axes=(0, None, None, None, None),
                               spmd_axis_name=MEMBER_MESH_AXIS), out_shardings=replicated)
    # DeepFool member by member: its loop runs until every input of the batch is fooled, so vmapped over K
    # members it would run each member for the slowest member's iterations (measured: 4.6-18 s an evaluation
    # of 25 members against ~2.8 s without DeepFool, the default MLP on CPU).
    take = jax.jit(member, out_shardings=replicated)
    measured_model = evaluate_lib.eval_model(program.measurement.model, program.measurement.eval_dtype)
    deepfool = jax.jit(lambda state, inputs: evaluate_lib.deepfool_keys(measured_model, state.variables, inputs),
                       out_shardings=replicated)

    def evaluate(state, due, train_inputs, train_labels, test_inputs, test_labels, deepfool_inputs=None):
      results = batched(state, train_inputs, train_labels, test_inputs, test_labels)
      measured = {k: jax.tree_util.tree_map(lambda v: v[k], results) for k in due}
      if deepfool_inputs is not None:
        for k in due:
          measured[k] |= deepfool(take(state, k), deepfool_inputs)
      return measured
  else:  # the single run's compiled evaluation, member by member: its results exactly (lax.map of it rounds
    take = jax.jit(member, out_shardings=replicated)  # differently: measured ~1e-6 relative in nc1, cdnv); k traced: one compile

    def evaluate(state, due, *data):
      return {k: program.evaluate(take(state, k), *data) for k in due}
  all_finite = jax.jit(jax.vmap(program.all_finite, spmd_axis_name=MEMBER_MESH_AXIS), out_shardings=replicated)
  schedules = tuple(program_lib.lr_schedule(config, lr, steps_per_epoch) for lr in lrs)
  return Population(
      lrs=lrs, mesh=mesh, state_sharding=members_split, program=program, init=lambda: init_fn(lr_array),
      train_epoch=lambda state, inputs, labels, epoch: epoch_fn(state, lr_array, inputs, labels, epoch),
      evaluate=evaluate, all_finite=all_finite, learning_rates=schedules)


# ------------------------------------------------------------------ the protocol, in memory

@dataclasses.dataclass
class Member:
  """One member's run as the loop keeps it: its lr, records, TPT start and, once non-finite, why it stopped."""

  lr: float
  records: list = dataclasses.field(default_factory=list)
  tpt_start_epoch: Optional[int] = None
  diverged: Optional[str] = None


def member_config(config: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
  """The single run's config of a member: ``config`` with lr = ``lr``."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.lr = lr
  return config


def _epoch_stats(totals, k: int, lr: float, seconds: float) -> loop.EpochStats:
  """Member k's training statistics of the epoch, as the single run's."""
  count = int(totals["count"])
  return loop.EpochStats(float(totals["loss"][k]) / count, float(totals["correct"][k]) / count, lr, count, seconds)


def train_population(config: ml_collections.ConfigDict, lrs: Sequence[float], *, member_loop: str = "vmap",
                     workdir=None, overwrite: bool = False, log=print) -> list[Member]:
  """Trains ``config`` at every lr of ``lrs`` as one population, in memory; returns one ``Member`` per lr.

  Each member's records are those its single run (``train_and_evaluate`` with config.lr = lr) appends to
  metrics.jsonl: measured at ``schedule.measurement_epochs``, the last epoch and the member's own TPT start.
  With member_loop "vmap" an epoch where any member is measured evaluates every member (one vmapped
  evaluation) and the members due keep theirs; with "unroll" the members due are measured one by one.
  With ``workdir`` every member is also a single run's workdir in it and the population checkpoints at every
  measured epoch and the last; a rerun resumes (``population_disk``; ``overwrite``: discard another
  population there). Refused: streamed input (the batches are drawn on device here).
  """
  lrs = check_lrs(lrs)
  member_configs = [member_config(config, lr) for lr in lrs]
  for member_cfg in member_configs:  # a bad value is refused before any work, naming the key, as a single run
    schema.validate(member_cfg)
  log = log if jax.process_index() == 0 else (lambda *args, **kwargs: None)
  mesh = program_lib.data_mesh(config)
  if program_lib.pipeline(config) == "stream":
    raise schema.ConfigError(f"config.input_pipeline = {config.input_pipeline!r} streams {config.dataset}; a "
                             "population draws its batches on device: use --config.input_pipeline=memory")
  dataset = program_lib.load_dataset(config, "memory")
  schema.validate_sizes(config, num_train=len(dataset.train_labels), num_test=len(dataset.test_labels),
                        num_devices=mesh.size)
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  population = build_population(config, lrs, mesh, dataset.num_classes, dataset.input_shape, steps_per_epoch,
                                len(dataset.train_labels), member_loop)
  disk = contextlib.nullcontext() if workdir is None else population_disk.PopulationDisk(
      workdir, config, member_configs, overwrite=overwrite, log=log)
  # With a workdir, SIGTERM / SIGINT checkpoint the population at the epoch's end and stop (``Preempted``).
  signals = contextlib.nullcontext() if workdir is None else preemption.StopSignals()
  with disk, signals as stop:
    start_epoch, state, saved = 0, None, None
    if workdir is not None:
      start_epoch, state, saved = disk.start(population_disk.abstract_population_state(population.init,
                                                                                        population.state_sharding))
    members = [Member(lr) for lr in lrs] if saved is None else [
        Member(lr, m["records"], m["tpt_start_epoch"], m["diverged"]) for lr, m in zip(lrs, saved)]
    state = population.init() if state is None else state
    last = _train_members(config, population, dataset, state, members, start_epoch, disk if workdir else None,
                          stop, log)
    if workdir is not None and last is not None:
      disk.finish(*last, members, jax.jit(member, out_shardings=device.replicated(population.mesh)))
  return members


def _train_members(config, population: Population, dataset, state, members: list, start_epoch: int, disk,
                   stop, log) -> Optional[tuple]:
  """The epochs after ``start_epoch``: train, stop diverged members, measure those due, checkpoint (``disk``),
  and on a signal (``stop``, a ``preemption.StopSignals`` or None) checkpoint and raise ``Preempted``.
  Checkpoints (with ``disk``) at every measured epoch, the last, where ``config.checkpoint_every_epochs`` /
  ``checkpoint_every_seconds`` say (as a single run's cadence) and on a signal to any process.
  Returns (the last epoch trained, the state after it), or None if no epoch was left."""
  # The single run's evaluation inputs (loop._inputs): the sets on every device, DeepFool's seeded test subset.
  chosen = program_lib.deepfool_indices(config, len(dataset.test_labels))
  mesh = population.mesh
  train_inputs, train_labels, test_inputs, test_labels = (device.put_replicated(x, mesh) for x in (
      dataset.train_inputs, dataset.train_labels, dataset.test_inputs, dataset.test_labels))
  deepfool_inputs = None if chosen is None else device.put_replicated(dataset.test_inputs[chosen], mesh)
  measure = set(schedule.measurement_epochs(config.num_epochs, config.measure_epochs))
  start = time.perf_counter()
  if disk is not None:
    disk.start_clock()
  wall = (lambda: disk.wall()) if disk is not None else (lambda: time.perf_counter() - start)
  last = None
  saved_epoch, saved_time = start_epoch, time.monotonic()
  if start_epoch >= config.num_epochs or all(m.diverged is not None for m in members):
    log(f"the population is done (epoch {start_epoch} of {config.num_epochs}); nothing to do")
    return (start_epoch, state) if start_epoch else None
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    tic = time.perf_counter()
    state, totals = population.train_epoch(state, train_inputs, train_labels, epoch)
    totals = jax.device_get(totals)
    seconds = time.perf_counter() - tic
    last = (epoch, state)
    finite = np.asarray(population.all_finite(state))
    steps = np.asarray(totals["step"])
    due = []
    for k, m in enumerate(members):
      if m.diverged is not None:
        continue
      stats = _epoch_stats(totals, k, float(population.learning_rates[k](int(steps[k]) - 1)), seconds)
      if not math.isfinite(stats.loss) or not finite[k]:
        m.diverged = (f"training loss is {stats.loss} at epoch {epoch} (lr {stats.lr:.3g}); member "
                      f"stopped: lower its lr (the sweep's other members go on)")
        log(f"member {k} (lr {m.lr:.3g}): {m.diverged}")
        continue
      tpt_starts_now = m.tpt_start_epoch is None and stats.acc >= config.tpt_threshold
      if tpt_starts_now:
        m.tpt_start_epoch = epoch
      if epoch in measure or epoch == config.num_epochs or tpt_starts_now:
        due.append((k, stats))
    if due:
      now = wall()
      results = jax.device_get(population.evaluate(state, [k for k, _ in due], train_inputs, train_labels,
                                                   test_inputs, test_labels, deepfool_inputs))
      for k, stats in due:
        try:
          members[k].records.append(loop.measurement_record(
              results[k], epoch=epoch, step=int(steps[k]), stats=stats, tpt_start_epoch=members[k].tpt_start_epoch,
              wall=now, log=log, who=f"member lr {members[k].lr:.3g}, "))
        except ValueError as error:  # a single run stops here too (e.g. finite params, overflowing features)
          members[k].diverged = f"epoch {epoch}: {error}; member stopped: lower its lr (the others go on)"
          log(f"member {k} (lr {members[k].lr:.3g}): {members[k].diverged}")
    stopped = all(m.diverged is not None for m in members)
    if disk is not None:  # checkpoint as a single run does: measured, last, on the cadence, or on a signal
      signalled, cadence_due = preemption.agree(  # any process's signal; process 0's clock
          stop.requested, preemption.cadence_due(config, epoch, saved_epoch, saved_time))
      if due or stopped or signalled or cadence_due or epoch == config.num_epochs:
        disk.save(epoch, state, members)
        saved_epoch, saved_time = epoch, time.monotonic()
      if signalled and not stopped:
        stop.raise_preempted(epoch)
    if stopped:
      log(f"every member diverged by epoch {epoch}; the population stops")
      break
    log(f"epoch {epoch:4d}  {len(members)} members  {seconds:.2f}s  "
        f"{len(members) * int(totals['count']) / seconds:,.0f} img/s (all members)")
  return last


__all__ = ["Member", "Population", "build_population", "check_lrs", "member", "member_config", "population_mesh",
           "stack", "train_population"]
