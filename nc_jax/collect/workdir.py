"""NC of a run directory made by ``python -m nc_jax.train``: its checkpoint restored with the run's own model
and data (``nc_jax.training.program.build_program`` / ``load_dataset``, which training uses too: collect never
imports the training loop), then measured by ``collect``."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Callable, Optional

import jax
import numpy as np

from nc_jax.collect.batches import array_batches, streamed_batches
from nc_jax.collect.errors import CollectError, warn as default_warn
from nc_jax.collect.measure import collect
from nc_jax.collect.outputs import CONVENTIONS, convention_flags

SPLITS = ("both", "train", "test")


def _not_empty(path, flag: str, what: str) -> None:
  """Refuses an empty path: pathlib reads '' as the current folder, where nothing was meant to go."""
  if isinstance(path, str) and not path.strip():
    raise CollectError(f"{flag} is empty: pass {what}", 2)


_REWRITE_CONFIG = ("rerun the run's python -m nc_jax.train command with the config it was trained with (it checks "
                   "that config against the checkpoint's digest and writes config.json again), then collect")


def _read_workdir_config(workdir: pathlib.Path):
  """The run's config.json as a ConfigDict, every key an earlier version did not write at its default (as
  ``nc_jax.train`` reads it: ``schema.fill_defaults``); CollectError (naming the fix) for anything else."""
  import ml_collections
  from nc_jax import records, schema
  if not workdir.exists():
    raise CollectError(f"--workdir {workdir} does not exist", 2)
  if not workdir.is_dir():
    raise CollectError(f"--workdir {workdir} is a file, not a run directory", 2)
  path = workdir / records.CONFIG_FILE
  if not path.exists():
    raise CollectError(f"{workdir} has no {records.CONFIG_FILE}: not a run directory of python -m nc_jax.train")
  try:
    values = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CollectError(f"{path} is damaged (not JSON: {error}); {_REWRITE_CONFIG}") from None
  if not isinstance(values, dict):
    raise CollectError(f"{path} holds a JSON {type(values).__name__}, not a run's config (an object); "
                       f"{_REWRITE_CONFIG}")
  return ml_collections.ConfigDict(schema.fill_defaults(values))


class DataNotFound(CollectError):
  """The run's data is not where its config.json says (``folder``): moved, or never prepared on this machine."""

  def __init__(self, message: str, folder: str):
    super().__init__(message)
    self.folder = folder


def _data_folder(config) -> Optional[str]:
  """The folder a run reads its data from (config.data_dir, or the source's default), None for generated data."""
  from nc_jax.data import idx, sources
  if config.dataset in sources.GENERATED_DATASETS:
    return None
  if config.data_source == "idx":
    return config.data_dir or str(idx.DEBIAN_FASHION_MNIST)
  return config.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _load_data(config, data_dir: Optional[str]):
  """``program.load_dataset`` of the run's config, reading from ``data_dir`` when given (data moved since
  training); DataNotFound when the folder or the data in it is missing."""
  from nc_jax.training import program as program_lib
  if data_dir is not None:
    if _data_folder(config) is None:
      raise CollectError(f"--data_dir {data_dir}: the run's data ({config.dataset}, {config.data_source}) is "
                         "generated, not read from a folder; drop --data_dir", 2)
    if not pathlib.Path(data_dir).expanduser().is_dir():
      raise DataNotFound(f"--data_dir {data_dir} is not a folder", data_dir)
    config = config.copy_and_resolve_references()
    config.data_dir = str(pathlib.Path(data_dir).expanduser().absolute())
  folder = _data_folder(config)
  try:
    return program_lib.load_dataset(config)
  except (FileNotFoundError, ValueError) as error:
    moved = isinstance(error, FileNotFoundError) or (
        folder is not None and not pathlib.Path(folder).expanduser().is_dir())
    if not moved:
      raise
    raise DataNotFound(f"the run's data ({config.dataset}, {config.data_source}) is not in {folder} "
                       f"({type(error).__name__})", folder) from None


def _check_out_dir(out_dir: pathlib.Path) -> None:
  """Refuses an --out that is a file or lies under one, or whose nearest existing folder is not writable."""
  for parent in [out_dir, *out_dir.parents]:
    if parent.exists():
      if not parent.is_dir():
        raise CollectError(f"--out {out_dir}: {parent} is a file, not a directory; choose another --out", 2)
      if not os.access(parent, os.W_OK | os.X_OK):
        raise CollectError(f"--out {out_dir}: {parent} is not writable; choose another --out")
      return


