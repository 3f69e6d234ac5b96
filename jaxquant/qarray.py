"""`QArray`: a quantized tensor as a pytree, and `quantize` / `dequantize`.

Children (traced): `values` (int8 / uint8, or packed uint8 for int4 and
int2), `scale` (float32) and `zero_point` (float32, or None when symmetric),
and, for activation-aware methods (`jq.awq`, `jq.smoothquant`), an
`in_scale` per input feature.
Aux data (static, hashable): the resolved `spec`, the logical `shape`, the
`dtype` that `dequantize` returns and the storage `order` of the axes.

Scales keep the rank of the tensor: size 1 on reduced axes, so
`(q - z) * s` broadcasts. Per-group scales have `n_groups` on the group
axis and are applied to the grouped view `(..., n_groups, group_size, ...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import numerics, packing
from jaxquant.spec import QuantSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Static quantization of the activation a weight meets in its matmul.

  From calibration (`jq.quantize_params(..., stats=...)`) or a fixed act
  clip: a per-tensor `scale` of shape () or, for `nn.scan`-stacked weights,
  (layers,); `zero_point` (None when `spec` is symmetric); the act `spec`.
  `quantized_apply` quantizes the activation as
  q = clip(round(x / scale + zero_point), qmin, qmax) instead of reducing
  over it at run time. Stored as `QArray.act`; a pytree (spec static).

  Attributes:
    scale: float32, shape () or (layers,).
    zero_point: float32 like `scale`, or None for a symmetric spec.
    spec: the activation `QuantSpec`, per tensor, without a clip.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8(clip=(-2.0, 2.0)))])
    >>> qparams = jq.quantize_params(model.apply, params, recipe, x)
    >>> act = qparams["params"]["kernel"].act
    >>> round(float(act.scale) * 127, 6), act.zero_point, act.spec.short()
    (2.0, None, 'int8/t')
  """

  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))

  def stacked(self, length: int) -> "ActQuant":
    """One scale per step of a `lax.scan` of `length` steps: a shared ()
    scale is repeated, a per-layer (layers,) one is kept."""
    stack = lambda a: None if a is None else jnp.broadcast_to(
        a, (length,) + a.shape[1:])
    return ActQuant(stack(self.scale), stack(self.zero_point), self.spec)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor. Build it with `quantize`, read it with `dequantize`.

  Attributes:
    values: the stored codes: int8 / uint8, float8 for fp8, or uint8 bytes
      holding packed codes for widths below 8 bits.
    scale: float32, the rank of the tensor (size 1 on reduced axes; the
      number of groups on the group axis).
    zero_point: float32 like `scale`, or None when symmetric.
    spec: the `QuantSpec`, with its axes resolved (static).
    shape: the logical shape (static).
    dtype: the dtype `dequantize` returns (static).
    act: an `ActQuant` for static activation quantization, or None.
    in_scale: None, or a float32 pre-scale `s > 0` per input feature of the
      matmul (keepdims: the weight's rank, size 1 except on the features'
      axes and scan-stacked layer axes). The codes then hold `W * s` and
      `dequantize` returns `Q(W * s) / s`; the engine computes
      `(x / s) @ Q(W * s)`, the activation pre-scale fused with its
      quantization (AWQ / SmoothQuant).
    order: None, or the axes of `shape` in the order `values` stores them
      (`values` holds `transpose(codes, order)`, packed along its last
      axis); scales keep the logical layout. `quantize_params` stores a
      matmul's contracted axes last where the machine multiplies that
      layout faster (`jaxquant.engine.lowering`); `int_values`,
      `dequantize` and checkpoints see the logical layout regardless.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> q = jq.quantize(jnp.linspace(-1, 1, 8).reshape(2, 4), jq.int4())
    >>> q.shape, q.values.dtype, q.values.shape     # two int4 per byte
    ((2, 4), dtype('uint8'), (2, 2))
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  # Static activation quantization of the matmul this weight feeds; None:
  # activations are quantized dynamically (or not at all).
  act: ActQuant | None = None
  # Pre-scale of the input features (the codes hold W * in_scale); None: 1.
  in_scale: jax.Array | None = None
  # Storage order of the axes of `values`; None: the logical order.
  order: tuple[int, ...] | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of values, scales and zero points together."""
    act = self.act or ActQuant(None, None, None)
    parts = (self.values, self.scale, self.zero_point, act.scale,
             act.zero_point, self.in_scale)
    return sum(int(np.prod(p.shape)) * jnp.dtype(p.dtype).itemsize
               for p in parts if p is not None)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The shape of the codes as stored (`shape` permuted by `order`)."""
    return stored_shape(self.shape, self.order)

  def stored_codes(self) -> jax.Array:
    """The codes unpacked but in storage order (`stored_shape`)."""
    if not self.spec.packed:
      return self.values
    return packing.unpack(self.values, self.spec.bits, self.stored_shape,
                          self.spec.codes_signed)

  def int_values(self) -> jax.Array:
    """The stored codes, unpacked to `self.shape`: int8 (signed) or uint8
    integers, fp8 values, or uint8 nf4 indices."""
    return logical(self.stored_codes(), self.order)

  def grid_values(self) -> jax.Array:
    """Values on the spec's grid before scaling: integers, fp8 values, or
    nf4 code values in [-1, 1]."""
    return numerics.decode(self.int_values(), self.spec)

  def dequantize(self) -> jax.Array:
    """`jq.dequantize(self)`: the float tensor, shape `shape`, in `dtype`."""
    return dequantize(self)

  def __repr__(self):
    return (f"QArray({self.spec.short()}, shape={self.shape}, "
            f"dtype={jnp.dtype(self.dtype).name}, nbytes={self.nbytes})")


