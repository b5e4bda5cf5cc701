"""python -m nc_jax.collect --workdir RUN --out DIR [--split both|train|test] [--epoch E] [--batch_size B]
                          [--data_dir DIR] [--checkpoint_every N] [--progress]
                          [--global_mean M] [--solver S] [--rcond R] [--[no]divide_nc1_by_classes]
                          [--std_ddof D] [--[no]self_duality_squared] [--[no]ncc_use_bias]
                          [--coordinator_address HOST:PORT --num_processes P --process_id I]

Measures Neural Collapse of a trained model without training it, in staged passes
over the data with the streaming accumulators of ``nc_jax.metrics.streaming``:

  pass 1  class means        mu_c = (1/n_c) sum_{y_i = c} h_i           (``update_class_means``)
  between                    M = mu - mu_G = U S V^T                       (``finalize_class_means``)
  pass 2  deviations         d_i = h_i - mu_{y_i}: sum ||d_i||^2, sum ||S^-1 V^T d_i||^2, NCC / network
                             decisions, per class                          (``update_deviations``)
  pass 3  held-out data      the test set's deviations from the *training* means (the ``*_test`` keys)

then ``nc_jax.metrics.finalize_collapse`` / ``finalize_transfer``. Each update is one jitted
function of (state, batch); memory is O(C p) whatever N is. h are the features the
model's ``apply_fn(params, x) -> (logits, features)`` returns (B, p) in eval mode.

Resumable: every ``checkpoint_every`` batches (and at every pass boundary) the pass,
the number of this process's batches done and every accumulator (a pytree of
arrays) go to ``DIR/accumulators.npz`` atomically (temporary file, fsync, rename),
with a sha256 of the arrays and a fingerprint of what is measured (model params, W,
b, data, batch size, options, process layout). A rerun resumes mid-pass and writes
the same nc.json, bit for bit; a damaged file (truncated, flipped bit) is moved to
``DIR/corrupt/`` with a warning and the measurement restarts; a file of another
measurement is refused, naming it.

Multi-process (``jax.distributed``): process i reads every P-th batch starting at i,
keeps its own accumulator file, and at the end of each pass the per-process states
are gathered (``process_allgather``) and folded with ``merge_class_means`` /
``merge_deviations`` in process order, so the result does not depend on timing. Within a
process, a batch is split over the local devices (a 'data' mesh) when they divide its size.

--split both (default) measures the training set as the paper (and ``nc_jax.train``) does plus the
test set's ``*_test`` keys against the training means; train: the training set only; test: the test
set's own collapse (its own class means, keys without suffix). One measurement per DIR at a time
(an flock on DIR/lock); in a multi-process run each process keeps DIR/accumulators.I-of-P.npz.

Outputs (process 0, atomically): ``DIR/nc.json`` (every key ``neural_collapse``
returns, as in metrics.jsonl, the ``*_test`` keys, the later metrics of
``nc_jax.metrics.further`` that the class statistics determine (``further_keys``),
train/test loss and accuracy when a loss is known, and epoch, step, num_samples,
checkpoint) and
``DIR/class_stats.npz`` (per-class counts, means, variances, centred-mean norms, W
row norms), written first; nc.json, written last, records the sha256 of class_stats.npz
(``class_stats_sha256``) and of its own other keys (``sha256``), so a pair left by a kill between the
two writes, or an nc.json edited since, is detected (``nc_jax.collect.read_outputs`` refuses it naming
the command that rewrites both; the next measurement warns and rewrites both).

Metric conventions (``nc_jax.metrics.NCOptions``): by default the run's own config.nc, so collect measures
what training logged (the paper's for a run older than config.nc); each flag replaces one of them, e.g.
``--nodivide_nc1_by_classes`` for the notebook's NC1 without the 1/C, ``--solver gram``. min_count is not
offered: collect measures every class (class_stats.npz and the later metrics have no filtered form), and a
run's config.nc.min_count is not applied (with a warning). nc.json records the conventions used under
``nc_options`` (covered by its own sha256).

Old runs: config.json files written by earlier versions are read with today's defaults for the keys
they lack (``nc_jax.schema.fill_defaults``, as ``nc_jax.train`` reads them). A run whose data moved
since training is measured with ``--data_dir NEW_FOLDER``; without it, the error prints that command.

Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 bad command line.
"""

from __future__ import annotations

from absl import flags

from nc_jax import cli, schema
from nc_jax.collect.errors import CollectError
from nc_jax.collect.workdir import CONVENTIONS, SPLITS, collect_workdir

USAGE = "python -m nc_jax.collect --workdir RUN --out DIR"
FLAGS = flags.FLAGS


