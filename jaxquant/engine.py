"""Int8 execution: payloads of quantized weights, matmul kernels, handlers.

`quantize_params`, `quantized_apply`, `fake_quant_apply` and `report` trace
the user's unmodified `apply_fn(params, *args, **kwargs)` once per abstract
signature (`jaxquant.transform`) and evaluate it, handing every
`dot_general` / `conv_general_dilated` that has a parameter operand to one of
the handlers below (`on_matmul`).

Int8 matmul (W8A8), for activation x and weight w with per-row and
per-output-channel scales:

  x ~ (q_x - z_x) s_x,   w ~ (q_w - z_w) s_w
  x . w ~ s_x s_w (q_x . q_w - z_x sum_k q_w - z_w sum_k q_x + K z_x z_w)

`q_x . q_w` is one `dot_general(int8, int8, preferred_element_type=int32)`;
the corrections vanish for symmetric specs (z = 0). This needs `s_w` constant
along the contracted axes, which is why channel axes are read from the
dimension numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import numerics
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec
from jaxquant.transform import layout
from jaxquant.transform.interpreter import Handler, LayoutRule, bind_plain
from jaxquant.transform.site import Site
from jaxquant.transform.tagged import FloatPayload, value

INT8, WEIGHT_ONLY, FLOAT = "int8", "weight-only", "float"


# --------------------------------------------------------------------------
# Payloads of the int8 engine


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantPayload:
  """Integer values and keepdims scales, in the layout of the current value."""

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  act_scale: jax.Array | None = None  # static activation quantization
  act_zero_point: jax.Array | None = None
  act_spec: QuantSpec | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  @classmethod
  def of(cls, q: QArray):
    if q.spec.granularity == "group":
      return GroupPayload(q.int_values(), q.scale, q.zero_point, q.spec,
                          q.dtype, q.act_scale, q.act_zero_point, q.act_spec,
                          q.spec.group_axis)
    return cls(q.int_values(), q.scale, q.zero_point, q.spec, q.dtype,
               q.act_scale, q.act_zero_point, q.act_spec)

  def materialize(self):
    return numerics.dequantize_with_scale(self.values, self.scale,
                                          self.zero_point, self.dtype)

  def apply(self, eqn, others, rule: LayoutRule):
    params = eqn.params
    if eqn.primitive.name == "convert_element_type":
      if not jnp.issubdtype(params["new_dtype"], jnp.floating):
        return None
      return dataclasses.replace(self, dtype=params["new_dtype"])
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    scale = rule.scale(params, self.scale, in_shape, out_shape, others)
    zp = self.zero_point
    if zp is not None:
      zp = rule.scale(params, zp, in_shape, out_shape, others)
    if scale is None or (self.zero_point is not None and zp is None):
      return None
    values = eqn.primitive.bind(self.values, *others, **params)
    return dataclasses.replace(self, values=values, scale=scale, zero_point=zp)

  def stackable(self, length):
    """Every leaf with `length` on axis 0, for `lax.scan` to slice.

    Scales are broadcast along the stacked axis; a shared () activation
    scale becomes one per step, a per-layer (layers,) one is kept.
    """
    def stack(a):
      return None if a is None else jnp.broadcast_to(
          a, (length,) + a.shape[1:])
    return dataclasses.replace(
        self, scale=stack(self.scale), zero_point=stack(self.zero_point),
        act_scale=stack(self.act_scale),
        act_zero_point=stack(self.act_zero_point))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DequantizedPayload(FloatPayload):
  """A quantized weight that can only run weight-only (dequantized)."""

  reason: str = dataclasses.field(default="", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupPayload:
  """Integer values with per-group scales (`n_groups` on `group_dim`).

  It follows dtype casts only: any other layout op turns it into a
  `DequantizedPayload`, so int8 compute sees the parameter's own layout.
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  act_scale: jax.Array | None  # static activation quantization
  act_zero_point: jax.Array | None
  act_spec: QuantSpec | None = dataclasses.field(metadata=dict(static=True))
  group_dim: int = dataclasses.field(metadata=dict(static=True))

  def expanded(self, a):
    """A per-group array broadcastable against the grouped view."""
    return None if a is None else jnp.expand_dims(a, self.group_dim + 1)

  def materialize(self):
    spec = dataclasses.replace(self.spec, group_axis=self.group_dim)
    view = numerics.grouped(self.values, spec)
    out = numerics.dequantize_with_scale(
        view, self.expanded(self.scale), self.expanded(self.zero_point),
        self.dtype)
    return out.reshape(self.values.shape)

  def apply(self, eqn, others, rule: LayoutRule):
    if eqn.primitive.name == "convert_element_type" and jnp.issubdtype(
        eqn.params["new_dtype"], jnp.floating):
      return dataclasses.replace(self, dtype=eqn.params["new_dtype"])
    moved = eqn.primitive.bind(self.materialize(), *others, **eqn.params)
    return DequantizedPayload(moved, _GROUP_MOVED)

  def stackable(self, length):
    return dataclasses.replace(
        QuantPayload.stackable(self, length), group_dim=self.group_dim - 1)