def stored_shape(shape, order) -> tuple[int, ...]:
  return tuple(shape) if order is None else tuple(shape[a] for a in order)


def logical(codes, order):
  """Codes stored in `order`, back in the logical layout."""
  if order is None:
    return codes
  return jnp.transpose(codes, np.argsort(order))


def check_order(order, ndim: int, where: str = "QArray") -> None:
  if order is not None and sorted(order) != list(range(ndim)):
    raise ValueError(f"{where}: order={order} is not a permutation of the "
                     f"{ndim} axes; pass a permutation of range({ndim}) or "
                     "None")


def _canonical(order, ndim: int, where: str = "QArray"):
  """`order` checked (`check_order`), as a tuple of ints, or None for the
  logical order."""
  check_order(order, ndim, where)
  if order is None or tuple(order) == tuple(range(ndim)):
    return None  # the logical order is stored as None
  return tuple(int(a) for a in order)


def with_order(q: QArray, order) -> QArray:
  """`q` with its codes stored in `order` (None: the logical order).

  The numbers are unchanged; only the layout of `values` is (see
  `QArray.order`).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> from jaxquant.qarray import with_order
    >>> q = jq.quantize(jnp.arange(6.0).reshape(2, 3), jq.int8())
    >>> t = with_order(q, (1, 0))
    >>> t.values.shape, t.shape, bool((t.dequantize() == q.dequantize()).all())
    ((3, 2), (2, 3), True)
  """
  order = _canonical(order, q.ndim)
  if order == q.order:
    return q
  codes = q.int_values()
  if order is not None:
    codes = jnp.transpose(codes, order)
  if q.spec.packed:
    codes = packing.pack(codes, q.spec.bits)
  return dataclasses.replace(q, values=codes, order=order)


