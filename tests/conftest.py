"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import importlib.metadata
import platform

import jax

jax.config.update("jax_num_cpu_devices", 8)

# The versions a run tested, in its header: CI tests both ends of the range pyproject.toml allows.
REPORTED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "grain", "tensorflow-datasets",
                     "ml_collections", "numpy", "scipy", "matplotlib", "pytest")


def pytest_report_header(config):
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "absent"
  return "nc-jax under Python " + platform.python_version() + ": " + ", ".join(
      f"{name} {version(name)}" for name in REPORTED_PACKAGES)