# --------------------------------------------------------------------------
# Which matmuls can run int8


_GROUPED = ("per-group scales need the group axis to be the only "
            "contracted axis")
_GROUP_MOVED = "per-group weight reshaped or transposed before its matmul"
_GROUP_ZP = "asymmetric per-group weights"
_VARYING = "weight scale varies along a contracted axis"
_CONV_ZP = "asymmetric weights in a convolution"


def group_problem(site: Site, spec: QuantSpec) -> str | None:
  """Why a per-group weight cannot run a grouped int8 matmul here."""
  if site.moved:
    return _GROUP_MOVED
  if (site.primitive != "dot_general" or len(site.weight_contract) != 1
      or site.param_contract != {spec.group_axis}):
    return _GROUPED
  if not spec.symmetric:
    return _GROUP_ZP
  return None


def int_path_problem(site: Site, payload, act_spec) -> str | None:
  """Why this site cannot run int8 x int8 (None when it can)."""
  if isinstance(payload, DequantizedPayload):
    return payload.reason
  if isinstance(payload, GroupPayload):
    return group_problem(site, payload.spec)
  if site.primitive == "conv_general_dilated" and (
      payload.zero_point is not None):
    return _CONV_ZP
  if site.batch_groups != 1:
    return "batch_group_count > 1"
  if any(payload.scale.shape[d] != 1 for d in site.weight_contract):
    return _VARYING
  return None


def spec_problem(site: Site, spec: QuantSpec, act_spec) -> str | None:
  """`int_path_problem` decided from the resolved weight spec alone."""
  if spec.granularity == "group":
    return group_problem(site, spec)
  if spec.granularity == "channel" and site.param_contract & set(
      spec.channel_axes):
    return _VARYING
  if site.primitive == "conv_general_dilated" and not spec.symmetric:
    return _CONV_ZP
  return None


@dataclasses.dataclass(frozen=True)
class OpRecord:
  """How one matmul ran: `mode` is 'int8', 'weight-only' or 'float'."""

  path: str
  primitive: str
  mode: str
  reason: str
  weight_shape: tuple[int, ...]
  act_shape: tuple[int, ...]
  weight_spec: str
  act_spec: str


# --------------------------------------------------------------------------
# Handlers


@dataclasses.dataclass(kw_only=True)
class ObserveHandler(Handler):
  """Emits the activation operand of every matmul a rule quantizes."""

  def on_matmul(self, eqn, site, rule, invals):
    if rule is not None and rule.weight is not None:
      self.emit(site.path, value(invals[site.act_index]))
    return bind_plain(eqn, invals)


def dynamic_act_scale(x, site: Site, spec: QuantSpec):
  """Scale and zero point of activation `x` from its own range.

  Per row / token (reduced over the contracted axes; per example for
  convolutions), or per tensor when `spec.granularity == "tensor"`.
  """
  reduce = (tuple(range(x.ndim)) if spec.granularity == "tensor"
            else site.act_contract)
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  # One reduction, no NaN guard: this runs on every call of the model.
  if spec.symmetric:
    hi = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
    lo = -hi
  else:
    lo = jnp.min(x, axis=reduce, keepdims=True)
    hi = jnp.max(x, axis=reduce, keepdims=True)
  return numerics.scale_from_range(lo, hi, spec)