def define_flags(values: flags.FlagValues = FLAGS) -> flags.FlagValues:
  """Defines this command's flags (and the distributed ones, ``cli.define_distributed_flags``) on ``values``."""
  flags.DEFINE_string("workdir", None, "A run directory of python -m nc_jax.train (config.json, checkpoints/).",
                      flag_values=values)
  flags.DEFINE_string("out", None, "Where nc.json, class_stats.npz and the accumulator checkpoints go.",
                      flag_values=values)
  flags.DEFINE_enum("split", "both", list(SPLITS), "both: the training set plus the test set's *_test keys (as "
                    "metrics.jsonl); train; test: the test set's own collapse.", flag_values=values)
  flags.DEFINE_integer("epoch", None, "The checkpoint's epoch (default: the newest good one).", flag_values=values)
  flags.DEFINE_integer("batch_size", None, "Examples per batch (default: the run's eval_batch_size; at most the "
                       "larger split's size).", flag_values=values)
  flags.DEFINE_string("data_dir", None, "Where the run's data is now, when it moved since training (default: "
                      "config.json's data_dir).", flag_values=values)
  flags.DEFINE_integer("checkpoint_every", 50, "Save the accumulators every N batches (0: never).",
                       flag_values=values)
  flags.DEFINE_bool("progress", None, "Show the live progress line (default: when stderr is a terminal).",
                    flag_values=values)
  _define_conventions(values)
  return cli.define_distributed_flags(values)


def _define_conventions(values: flags.FlagValues) -> None:
  """The metric conventions' flags (``workdir.CONVENTIONS``), each defaulting to None: the run's config.nc."""
  run = " (default: the run's config.nc)"
  flags.DEFINE_enum("global_mean", None, list(schema.NC_GLOBAL_MEANS), "mu_G: class_means (the mean of the class "
                    "means, the notebook's) or samples (the mean of every feature)" + run, flag_values=values)
  flags.DEFINE_enum("solver", None, list(schema.NC_SOLVERS), "Sigma_B^+ by svd, gram (faster for many classes, "
                    "squares M's condition number), or auto (svd on CPU; CholeskyQR2 on GPU/TPU, faster "
                    "there)" + run, flag_values=values)
  flags.DEFINE_float("rcond", None, "Directions of M at or below rcond x its largest singular value are not "
                     "inverted in Sigma_B^+" + run + "; None there: max(C, p) x machine epsilon.", lower_bound=0.0,
                     flag_values=values)
  flags.DEFINE_bool("divide_nc1_by_classes", None, "NC1 = Tr(Sigma_W Sigma_B^+)/C (the paper's); "
                    "--nodivide_nc1_by_classes: without the 1/C (the notebook's)" + run, flag_values=values)
  flags.DEFINE_integer("std_ddof", None, "The std's delta degrees of freedom in equinorm / equiangularity: 1 "
                       "(unbiased, the notebook's) or 0 (population)" + run, lower_bound=0, flag_values=values)
  flags.DEFINE_bool("self_duality_squared", None, "NC3 as the squared distance (the paper's); "
                    "--noself_duality_squared: its root" + run, flag_values=values)
  flags.DEFINE_bool("ncc_use_bias", None, "NC4 compares the NCC rule with argmax(W h + b) (the paper's); "
                    "--noncc_use_bias: with argmax(W h)" + run + ". (min_count is not offered: collect measures "
                    "every class.)", flag_values=values)


def _fail(message: str, code: int = 1) -> None:
  # orbax's reads abandoned by a failed restore report themselves at exit, with tracebacks: the failure is this line.
  cli.fail(message, code, drop_unraisable=True)


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(argv, FLAGS, required=("workdir", "out"), usage=USAGE)


def main(argv) -> None:
  """Measures --workdir's checkpoint into --out; every failure is one line on stderr and exit status 1 or 2."""
  cli.start(argv, FLAGS, detect_cluster=False)
  try:
    collect_workdir(FLAGS.workdir, FLAGS.out, split=FLAGS.split, epoch=FLAGS.epoch, batch_size=FLAGS.batch_size,
                    checkpoint_every=FLAGS.checkpoint_every, progress=FLAGS.progress, data_dir=FLAGS.data_dir,
                    conventions={name: FLAGS[name].value for name in CONVENTIONS})
  except CollectError as error:
    _fail(str(error), error.code)
  except KeyboardInterrupt:
    _fail("interrupted; rerun the same command to resume from the last accumulator checkpoint", 130)
  except Exception as error:  # noqa: BLE001  (one line for the user, as nc_jax.train does)
    os_error = cli.os_error(error)
    if os_error is not None:  # a failed write under --out names the fix; a failed read, its reason and file
      _fail(cli.describe_os_error(os_error, "--out", under=FLAGS.out))
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, ImportError)):
      _fail(cli.one_line(error))
    raise


if __name__ == "__main__":
  define_flags()
  cli.run(main, _parse_flags)
