"""Per-input-feature statistics and pre-scales of a matmul (AWQ, SmoothQuant).

A matmul `x @ W` computes the same as `(x / s) @ (W * s)` for any `s > 0`
per input feature. Activation-aware methods choose `s` so that `W * s`
quantizes better (AWQ) or `x / s` does (SmoothQuant); the weight stores
`Q(W * s)` with `s` as its `in_scale`, and the engine divides the
activation by `s` just before quantizing it, whatever op produced it.

The input features are the contracted features of a `dot_general` (in the
weight's order, as `jaxquant.engine.hessian` orders them) and the input
channels of a convolution (one `s` per channel, shared by its window).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant import compat
from jaxquant.engine import hessian
from jaxquant.transform.site import Site


class FeatureKey(NamedTuple):
  """Names a `FeatureStats` side value: the weight `path`, the parameter
  axes its matmul covers (as in `hessian.HessianKey`) and the parameter
  axes its input features run along."""

  path: str
  covered: frozenset
  feature_axes: tuple[int, ...]


class FeatureStats(NamedTuple):
  """Per input feature, over the rows seen: `sum |x|`, `min x`, `max x`
  (each (..., K)), and the number of rows (...)."""

  abs_sum: jax.Array
  lo: jax.Array
  hi: jax.Array
  rows: jax.Array

  @property
  def mean_abs(self) -> jax.Array:
    return self.abs_sum / jnp.maximum(self.rows, 1)[..., None]

  @property
  def abs_max(self) -> jax.Array:
    return jnp.maximum(-self.lo, self.hi)

  @staticmethod
  def combine(a: "FeatureStats", b: "FeatureStats") -> "FeatureStats":
    return FeatureStats(a.abs_sum + b.abs_sum, jnp.minimum(a.lo, b.lo),
                        jnp.maximum(a.hi, b.hi), a.rows + b.rows)

  @staticmethod
  def reduce(s: "FeatureStats", axes: tuple[int, ...]) -> "FeatureStats":
    """Combined over the leading `axes` (scan steps of a reused weight)."""
    return FeatureStats(jnp.sum(s.abs_sum, axes), jnp.min(s.lo, axes),
                        jnp.max(s.hi, axes), jnp.sum(s.rows, axes))

  @staticmethod
  def empty(like: "FeatureStats") -> "FeatureStats":
    """The identity of `combine`, shaped like `like`."""
    full = lambda a, v: jnp.full(a.shape, v, jnp.float32)
    return FeatureStats(full(like.abs_sum, 0), full(like.lo, jnp.inf),
                        full(like.hi, -jnp.inf), full(like.rows, 0))


def _dims(site: Site, params) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(weight dims, activation dims) of the input features, paired."""
  if site.primitive == compat.DOT_GENERAL:
    return site.weight_contract, site.act_contract
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  return (rhs_spec[1],), (lhs_spec[1],)


def feature_axes(site: Site, axes, params) -> tuple[int, ...]:
  """The parameter axes the input features run along (ascending)."""
  w_dims, _ = _dims(site, params)
  return tuple(sorted(frozenset().union(*(axes[d] for d in w_dims))))


def feature_stats(x: jax.Array, site: Site, axes, params) -> FeatureStats:
  """`FeatureStats` of the activation `x` over its rows, features in the
  weight's order (float32)."""
  hessian.check_supported(site, params)
  w_dims, x_dims = _dims(site, params)
  order = hessian.feature_order(site, axes, w_dims)
  rows = hessian.rows_of(x.astype(jnp.float32), order, x_dims)
  return FeatureStats(jnp.sum(jnp.abs(rows), 0), jnp.min(rows, 0),
                      jnp.max(rows, 0), jnp.float32(rows.shape[0]))


def divide(x: jax.Array, site: Site, in_scale: jax.Array, params):
  """`x / s` with the weight operand's `in_scale` lined up with `x`'s
  features, in `x`'s dtype; None when it does not line up (it varies along
  an axis that is not an input feature, or a grouped conv)."""
  w_dims, x_dims = _dims(site, params)
  if any(in_scale.shape[d] != 1 for d in range(in_scale.ndim)
         if d not in w_dims):
    return None
  if site.primitive != compat.DOT_GENERAL and (
      params["feature_group_count"] != 1):
    return None
  pairs = sorted(zip(x_dims, w_dims))
  rest = [d for d in range(in_scale.ndim) if d not in w_dims]
  s = jnp.transpose(in_scale, rest + [w for _, w in pairs])
  shape = [1] * x.ndim
  for x_dim, w_dim in pairs:
    shape[x_dim] = in_scale.shape[w_dim]
  s = s.reshape(shape)
  return (x.astype(jnp.float32) / s).astype(x.dtype)


def leaf_shape(shape, stacked: int, axes: tuple[int, ...]) -> tuple:
  """The keepdims shape of an `in_scale` for a leaf of `shape`: full on
  the `stacked` leading axes and the feature `axes`, 1 elsewhere."""
  return tuple(d if a < stacked or a in axes else 1
               for a, d in enumerate(shape))


def to_leaf(s: jax.Array, shape, stacked: int, axes) -> jax.Array:
  """Per-feature `s` of shape (*layers, K) as a keepdims `in_scale`."""
  return jnp.reshape(s, leaf_shape(shape, stacked, axes))