@dataclasses.dataclass(kw_only=True)
class FakeQuantHandler(Handler):
  """Fake-quantizes the activation of every matmul that would run int8."""

  specs: dict  # path -> resolved weight spec

  def on_matmul(self, eqn, site, rule, invals):
    if rule is None or rule.act is None or site.path not in self.specs or (
        spec_problem(site, self.specs[site.path], rule.act)):
      return bind_plain(eqn, invals)
    a = site.act_index
    x = value(invals[a])
    scale, zp = dynamic_act_scale(x, site, rule.act)
    invals = list(invals)
    invals[a] = numerics.fake_quant_with_scale(x, scale, zp, rule.act)
    return bind_plain(eqn, invals)


@dataclasses.dataclass(kw_only=True)
class QuantizedHandler(Handler):
  """Runs int8 x int8 -> int32 matmuls; records what ran how."""

  records: list = dataclasses.field(default_factory=list)

  def on_matmul(self, eqn, site, rule, invals):
    if site is None:
      self._record(eqn, invals, None, FLOAT, "no parameter kernel operand")
      return bind_plain(eqn, invals)
    payload = invals[site.weight_index].payload
    if not isinstance(payload, (QuantPayload, GroupPayload,
                                DequantizedPayload)):
      self._record(eqn, invals, site, FLOAT, "parameter not quantized")
      return bind_plain(eqn, invals)
    if rule is None or rule.act is None:
      self._record(eqn, invals, site, WEIGHT_ONLY, "no activation spec")
      return bind_plain(eqn, invals)
    problem = int_path_problem(site, payload, rule.act)
    if problem:
      self._record(eqn, invals, site, WEIGHT_ONLY, problem, rule.act)
      return bind_plain(eqn, invals)
    if static_act(payload):
      self._record(eqn, invals, site, INT8, "static activation scale",
                   payload.act_spec)
    else:
      self._record(eqn, invals, site, INT8, "", rule.act)
    x = value(invals[site.act_index])
    if isinstance(payload, GroupPayload):
      return [grouped_int8_matmul(eqn, site, x, payload, rule.act)]
    return [int8_matmul(eqn, site, x, payload, rule.act)]

  def _record(self, eqn, invals, site, mode, reason, act_spec=None):
    payload = None if site is None else invals[site.weight_index].payload
    wspec = payload.spec.short() if isinstance(
        payload, (QuantPayload, GroupPayload)) else (
        "dequantized" if isinstance(payload, DequantizedPayload) else "float")
    shapes = [tuple(v.aval.shape) for v in eqn.invars[:2]]
    rule = None if site is None else self.recipe.match(site.path)
    if (isinstance(payload, QuantPayload) and rule is not None
        and rule.weight is not None
        and (rule.weight.bits, rule.weight.signed) != (payload.spec.bits,
                                                        payload.spec.signed)):
      reason = "; ".join(filter(None, [
          reason, f"params hold {payload.spec.short()}, recipe says "
          f"{rule.weight.short()}"]))
    self.records.append(OpRecord(
        site.path if site else "-", eqn.primitive.name, mode, reason,
        site.weight_shape if site else shapes[1],
        site.act_shape if site else shapes[0], wspec,
        act_spec.short() if act_spec else "float"))


def _signed(q, zp, spec: QuantSpec):
  """int8 values (and zero point) for the dot; uint8 is shifted by 128."""
  if spec.signed:
    return q, zp
  shifted = (q.astype(jnp.int16) - 128).astype(jnp.int8)
  return shifted, (0.0 if zp is None else zp) - 128.0


def static_act(payload) -> bool:
  """Whether calibrated activation scales apply at this (scan) depth."""
  return (isinstance(payload, (QuantPayload, GroupPayload))
          and payload.act_scale is not None and payload.act_scale.ndim == 0)


