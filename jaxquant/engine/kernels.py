"""Int8 matmul kernels: activation quantization, int8 x int8 -> int32, rescale.

For activation x and weight w with per-row and per-output-channel scales:

  x ~ (q_x - z_x) s_x,   w ~ (q_w - z_w) s_w
  x . w ~ s_x s_w (q_x . q_w - z_x sum_k q_w - z_w sum_k q_x + K z_x z_w)

`q_x . q_w` is one `dot_general(int8, int8, preferred_element_type=int32)`;
the corrections vanish for symmetric specs (z = 0). This needs `s_w` constant
along the contracted axes, which is why channel axes are read from the
dimension numbers.

Guarantees every kernel keeps (tested against float):
- No int32 overflow: a contraction of K products of at most P in magnitude
  is split into chunks of at most (2^31 - 1) // P products, each converted
  to float32 and summed (`accumulate`); P = 127 * 127 for int8 x int8.
- NaN/inf in an activation row gives NaN in that output row (per example for
  convolutions), as in float, through a NaN scale for the row: within the
  per-row range reduction for dynamic scales (free), or one extra reduction,
  the row's `sum(x * 0)` (0, or NaN), for static and per-tensor scales.
- The int8 rounding has no useful gradient: differentiating these kernels
  with respect to the activation raises, pointing to `jq.fake_quant_apply`
  (gradients with respect to other float inputs, e.g. biases, flow).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import native, numerics
from jaxquant.engine.lowering import (INT8_DOT, NATIVE_DOT, PER_GROUP_DOTS,
                                     Lowering, free_axes, int8_conv_native)
from jaxquant.engine.payloads import GroupPayload, QuantPayload
from jaxquant.qarray import logical
from jaxquant.spec import QuantSpec
from jaxquant.transform import layout
from jaxquant.transform.site import Site


_INT32_MAX = 2**31 - 1
PLAIN = Lowering(INT8_DOT)  # no padding, no parts


def max_abs_int(spec: QuantSpec) -> int:
  """Largest |q| of a spec's integers as they enter the dot (unsigned values
  are shifted by 128 into int8)."""
  return 128 if not spec.signed else max(-spec.qmin, spec.qmax)


def max_terms(weight_spec: QuantSpec, act_spec: QuantSpec) -> int:
  """Products an int32 partial sum may hold without overflowing."""
  return _INT32_MAX // (max_abs_int(weight_spec) * max_abs_int(act_spec))


def contraction(site: Site, params: dict):
  """(terms per output, (act dim, weight dim) to split along, or None).

  Dots split the longest contracted dimension pair; convolutions split the
  input features (not with feature groups, whose slices would regroup).
  """
  w = site.weight_shape
  if site.primitive == "dot_general":
    terms = math.prod(w[d] for d in site.weight_contract)
    if not site.weight_contract:
      return terms, None
    i = max(range(len(site.weight_contract)),
            key=lambda i: w[site.weight_contract[i]])
    return terms, (site.act_contract[i], site.weight_contract[i])
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  terms = math.prod(w) // w[rhs_spec[0]]
  if params.get("feature_group_count", 1) != 1:
    return terms, None
  return terms, (lhs_spec[1], rhs_spec[1])


def accumulation_problem(site: Site, params, weight_spec, act_spec):
  """Why an int32 accumulator cannot hold this contraction, even split."""
  terms, split = contraction(site, params)
  limit = max_terms(weight_spec, act_spec)
  if terms <= limit:
    return None
  if split is not None:
    a_dim = split[0]
    if terms // site.act_shape[a_dim] <= limit:
      return None
  return (f"contraction of {terms} terms can overflow the int32 "
          "accumulator and cannot be split here")


def accumulate(bind, lhs, rhs, dims, terms: int, limit: int):
  """`bind(lhs, rhs)` (an int32 product) in float32, without overflow.

  With more than `limit` products per output, the operands are sliced along
  the contracted dimensions `dims = (lhs dim, rhs dim)` into chunks of at
  most `limit` products; the int32 partial results are summed in float32.
  """
  if terms <= limit:
    return bind(lhs, rhs).astype(jnp.float32)
  l_dim, r_dim = dims
  n = lhs.shape[l_dim]
  chunk = limit // (terms // n)
  total = None
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    part = bind(lax.slice_in_dim(lhs, start, stop, axis=l_dim),
                lax.slice_in_dim(rhs, start, stop, axis=r_dim))
    part = part.astype(jnp.float32)
    total = part if total is None else total + part
  return total


@jax.custom_vjp
def no_grad_through(y, x):
  """`y`, an int8 kernel's output computed from activation `x`; raises when
  differentiated with respect to `x` (int8 rounding has no useful gradient,
  and autodiff would silently give zero)."""
  return y


def _no_grad_fwd(y, x):
  if x.perturbed:
    raise ValueError(
        "jax.grad through jq.quantized_apply with respect to activations: "
        "its int8 matmuls round them, whose gradient is zero almost "
        "everywhere. For training or input gradients use "
        "jq.fake_quant_apply(apply_fn, recipe) (float params, "
        "straight-through gradients).")
  return y.value, None


def _no_grad_bwd(_, g):
  return g, None


no_grad_through.defvjp(_no_grad_fwd, _no_grad_bwd, symbolic_zeros=True)


def nan_rows(x, axes):
  """0 for rows of `x` (reduced over `axes`, keepdims) that are finite, NaN
  for rows with a NaN or inf: added to a row's scale, it poisons the row."""
  return jnp.sum(jax.lax.stop_gradient(x).astype(jnp.float32) * 0, axis=axes,
                 keepdims=True)


