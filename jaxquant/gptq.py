"""GPTQ on one parameter leaf: the weight as (layers, N, K) problems.

`gptq_core` works on one matrix `(N, K)` (rows: output channels; columns:
contracted features) with its Hessian `(K, K)`. A parameter leaf is brought
to that form from the model's view of it: the leading axes a `scan` stacks
become a vmapped layer axis, the other non-contracted axes are flattened
into N and the contracted ones (ascending, row-major, as
`jaxquant.engine.hessian` orders the Hessian) into K. The result returns
to the leaf's layout and becomes a `QArray` through `jaxquant.quantize`
with each block's range as `value_range`, which reproduces GPTQ's scales
and codes exactly and keeps one storage path for every method.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import numerics
from jaxquant.gptq_core import gptq_core
from jaxquant.methods import Gptq
from jaxquant.qarray import QArray, quantize
from jaxquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class ProblemLayout:
  """How a leaf maps to (layers, N, K): its axes, grouped by role."""

  stacked: tuple[int, ...]
  channels: tuple[int, ...]
  contracted: tuple[int, ...]

  @property
  def order(self) -> tuple[int, ...]:
    return self.stacked + self.channels + self.contracted

  def to_problems(self, x):
    sizes = [np.prod([x.shape[a] for a in axes], dtype=int) for axes in (
        self.stacked, self.channels, self.contracted)]
    return jnp.transpose(x, self.order).reshape(sizes)

  def from_problems(self, x, shape):
    moved = [shape[a] for a in self.order]
    return jnp.transpose(x.reshape(moved), np.argsort(self.order))


def problem_layout(shape, contracted, stacked: int,
                   path: str) -> ProblemLayout:
  """The axes of a leaf of `shape` by role; a ValueError naming `path` when
  a scan-stacked axis is contracted."""
  lead = tuple(range(stacked))
  if set(lead) & set(contracted):
    raise ValueError(f"{path}: a scan-stacked axis is contracted; quantize "
                     "it without method=")
  channels = tuple(a for a in range(len(shape))
                   if a not in contracted and a not in lead)
  return ProblemLayout(lead, channels, tuple(sorted(contracted)))


def _group_ids(shape, layout: ProblemLayout, spec: QuantSpec, path: str):
  """(K,) group of each contracted feature, and whether scales are shared
  by all rows (per-tensor)."""
  sizes = [shape[a] for a in layout.contracted]
  k = int(np.prod(sizes, dtype=int))
  if spec.granularity == "tensor":
    if layout.stacked:
      raise ValueError(f"{path}: one per-tensor scale across scan-stacked "
                       "layers cannot follow each layer's GPTQ; use "
                       "per-channel or per-group weights")
    return np.zeros(k, np.int32), True
  if spec.granularity == "channel":
    if set(spec.channel_axes) != set(layout.stacked + layout.channels):
      raise ValueError(f"{path}: GPTQ needs one scale per output channel "
                       f"(channel_axes={layout.stacked + layout.channels}), "
                       f"got channel_axes={spec.channel_axes}")
    return np.zeros(k, np.int32), False
  if spec.group_axis not in layout.contracted:
    raise ValueError(f"{path}: GPTQ groups run along a contracted axis "
                     f"{layout.contracted}, got group_axis={spec.group_axis}")
  index = np.indices(sizes).reshape(len(sizes), -1)
  at = layout.contracted.index(spec.group_axis)
  index[at] //= spec.group_size
  groups = list(sizes)
  groups[at] //= spec.group_size
  return np.ravel_multi_index(tuple(index), groups).astype(np.int32), False


def _block_range(full, spec: QuantSpec, reduce):
  """One value per scale block of a leaf-shaped array constant per block."""
  if spec.granularity == "group":
    full = numerics.grouped(full, spec)
  axes = numerics.reduction_axes(spec, full.ndim - (
      spec.granularity == "group"))
  return reduce(full, axis=axes, keepdims=True)


def gptq_leaf(leaf, spec: QuantSpec, hessian, contracted, stacked: int,
              method: Gptq, path: str) -> QArray:
  """The GPTQ-quantized `QArray` of `leaf` (its spec's axes resolved).

  Args:
    leaf: the float weight.
    spec: its resolved weight spec.
    hessian: `sum x^T x`, shape `(*stacked layers, K, K)`.
    contracted: the leaf axes its matmuls contract.
    stacked: leading axes of `leaf` that are scan-stacked layers.
    method: the `Gptq` settings.
    path: the parameter path, for errors.
  """
  shape = tuple(leaf.shape)
  layout = problem_layout(shape, contracted, stacked, path)
  group_ids, per_tensor = _group_ids(shape, layout, spec, path)
  w = layout.to_problems(jnp.asarray(leaf, jnp.float32))   # (L, N, K)
  k = w.shape[-1]
  h = jnp.asarray(hessian, jnp.float32).reshape(-1, k, k)
  if h.shape[0] != w.shape[0]:
    raise ValueError(f"{path}: Hessian of shape {np.shape(hessian)} does not "
                     f"fit a weight of shape {shape}; calibrate with this "
                     "model")
  core = jax.vmap(lambda w, h: gptq_core(
      w, h, group_ids, spec, block_size=method.block_size, damp=method.damp,
      act_order=method.act_order, per_tensor=per_tensor))
  w_hat, lo, hi, ok = core(w, h)
  if not bool(jnp.all(ok)):
    raise ValueError(
        f"{path}: the Hessian of its inputs is not positive definite after "
        f"damping (damp={method.damp}); raise damp in jq.gptq(damp=...) or "
        "calibrate on more batches")
  back = lambda a: layout.from_problems(jnp.broadcast_to(a, w.shape), shape)
  lo_full, hi_full = back(lo[..., group_ids]), back(hi[..., group_ids])
  value_range = (_block_range(lo_full, spec, jnp.min),
                 _block_range(hi_full, spec, jnp.max))
  q = quantize(back(w_hat), spec, value_range=value_range, where=path)
  return dataclasses.replace(q, dtype=np.dtype(leaf.dtype))
