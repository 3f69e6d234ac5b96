"""A jaxpr interpreter that follows parameters into matmuls.

`evaluate(jaxpr, consts, args, handler)` runs a jaxpr like
`jax.core.eval_jaxpr`, except that values derived from a parameter leaf are
carried as `Tagged`: the parameter's path, an `AxisMap` from the value's
dimensions back to the parameter's axes, and a mode-specific `payload` (the
float value, or int values with scales). Layout-only ops transform the
payload; `dot_general` and `conv_general_dilated` with a tagged operand are
handed to `handler.dot`; every other primitive sees plain float values.

Sub-jaxprs without a tagged input are bound unchanged (their custom
derivatives survive). Those with one are re-entered: `pjit`, `closed_call`,
`custom_jvp_call` and `custom_vjp_call` are inlined (their custom derivative
rules are then replaced by the derivative of their primal computation),
`checkpoint` is re-wrapped in `jax.checkpoint`, and `scan`, `while` and
`cond` are rebuilt with `lax.scan`, `lax.while_loop` and `lax.switch`,
passing tagged payloads through as pytrees. Side values a handler emits
(observed activations) leave `checkpoint` and `scan` (stacked per step);
inside `while` and `cond` they are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Protocol

import jax
from jax import lax
from jax.extend import core

from jaxquant import layout

DOT_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr":
            "fun_jaxpr"}


class Payload(Protocol):
  """What a `Tagged` value carries; a pytree."""

  def materialize(self) -> jax.Array: ...

  def apply(self, eqn, others) -> "Payload | None": ...

  def stackable(self, length: int) -> "Payload":
    """A payload whose every leaf has `length` on axis 0 (for `lax.scan`);
    its static data describes the per-step slice the scan body sees."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tagged:
  """A value derived from parameter `path` by layout ops only."""

  payload: Any
  path: str = dataclasses.field(metadata=dict(static=True))
  axes: layout.AxisMap = dataclasses.field(metadata=dict(static=True))
  # Whether a layout op other than a dtype cast moved the elements.
  moved: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def value(self) -> jax.Array:
    return self.payload.materialize()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatPayload:
  """The float value itself (analysis, fake-quant and observe modes)."""

  x: jax.Array

  def materialize(self):
    return self.x

  def apply(self, eqn, others):
    return dataclasses.replace(
        self, x=eqn.primitive.bind(self.x, *others, **eqn.params))

  def stackable(self, length):
    return self


class Handler(Protocol):
  """Rewrites matmuls. A handler may also keep `sides`, a list of
  `(key, depth, array)` it emits while evaluating (the observe mode does);
  values emitted inside a `scan` come out stacked, with `depth` + 1."""

  def dot(self, eqn, invals: list) -> list: ...


@contextlib.contextmanager
def _side_scope(handler):
  """Collects the side values emitted inside a traced sub-function."""
  outer = getattr(handler, "sides", None)
  inner: list = []
  if outer is not None:
    handler.sides = inner
  try:
    yield inner
  finally:
    if outer is not None:
      handler.sides = outer


def _emit(handler, inner, values, extra_depth):
  if inner:
    handler.sides.extend((key, depth + extra_depth, v) for (key, depth, _), v
                         in zip(inner, values))


def value(v):
  """A plain array for any interpreter value."""
  return v.value() if isinstance(v, Tagged) else v