def fixed_act_scale(spec: QuantSpec):
  """Per-tensor scale and zero point of a fixed `clip=(lo, hi)` spec."""
  lo, hi = (jnp.float32(c) for c in spec.clip)
  return numerics.scale_from_range(lo, hi, spec)


def activation_scale(x, site: Site, spec: QuantSpec):
  """Scale and zero point of activation `x`, NaN on rows with NaN or inf.

  From the spec's fixed clip range, or from `x` itself (`dynamic_act_scale`).
  """
  if isinstance(spec.clip, tuple):
    scale, zero_point = fixed_act_scale(spec)
    return poisoned(scale, x, site), zero_point
  return dynamic_act_scale(x, site, spec)


def poisoned(scale, x, site: Site):
  """`scale` broadcast per row, NaN on rows of `x` with a NaN or inf: one
  reduction over `x`, for scales that do not come from a per-row one."""
  return scale + nan_rows(x, site.act_contract)


def dynamic_act_scale(x, site: Site, spec: QuantSpec):
  """Scale and zero point of activation `x` from its own range.

  Per row / token (reduced over the contracted axes; per example for
  convolutions), or per tensor when `spec.granularity == "tensor"`. Rows
  with a NaN or inf get a NaN scale, so their outputs are NaN as in float:
  per row, within the same reduction (NaN counts as inf; XLA's max would
  skip it); per tensor, with `poisoned`.
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  per_tensor = spec.granularity == "tensor"
  axes = tuple(range(x.ndim)) if per_tensor else site.act_contract
  nan = 0.0 if per_tensor else jnp.inf
  if spec.symmetric:
    # The range [-top, top] straight to its scale: no lo = -top (a few ops
    # per matmul, which deep models compile as many times).
    top = jnp.max(numerics.where(x != x, nan, jnp.abs(x)), axis=axes,
                  keepdims=True)
    scale, zero_point = numerics.symmetric_scale(top, spec), None
  else:
    lo, hi = _range(x, axes, nan)
    scale, zero_point = numerics.scale_from_range(lo, hi, spec)
  if per_tensor:
    return poisoned(scale, x, site), zero_point
  bad = top == jnp.inf if spec.symmetric else jnp.abs(hi - lo) == jnp.inf
  return numerics.where(bad, jnp.nan, scale), zero_point


def _range(x, axes, nan: float):
  """(lo, hi) of `x` over `axes` (keepdims), with NaN read as +-`nan`."""
  lo = jnp.min(numerics.where(x != x, -nan, x), axis=axes, keepdims=True)
  hi = jnp.max(numerics.where(x != x, nan, x), axis=axes, keepdims=True)
  return lo, hi


def _signed(q, zp, spec: QuantSpec):
  """int8 values (and zero point) for the dot; uint8 is shifted by 128."""
  if spec.signed:
    return q, zp
  shifted = (q.astype(jnp.int16) - 128).astype(jnp.int8)
  return shifted, (0.0 if zp is None else zp) - 128.0


def static_act(payload) -> bool:
  """Whether calibrated activation scales apply at this (scan) depth."""
  return (isinstance(payload, QuantPayload) and payload.act is not None
          and payload.act.scale.ndim == 0)


def quantized_activation(x, site: Site, payload, act_spec):
  """(codes, keepdims scale, zero point or None, spec) of activation `x`:
  int8 values, or fp8 values for an fp8 spec.

  Calibrated (static) scales and fixed clips only clip and round; otherwise
  the scale comes from `x` itself (`dynamic_act_scale`). Rows with NaN/inf
  get a NaN scale (`nan_rows`).
  """
  if static_act(payload):
    act_spec = payload.act.spec
    sx, zx = poisoned(payload.act.scale, x, site), payload.act.zero_point
  else:
    sx, zx = activation_scale(x, site, act_spec)
  qx, zx = _signed(numerics.quantize_with_scale(x, sx, zx, act_spec), zx,
                   act_spec)
  return qx, sx, None if zx is None else jnp.broadcast_to(zx, sx.shape), (
      act_spec)


# Activation parts for weight-only matmuls: symmetric per-row int8 steps.
PARTS_SPEC = QuantSpec(bits=8, signed=True, symmetric=True)
_PART_BASE = 254.0  # 2 * 127: each residual, scaled, fits an int8 again


def split_activation(x, site: Site, n: int):
  """(n int8 parts, per-row scale) with x ~ s_x sum_i h_i / 254^i.

  `r_0 = x / s_x` lies in [-127, 127]; `h_i = round(r_i)`, and the scaled
  residual `r_{i+1} = 254 (r_i - h_i)` lies in [-127, 127] again, so the
  error after n parts is at most `s_x / (2 * 254^(n-1))` per element.
  Rows with NaN or inf get a NaN scale (their outputs are NaN).
  """
  sx, _ = dynamic_act_scale(x, site, PARTS_SPEC)
  r = x.astype(jnp.float32) / sx
  parts = []
  for _ in range(n):
    h = jnp.round(r)
    parts.append(h.astype(jnp.int8))
    r = (r - h) * _PART_BASE
  return parts, sx


class RowStack:
  """Stacks int8 activation parts (and zero rows) along the activation's
  first free axis, and undoes it on the matmul's output.

  Both are no-ops for one part and no padding, so the plain kernels keep
  their exact graph.
  """

  def __init__(self, site: Site, shape, lowering: Lowering, *,
               grouped: bool = False):
    free = free_axes(len(shape), site.act_contract, site.act_batch)
    self.parts = max(lowering.act_parts, 1)
    self.active = bool(free) and site.primitive == "dot_general" and (
        self.parts > 1 or lowering.min_rows > 1)
    if not self.active:
      return
    self.axis = free[0]
    self.size = shape[self.axis]
    other = math.prod(shape[d] for d in free) // max(self.size, 1)
    need = -(-lowering.min_rows // max(other, 1))
    self.stacked = max(self.parts * self.size, need)
    w_free = (len(site.weight_shape) - len(site.weight_contract)
              - len(site.weight_batch))
    self.out_axis = (len(site.act_batch) + grouped
                     + (w_free if site.weight_index == 0 else 0))

  def stack(self, codes: list):
    if not self.active:
      return codes[0]
    x = codes[0]
    if len(codes) > 1:
      # Row r's parts are rows r * parts + i: each shard of a row-sharded
      # activation keeps its own rows' parts, with no data movement.
      x = jnp.stack(codes, axis=self.axis + 1)
      x = x.reshape(x.shape[:self.axis] + (self.parts * self.size,)
                    + x.shape[self.axis + 2:])
    pad = [(0, 0)] * x.ndim
    pad[self.axis] = (0, self.stacked - x.shape[self.axis])
    return jnp.pad(x, pad)

  def combine(self, acc):
    """The output rows of part 0 plus part i / 254^i, as float32."""
    if not self.active:
      return acc
    axis, n = self.out_axis, self.parts
    acc = lax.slice_in_dim(acc, 0, n * self.size, axis=axis)
    if n == 1:
      return acc
    acc = acc.reshape(acc.shape[:axis] + (self.size, n)
                      + acc.shape[axis + 1:])
    part = lambda i: lax.index_in_dim(acc, i, axis + 1, keepdims=False)
    out = part(0).astype(jnp.float32)
    for i in range(1, n):
      out = out + part(i).astype(jnp.float32) * jnp.float32(
          _PART_BASE ** -i)
    return out


def activation_codes(x, site: Site, payload, act_spec, lowering: Lowering):
  """(int8 codes, per-row scale, zero point or None, act spec) of `x`: its
  quantized activation, or for weight-only (`lowering.act_parts`) its int8
  parts (`split_activation`)."""
  if lowering.act_parts:
    codes, sx = split_activation(x, site, lowering.act_parts)
    return codes, sx, None, PARTS_SPEC
  qx, sx, zx, act_spec = quantized_activation(x, site, payload, act_spec)
  return [qx], sx, zx, act_spec


def _finished(eqn, site: Site, out, x, payload, weight_only: bool):
  """A kernel's output with its gradient rule: the float one for a
  weight-only matmul (activation parts or float rows represent x exactly),
  none through rounded activations."""
  if weight_only:
    return exact_weight_only(eqn, site, out, x, payload)
  return no_grad_through(out, x)


def exact_weight_only(eqn, site: Site, out, x, payload):
  """`out`, computed from `x`'s int8 parts, with the float gradient of
  `x . dequantized(w)` (the parts represent x, so this is its derivative)."""
  def reference(x, payload):
    w = payload.materialize()
    return eqn.primitive.bind(*((w, x) if site.weight_index == 0 else (x, w)),
                              **eqn.params)
  return _with_grad_of(reference)(out, x, payload)


def _with_grad_of(reference):
  @jax.custom_vjp
  def f(out, x, payload):
    return out

  def fwd(out, x, payload):
    return out, (x, payload)

  def bwd(res, g):
    x, payload = res
    _, vjp = jax.vjp(reference, x, payload)
    return (jnp.zeros_like(g),) + vjp(g)

  f.defvjp(fwd, bwd)
  return f


def int8_matmul(eqn, site: Site, x, payload: QuantPayload, act_spec,
                lowering: Lowering = PLAIN):
  """One quantized `dot_general` / `conv_general_dilated` (see module doc).

  `lowering` may pad the activation's rows or, for a weight-only matmul
  (`act_parts > 0`), replace the quantized activation by its int8 parts
  (`split_activation`).
  """
  w = site.weight_index
  codes, sx, zx, act_spec = activation_codes(x, site, payload, act_spec,
                                             lowering)
  qw, zw = _signed(payload.values, payload.zero_point, payload.spec)
  params = dict(stored_dims(eqn.params, site, payload),
                preferred_element_type=jnp.int32)
  if "precision" in params:
    params["precision"] = None
  if lowering.kernel == NATIVE_DOT:
    bind = native_bind(site, payload)
  elif site.primitive == "conv_general_dilated" and not int8_conv_native():
    params.update(preferred_element_type=jnp.float32,
                  precision=lax.Precision.HIGHEST)
    bind = lambda a, b: eqn.primitive.bind(
        a.astype(jnp.float32), b.astype(jnp.float32), **params)
  else:
    bind = lambda a, b: eqn.primitive.bind(
        *((b, a) if w == 0 else (a, b)), **params)
  rows = RowStack(site, codes[0].shape, lowering)
  qx = rows.stack(codes)
  terms, dims = contraction(site, eqn.params)
  if dims is not None:
    dims = (dims[0], payload.stored_axis(dims[1]))
  acc = accumulate(bind, qx, qw, dims, terms,
                   max_terms(payload.spec, act_spec))
  if site.primitive == "conv_general_dilated":
    if zx is not None:
      # sum of q_w over the window taps that fall inside the image (padding
      # contributes 0, not z_x): the same conv on a one-example tensor of 1s.
      shape = list(qx.shape)
      shape[eqn.params["dimension_numbers"][0][0]] = 1
      taps = bind(jnp.ones(shape, jnp.int8), qw).astype(jnp.float32)
      acc = acc - _conv_scales(eqn, zx, payload.scale)[0] * taps
    return no_grad_through(_rescaled(eqn, site, acc, sx, payload.scale), x)
  to_x, to_w = _output_layout(site, qx.ndim, qw.ndim)
  if zw is not None:  # per stacked row: each part is a row of its own
    rowsum = jnp.sum(qx, site.act_contract, jnp.int32, keepdims=True)
    acc = acc - to_w(zw) * to_x(rowsum)
  acc = rows.combine(acc)
  if zx is not None:
    colsum = logical(jnp.sum(qw, tuple(map(
        payload.stored_axis, site.weight_contract)), jnp.int32,
        keepdims=True), payload.order)
    acc = acc - to_x(zx) * to_w(colsum)
    if zw is not None:
      k = layout.contracted_size(qx.shape, site.act_contract)
      acc = acc + k * to_x(zx) * to_w(zw)
  out = _rescaled(eqn, site, acc, sx, payload.scale)
  return _finished(eqn, site, out, x, payload, bool(lowering.act_parts))


def native_layout(site: Site, payload) -> bool:
  """Whether `payload`'s codes lie as the native int8 dot reads them: the
  weight's free axes, in their logical order, then its contracted ones (no
  batch axes), so that they are an (N, K) matrix as stored."""
  order = payload.order or tuple(range(len(site.weight_shape)))
  return site.primitive == "dot_general" and contracted_last(site, order)


def native_bind(site: Site, payload):
  """`bind(q_x, q_w)` of `int8_matmul` on the native kernel: q_w's stored
  codes as (N, K) (`native_layout`), q_x's free then contracted axes (in
  the order the weight stores its contracted ones) as (M, K), the (M, N)
  product back in `dot_general`'s output layout."""
  order = payload.order or tuple(range(len(site.weight_shape)))
  n_free = len(order) - len(site.weight_contract)
  paired = [site.act_contract[site.weight_contract.index(d)]
            for d in order[n_free:]]

  def bind(qx, qw):
    x_free = free_axes(qx.ndim, site.act_contract, ())
    m = math.prod(qx.shape[d] for d in x_free)
    k = math.prod(qx.shape[d] for d in paired)
    w_free = qw.shape[:n_free]
    x2 = jnp.transpose(qx, x_free + paired).reshape(m, k)
    out = native.int8_dot(x2, qw.reshape(math.prod(w_free), k))
    out = out.reshape(tuple(qx.shape[d] for d in x_free) + w_free)
    if site.weight_index == 0:  # dot_general puts the lhs' free axes first
      out = jnp.moveaxis(out, tuple(range(len(x_free))),
                         tuple(range(n_free, out.ndim)))
    return out

  return bind


