"""Payloads of quantized weights, as they travel to their matmuls.

`QuantPayload` carries integer values and keepdims scales (size 1 on axes a
scale does not vary over) and follows layout ops by applying the same op to
both; `GroupPayload` carries per-group scales and follows dtype casts only;
`DequantizedPayload` is a weight that can only run weight-only. An
`in_scale` (AWQ / SmoothQuant) travels like a scale; the matmul handler
divides the activation by it (`prescale_problem` says when it cannot).

Codes stored in another axis order (`QArray.order`) stay in it: a
transpose only changes the recorded order, and the int8 kernels address
the stored layout (`stored_dims`); any other consumer gets the codes back
in the logical layout (`in_logical_order`), at the cost of a transpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import numerics
from jaxquant.qarray import ActQuant, QArray, logical, unscaled
from jaxquant.spec import QuantSpec
from jaxquant.transform.interpreter import LayoutRule
from jaxquant.transform.tagged import FloatPayload

GROUP_MOVED = ("per-group weight reshaped, sliced or broadcast before its "
               "matmul")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantPayload:
  """Integer values and keepdims scales, in the layout of the current value
  (the values in storage `order` when it is not None: see the module doc)."""

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  act: ActQuant | None = None  # static activation quantization
  in_scale: jax.Array | None = None  # the values hold W * in_scale
  # The current value's axes in the order `values` stores them; None: as is.
  order: tuple[int, ...] | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  @staticmethod
  def of(q: QArray) -> "QuantPayload":
    """The payload of a `QArray`: a `GroupPayload` for per-group scales."""
    args = (q.scale, q.zero_point, q.spec, q.dtype, q.act, q.in_scale)
    if q.spec.granularity == "group":
      return GroupPayload(q.grid_values(), *args, group_dim=q.spec.group_axis)
    return QuantPayload(numerics.decode(q.stored_codes(), q.spec), *args,
                        order=q.order)

  def in_logical_order(self) -> "QuantPayload":
    """This payload with its values in the logical layout."""
    if self.order is None:
      return self
    return dataclasses.replace(self, values=logical(self.values, self.order),
                               order=None)

  def stored_axis(self, axis: int) -> int:
    """Where logical axis `axis` of the values is stored."""
    return axis if self.order is None else self.order.index(axis)

  def materialize(self):
    return unscaled(numerics.dequantize_with_scale(
        logical(self.values, self.order), self.scale, self.zero_point,
        self.dtype), self.in_scale)

  def apply(self, eqn, others, rule: LayoutRule):
    params = eqn.params
    if eqn.primitive.name == "convert_element_type":
      if not jnp.issubdtype(params["new_dtype"], jnp.floating):
        return None
      return dataclasses.replace(self, dtype=params["new_dtype"])
    # A transpose of stored values only re-records their order.
    reorder = self.order is not None and eqn.primitive.name == "transpose"
    if not reorder:
      self = self.in_logical_order()
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    moved = [None if a is None else rule.scale(params, a, in_shape, out_shape,
                                               others)
             for a in (self.scale, self.zero_point, self.in_scale)]
    if any(m is None and a is not None for m, a in zip(
        moved, (self.scale, self.zero_point, self.in_scale))):
      return None
    scale, zp, in_scale = moved
    if reorder:  # the logical axis perm[j] becomes axis j
      perm = list(params["permutation"])
      return dataclasses.replace(
          self, scale=scale, zero_point=zp, in_scale=in_scale,
          order=tuple(perm.index(a) for a in self.order))
    values = eqn.primitive.bind(self.values, *others, **params)
    return dataclasses.replace(self, values=values, scale=scale, zero_point=zp,
                               in_scale=in_scale)

  def stackable(self, length):
    """Every leaf with `length` on axis 0, for `lax.scan` to slice.

    Weight scales are broadcast along the stacked axis; see
    `ActQuant.stacked` for the activation's. Stored values keep their
    order when it leaves axis 0 first (the order recorded is the one of a
    slice).
    """
    def stack(a):
      return None if a is None else jnp.broadcast_to(
          a, (length,) + a.shape[1:])
    if self.order is not None and self.order[0] != 0:
      self = self.in_logical_order()
    order = None if self.order is None else tuple(
        a - 1 for a in self.order[1:])
    return dataclasses.replace(
        self, scale=stack(self.scale), zero_point=stack(self.zero_point),
        in_scale=stack(self.in_scale), order=order,
        act=None if self.act is None else self.act.stacked(length))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DequantizedPayload(FloatPayload):
  """A quantized weight that can only run weight-only (dequantized)."""

  reason: str = dataclasses.field(default="", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupPayload(QuantPayload):
  """A `QuantPayload` with per-group scales (`n_groups` on `group_dim`).

  It follows dtype casts only: any other layout op turns it into a
  `DequantizedPayload`, so int8 compute sees the parameter's own layout.
  """

  group_dim: int = dataclasses.field(default=0, metadata=dict(static=True))

  def expanded(self, a):
    """A per-group array broadcastable against the grouped view."""
    return None if a is None else jnp.expand_dims(a, self.group_dim + 1)

  def materialize(self):
    spec = dataclasses.replace(self.spec, group_axis=self.group_dim)
    view = numerics.grouped(self.values, spec)
    out = numerics.dequantize_with_scale(
        view, self.expanded(self.scale), self.expanded(self.zero_point),
        self.dtype)
    return unscaled(out.reshape(self.values.shape), self.in_scale)

  def apply(self, eqn, others, rule: LayoutRule):
    """Follows casts, copies and transposes (the group axis moves with the
    permutation); any other layout op dequantizes."""
    name, params = eqn.primitive.name, eqn.params
    if name == "convert_element_type" and jnp.issubdtype(
        params["new_dtype"], jnp.floating):
      return dataclasses.replace(self, dtype=params["new_dtype"])
    if not rule.regroups and name != "convert_element_type":
      perm = params.get("permutation", tuple(range(self.values.ndim)))
      move = lambda a: None if a is None else jnp.transpose(a, perm)
      return dataclasses.replace(
          self, values=eqn.primitive.bind(self.values, *others, **params),
          scale=move(self.scale), zero_point=move(self.zero_point),
          in_scale=move(self.in_scale), group_dim=list(perm).index(self.group_dim))
    moved = eqn.primitive.bind(self.materialize(), *others, **params)
    return DequantizedPayload(moved, GROUP_MOVED)

  def stackable(self, length):
    return dataclasses.replace(super().stackable(length),
                               group_dim=self.group_dim - 1)