def evaluate(jaxpr: core.Jaxpr, consts, args, handler: Handler) -> list:
  env: dict = {}

  def read(var):
    return var.val if isinstance(var, core.Literal) else env[var]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(v, Tagged) for v in invals):
      outvals = _tagged_eqn(eqn, invals, handler)
    else:
      outvals = _bind(eqn, invals)
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _tagged_eqn(eqn, invals, handler):
  name = eqn.primitive.name
  if name in DOT_PRIMITIVES:
    return handler.dot(eqn, invals)
  if name in layout.LAYOUT_PRIMITIVES and isinstance(invals[0], Tagged) and (
      not any(isinstance(v, Tagged) for v in invals[1:])):
    out = _follow_layout(eqn, invals[0], invals[1:])
    if out is not None:
      return [out]
  if name in _INLINED:
    closed = eqn.params[_INLINED[name]]
    closed = closed() if callable(closed) else closed
    if isinstance(closed, core.ClosedJaxpr):
      return evaluate(closed.jaxpr, closed.consts, invals, handler)
    return evaluate(closed, (), invals, handler)
  if name in ("checkpoint", "remat2", "remat"):
    return _remat(eqn, invals, handler)
  if name == "scan":
    return _scan(eqn, invals, handler)
  if name == "while":
    return _while(eqn, invals, handler)
  if name == "cond":
    return _cond(eqn, invals, handler)
  return _bind(eqn, [value(v) for v in invals])


def _follow_layout(eqn, tagged: Tagged, others):
  in_shape = eqn.invars[0].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  payload = tagged.payload.apply(eqn, others)
  if payload is None:
    return None
  axes = layout.map_axes(eqn.primitive.name, eqn.params, tagged.axes,
                         in_shape, out_shape)
  moved = tagged.moved or eqn.primitive.name != "convert_element_type"
  return Tagged(payload, tagged.path, axes, moved)


def _plain(values):
  return [value(v) for v in values]


def _remat(eqn, invals, handler):
  jaxpr = eqn.params["jaxpr"]
  inner = []

  def fn(*args):
    with _side_scope(handler) as sides:
      out = _plain(evaluate(jaxpr, (), args, handler))
    inner[:] = sides
    return out, [v for _, _, v in sides]

  out, side_values = jax.checkpoint(
      fn, prevent_cse=eqn.params.get("prevent_cse", True),
      policy=eqn.params.get("policy"))(*invals)
  _emit(handler, inner, side_values, 0)
  return out


def _scan(eqn, invals, handler):
  p = eqn.params
  closed, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  carry = _plain(invals[n_consts:n_consts + n_carry])
  xs = [_stackable(v, p["length"]) for v in invals[n_consts + n_carry:]]

  inner = []

  def body(c, x):
    x = [_unstack(v) for v in x]
    with _side_scope(handler) as sides:
      out = _plain(evaluate(closed.jaxpr, closed.consts, [*consts, *c, *x],
                            handler))
    inner[:] = sides
    return out[:n_carry], (out[n_carry:], [v for _, _, v in sides])

  carry_out, (ys, side_values) = lax.scan(
      body, carry, xs, length=p["length"], reverse=p["reverse"],
      unroll=p["unroll"])
  _emit(handler, inner, side_values, 1)
  return [*carry_out, *ys]


def _stackable(v, length):
  """A tagged scan input whose payload can be sliced along axis 0."""
  if not isinstance(v, Tagged):
    return v
  return Tagged(v.payload.stackable(length), v.path, v.axes, v.moved)


def _unstack(v):
  if not isinstance(v, Tagged):
    return v
  return Tagged(v.payload, v.path, v.axes[1:], v.moved)


def _while(eqn, invals, handler):
  p = eqn.params
  cond, body = p["cond_jaxpr"], p["body_jaxpr"]
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
  init = _plain(invals[nc + nb:])

  def cond_fn(c):
    with _side_scope(handler):
      return value(evaluate(cond.jaxpr, cond.consts, [*cond_consts, *c],
                            handler)[0])

  def body_fn(c):
    with _side_scope(handler):  # a loop of unknown length: not observed
      return _plain(evaluate(body.jaxpr, body.consts, [*body_consts, *c],
                             handler))

  return lax.while_loop(cond_fn, body_fn, init)


def _cond(eqn, invals, handler):
  index, ops = value(invals[0]), invals[1:]

  def branch(closed):
    def run(*args):
      with _side_scope(handler):  # branches differ: not observed
        return _plain(evaluate(closed.jaxpr, closed.consts, list(args),
                               handler))
    return run

  return lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops)