def stored_dims(params, site: Site, payload):
  """`dot_general` parameters addressing the weight's values as stored
  (`QuantPayload.order`: its free axes keep their relative order, so the
  output layout is the same)."""
  if payload.order is None:
    return params
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  at = lambda dims: tuple(map(payload.stored_axis, dims))
  if site.weight_index == 0:
    lc, lb = at(lc), at(lb)
  else:
    rc, rb = at(rc), at(rb)
  return dict(params, dimension_numbers=((lc, rc), (lb, rb)))


def stored_usable(site: Site, payload) -> bool:
  """Whether the int8 kernels can address `payload`'s values as stored: an
  integer `dot_general` weight whose free axes keep their relative order
  (else the handler passes the logical layout)."""
  if payload.order is None:
    return True
  free = free_axes(len(payload.order), site.weight_contract,
                   site.weight_batch)
  return (site.primitive == "dot_general" and payload.spec.format == "int"
          and [a for a in payload.order if a in free] == free)


def contracted_last(site: Site, order) -> bool:
  """Whether values stored in `order` hold the weight's free axes first,
  in their logical order, and its contracted axes last (no batch axes):
  the layout `row_reduce_matmul` reads and `stored_dims` needs."""
  if order is None or site.weight_batch:
    return False
  n_free = len(order) - len(site.weight_contract)
  free = free_axes(len(order), site.weight_contract, ())
  return (list(order[:n_free]) == free
          and set(order[n_free:]) == set(site.weight_contract))