def quantized_activation(x, site: Site, payload, act_spec):
  """(int8 values, keepdims scale, zero point or None) of activation `x`.

  Calibrated (static) scales only clip and round; otherwise the scale comes
  from `x` itself (`dynamic_act_scale`).
  """
  if static_act(payload):
    act_spec = payload.act_spec
    sx, zx = payload.act_scale, payload.act_zero_point
  else:
    sx, zx = dynamic_act_scale(x, site, act_spec)
  qx, zx = _signed(numerics.quantize_with_scale(x, sx, zx, act_spec), zx,
                   act_spec)
  sx = jnp.broadcast_to(sx, (1,) * x.ndim) if sx.ndim == 0 else sx
  return qx, sx, None if zx is None else jnp.broadcast_to(zx, sx.shape)


def int8_matmul(eqn, site: Site, x, payload: QuantPayload, act_spec):
  """One quantized `dot_general` / `conv_general_dilated` (see module doc)."""
  w = site.weight_index
  qx, sx, zx = quantized_activation(x, site, payload, act_spec)
  qw, zw = _signed(payload.values, payload.zero_point, payload.spec)
  operands = (qw, qx) if w == 0 else (qx, qw)
  params = dict(eqn.params, preferred_element_type=jnp.int32)
  if "precision" in params:
    params["precision"] = None
  acc = eqn.primitive.bind(*operands, **params).astype(jnp.float32)
  out_ndim = eqn.outvars[0].aval.ndim
  if site.primitive == "conv_general_dilated":
    sx_out, sw_out = _conv_scales(eqn, sx, payload.scale, out_ndim)
    if zx is not None:
      # sum of q_w over the window taps that fall inside the image (padding
      # contributes 0, not z_x): the same conv on a one-example tensor of 1s.
      shape = list(qx.shape)
      shape[eqn.params["dimension_numbers"][0][0]] = 1
      ones = jnp.ones(shape, jnp.int8)
      taps = eqn.primitive.bind(ones, qw, **params).astype(jnp.float32)
      zx_out, _ = _conv_scales(eqn, zx, payload.scale, out_ndim)
      acc = acc - zx_out * taps
    return (acc * sx_out * sw_out).astype(eqn.outvars[0].aval.dtype)
  to_x = lambda s: layout.to_output_layout(
      s, site.act_contract, site.act_batch, w == 1,
      qw.ndim - len(site.weight_contract) - len(site.weight_batch))
  to_w = lambda s: layout.to_output_layout(
      s, site.weight_contract, site.weight_batch, w == 0,
      qx.ndim - len(site.act_contract) - len(site.act_batch))
  if zx is not None:
    colsum = jnp.sum(qw, site.weight_contract, jnp.int32, keepdims=True)
    acc = acc - to_x(zx) * to_w(colsum)
  if zw is not None:
    rowsum = jnp.sum(qx, site.act_contract, jnp.int32, keepdims=True)
    acc = acc - to_w(zw) * to_x(rowsum)
    if zx is not None:
      k = layout.contracted_size(qx.shape, site.act_contract)
      acc = acc + k * to_x(zx) * to_w(zw)
  return (acc * to_x(sx) * to_w(payload.scale)).astype(
      eqn.outvars[0].aval.dtype)


def grouped_int8_matmul(eqn, site: Site, x, payload: GroupPayload, act_spec):
  """`dot_general` with per-group weight scales as a batch of int8 dots.

  With the contraction axis split into G groups of size g,
    x . w ~ s_x sum_G s_w[G] (q_x[G] . q_w[G])
  one `dot_general(s8, s8) -> s32` with G as an extra batch dimension, then
  a scaled sum over G in float.
  """
  w, (ca,), (cw,) = site.weight_index, site.act_contract, site.weight_contract
  size = payload.spec.group_size
  qx, sx, zx = quantized_activation(x, site, payload, act_spec)
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
  acc = acc.astype(jnp.float32)
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
  out = jnp.sum(acc * to_x(sx) * to_w(sw), axis=len(site.act_batch))
  return out.astype(eqn.outvars[0].aval.dtype)


def _conv_scales(eqn, sx, sw, out_ndim):
  lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
  x_shape = [1] * out_ndim
  x_shape[out_spec[0]] = sx.shape[lhs_spec[0]]
  w_shape = [1] * out_ndim
  w_shape[out_spec[1]] = sw.shape[rhs_spec[0]]
  return sx.reshape(x_shape), sw.reshape(w_shape)
