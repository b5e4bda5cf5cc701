"""Exact power-of-two units: how the metrics measure features of any magnitude in float32.

NC1, NC2, NC3, CDNV and the NCC rule do not change when every feature is multiplied by the
same positive number, but float32 squares overflow above ~1.8e19 and flush to zero below
~1e-19. So pass 1 keeps the largest finite |h_ij| it has seen, and pass 2 works on h 2^-e
with max |h_ij| 2^-e in [0.5, 1) (``scale_exponent``): a power of two, so the scaled numbers
are exactly the unscaled ones wherever those did not over- or underflow, and ordinary data
gives bit-identical results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def float_dtype(features: jax.Array):
  """float32 for bfloat16/float16/float32 inputs; float64 only where jax_enable_x64 allows it."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(features.dtype, jnp.float32))


def scale_exponent(max_abs: jax.Array) -> jax.Array:
  """The int32 e with max_abs * 2^-e in [0.5, 1); 0 when max_abs is 0 or not finite.

  Clipped to the normal range (float32: -126 <= e <= 126), so 2^-e is an exact,
  normal float and multiplying by it loses nothing.
  """
  info = jnp.finfo(max_abs.dtype)
  _, exponent = jnp.frexp(max_abs)
  exponent = jnp.where(jnp.isfinite(max_abs) & (max_abs > 0), exponent, 0)
  return jnp.clip(exponent, info.minexp, info.maxexp - 2).astype(jnp.int32)


def power_of_two(exponent: jax.Array, dtype) -> jax.Array:
  """2^exponent as a ``dtype`` scalar, exact for exponents in the normal range."""
  return jnp.ldexp(jnp.ones((), dtype), exponent)


def max_finite_abs(values: jax.Array) -> jax.Array:
  """max |v_ij| over the finite entries of ``values`` (any shape), 0 if there are none."""
  magnitude = jnp.abs(values)
  return jnp.max(jnp.where(jnp.isfinite(magnitude), magnitude, 0.0), initial=0.0)


def unit_scaled(vectors: jax.Array) -> jax.Array:
  """``vectors`` times the power of two that brings max |v_ij| into [0.5, 1) (NaN and inf stay).

  For the scale-invariant geometry of classifier rows: exact, and no square can overflow.
  """
  return vectors * power_of_two(-scale_exponent(max_finite_abs(vectors)), vectors.dtype)


def scale_features(features: jax.Array, exponent: jax.Array, dtype) -> jax.Array:
  """h 2^-e (B, p), pass 2's units: exact, and below 1 in magnitude for the data of pass 1."""
  return features.astype(dtype) * power_of_two(-exponent, dtype)


def in_feature_units_sq(value: jax.Array, exponent: jax.Array) -> jax.Array:
  """A squared length measured in units of 2^e back in the features' units: value 4^e,
  exact, inf or 0 where float32 cannot hold the result."""
  return jnp.ldexp(value, 2 * exponent)