def row_reduce_matmul(eqn, site: Site, x, payload: QuantPayload, act_spec,
                      lowering: Lowering):
  """A one-row matmul as a float reduction over the stored int8 codes.

  With the weight stored contracted-axes-last (`contracted_last`) and one
  activation row, `out[n] = s_w[n] sum_k q_w[n, k] v[k]` with `v = x`
  (weight-only: exactly `x . dequantized(w)`) or `v = s_x (q_x - z_x)`
  (int8 activations: the int8 kernel's numbers, accumulated in float32).
  XLA:CPU streams the int8 codes through this reduction in one fused loop,
  where its int8 dot has no one-row path (`lowering.ROW_REDUCE`).
  """
  del lowering
  if act_spec is None:
    v, sx = x.astype(jnp.float32), jnp.float32(1)
  else:
    qx, sx, zx, _ = quantized_activation(x, site, payload, act_spec)
    v = qx.astype(jnp.float32) - (0.0 if zx is None else zx)
  n_free = len(payload.order) - len(site.weight_contract)
  stored_contract = payload.order[n_free:]
  # The activation's contracted axes, in the order the weight stores them.
  paired = [site.act_contract[site.weight_contract.index(d)]
            for d in stored_contract]
  v = jnp.transpose(v, free_axes(v.ndim, site.act_contract, ()) + paired)
  v = v.reshape(v.shape[v.ndim - len(paired):])
  axes = tuple(range(n_free, len(payload.order)))
  # Tied to this step's activation: in a decode loop XLA would otherwise
  # hoist the weight's conversion out of the loop, and stream a float32
  # copy every step (1.7x float, against 0.55x tied, 16-step loop).
  w, v = lax.optimization_barrier((payload.values, v))
  w = w.astype(jnp.float32)
  if payload.zero_point is not None:
    w = w - jnp.transpose(payload.zero_point, payload.order)
  acc = jnp.sum(w * v, axis=axes)
  sw = jnp.squeeze(payload.scale, site.weight_contract)
  out = (acc * sw * jnp.reshape(sx, ())).reshape(eqn.outvars[0].aval.shape)
  out = out.astype(eqn.outvars[0].aval.dtype)
  return _finished(eqn, site, out, x, payload, act_spec is None)


