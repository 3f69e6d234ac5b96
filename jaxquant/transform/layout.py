"""Following a weight through layout-only ops.

A weight reaches a matmul after reshapes, transposes, broadcasts, slices and
dtype casts. Each such primitive is registered once with `def_layout`, with
both halves of following it: how the `AxisMap` (output dimension -> the
parameter's axes) changes, so `dot_general` dimension numbers map back to
parameter axes; and how the same op applies to a keepdims-shaped scale (size
1 on axes it does not vary over), so the int8 engine can move integer values
and their scales together.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from jaxquant import compat
from jaxquant.transform.interpreter import def_layout
from jaxquant.transform.tagged import AxisMap


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
  """Pairs (old_dims, new_dims) of contiguous runs with equal products.

  >>> reshape_groups((2, 3, 4), (6, 4))
  [((0, 1), (0,)), ((2,), (1,))]
  """
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj = [i] if i < len(old) else [], [j] if j < len(new) else []
    pi = old[i] if i < len(old) else 1
    pj = new[j] if j < len(new) else 1
    i, j = i + bool(gi), j + bool(gj)
    while pi != pj:
      if pi < pj and i < len(old):
        gi.append(i); pi *= old[i]; i += 1
      elif j < len(new):
        gj.append(j); pj *= new[j]; j += 1
      else:
        break
    # Trailing size-1 dims join the current group.
    while i < len(old) and old[i] == 1 and j >= len(new):
      gi.append(i); i += 1
    while j < len(new) and new[j] == 1 and i >= len(old):
      gj.append(j); j += 1
    groups.append((tuple(gi), tuple(gj)))
  return groups


# --------------------------------------------------------------------------
# Axis maps


def _same_axes(params, axes, in_shape, out_shape) -> AxisMap:
  return axes


def _transpose_axes(params, axes, in_shape, out_shape) -> AxisMap:
  return tuple(axes[p] for p in params["permutation"])


def _broadcast_axes(params, axes, in_shape, out_shape) -> AxisMap:
  out = [frozenset()] * len(out_shape)
  for i, d in enumerate(params["broadcast_dimensions"]):
    out[d] = axes[i]
  return tuple(out)


def _squeeze_axes(params, axes, in_shape, out_shape) -> AxisMap:
  drop = {d % len(in_shape) for d in params["dimensions"]}
  return tuple(a for i, a in enumerate(axes) if i not in drop)


def _reshape_axes(params, axes, in_shape, out_shape) -> AxisMap:
  out = [frozenset()] * len(out_shape)
  for gi, gj in reshape_groups(tuple(in_shape), tuple(out_shape)):
    merged = frozenset().union(*(axes[i] for i in gi)) if gi else frozenset()
    for j in gj:
      out[j] = merged
  return tuple(out)


# --------------------------------------------------------------------------
# Keepdims scales


def _same_scale(params, scale, in_shape, out_shape, others):
  return scale


def _transpose_scale(params, scale, in_shape, out_shape, others):
  return jnp.transpose(scale, params["permutation"])


def _squeeze_scale(params, scale, in_shape, out_shape, others):
  return lax.squeeze(scale, params["dimensions"])


def _broadcast_scale(params, scale, in_shape, out_shape, others):
  dims = params["broadcast_dimensions"]
  shape = [1] * len(out_shape)
  for i, d in enumerate(dims):
    shape[d] = out_shape[d] if scale.shape[i] != 1 else 1
  return lax.broadcast_in_dim(scale, tuple(shape), dims)


def _varies(scale, in_shape):
  """Per axis: whether the scale has the value's full size there."""
  return [s != 1 or in_shape[d] == 1 for d, s in enumerate(scale.shape)]


def _slice_scale(params, scale, in_shape, out_shape, others):
  start, limit = params["start_indices"], params["limit_indices"]
  strides = params["strides"] or (1,) * scale.ndim
  keep = _varies(scale, in_shape)
  return lax.slice(
      scale, [s if k else 0 for s, k in zip(start, keep)],
      [l if k else 1 for l, k in zip(limit, keep)],
      [st if k else 1 for st, k in zip(strides, keep)])


def _dynamic_slice_scale(params, scale, in_shape, out_shape, others):
  full = _varies(scale, in_shape)
  idx = [i if f else jnp.zeros_like(i) for i, f in zip(others, full)]
  sizes = [z if f else 1 for z, f in zip(params["slice_sizes"], full)]
  return lax.dynamic_slice(scale, idx, sizes)


def _reshape_scale(params, scale, in_shape, out_shape, others):
  shape = []
  for gi, gj in reshape_groups(tuple(in_shape), tuple(out_shape)):
    varies = [scale.shape[i] != 1 for i in gi if in_shape[i] != 1]
    if all(varies):
      shape += [out_shape[j] for j in gj]
    elif not any(varies):
      shape += [1] * len(gj)
    else:
      return None  # a varying axis merged with a constant one
  return scale.reshape(shape)


def_layout("convert_element_type", axes=_same_axes, scale=_same_scale,
           regroups=False)
for _copy in compat.COPY:
  def_layout(_copy, axes=_same_axes, scale=_same_scale, regroups=False)
def_layout("transpose", axes=_transpose_axes, scale=_transpose_scale,
           regroups=False)
def_layout("broadcast_in_dim", axes=_broadcast_axes, scale=_broadcast_scale)
def_layout("squeeze", axes=_squeeze_axes, scale=_squeeze_scale)
def_layout("reshape", axes=_reshape_axes, scale=_reshape_scale)
def_layout("expand_dims", axes=_reshape_axes, scale=_reshape_scale)
def_layout("slice", axes=_same_axes, scale=_slice_scale)
def_layout("dynamic_slice", axes=_same_axes, scale=_dynamic_slice_scale)


# --------------------------------------------------------------------------
# Scales in a matmul's output layout


def to_output_layout(s, contract, batch, is_lhs: bool, n_other_free: int):
  """Moves a keepdims operand-scale into `dot_general`'s output layout.

  The output is (batch dims, lhs free dims, rhs free dims); `s` must have
  size 1 on the `contract` dims.
  """
  free = [d for d in range(s.ndim) if d not in contract and d not in batch]
  kept = list(batch) + free
  kept_shape = tuple(s.shape[d] for d in kept)
  # The contracted dims have size 1: dropping them, wherever they sit, is a
  # reshape (one op, where a transpose and two reshapes would lower to
  # three); only a reordering of the kept dims needs the transpose.
  if kept != sorted(kept):
    s = jnp.transpose(s, kept + list(contract))
  ones = (1,) * n_other_free
  nb = len(batch)
  shape = (kept_shape + ones if is_lhs
           else kept_shape[:nb] + ones + kept_shape[nb:])
  return s.reshape(shape)


def contracted_size(shape, contract) -> int:
  return math.prod(shape[d] for d in contract)
