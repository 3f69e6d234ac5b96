"""Packing narrow integers into bytes along the last axis.

Every width below 8 bits is stored packed, as one bit stream per row of the
last axis (padded to a whole byte): element `i` occupies stream bits
`[i * bits, (i + 1) * bits)`, least significant bit first, signed values in
two's complement. For widths dividing 8 (int4: two per byte, int2: four)
element `i` therefore sits in byte `i // k` at bit `(i % k) * bits`,
`k = 8 // bits`, and a faster path packs them. Packing along the last axis
keeps every leading axis intact, so slicing a stacked `(layers, ...)` weight
slices its packed bytes too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_length(n: int, bits: int) -> int:
  return -(-n * bits // 8)


def _arange(n):
  return jnp.arange(n, dtype=jnp.uint8)


def pack(q: jax.Array, bits: int) -> jax.Array:
  """Packs int8/uint8 values of `bits` bits into uint8 along the last axis."""
  if q.ndim == 0:
    q = q.reshape(1)
  lead, n = q.shape[:-1], q.shape[-1]
  # Explicit sizes, not -1: a reshape cannot infer -1 for a size-0 array.
  nbytes = packed_length(n, bits)
  u = jnp.bitwise_and(q.astype(jnp.uint8), jnp.uint8(2**bits - 1))
  if 8 % bits == 0:
    per_byte = 8 // bits
    u = jnp.pad(u, [(0, 0)] * len(lead) + [(0, (-n) % per_byte)])
    u = u.reshape(lead + (nbytes, per_byte))
    shifts = _arange(per_byte) * jnp.uint8(bits)
  else:  # a bit stream: (..., n, bits) -> (..., bytes, 8)
    u = jnp.bitwise_and(jnp.right_shift(u[..., None], _arange(bits)),
                        jnp.uint8(1))
    u = u.reshape(lead + (n * bits,))
    u = jnp.pad(u, [(0, 0)] * len(lead) + [(0, (-n * bits) % 8)])
    u = u.reshape(lead + (nbytes, 8))
    shifts = _arange(8)
  # The fields are disjoint, so their sum is their bitwise or.
  return jnp.sum(jnp.left_shift(u, shifts), axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...],
           signed: bool) -> jax.Array:
  """Inverse of `pack`: int8 (signed) or uint8 values of the given shape."""
  n = shape[-1] if shape else 1
  lead, nbytes = packed.shape[:-1], packed.shape[-1]
  mask = jnp.uint8(2**bits - 1)
  if 8 % bits == 0:
    per_byte = 8 // bits
    shifts = _arange(per_byte) * jnp.uint8(bits)
    u = jnp.bitwise_and(jnp.right_shift(packed[..., None], shifts), mask)
    u = u.reshape(lead + (nbytes * per_byte,))[..., :n]
  else:
    b = jnp.bitwise_and(jnp.right_shift(packed[..., None], _arange(8)),
                        jnp.uint8(1))
    b = b.reshape(lead + (nbytes * 8,))[..., :n * bits].reshape(
        lead + (n, bits))
    u = jnp.sum(jnp.left_shift(b, _arange(bits)), axis=-1, dtype=jnp.uint8)
  u = u.reshape(shape)
  if not signed:
    return u
  # Sign-extend: move the field's top bit to bit 7, then shift back
  # arithmetically.
  spare = jnp.uint8(8 - bits)
  v = jax.lax.bitcast_convert_type(jnp.left_shift(u, spare), jnp.int8)
  return jnp.right_shift(v, jnp.int8(8 - bits))