def fp8_matmul(eqn, site: Site, x, payload: QuantPayload, act_spec):
  """An fp8 x fp8 matmul, rescaled by s_x s_w.

  The fp8 operands are upcast to float32 (every fp8 product is exact in
  float32) and multiplied at full float32 precision (no TF32): see
  `lowering.FP8_REASON`.
  """
  qx, sx, _, _ = quantized_activation(x, site, payload, act_spec)
  params = dict(eqn.params, preferred_element_type=jnp.float32)
  if "precision" in params:
    params["precision"] = lax.Precision.HIGHEST
  qx, qw = qx.astype(jnp.float32), payload.values.astype(jnp.float32)
  operands = (qw, qx) if site.weight_index == 0 else (qx, qw)
  acc = eqn.primitive.bind(*operands, **params)
  return no_grad_through(_rescaled(eqn, site, acc, sx, payload.scale), x)


def _output_layout(site: Site, x_ndim: int, w_ndim: int):
  """Functions moving keepdims activation / weight scales to the output."""
  w = site.weight_index
  to_x = lambda s: layout.to_output_layout(
      s, site.act_contract, site.act_batch, w == 1,
      w_ndim - len(site.weight_contract) - len(site.weight_batch))
  to_w = lambda s: layout.to_output_layout(
      s, site.weight_contract, site.weight_batch, w == 0,
      x_ndim - len(site.act_contract) - len(site.act_batch))
  return to_x, to_w