def quantize(x, spec: QuantSpec, *, key=None, value_range=None,
             where: str = "tensor", order=None) -> QArray:
  """Quantizes `x` to a `QArray` on the grid of `spec`.

  Under `jax.jit` a NaN cannot be checked for or stored as an integer: it
  makes its block's scale NaN, so the block dequantizes to NaN; an inf
  saturates against a fixed `clip` / `value_range` (see `jaxquant.numerics`).

  Args:
    x: a float array; outside jit it must be finite (else ValueError).
    spec: the `QuantSpec`; missing axes default to the `(..., in, out)`
      kernel layout (see `QuantSpec`).
    key: PRNG key, required for `rounding="stochastic"`.
    value_range: optional `(lo, hi)` (e.g. from calibration), broadcastable
      to the scale; overrides the data range and `spec.clip`.
    where: a name for error messages (the parameter path).
    order: None, or the axis order to store the codes in (`QArray.order`);
      transposed inside the quantizing computation, so no logical-order
      copy of the codes is ever made.

  Returns:
    A `QArray`. Per scale block, with [lo, hi] the block's range
    (`value_range`, else a tuple `spec.clip`, else the data's
    [-absmax, absmax] when symmetric and [min, max] when not), an integer
    spec stores

      symmetric:   s = max(-lo, hi) / qmax,
                   q = clip(round(x / s), qmin, qmax)
      asymmetric:  s = (hi - lo) / (qmax - qmin),  z = qmin - lo / s,
                   q = clip(round(x / s + z), qmin, qmax)

    so that with round-to-nearest |dequantize(q) - x| <= s / 2 inside the
    range. fp8 and nf4 take the symmetric scale with their grid max as qmax
    and encode x / s (see `jaxquant.formats`).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> x = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> q = jq.quantize(x, jq.int8(granularity="tensor"))
    >>> q
    QArray(int8/t, shape=(2, 2), dtype=float32, nbytes=8)
    >>> q.values.tolist(), round(float(q.scale[0, 0]) * 127, 6)
    ([[32, -64], [16, 127]], 2.0)
    >>> bool(jnp.all(jnp.abs(q.dequantize() - x) <= q.scale / 2))
    True
  """
  x, spec, key = _checked(x, spec, key, where)
  return _quantize(x, spec, key, value_range,
                   _canonical(order, x.ndim, where))


def _checked(x, spec: QuantSpec, key, where: str):
  """(x as a float array, spec with resolved axes, key or None), or a
  ValueError naming `where`: the checks quantize and fake_quant share."""
  numerics.check_finite(x, where)  # before asarray: float64 beyond float32
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{where}: cannot quantize dtype {x.dtype}; "
                     "only float tensors are quantized")
  spec = numerics.resolve_axes(spec, x.ndim, where)
  if spec.granularity == "group":
    numerics.grouped(x, spec, where)  # a group size that does not divide
  if stochastic := spec.rounding == "stochastic":
    if key is None:
      raise ValueError(f"{where}: rounding='stochastic' needs a PRNG key: "
                       "pass key=")
  return x, spec, key if stochastic else None


def _scale(view, spec: QuantSpec, value_range):
  """Scale and zero point of the (grouped) view; NaN scale on NaN blocks."""
  view = jax.lax.stop_gradient(view)
  lo, hi = value_range if value_range is not None else numerics.data_range(
      view, spec)
  scale, zero_point = numerics.scale_from_range(lo, hi, spec)
  scale = jnp.broadcast_to(scale, _scale_shape(view.shape, spec))
  if zero_point is not None:
    zero_point = jnp.broadcast_to(zero_point, scale.shape)
  return numerics.nan_to_scale(view, scale, spec), zero_point


@functools.partial(jax.jit, static_argnames=("spec", "order"))
def _quantize(x, spec: QuantSpec, key, value_range, order=None) -> QArray:
  # Compiled once per shape and spec: eager calls would otherwise run (and
  # compile) each small op on its own, and jit and no-jit agree bit for bit.
  view = numerics.grouped(x, spec) if spec.granularity == "group" else x
  scale, zero_point = _scale(view, spec, value_range)
  q = numerics.quantize_with_scale(view, scale, zero_point, spec, key)
  q = q.reshape(x.shape)
  if spec.granularity == "group":  # store without the group_size axis
    scale = jnp.squeeze(scale, spec.group_axis + 1)
    if zero_point is not None:
      zero_point = jnp.squeeze(zero_point, spec.group_axis + 1)
  if order is not None:
    q = jnp.transpose(q, order)
  if spec.packed:
    q = packing.pack(q, spec.bits)
  return QArray(q, scale, zero_point, spec, tuple(x.shape), x.dtype,
                order=order)