def restore_workdir(workdir, epoch: Optional[int] = None, *, data_dir: Optional[str] = None,
                    warn: Callable[[str], None] = default_warn):
  """(config, dataset, model, variables, epoch, step, checkpoint path) of a run directory's checkpoint.

  The data, the model and the checkpoint's abstract state are the run's own: ``nc_jax.training.program``'s
  ``load_dataset`` and ``build_program`` make them as training made them; ``variables`` ({'params',
  'batch_stats'}) are this process's numpy copies. ``epoch`` None: the newest checkpoint that is not damaged.
  ``data_dir``: where the run's data is now, when it moved since training (config.json's data_dir
  otherwise); the returned config keeps the run's own. DataNotFound when the data is not there.
  """
  from nc_jax.data import device
  from nc_jax.training import checkpoints, program as program_lib, workdir as workdir_lib

  _not_empty(workdir, "--workdir", "a run directory of python -m nc_jax.train")
  workdir = pathlib.Path(workdir).absolute()
  config = _read_workdir_config(workdir)
  try:  # config.json edited after training would measure the checkpoint under another config (data, model)
    workdir_lib.verified_config(workdir)
  except workdir_lib.WorkdirError as error:
    raise CollectError(str(error)) from None
  directory = workdir / "checkpoints"
  epochs = []
  if directory.is_dir():
    epochs = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not epochs:
    raise CollectError(f"{workdir} has no checkpoint in {directory}: train it first (python -m nc_jax.train "
                       f"--workdir {workdir} ...)")
  if epoch is not None and epoch not in epochs:
    raise CollectError(f"--epoch {epoch}: {workdir} has no checkpoint of epoch {epoch}; it has epochs "
                       f"{', '.join(map(str, epochs))}", 2)
  dataset = _load_data(config, data_dir)  # a StreamedDataset where the run streamed
  program = program_lib.build_program(config, device.data_mesh(), dataset.num_classes, dataset.input_shape,
                                      max(len(dataset.train_labels) // config.batch_size, 1),
                                      len(dataset.train_labels))
  manager = checkpoints.Checkpoints(directory, read_only=True)
  try:
    if epoch is None:
      restored = manager.restore_latest(program.abstract_state, warn=warn)
      if restored is None:
        raise CollectError(f"no good checkpoint in {directory} (epochs {', '.join(map(str, epochs))} are damaged)")
      epoch, state, _ = restored
    else:
      state, _ = manager.restore(epoch, program.abstract_state)
  except checkpoints.CheckpointDamaged as error:
    others = [str(e) for e in epochs if e != epoch]
    advice = f"choose another --epoch ({', '.join(others)})" if others else "it is the only one"
    raise CollectError(f"checkpoint {directory / str(epoch)} is damaged ({error}); {advice}") from None
  except checkpoints.CheckpointMismatch as error:
    raise CollectError(f"{error}; config.json and checkpoints/ of {workdir} are not of the same run") from None
  finally:
    manager.close()
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
  variables = jax.tree_util.tree_map(local, state.variables)
  return config, dataset, program.model, variables, epoch, int(local(state.step)), directory / str(epoch)


def rerun_line(workdir, out_dir, *, split: str = "both", epoch: Optional[int] = None,
               batch_size: Optional[int] = None, data_dir: Optional[str] = None,
               conventions: Optional[dict] = None) -> str:
  """The ``python -m nc_jax.collect`` command line of these arguments (shell-quoted)."""
  import shlex
  line = ["python", "-m", "nc_jax.collect", "--workdir", str(workdir), "--out", str(out_dir)]
  for flag, value, default in (("split", split, "both"), ("epoch", epoch, None), ("batch_size", batch_size, None),
                               ("data_dir", data_dir, None)):
    if value != default:
      line += [f"--{flag}", str(value)]
  return shlex.join(line + convention_flags(conventions))


def workdir_options(config, conventions: Optional[dict] = None, warn: Callable[[str], None] = default_warn):
  """The ``NCOptions`` a run is measured with: its config.nc (what training logged; the defaults for a run
  older than the group), with each convention given in ``conventions`` (name -> value, None: the run's) in its
  place. A run's min_count is not applied (collect measures every class: class_stats.npz and the later metrics
  have no filtered form), with a warning; a bad value is a CollectError (exit 2) naming the flag."""
  from nc_jax import schema
  from nc_jax.metrics.options import NCOptions
  given = {name: value for name, value in (conventions or {}).items() if value is not None}
  unknown = sorted(set(given) - set(CONVENTIONS))
  if unknown:
    raise CollectError(f"--{unknown[0]}: not a convention collect takes; the conventions are "
                       f"{', '.join('--' + name for name in CONVENTIONS)}", 2)
  for name, value in given.items():  # each flag alone, so the message names the one that is wrong
    try:
      NCOptions(**{name: value})
    except ValueError as error:
      raise CollectError(f"--{name} {value}: {str(error).split(': ', 2)[-1]}", 2) from None
  run = schema.nc_values(config)
  if run["min_count"] is not None:
    warn(f"the run's config.nc.min_count = {run['min_count']} is not applied: collect measures every class "
         "(class_stats.npz has no filtered form), so its NC keys may differ from metrics.jsonl's")
  try:
    return NCOptions(**{**run, "min_count": None, **given})
  except ValueError as error:  # a config.json whose nc group no trainer wrote
    raise CollectError(f"config.json's nc group: {error}; pass the conventions as flags (--help lists them)") from None


def collect_workdir(workdir, out_dir, *, split: str = "both", epoch: Optional[int] = None,
                    batch_size: Optional[int] = None, checkpoint_every: int = 0, progress: Optional[bool] = None,
                    quiet: bool = False, data_dir: Optional[str] = None, conventions: Optional[dict] = None,
                    warn: Callable[[str], None] = default_warn) -> dict:
  """NC of a run's checkpoint, measured as ``nc_jax.training.evaluate`` measures it; writes ``out_dir``.

  split: 'both' (default: the training set, the paper's measurement, plus the test set's ``*_test`` keys
  against the training means: metrics.jsonl's keys), 'train', or 'test' (the test set's own collapse, its
  own class means; the keys without suffix). Features are eval-mode (BatchNorm running statistics), W and
  b the head's (``models.classifier_weights``), batches of ``batch_size`` (default the run's
  ``eval_batch_size``, at most the larger split's size: memory follows the data, not the flag) in dataset
  order, the last one padded and masked, like ``forward_all``. data_dir: where the run's data is now, if it
  moved since training; when the data is not found, the CollectError gives the command that passes it.
  conventions: the metric conventions to measure with (name -> value, None: the run's config.nc; see
  ``workdir_options``); nc.json records those used under 'nc_options'.
  """
  from nc_jax import models
  from nc_jax.training import evaluate as evaluate_lib, step as step_lib

  if split not in SPLITS:
    raise CollectError(f"--split {split!r}: choose one of {', '.join(SPLITS)}", 2)
  if batch_size is not None and batch_size < 1:
    raise CollectError(f"--batch_size {batch_size}: must be at least 1", 2)
  _not_empty(workdir, "--workdir", "a run directory of python -m nc_jax.train")
  _not_empty(out_dir, "--out", "the folder for nc.json and class_stats.npz")
  out_dir = pathlib.Path(out_dir).absolute()
  _check_out_dir(out_dir)
  workdir_options(None, conventions)  # a bad flag is refused before anything is loaded
  try:
    config, dataset, model, variables, epoch, step, checkpoint = restore_workdir(workdir, epoch, data_dir=data_dir,
                                                                                 warn=warn)
  except DataNotFound as error:
    command = rerun_line(pathlib.Path(workdir).absolute(), out_dir, split=split, epoch=epoch, batch_size=batch_size,
                         data_dir="NEW_FOLDER", conventions=conventions)
    raise CollectError(f"{error}; if it moved, pass its folder: `{command}` with NEW_FOLDER the folder that now "
                       "holds it") from None
  options = workdir_options(config, conventions, warn)
  sizes = (len(dataset.train_labels), len(dataset.test_labels))
  batch_size = min(batch_size or config.eval_batch_size, max(sizes))  # a larger batch would be padding only
  model = evaluate_lib.eval_model(model, config.eval_dtype)  # float32 features whatever compute_dtype was
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  feature_shape = jax.eval_shape(apply_fn, variables, np.zeros((1, *dataset.input_shape), np.float32))[1].shape
  weights, bias = models.classifier_weights(variables["params"], feature_dim=math.prod(feature_shape[1:]),
                                            num_classes=dataset.num_classes)
  index, count = jax.process_index(), jax.process_count()
  if not dataset.streamed:
    train = array_batches(dataset.train_inputs, dataset.train_labels, batch_size, process_index=index,
                          process_count=count)
    test = array_batches(dataset.test_inputs, dataset.test_labels, batch_size, process_index=index,
                         process_count=count)
  else:
    train, test = (streamed_batches(dataset, split_name, batch_size, process_index=index, process_count=count)
                   for split_name in ("train", "test"))
  main, heldout = {"both": (train, test), "train": (train, None), "test": (test, None)}[split]
  info = {"workdir": str(pathlib.Path(workdir).absolute()), "checkpoint": str(checkpoint), "epoch": epoch,
          "step": step, "split": split, "batch_size": batch_size}  # collect() adds the options (OPTIONS_KEY)
  # Without config.nc (the options are fingerprinted on their own): an accumulator file of a run at the default
  # conventions, written before the group existed, still resumes.
  config_text = json.dumps({k: v for k, v in json.loads(config.to_json_best_effort()).items() if k != "nc"},
                           sort_keys=True)
  return collect(apply_fn, variables, main, dataset.num_classes, out_dir=out_dir, weights=np.asarray(weights),
                 bias=np.asarray(bias), test_batches=heldout, loss_fn=step_lib.loss_function(config.loss),
                 checkpoint_every=checkpoint_every, progress=progress, quiet=quiet, info=info,
                 fingerprint=f"{config_text}|{checkpoint}|{epoch}|{split}",
                 loss_names=("test", "test") if split == "test" else ("train", "test"), options=options, warn=warn)