def _rescaled(eqn, site: Site, acc, sx, sw):
  """`acc * s_x * s_w` in the output layout and dtype."""
  if site.primitive == "conv_general_dilated":
    sx_out, sw_out = _conv_scales(eqn, sx, sw)
    out = acc * sx_out * sw_out
  else:
    to_x, to_w = _output_layout(site, len(site.act_shape),
                                len(site.weight_shape))
    out = acc * to_x(sx) * to_w(sw)
  return out.astype(eqn.outvars[0].aval.dtype)


def grouped_int8_matmul(eqn, site: Site, x, payload: GroupPayload, act_spec,
                        lowering: Lowering = PLAIN):
  """`dot_general` with per-group weight scales: int8 dots per group.

  With the contraction axis split into G groups of size g,
    x . w ~ s_x sum_G s_w[G] (q_x[G] . q_w[G])
  either one `dot_general(s8, s8) -> s32` with G as an extra batch
  dimension, then a scaled sum over G in float, or (`lowering.kernel ==
  PER_GROUP_DOTS`) one plain int8 dot per group, each scaled into a float
  accumulator. `lowering` may also pad rows or use activation parts, as
  for `int8_matmul`.
  """
  codes, sx, zx, _ = activation_codes(x, site, payload, act_spec, lowering)
  if lowering.kernel == PER_GROUP_DOTS:
    out = _per_group_dots(site, codes, zx, payload, lowering)
    to_x, _ = _output_layout(site, len(site.act_shape),
                             len(site.weight_shape))
    out = out * to_x(sx)
  else:
    out = _batched_group_dot(site, codes, sx, zx, payload, lowering)
  out = out.astype(eqn.outvars[0].aval.dtype)
  return _finished(eqn, site, out, x, payload, bool(lowering.act_parts))