def _scale_shape(view_shape, spec):
  axes = numerics.reduction_axes(spec, len(view_shape) - (
      spec.granularity == "group"))
  return tuple(1 if a in axes else d for a, d in enumerate(view_shape))


def dequantize(q: QArray) -> jax.Array:
  """The float tensor `(values - zero_point) * scale`, in `q.dtype`.

  Packed codes are unpacked first; per-group scales apply to each group of
  `group_size` elements; fp8 codes and nf4 code values stand in for the
  integer values (see `QArray.grid_values`). With an `in_scale` `s` the
  result is divided by it: `Q(W * s) / s` approximates `W`.

  Args:
    q: a `QArray`.

  Returns:
    An array of shape `q.shape` and dtype `q.dtype`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> q = jq.quantize(jnp.array([-1.0, 0.0, 1.0, 3.0]),
    ...                 jq.uint8(granularity="tensor"))
    >>> q.values.tolist()
    [0, 64, 127, 255]
    >>> [round(v, 3) for v in jq.dequantize(q).tolist()]
    [-1.0, 0.004, 0.992, 3.0]
  """
  values = q.grid_values()
  if q.spec.granularity != "group":
    out = numerics.dequantize_with_scale(values, q.scale, q.zero_point,
                                         q.dtype)
  else:
    axis = q.spec.group_axis
    view = numerics.grouped(values, q.spec)
    expand = lambda a: None if a is None else jnp.expand_dims(a, axis + 1)
    out = numerics.dequantize_with_scale(view, expand(q.scale),
                                         expand(q.zero_point), q.dtype)
  return unscaled(out.reshape(q.shape), q.in_scale)


def unscaled(w, in_scale):
  """`w / in_scale` in `w`'s dtype (`w` itself when `in_scale` is None)."""
  if in_scale is None:
    return w
  return (w.astype(jnp.float32) / in_scale).astype(w.dtype)


def fake_quant(x, spec: QuantSpec, *, key=None, value_range=None,
               where: str = "tensor"):
  """`dequantize(quantize(x, spec))` with a straight-through gradient.

  Same checks and NaN behaviour as `quantize`: a NaN's block comes back
  NaN, an inf saturates against a fixed `clip` / `value_range`. The
  gradient is 1 for elements inside the representable range of their scale
  block and 0 for clipped ones (see `numerics.fake_quant_with_scale`).

  Args:
    x: a float array.
    spec: the `QuantSpec`, as for `quantize`.
    key: PRNG key, required for `rounding="stochastic"`.
    value_range: optional `(lo, hi)`, overriding the data range and
      `spec.clip`.
    where: a name for error messages.

  Returns:
    An array like `x`, every element on the grid of its block.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> spec = jq.int8(granularity="tensor", clip=(-0.5, 0.5))
    >>> x = jnp.array([0.3, -0.7, 1.0, 0.05])
    >>> [round(v, 4) for v in jq.fake_quant(x, spec).tolist()]
    [0.2992, -0.5, 0.5, 0.0512]
    >>> jax.grad(lambda v: jq.fake_quant(v, spec).sum())(x).tolist()
    [1.0, 0.0, 0.0, 1.0]
  """
  x, spec, key = _checked(x, spec, key, where)
  view = numerics.grouped(x, spec) if spec.granularity == "group" else x
  scale, zero_point = _scale(view, spec, value_range)
  out = numerics.fake_quant_with_scale(view, scale, zero_point, spec, key)
  return out.reshape(x.shape)
