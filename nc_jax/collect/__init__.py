"""Neural Collapse of a trained model without training it, in resumable streaming passes over the data.

  from nc_jax.collect import collect, collect_workdir
  collect(apply_fn, params, batches, C, weights=W, bias=b, out_dir=DIR)  # any model, any batches
  collect_workdir(RUN, DIR)                        # a run of python -m nc_jax.train, its newest good checkpoint

or on the command line ``python -m nc_jax.collect --workdir RUN --out DIR`` (``--help``: the flags, the
passes, resuming, several processes, the outputs and exit codes). Memory is O(C p) whatever N is.

One job per module:

  measure.py            ``collect``: ``nc_jax.metrics.engine``'s passes, resumed; merging over processes; finalize
  batches.py            ``Batches``: this process's share of a re-readable stream, from any position
  accumulator_files.py  the checksummed, atomically written accumulator file (resume after kill -9)
  statistics.py         ``per_class_statistics`` (class_stats.npz) and ``further_keys`` from the sums
  outputs.py            nc.json and class_stats.npz, written as a pair nc.json's sha256 ties together
  progress.py           the live progress line and the summary on stderr
  workdir.py            ``restore_workdir`` / ``collect_workdir``: a training run's checkpoint, measured
  __main__.py           the command line
"""

from nc_jax.collect.accumulator_files import (CORRUPT_DIR, FORMAT, AccumulatorsDamaged, load_accumulators,
                                              save_accumulators)
from nc_jax.collect.batches import Batches, array_batches, as_batches, iterable_batches, streamed_batches
from nc_jax.collect.errors import CollectError
from nc_jax.collect.measure import KILL_ENV, OutputLock, collect
from nc_jax.collect.outputs import NC_FILE, OWN_DIGEST_KEY, STATS_DIGEST_KEY, STATS_FILE, read_outputs
from nc_jax.collect.progress import Progress
from nc_jax.collect.statistics import further_keys, per_class_statistics
from nc_jax.collect.measure import merge_across_processes
from nc_jax.metrics.engine import DeviationPass, LossSums as LossState, init_loss, merge_deviation_pass, merge_loss
from nc_jax.collect.workdir import SPLITS, collect_workdir, restore_workdir

__all__ = [
    "AccumulatorsDamaged", "Batches", "CORRUPT_DIR", "CollectError", "DeviationPass", "FORMAT", "KILL_ENV",
    "LossState", "NC_FILE", "OWN_DIGEST_KEY", "OutputLock", "Progress", "SPLITS", "STATS_DIGEST_KEY", "STATS_FILE",
    "array_batches", "as_batches", "collect", "collect_workdir", "further_keys", "init_loss", "iterable_batches",
    "load_accumulators", "merge_across_processes", "merge_deviation_pass", "merge_loss", "per_class_statistics",
    "read_outputs", "restore_workdir", "save_accumulators", "streamed_batches",
]
