"""Following a weight through layout-only ops.

A weight reaches a matmul after reshapes, transposes, broadcasts, slices and
dtype casts. For each dimension of the current value we keep the set of the
original parameter's axes it is made of (`AxisMap`), so the `dot_general`
dimension numbers can be mapped back to parameter axes. In the int8 engine the
same ops are applied to the integer values and, in a matching way, to the
keepdims-shaped scale (size 1 on reduced axes).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

AxisMap = tuple[frozenset, ...]

# Primitives that move or select elements without arithmetic.
LAYOUT_PRIMITIVES = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "convert_element_type", "copy", "copy_p", "slice", "dynamic_slice",
})


def identity_map(ndim: int) -> AxisMap:
  return tuple(frozenset({i}) for i in range(ndim))


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
  """Pairs (old_dims, new_dims) of contiguous runs with equal products."""
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


def map_axes(prim: str, params: dict, axes: AxisMap, in_shape, out_shape) -> AxisMap:
  """The `AxisMap` of a layout op's output, given its input's."""
  if prim == "transpose":
    return tuple(axes[p] for p in params["permutation"])
  if prim == "broadcast_in_dim":
    out = [frozenset()] * len(out_shape)
    for i, d in enumerate(params["broadcast_dimensions"]):
      out[d] = axes[i]
    return tuple(out)
  if prim == "squeeze":
    drop = {d % len(in_shape) for d in params["dimensions"]}
    return tuple(a for i, a in enumerate(axes) if i not in drop)
  if prim in ("reshape", "expand_dims"):
    out = [frozenset()] * len(out_shape)
    for gi, gj in reshape_groups(tuple(in_shape), tuple(out_shape)):
      merged = frozenset().union(*(axes[i] for i in gi)) if gi else frozenset()
      for j in gj:
        out[j] = merged
    return tuple(out)
  return axes  # casts, copies and slices keep every dimension in place


def apply_to_scale(prim: str, params: dict, scale, in_shape, out_shape, others):
  """Applies a layout op to a keepdims scale; None if it cannot stay small.

  `scale` has the rank of the value, with size 1 on axes it does not vary
  over. `others` are the op's remaining operands (dynamic_slice indices).
  """
  if prim in ("convert_element_type", "copy", "copy_p"):
    return scale
  if prim == "transpose":
    return jnp.transpose(scale, params["permutation"])
  if prim == "squeeze":
    return lax.squeeze(scale, params["dimensions"])
  if prim == "broadcast_in_dim":
    dims = params["broadcast_dimensions"]
    shape = [1] * len(out_shape)
    for i, d in enumerate(dims):
      shape[d] = out_shape[d] if scale.shape[i] != 1 else 1
    return lax.broadcast_in_dim(scale, tuple(shape), dims)
  if prim == "slice":
    start, limit = params["start_indices"], params["limit_indices"]
    strides = params["strides"] or (1,) * scale.ndim
    keep = [s != 1 or in_shape[d] == 1 for d, s in enumerate(scale.shape)]
    return lax.slice(
        scale, [s if k else 0 for s, k in zip(start, keep)],
        [l if k else 1 for l, k in zip(limit, keep)],
        [st if k else 1 for st, k in zip(strides, keep)])
  if prim == "dynamic_slice":
    sizes = params["slice_sizes"]
    full = [s != 1 or in_shape[d] == 1 for d, s in enumerate(scale.shape)]
    idx = [i if f else jnp.zeros_like(i) for i, f in zip(others, full)]
    return lax.dynamic_slice(scale, idx, [z if f else 1 for z, f in zip(
        sizes, full)])
  if prim in ("reshape", "expand_dims"):
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
  return None


def to_output_layout(s, contract, batch, is_lhs: bool, n_other_free: int):
  """Moves a keepdims operand-scale into `dot_general`'s output layout.

  The output is (batch dims, lhs free dims, rhs free dims); `s` must have
  size 1 on the `contract` dims.
  """
  free = [d for d in range(s.ndim) if d not in contract and d not in batch]
  s = jnp.transpose(s, list(batch) + free + list(contract))
  s = s.reshape(s.shape[:len(batch) + len(free)])
  ones = (1,) * n_other_free
  nb = len(batch)
  shape = s.shape + ones if is_lhs else s.shape[:nb] + ones + s.shape[nb:]
  return s.reshape(shape)


def contracted_size(shape, contract) -> int:
  return math.prod(shape[d] for d in contract)
