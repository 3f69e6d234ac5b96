"""AWQ and SmoothQuant on one parameter leaf: choose `s`, store `Q(W * s)`.

Both methods pick a pre-scale `s > 0` per input feature of the weight's
matmul (`jaxquant.engine.prescale`), quantize `W * s` with the rule's spec
and keep `s` as the `QArray`'s `in_scale`; the engine divides the
activation by `s`. Per-feature arrays here are keepdims in the leaf's
layout: full on the scan-stacked leading axes and the feature axes, 1
elsewhere, so `W * s` broadcasts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.engine.prescale import FeatureStats, to_leaf
from jaxquant.gptq import problem_layout
from jaxquant.methods import Awq, SmoothQuant
from jaxquant.qarray import QArray, quantize
from jaxquant.spec import QuantSpec

_FLOOR = 1e-5  # smallest statistic used, as a fraction of the layer's largest


def _others(shape, stacked: int, axes) -> tuple[int, ...]:
  """Leaf axes that are neither stacked layers nor features."""
  return tuple(a for a in range(len(shape)) if a >= stacked and a not in axes)


def _floored(a, over):
  """`a` with values below `_FLOOR` x its maximum over `over` raised to it
  (dead features would get s = 0)."""
  top = jnp.max(a, axis=over, keepdims=True)
  return jnp.maximum(a, _FLOOR * top + jnp.finfo(jnp.float32).tiny)


def _quantized(w, s, spec: QuantSpec, path: str) -> QArray:
  return dataclasses.replace(quantize(w * s, spec, where=path),
                             in_scale=s.astype(jnp.float32))


def _normalised(s, feature_axes):
  """`s` over the geometric mean of its extremes, per layer."""
  return s / jnp.sqrt(jnp.max(s, feature_axes, keepdims=True)
                      * jnp.min(s, feature_axes, keepdims=True))


@functools.partial(jax.jit, static_argnames=("spec", "layout", "grid"))
def _awq_search(w, h, mean, *, spec, layout, grid: int):
  """Per layer, the alpha on the grid with the least `tr(D H D^T)` (one
  compilation per shape and spec, shared by same-shaped layers)."""
  feature_axes = tuple(range(len(layout.stacked), w.ndim))

  def error(alpha):
    s = _normalised(mean ** alpha, feature_axes)
    d = layout.to_problems(_quantized(w, s, spec, "awq").dequantize() - w)
    return jnp.einsum("lnk,lkj,lnj->l", d, h, d,
                      precision=jax.lax.Precision.HIGHEST)

  alphas = jnp.arange(grid, dtype=jnp.float32) / grid
  errors = jax.lax.map(error, alphas)                 # (grid, layers)
  return alphas[jnp.argmin(errors, axis=0)]


def awq_scale(w, spec: QuantSpec, features: FeatureStats, hessian,
              contracted, stacked: int, axes, method: Awq, path: str):
  """The AWQ pre-scale of leaf `w` (keepdims), alpha chosen per layer.

  For each alpha on the grid, `s = m^alpha` normalised by the geometric
  mean of its extremes (`m`: mean |x| per feature), and the layer's output
  error on the calibration inputs is `tr(D H D^T)`, `D = Q(W s)/s - W` as
  (N, K) rows. The alpha with the least error wins, per layer.
  """
  shape = tuple(w.shape)
  layout = problem_layout(shape, contracted, stacked, path)
  feature_axes = tuple(range(stacked, len(shape)))
  mean = _floored(to_leaf(features.mean_abs, shape, stacked, axes),
                  feature_axes)
  k = int(np.prod([shape[a] for a in layout.contracted], dtype=int))
  h = jnp.asarray(hessian, jnp.float32).reshape(-1, k, k)
  best = _awq_search(w, h, mean, spec=spec, layout=layout, grid=method.grid)
  alpha = best.reshape(shape[:stacked] + (1,) * (len(shape) - stacked))
  return _normalised(mean ** alpha, feature_axes)


def smoothquant_scale(w, features: FeatureStats, stacked: int, axes,
                      method: SmoothQuant):
  """`s = max|x|^alpha / max|W|^(1 - alpha)` per input feature (keepdims),
  the weight's maximum taken over its output channels."""
  shape = tuple(w.shape)
  x_max = to_leaf(features.abs_max, shape, stacked, axes)
  w_max = jnp.max(jnp.abs(w), _others(shape, stacked, axes), keepdims=True)
  floor = lambda a: jnp.maximum(a, _FLOOR)
  return floor(x_max) ** method.alpha / floor(w_max) ** (1 - method.alpha)


def prescaled_leaf(leaf, spec: QuantSpec, method, features: FeatureStats,
                   hessian, contracted, stacked: int, axes,
                   path: str) -> QArray:
  """The `QArray` of `leaf` quantized as `Q(leaf * s)` with `in_scale=s`.

  Args:
    leaf: the float weight.
    spec: its resolved weight spec.
    method: an `Awq` or `SmoothQuant`.
    features: the inputs' `FeatureStats` (from `jq.calibrate`).
    hessian: `sum x^T x`, (*layers, K, K) (AWQ only; else None).
    contracted: the leaf axes its matmuls contract.
    stacked: leading axes of `leaf` that are scan-stacked layers.
    axes: the leaf axes the input features run along.
    path: the parameter path, for errors.
  """
  w = jnp.asarray(leaf, jnp.float32)
  if isinstance(method, Awq):
    s = awq_scale(w, spec, features, hessian, contracted, stacked, axes,
                  method, path)
  else:
    s = smoothquant_scale(w, features, stacked, axes, method)
  q = _quantized(w, s, spec, path)
  return dataclasses.replace(q, dtype=np.dtype(leaf.dtype))


def prescaled_range(q: QArray, features: FeatureStats):
  """(lo, hi) of the activation divided by `q.in_scale`, per layer (shape
  () or (layers,)): `min_k lo_k / s_k`, `max_k hi_k / s_k`."""
  s = q.in_scale.reshape(features.lo.shape)   # (*layers, K), same order
  return jnp.min(features.lo / s, -1), jnp.max(features.hi / s, -1)
