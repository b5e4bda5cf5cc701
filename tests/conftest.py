"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import gc
import importlib.metadata
import platform
import sys

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# The versions a run tested, in its header: CI tests both ends of the range pyproject.toml allows.
REPORTED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "grain", "tensorflow-datasets",
                     "ml_collections", "numpy", "scipy", "matplotlib", "tensorboardX", "pytest")


def pytest_report_header(config):
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "absent"
  return "nc-jax under Python " + platform.python_version() + ": " + ", ".join(
      f"{name} {version(name)}" for name in REPORTED_PACKAGES)


# Tests run once per paper cell or net: past the first cell each repeats the same code on another net. They are
# marked ``more_cells`` so the oldest end of CI (which checks the API at the lower bounds, not every net again)
# can leave them out with -m "not more_cells"; README's command (the newest end) runs them all.
PER_CELL_TESTS = {
    "tests/test_configs.py::test_smoke_variants_train_under_mock_data",
    "tests/test_stream.py::test_imagenet_cell_trains_from_the_fixture_dataset_by_streaming",
    "tests/test_lowering.py::test_cell_lowers_for_tpu_and_cuda",
}


def pytest_collection_modifyitems(config, items):
  seen = set()
  for item in items:
    name = item.nodeid.split("[")[0]
    if name in PER_CELL_TESTS:
      if name in seen:
        item.add_marker("more_cells")
      seen.add(name)


# One pytest process compiles many hundreds of programs, and jax keeps every executable (nc_jax its program cache)
# for the life of the process. Released after every test module. Without it, jaxlib 0.7.1 (the oldest end of
# CI) died with SIGSEGV inside XLA:CPU's compiler at the same test, 97% into the fast suite, in CI and in two
# runs here (tests/test_variants_measurement.py's small-CNN evaluation, which passes alone and after the five
# modules before it); with it the whole suite passes. (The process's peak memory drops ~10% too.)
@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  program = sys.modules.get("nc_jax.training.program")
  if program is not None:
    program._CACHE.clear()
  jax.clear_caches()
  gc.collect()
