"""Runs of one config at several seeds, summarised as one: which runs are replicates, and the mean with the
range (min..max) of a measurement over them.

Replicates are runs whose configs are equal but for ``SEED_KEYS`` (and the operational keys, which leave results
alone). nc_jax.report draws a group of them as one series (``--group seeds``) and experiments/grid.py chooses a
learning rate by their mean; both read run outputs only (no JAX, no trainer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union

from nc_jax import schema

# The keys that pick a replicate: init, batch order and DeepFool inputs (seed); the balanced subsample (data_seed).
SEED_KEYS = ("data_seed", "seed")

Item = TypeVar("Item")
Form = Union[str, Callable[[float], str]]


def replicate_key(config: Mapping) -> Optional[str]:
  """What replicates share: the config without SEED_KEYS and schema.OPERATIONAL_KEYS, as sorted JSON;
  None for a run without a config (it is no one's replicate)."""
  if not config:
    return None
  kept = {k: v for k, v in config.items() if k not in SEED_KEYS and k not in schema.OPERATIONAL_KEYS}
  return json.dumps(kept, sort_keys=True, default=str)


def flat(config: Mapping, prefix: str = "") -> dict:
  """A config's values by dotted key ('model_options.width'), groups included (as in --config.KEY overrides)."""
  values = {}
  for key, value in config.items():
    values[prefix + key] = value
    if isinstance(value, Mapping):
      values.update(flat(value, f"{prefix}{key}."))
  return values


def differing_keys(configs: Sequence[Mapping]) -> list[str]:
  """The dotted keys (not groups, not operational) that every one of ``configs`` has and not all with one value:
  what tells runs apart that their names may not show (weight_decay, a model option, ...)."""
  flats = [flat(config) for config in configs]
  if len(flats) < 2:
    return []
  common = set(flats[0]).intersection(*flats[1:])
  return sorted(k for k in common if k.split(".")[0] not in schema.OPERATIONAL_KEYS
                and not any(isinstance(f[k], Mapping) for f in flats)
                and len({json.dumps(f[k], sort_keys=True, default=str) for f in flats}) > 1)


def seeds_of(config: Mapping) -> tuple:
  """The config's SEED_KEYS as ((key, value), ...) in SEED_KEYS' order (keys it lacks left out)."""
  return tuple((k, config[k]) for k in SEED_KEYS if k in config)


def group(items: Iterable[Item], config_of: Callable[[Item], Mapping]) -> list[list[Item]]:
  """``items`` grouped as replicates, groups and members in order of first appearance: each item joins the
  first group with its ``replicate_key`` that lacks its seeds (the same seeds twice is the same run twice:
  a group of its own), and an item without a config stays alone."""
  groups: list[tuple[Optional[str], set, list]] = []
  for item in items:
    config = config_of(item)
    key, seeds = replicate_key(config), seeds_of(config)
    home = next((g for g in groups if key is not None and g[0] == key and seeds not in g[1]), None)
    if home is None:
      home = (key, set(), [])
      groups.append(home)
    home[1].add(seeds)
    home[2].append(item)
  return [members for _, _, members in groups]


def describe_seeds(configs: Sequence[Mapping]) -> str:
  """The seeds of replicates in words, naming only the keys that differ: 'seed 1, 2, 3';
  'data_seed/seed 0/1, 1/1'; '' for fewer than two."""
  if len(configs) < 2:
    return ""
  differing = [k for k in SEED_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]
  if not differing:
    return ""
  values = ", ".join("/".join(str(c.get(k)) for k in differing) for c in configs)
  return f"{'/'.join(differing)} {values}"


def _formatted(form: Form, value: float) -> str:
  return form(value) if callable(form) else form.format(value)


@dataclasses.dataclass(frozen=True)
class Spread:
  """Mean, min and max of one measurement over replicates (``count`` of them)."""
  mean: float
  low: float
  high: float
  count: int

  @classmethod
  def of(cls, values: Sequence[float]) -> "Spread":
    """The spread of ``values`` (at least one, each finite): mean = sum / count, low = min, high = max."""
    values = [float(v) for v in values]
    if not values:
      raise ValueError("a spread of no values")
    return cls(math.fsum(values) / len(values), min(values), max(values), len(values))

  def text(self, form: Form = "{:.4g}") -> str:
    """'mean [low..high]', each with ``form`` (a format string or a function); the mean alone when every value
    is the same (one run, or replicates that agree)."""
    if self.low == self.high:
      return _formatted(form, self.mean)
    return f"{_formatted(form, self.mean)} [{_formatted(form, self.low)}..{_formatted(form, self.high)}]"


def epoch_text(value: float) -> str:
  """An epoch, or a mean of epochs: whole numbers without decimals, others to one decimal."""
  return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def aligned(series: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, Spread]]:
  """The spread over ``series`` (each [(epoch, value), ...], e.g. one run's measurements of a key) at each epoch
  where every series has a value, in epoch order. Replicates measure the same schedule; an epoch only some of
  them measured (each one's TPT start, a run that went further) is left out, so that every point of the mean
  is over all of them."""
  if not series:
    return []
  tables = [dict(points) for points in series]
  epochs = set(tables[0]).intersection(*tables[1:])
  return [(epoch, Spread.of([table[epoch] for table in tables])) for epoch in sorted(epochs)]
