"""Scale, zero point, rounding and the straight-through fake-quant.

For a real range [lo, hi] and an integer grid [qmin, qmax] (see `QuantSpec`):

  symmetric:   s = max(|lo|, |hi|) / qmax,        z = 0
               (unsigned symmetric: s = max(hi, 0) / qmax)
  asymmetric:  s = (hi - lo) / (qmax - qmin),     z = qmin - lo / s

  q = clip(round(x / s + z), qmin, qmax)          x_hat = (q - z) * s

The asymmetric zero point z is kept in float32, not rounded, so lo and hi
themselves land exactly on qmin and qmax; the integer accumulators of the
int8 engine subtract it in float after the dot.

Degenerate ranges never give a zero, NaN or inf scale: an all-zero tensor
gets s = 1 (every q is 0); a constant tensor c != 0 gets s = |c| / qmax
(symmetric) or s = |c| / (qmax - qmin) (asymmetric), so c round-trips exactly.

Non-finite inputs: `check_finite` raises a ValueError outside `jax.jit`
(also for float64 values beyond the float32 range, which the float32 scale
math cannot hold). Inside jit the check cannot run, and integers cannot
hold NaN, so:
  * a NaN makes the scale of its whole block NaN: the block dequantizes
    (and fake-quantizes) to NaN, whatever the range source (data, clip,
    "mse", calibrated value_range);
  * an inf, or a float64 value beyond float32 (it becomes inf), widens a
    data-derived range to infinity, so its block dequantizes to NaN too;
    against a fixed range (`clip=(lo, hi)` or `value_range`) it saturates
    to the nearest bound, like any other out-of-range value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import compat, formats
from jaxquant.spec import QuantSpec

_TINY = float(np.finfo(np.float32).tiny)


def resolve_axes(spec: QuantSpec, ndim: int, where: str = "tensor") -> QuantSpec:
  """Returns `spec` with concrete, non-negative channel / group axes.

  Missing axes default to the Flax kernel layout `(..., in, out)`.
  Raises a ValueError naming `where` when an axis is out of range.
  """
  def norm(axis):
    if not -ndim <= axis < max(ndim, 1):
      raise ValueError(
          f"{where}: axis {axis} is out of range for a tensor of rank {ndim}; "
          f"use an axis in [{-ndim}, {ndim - 1}]")
    return axis % max(ndim, 1)

  if spec.granularity == "channel":
    axes = spec.channel_axes if spec.channel_axes is not None else (-1,)
    axes = tuple(sorted({norm(a) for a in axes})) if ndim else ()
    return spec if axes == spec.channel_axes else _replace(spec, channel_axes=axes)
  if spec.granularity == "group":
    if ndim == 0:
      raise ValueError(f"{where}: per-group quantization of a scalar; use "
                       "granularity='tensor'")
    axis = spec.group_axis if spec.group_axis is not None else (
        -2 if ndim >= 2 else 0)
    return _replace(spec, group_axis=norm(axis))
  return spec


def _replace(spec, **changes):
  return dataclasses.replace(spec, **changes)


def reduction_axes(spec: QuantSpec, ndim: int) -> tuple[int, ...]:
  """Axes reduced to one scale (for "group": within the grouped view)."""
  if spec.granularity == "tensor":
    return tuple(range(ndim))
  if spec.granularity == "channel":
    return tuple(a for a in range(ndim) if a not in spec.channel_axes)
  return (spec.group_axis + 1,)


def grouped(x: jax.Array, spec: QuantSpec, where: str = "tensor") -> jax.Array:
  """Views `x` as (..., n_groups, group_size, ...) along `spec.group_axis`."""
  axis, size = spec.group_axis, spec.group_size
  if x.shape[axis] % size:
    raise ValueError(
        f"{where}: group_size={size} does not divide axis {axis} of shape "
        f"{tuple(x.shape)}; pick a group_size that divides {x.shape[axis]}")
  return x.reshape(x.shape[:axis] + (x.shape[axis] // size, size)
                   + x.shape[axis + 1:])


def data_range(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """(lo, hi) of `x` per scale block, keepdims; `x` already grouped."""
  axes = reduction_axes(spec, x.ndim - (spec.granularity == "group"))
  shape = [1 if a in axes else d for a, d in enumerate(x.shape)]
  if isinstance(spec.clip, tuple):
    return (jnp.full(shape, spec.clip[0], jnp.float32),
            jnp.full(shape, spec.clip[1], jnp.float32))
  if x.size == 0:  # empty blocks have no max: the all-zero range, scale 1
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
  x = x.astype(jnp.float32)
  # A NaN/inf widens its block's range to inf (XLA's max may skip NaNs), so
  # the block dequantizes to NaN instead of to plausible numbers.
  finite = jnp.isfinite(x)
  if spec.symmetric:
    hi = jnp.max(jnp.where(finite, jnp.abs(x), jnp.inf), axis=axes,
                 keepdims=True)
    lo = -hi
  else:
    lo = jnp.min(jnp.where(finite, x, -jnp.inf), axis=axes, keepdims=True)
    hi = jnp.max(jnp.where(finite, x, jnp.inf), axis=axes, keepdims=True)
  if spec.clip == "mse":
    return _mse_shrink(x, lo, hi, spec, axes)
  return lo, hi


MSE_RATIOS = np.linspace(0.2, 1.0, 64, dtype=np.float32)


def _mse_shrink(x, lo, hi, spec, axes):
  """Scales (lo, hi) per block by the ratio with the least squared error."""
  def error(ratio):
    scale, zero_point = scale_from_range(lo * ratio, hi * ratio, spec)
    x_hat = quantize_dequantize(x, scale, zero_point, spec)
    return jnp.sum((x_hat - x) ** 2, axis=axes, keepdims=True)

  errors = jax.lax.map(error, jnp.asarray(MSE_RATIOS))
  best = jnp.asarray(MSE_RATIOS)[jnp.argmin(errors, axis=0)]
  return lo * best, hi * best


def where(cond, a, b):
  """`jnp.where(cond, a, b)` written with `lax.select`.

  `jnp.where` (like `jnp.round`, `jnp.clip`, `jnp.isinf`) is a jitted
  function, lowered as one private function call per use: a few per
  quantized matmul, which XLA compiles and inlines (compile time on deep
  models). The result dtype is `a`'s (or float32 for Python scalars).
  """
  dtype = getattr(a, "dtype", None) or getattr(b, "dtype", None) or (
      jnp.float32)
  shape = jnp.broadcast_shapes(jnp.shape(cond), jnp.shape(a), jnp.shape(b))
  return jax.lax.select(_broadcast(cond, None, shape),
                        _broadcast(a, dtype, shape),
                        _broadcast(b, dtype, shape))


def _broadcast(v, dtype, shape):
  """`v` (a scalar or an array broadcastable to `shape`) as `dtype` (None:
  its own) and `shape`, with lax ops only: jnp's argument checks are a few
  hundred microseconds per call, paid per quantized matmul when tracing."""
  if not hasattr(v, "shape"):
    return jax.lax.full(shape, v, dtype)
  if dtype is not None and v.dtype != dtype:
    v = jax.lax.convert_element_type(v, dtype)
  if v.shape == shape:
    return v
  # numpy broadcasting aligns trailing axes; size-1 axes are expanded.
  lead = len(shape) - v.ndim
  keep = [d for d in range(v.ndim) if v.shape[d] == shape[lead + d]]
  v = jax.lax.reshape(v, tuple(v.shape[d] for d in keep)) if len(keep) < (
      v.ndim) else v
  return jax.lax.broadcast_in_dim(v, shape, tuple(lead + d for d in keep))


def scale_from_range(lo, hi, spec: QuantSpec):
  """Scale and zero point (None when symmetric) for the range [lo, hi]."""
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  if spec.symmetric:
    top = jnp.maximum(hi, 0.0) if not spec.signed else jnp.maximum(-lo, hi)
    return symmetric_scale(top, spec), None
  step = np.float32(1.0 / (spec.qmax - spec.qmin))
  width = hi - lo
  # hi - lo overflows float32 for |lo|, |hi| near its max; scaling each
  # bound first cannot (step < 1). Only there: elsewhere width * step
  # rounds once, and jit / no-jit / NumPy references agree bit for bit.
  scaled = jnp.where(jnp.isfinite(width), width * step, hi * step - lo * step)
  fallback = jnp.where(jnp.abs(lo) > 0,
                       jnp.maximum(jnp.abs(lo) * step, _TINY), 1.0)
  scale = jnp.where(width > 0, jnp.maximum(scaled, _TINY), fallback)
  zero_point = spec.qmin - lo / scale
  return scale, zero_point


def symmetric_scale(top, spec: QuantSpec):
  """The symmetric scale for the range [-top, top] (`top` >= 0, not NaN):
  `top / qmax`, at least the smallest normal float, and 1 where `top` is 0."""
  # Multiply by a reciprocal: XLA rewrites division by a constant that way
  # under jit, and eager and jitted scales must agree bit for bit.
  scale = top * np.float32(1.0 / spec.qmax)
  return where(top > 0, jnp.maximum(scale, _TINY), 1.0)


def nan_to_scale(x: jax.Array, scale: jax.Array, spec: QuantSpec):
  """`scale`, NaN in every block of `x` (grouped view) that holds a NaN.

  Integers cannot hold NaN, and a fixed range would turn it into a
  plausible number (0 or a bound); a NaN scale dequantizes the block to NaN.
  """
  axes = reduction_axes(spec, x.ndim - (spec.granularity == "group"))
  has_nan = jnp.any(jnp.isnan(x), axis=axes, keepdims=True)
  return jnp.where(has_nan, jnp.float32(jnp.nan), scale)


def round_values(v: jax.Array, spec: QuantSpec, key=None) -> jax.Array:
  """Round-to-nearest-even, or stochastic rounding E[round(v)] = v."""
  if spec.rounding == "nearest":
    return jax.lax.round(v, jax.lax.RoundingMethod.TO_NEAREST_EVEN)
  if key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key: pass key=")
  return jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype))


def storage_dtype(spec: QuantSpec):
  if spec.format != "int":
    return formats.storage_dtype(spec.format)
  return jnp.int8 if spec.signed else jnp.uint8


def quantize_with_scale(x, scale, zero_point, spec: QuantSpec, key=None):
  """Codes of `x` on the grid of `spec`: integers (int8/uint8 storage), or
  fp8 values / nf4 indices (`jaxquant.formats`)."""
  v = x.astype(jnp.float32) / scale
  if spec.format != "int":
    return formats.encode(v, spec.format)
  if zero_point is not None:
    v = v + zero_point
  q = jax.lax.clamp(np.float32(spec.qmin), round_values(v, spec, key),
                    np.float32(spec.qmax))
  return q.astype(storage_dtype(spec))


def decode(q, spec: QuantSpec):
  """Grid values of codes: integers and fp8 as they are, nf4 looked up."""
  return formats.decode(q, "nf4") if spec.format == "nf4" else q


def dequantize_with_scale(q, scale, zero_point, dtype=jnp.float32):
  """`(q - zero_point) * scale` for grid values `q` (see `decode`)."""
  v = q.astype(jnp.float32)
  if zero_point is not None:
    v = v - zero_point
  return (v * scale).astype(dtype)


def check_finite(x, where: str = "tensor") -> None:
  """Raises ValueError on NaN/inf, or on float64 values beyond float32, in a
  concrete array; no-op under tracing."""
  if compat.is_tracer(x):
    return
  arr = np.asarray(x)
  # bfloat16 and the fp8 types have NumPy kind 'V', not 'f'.
  if not arr.size or not jnp.issubdtype(arr.dtype, jnp.floating):
    return
  finite = np.isfinite(arr)
  if not finite.all():
    raise ValueError(
        f"{where}: {arr.size - int(finite.sum())} NaN/inf value(s) cannot be "
        "quantized; fix the producer of this tensor or replace them (e.g. "
        "jnp.nan_to_num)")
  if arr.dtype.itemsize > 4 and (big := int(
      (np.abs(arr) > np.finfo(np.float32).max).sum())):
    raise ValueError(
        f"{where}: {big} value(s) beyond the float32 range (|x| > "
        f"{np.finfo(np.float32).max:.4g}) cannot be quantized (scales are "
        "float32); rescale the tensor or clip it to the float32 range")


def fake_quant_with_scale(x, scale, zero_point, spec: QuantSpec, key=None):
  """quantize -> dequantize, with the straight-through estimator.

  Forward: `(clip(round(x/s + z), qmin, qmax) - z) * s`; a NaN in `x` stays
  NaN (integer rounding would make it 0), an inf saturates to the bound.
  Backward: `dx = g` where `x` lies in the representable range
  `[(qmin - z) s, (qmax - z) s]`, and `0` outside it (clipped elements get
  no gradient). Scale and zero point are treated as constants.
  """
  scale = jax.lax.stop_gradient(scale)
  zp = None if zero_point is None else jax.lax.stop_gradient(zero_point)
  lo = (spec.qmin - (0.0 if zp is None else zp)) * scale
  hi = (spec.qmax - (0.0 if zp is None else zp)) * scale
  x_hat = quantize_dequantize(x, scale, zp, spec, key)
  return _ste(x, lo, hi, jnp.where(jnp.isnan(x), x, x_hat))


def quantize_dequantize(x, scale, zero_point, spec, key=None):
  q = decode(quantize_with_scale(x, scale, zero_point, spec, key), spec)
  return dequantize_with_scale(q, scale, zero_point, x.dtype)


@jax.custom_vjp
def _ste(x, lo, hi, x_hat):
  del x, lo, hi
  return x_hat


def _ste_fwd(x, lo, hi, x_hat):
  inside = (x >= lo) & (x <= hi)
  return x_hat, inside


def _ste_bwd(inside, g):
  zeros = jnp.zeros_like(g)
  return (jnp.where(inside, g, zeros), None, None, zeros)


_ste.defvjp(_ste_fwd, _ste_bwd)
