"""Packing narrow integers several per byte, along the last axis.

QuantSpecs pack int4 (two per byte) and int2 (four per byte); the functions
work for any width from 1 to 8 bits.

Packing along the last axis (padded to a whole byte) keeps every leading
axis intact, so slicing a stacked `(layers, ...)` weight slices its packed
bytes too. Element `i` of a row sits in byte `i // k` at bit `(i % k) * bits`,
with `k = 8 // bits`; signed values are stored in two's complement.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_length(n: int, bits: int) -> int:
  per_byte = 8 // bits
  return -(-n // per_byte)


def pack(q: jax.Array, bits: int) -> jax.Array:
  """Packs int8/uint8 values of `bits` bits into uint8 along the last axis."""
  per_byte = 8 // bits
  if q.ndim == 0:
    q = q.reshape(1)
  n = q.shape[-1]
  pad = packed_length(n, bits) * per_byte - n
  u = jnp.bitwise_and(q.astype(jnp.uint8), jnp.uint8(2**bits - 1))
  u = jnp.pad(u, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
  u = u.reshape(q.shape[:-1] + (-1, per_byte))
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  # The fields are disjoint, so their sum is their bitwise or.
  return jnp.sum(jnp.left_shift(u, shifts), axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...],
           signed: bool) -> jax.Array:
  """Inverse of `pack`: int8 (signed) or uint8 values of the given shape."""
  per_byte = 8 // bits
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  u = jnp.right_shift(packed[..., None], shifts)
  u = jnp.bitwise_and(u, jnp.uint8(2**bits - 1))
  u = u.reshape(packed.shape[:-1] + (-1,))[..., : (shape[-1] if shape else 1)]
  u = u.reshape(shape)
  if not signed:
    return u
  # Sign-extend: move the field's top bit to bit 7, then shift back
  # arithmetically.
  spare = jnp.uint8(8 - bits)
  v = jax.lax.bitcast_convert_type(jnp.left_shift(u, spare), jnp.int8)
  return jnp.right_shift(v, jnp.int8(8 - bits))