def _batched_group_dot(site: Site, codes, sx, zx, payload: GroupPayload,
                       lowering: Lowering):
  """sum_G s_w[G] (q_x[G] . q_w[G]) s_x, G as a batch dimension."""
  w, (ca,), (cw,) = site.weight_index, site.act_contract, site.weight_contract
  size = payload.spec.group_size  # <= max_terms: see accumulation_problem
  rows = RowStack(site, codes[0].shape, lowering, grouped=True)
  qx = rows.stack(codes)
  split = lambda a, d: a.reshape(a.shape[:d] + (a.shape[d] // size, size)
                                 + a.shape[d + 1:])
  grow = lambda dims, d: tuple(i + (i > d) for i in dims)
  ab, wb = grow(site.act_batch, ca), grow(site.weight_batch, cw)
  qxg, qwg = split(qx, ca), split(payload.values, cw)
  a_dims = ((ca + 1,), ab + (ca,))
  w_dims = ((cw + 1,), wb + (cw,))
  lhs, rhs = (qwg, qxg) if w == 0 else (qxg, qwg)
  (lc, lb), (rc, rb) = (w_dims, a_dims) if w == 0 else (a_dims, w_dims)
  acc = jax.lax.dot_general(lhs, rhs, ((lc, rc), (lb, rb)),
                            preferred_element_type=jnp.int32)
  acc = rows.combine(acc.astype(jnp.float32))
  n_act_free = qx.ndim - 1 - len(site.act_batch)
  n_w_free = payload.values.ndim - 1 - len(site.weight_batch)
  to_x = lambda s: layout.to_output_layout(
      jnp.expand_dims(s, ca + 1), (ca + 1,), ab + (ca,), w == 1, n_w_free)
  sw = payload.expanded(payload.scale)
  to_w = lambda s: layout.to_output_layout(s, (cw + 1,), wb + (cw,), w == 0,
                                           n_act_free)
  if zx is not None:
    colsum = jnp.sum(qwg, cw + 1, jnp.int32, keepdims=True)
    acc = acc - to_x(zx) * to_w(colsum)
  return jnp.sum(acc * to_x(sx) * to_w(sw), axis=len(site.act_batch))


def _per_group_dots(site: Site, codes, zx, payload: GroupPayload,
                    lowering: Lowering):
  """sum_G s_w[G] (q_x[G] . q_w[G]) in float, one int8 dot per group
  (without s_x)."""
  w, (ca,), (cw,) = site.weight_index, site.act_contract, site.weight_contract
  size = payload.spec.group_size
  rows = RowStack(site, codes[0].shape, lowering)
  qx, qw = rows.stack(codes), payload.values
  dims = (((cw,), (ca,)), (site.weight_batch, site.act_batch)) if w == 0 else (
      ((ca,), (cw,)), (site.act_batch, site.weight_batch))
  to_x, to_w = _output_layout(site, qx.ndim, qw.ndim)
  acc = None
  for g in range(qw.shape[cw] // size):
    a = lax.slice_in_dim(qx, g * size, (g + 1) * size, axis=ca)
    b = lax.slice_in_dim(qw, g * size, (g + 1) * size, axis=cw)
    part = rows.combine(jax.lax.dot_general(
        *((b, a) if w == 0 else (a, b)), dims,
        preferred_element_type=jnp.int32).astype(jnp.float32))
    if zx is not None:
      part = part - to_x(zx) * to_w(jnp.sum(b, cw, jnp.int32, keepdims=True))
    part = part * to_w(lax.slice_in_dim(payload.scale, g, g + 1, axis=cw))
    acc = part if acc is None else acc + part
  return acc


def fake_quant_matmul(eqn, site: Site, x, payload: QuantPayload, act_spec):
  """The quantized activation times the dequantized weight, in float: the
  numbers of the int8 kernels up to float rounding, for machines and shapes
  where the int8 form is slower (`lowering.FAKE_QUANT_DOT`)."""
  qx, sx, zx, _ = quantized_activation(x, site, payload, act_spec)
  xq = numerics.dequantize_with_scale(
      qx, sx, zx, eqn.invars[site.act_index].aval.dtype)
  wq = payload.materialize()
  out = eqn.primitive.bind(*((wq, xq) if site.weight_index == 0 else (xq, wq)),
                           **eqn.params)
  return no_grad_through(out, x)


def _conv_scales(eqn, sx, sw):
  lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
  out_ndim = eqn.outvars[0].aval.ndim
  x_shape = [1] * out_ndim
  x_shape[out_spec[0]] = sx.shape[lhs_spec[0]]
  w_shape = [1] * out_ndim
  w_shape[out_spec[1]] = sw.shape[rhs_spec[0]]
  return sx.reshape(x_shape), sw.reshape(w_shape)
