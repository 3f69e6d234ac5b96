"""Number formats beyond integers: fp8 (e4m3, e5m2) and the nf4 codebook.

A format maps a scaled value `v = x / s` to a stored code and back:

  int        code = clip(round(v + z), qmin, qmax)     (see `numerics`)
  fp8_e4m3   code = float8_e4m3fn(clip(v, -448, 448))       grid max 448
  fp8_e5m2   code = float8_e5m2(clip(v, -57344, 57344))     grid max 57344
  nf4        code = argmin_i |v - NF4[i]|, 4-bit index       grid max 1

The scale maps a block's absmax to the grid max, as for symmetric integers
(`s = absmax / grid_max`). fp8 codes are exactly `astype(float8)` of the
clipped scaled value (round to nearest even). The rounding is done in
float32 arithmetic first (`round_to_grid`: `lax.reduce_precision` for
normal numbers, a fixed step below the smallest normal), so the grid holds
even where a compiler removes a float32 -> fp8 -> float32 convert pair
(seen under jit on XLA:GPU). NF4 (QLoRA,
Dettmers et al. 2023) holds the 16 quantiles of a unit normal, normalised to
[-1, 1] with an exact 0: suited to normally distributed weights, weight-only.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxquant import formats
  >>> formats.encode(jnp.array([0.3, -0.9]), "nf4").tolist()
  [11, 0]
  >>> formats.decode(jnp.array([11, 0], jnp.uint8), "nf4").tolist()
  [0.33791524171829224, -1.0]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# QLoRA's NF4 code values (bitsandbytes' table), ascending.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2

FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
# (mantissa bits, exponent of the smallest normal number) of each fp8 type.
_FP8_BITS = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}
FORMATS = ("int", *FP8, "nf4")


def bits(fmt: str) -> int:
  return 4 if fmt == "nf4" else 8


def grid_max(fmt: str) -> float:
  """The largest grid value (a block's absmax maps onto it)."""
  if fmt in FP8:
    return float(jnp.finfo(FP8[fmt]).max)
  return 1.0


def storage_dtype(fmt: str):
  """dtype of unpacked codes: the fp8 type, or uint8 nf4 indices."""
  return FP8[fmt] if fmt in FP8 else jnp.uint8


def round_to_grid(v, fmt: str):
  """Scaled values `v` (float32) rounded to the fp8 grid, still float32.

  Normal range: mantissa rounded to nearest even by `lax.reduce_precision`;
  below the smallest normal 2^e the grid is uniform with step 2^(e - m).
  """
  mantissa, min_exp = _FP8_BITS[fmt]
  top = grid_max(fmt)
  v = jnp.clip(v, -top, top)
  normal = lax.reduce_precision(v, exponent_bits=8, mantissa_bits=mantissa)
  step = 2.0 ** (min_exp - mantissa)
  subnormal = jnp.round(v / step) * step
  return jnp.where(jnp.abs(v) < 2.0**min_exp, subnormal, normal)


def encode(v, fmt: str):
  """Codes of scaled values `v` (NaN stays NaN in fp8; nf4 has no NaN)."""
  if fmt in FP8:
    return round_to_grid(v, fmt).astype(FP8[fmt])
  # Index of the nearest code value: how many midpoints lie below v.
  return jnp.sum(v[..., None] > _NF4_MIDPOINTS, axis=-1).astype(jnp.uint8)


def decode(codes, fmt: str):
  """Grid values (float32) of codes."""
  if fmt in FP8:
    return codes.astype(jnp.float32)
  return jnp.asarray(NF4)[codes.astype(jnp.int32)]
