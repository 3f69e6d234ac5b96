"""A jaxpr interpreter that follows parameters into matmuls.

`evaluate(jaxpr, consts, args, handler)` runs a jaxpr like
`jax.core.eval_jaxpr`, except that values derived from a parameter leaf are
carried as `Tagged`. An equation with a tagged input is dispatched through
one table, `RULES` (primitive name -> rule), in the style of
`jax/_src/checkify.py`; primitives without a rule see plain float values.
Families are registered by helpers, one call per primitive:

  def_matmul(name)                     -> handler.on_matmul(eqn, site, rule, invals)
  def_layout(name, axes=..., scale=...) -> the payload follows the op
  def_inline(name)                     -> the call's jaxpr is evaluated inline

`checkpoint` is re-wrapped in `jax.checkpoint`, and `scan`, `while` and
`cond` are rebuilt with `lax.scan`, `lax.while_loop` and `lax.switch`,
passing tagged payloads through as pytrees. Sub-jaxprs without a tagged input
are bound unchanged (their custom derivatives survive); inlined ones lose
their custom derivative rules for the derivative of their primal computation.

A handler's side values (observed activations) leave `checkpoint` and `scan`
(stacked per step, one more leading axis); inside `while` and `cond` they are
dropped, since the number of steps or the branch is not static.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
from jax import lax

from jaxquant import compat
from jaxquant.transform.site import Site, find_site
from jaxquant.transform.tagged import AxisMap, Tagged, value

# An equation rule: (eqn, invals, handler) -> output values.
Rule = Callable[..., list]
RULES: dict[str, Rule] = {}


@dataclasses.dataclass(kw_only=True)
class Handler:
  """Decides what a matmul with a parameter operand computes.

  The interpreter finds the `site` (which operand is the parameter, its
  contracted axes) and, when the handler has a `recipe`, the matching
  `rule`, then calls `on_matmul(eqn, site, rule, invals)`; `site` is None
  when no operand is a parameter (e.g. a convolution whose input is one).
  The default computes the float matmul.

  `sides` is the handler's output channel: `emit(key, array)` appends
  `(key, depth, array)`, where `depth` counts the `scan`s the array was
  stacked by on its way out.
  """

  recipe: object = None
  sides: list = dataclasses.field(default_factory=list)

  def on_matmul(self, eqn, site: Site | None, rule, invals) -> list:
    return bind_plain(eqn, invals)

  def emit(self, key: str, x) -> None:
    self.sides.append((key, 0, x))


def bind_plain(eqn, invals) -> list:
  """Binds `eqn` on the float value of every input."""
  return compat.bind(eqn, [value(v) for v in invals])


def _float_rule(eqn, invals, handler) -> list:
  """The default: the primitive sees plain float values."""
  return bind_plain(eqn, invals)


def evaluate(jaxpr: compat.Jaxpr, consts, args, handler: Handler) -> list:
  """Evaluates `jaxpr`, dispatching tagged equations through `RULES`."""
  env: dict = {}

  def read(var):
    return var.val if isinstance(var, compat.Literal) else env[var]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(v, Tagged) for v in invals):
      outvals = RULES.get(eqn.primitive.name, _float_rule)(eqn, invals,
                                                           handler)
    else:
      outvals = compat.bind(eqn, invals)
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------
# Registration helpers


def def_rule(name: str, rule: Rule) -> None:
  RULES[name] = rule


def def_matmul(name: str) -> None:
  """A matmul primitive: handed to `handler.on_matmul`."""
  def rule(eqn, invals, handler):
    site = find_site(eqn, invals)
    recipe_rule = (handler.recipe.match(site.path)
                   if site is not None and handler.recipe is not None
                   else None)
    return handler.on_matmul(eqn, site, recipe_rule, invals)
  RULES[name] = rule


def def_inline(name: str) -> None:
  """A call-like primitive whose jaxpr is evaluated in place."""
  def rule(eqn, invals, handler):
    jaxpr, consts = compat.inline_jaxpr(eqn)
    return evaluate(jaxpr, consts, invals, handler)
  RULES[name] = rule


@dataclasses.dataclass(frozen=True)
class LayoutRule:
  """A primitive that moves or selects elements without arithmetic.

  Attributes:
    axes: `(params, axes, in_shape, out_shape) -> AxisMap` of the output.
    scale: `(params, scale, in_shape, out_shape, others) -> scale or None`:
      the same op on a keepdims scale (size 1 on axes it does not vary
      over); None when the result cannot stay that small.
    regroups: whether the op changes which elements are neighbours along an
      axis (casts, copies and transposes do not: per-group scales follow
      them).
  """

  axes: Callable[..., AxisMap]
  scale: Callable
  regroups: bool = True

  def __call__(self, eqn, invals, handler):
    tagged, others = invals[0], invals[1:]
    if not isinstance(tagged, Tagged) or any(
        isinstance(v, Tagged) for v in others):
      return bind_plain(eqn, invals)
    payload = tagged.payload.apply(eqn, others, self)
    if payload is None:
      return bind_plain(eqn, invals)
    axes = self.axes(eqn.params, tagged.axes, eqn.invars[0].aval.shape,
                     eqn.outvars[0].aval.shape)
    return [Tagged(payload, tagged.path, axes,
                   tagged.regrouped or self.regroups)]


def def_layout(name: str, *, axes, scale, regroups: bool = True) -> None:
  """A layout primitive, with both halves of following it (`LayoutRule`)."""
  RULES[name] = LayoutRule(axes, scale, regroups)


# --------------------------------------------------------------------------
# Higher-order primitives


@contextlib.contextmanager
def _side_scope(handler):
  """Collects the side values emitted inside a traced sub-function."""
  outer, handler.sides = handler.sides, []
  try:
    yield handler.sides
  finally:
    handler.sides = outer


def _emit_from(handler, inner, values, extra_depth):
  handler.sides.extend((key, depth + extra_depth, v)
                       for (key, depth, _), v in zip(inner, values))


def _plain(values):
  return [value(v) for v in values]


def _remat(eqn, invals, handler):
  jaxpr, kwargs = compat.remat_params(eqn.params)
  inner = []

  def fn(*args):
    with _side_scope(handler) as sides:
      out = _plain(evaluate(jaxpr, (), args, handler))
    inner[:] = sides
    return out, [v for _, _, v in sides]

  out, side_values = jax.checkpoint(fn, **kwargs)(*invals)
  _emit_from(handler, inner, side_values, 0)
  return out


def _scan(eqn, invals, handler):
  p = compat.scan_params(eqn.params)
  n_consts, n_carry = p.num_consts, p.num_carry
  consts = invals[:n_consts]
  carry = _plain(invals[n_consts:n_consts + n_carry])
  xs = [_stackable(v, p.length) for v in invals[n_consts + n_carry:]]
  inner = []

  def body(c, x):
    x = [_unstack(v) for v in x]
    with _side_scope(handler) as sides:
      out = _plain(evaluate(p.jaxpr, p.consts, [*consts, *c, *x], handler))
    inner[:] = sides
    return out[:n_carry], (out[n_carry:], [v for _, _, v in sides])

  carry_out, (ys, side_values) = lax.scan(
      body, carry, xs, length=p.length, reverse=p.reverse, unroll=p.unroll)
  _emit_from(handler, inner, side_values, 1)
  return [*carry_out, *ys]


def _stackable(v, length):
  """A tagged scan input whose payload can be sliced along axis 0."""
  if not isinstance(v, Tagged):
    return v
  return Tagged(v.payload.stackable(length), v.path, v.axes, v.regrouped)


def _unstack(v):
  if not isinstance(v, Tagged):
    return v
  return Tagged(v.payload, v.path, v.axes[1:], v.regrouped)


def _while(eqn, invals, handler):
  p = compat.while_params(eqn.params)
  nc, nb = p.cond_nconsts, p.body_nconsts
  cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]

  def cond_fn(c):
    with _side_scope(handler):
      return value(evaluate(*p.cond, [*cond_consts, *c], handler)[0])

  def body_fn(c):
    with _side_scope(handler):  # a loop of unknown length: not observed
      return _plain(evaluate(*p.body, [*body_consts, *c], handler))

  return lax.while_loop(cond_fn, body_fn, _plain(invals[nc + nb:]))


def _cond(eqn, invals, handler):
  index, ops = value(invals[0]), invals[1:]

  def branch(jaxpr_consts):
    def run(*args):
      with _side_scope(handler):  # branches differ: not observed
        return _plain(evaluate(*jaxpr_consts, list(args), handler))
    return run

  branches = [branch(b) for b in compat.cond_branches(eqn.params)]
  return lax.switch(index, branches, *ops)


def_matmul(compat.DOT_GENERAL)
def_matmul(compat.CONV)
for _name in compat.INLINE_CALLS:
  def_inline(_name)
for _name in compat.REMAT:
  def_rule(_name, _remat)
def_rule("scan", _scan)
def_rule("while", _while)
def_rule("cond", _cond)
