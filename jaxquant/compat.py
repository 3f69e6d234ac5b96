"""The one place jaxquant reaches into JAX internals.

The transform reads jaxprs: equation contexts, bind parameters, and the
parameter layouts of higher-order primitives, none of which is a public,
stable API. Everything version-dependent lives here, each with a note on
which JAX versions spell it that way. Supported and tested: jax 0.10.2
(oldest) to 0.12.x (newest).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend import core

Jaxpr = core.Jaxpr
ClosedJaxpr = core.ClosedJaxpr
Literal = core.Literal
jaxprs_in_params = core.jaxprs_in_params

# Matmul primitives; their dimension numbers are the documented arguments of
# `lax.dot_general` / `lax.conv_general_dilated` (stable across versions).
DOT_GENERAL = "dot_general"
CONV = "conv_general_dilated"

# Call-like primitives evaluated inline, with the parameter holding their
# jaxpr. `jit` since jax 0.7 (before: `pjit`); `custom_vjp_call` with
# `call_jaxpr` since jax 0.7 (before: `custom_vjp_call_jaxpr` with
# `fun_jaxpr`); `closed_call` / `core_call` / `custom_jvp_call` unchanged.
INLINE_CALLS = {
    "jit": "jaxpr", "pjit": "jaxpr",
    "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
}

# `jax.checkpoint` binds `remat2` (jax 0.4 to 0.12); `checkpoint` and `remat`
# are older spellings.
REMAT = ("remat2", "checkpoint", "remat")

# `x.copy()` binds `copy` (0.10 to 0.12); `copy_p` is an older spelling.
COPY = ("copy", "copy_p")


def bind(eqn, invals: list) -> list:
  """Binds `eqn`'s primitive to new inputs, in the equation's context.

  `get_bind_params` turns stored sub-jaxprs back into what `bind` takes;
  `eqn.ctx.manager` restores name stacks and compute-on context (both since
  jax 0.4.x).
  """
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def open_jaxpr(closed) -> tuple[Jaxpr, tuple]:
  """(jaxpr, consts) of a `Jaxpr`, a `ClosedJaxpr` or a thunk of either."""
  closed = closed() if callable(closed) else closed
  if isinstance(closed, ClosedJaxpr):
    return closed.jaxpr, tuple(closed.consts)
  return closed, ()


def inline_jaxpr(eqn) -> tuple[Jaxpr, tuple]:
  return open_jaxpr(eqn.params[INLINE_CALLS[eqn.primitive.name]])


@dataclasses.dataclass(frozen=True)
class ScanParams:
  """`lax.scan`'s equation parameters, in one spelling."""

  jaxpr: Jaxpr
  consts: tuple
  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


def scan_params(params: dict) -> ScanParams:
  """Reads a `scan` equation.

  jax <= 0.11: `jaxpr` is a ClosedJaxpr, with `num_consts` / `num_carry`.
  jax 0.12: `jaxpr` is an open Jaxpr and the operands are described by a
  flat tree `ft_in` of three groups (consts, carry, xs), possibly nested.
  """
  jaxpr, consts = open_jaxpr(params["jaxpr"])
  if "num_consts" in params:
    n_consts, n_carry = params["num_consts"], params["num_carry"]
  else:
    groups = params["ft_in"].unpack()
    n_consts, n_carry = (len(list(g.vals)) for g in groups[:2])
  return ScanParams(jaxpr, consts, n_consts, n_carry, params["length"],
                    params["reverse"], params["unroll"])


@dataclasses.dataclass(frozen=True)
class WhileParams:
  cond: tuple[Jaxpr, tuple]
  body: tuple[Jaxpr, tuple]
  cond_nconsts: int
  body_nconsts: int


def while_params(params: dict) -> WhileParams:
  """Reads a `while` equation (same spelling in jax 0.10 to 0.12)."""
  return WhileParams(open_jaxpr(params["cond_jaxpr"]),
                     open_jaxpr(params["body_jaxpr"]),
                     params["cond_nconsts"], params["body_nconsts"])


def cond_branches(params: dict) -> list[tuple[Jaxpr, tuple]]:
  """A `cond` equation's branches; its first operand is the branch index."""
  return [open_jaxpr(b) for b in params["branches"]]


def remat_params(params: dict) -> tuple[Jaxpr, dict]:
  """(jaxpr, keyword arguments for `jax.checkpoint`) of a remat equation."""
  jaxpr, _ = open_jaxpr(params["jaxpr"])
  return jaxpr, dict(prevent_cse=params.get("prevent_cse", True),
                     policy=params.get("policy"))


def sub_jaxprs(eqn) -> list[Jaxpr]:
  """Every jaxpr nested in an equation's parameters (open form)."""
  return [open_jaxpr(j)[0] for j in jaxprs_in_params(eqn.params)]


def is_tracer(x) -> bool:
  """Whether `x` is abstract (under `jit`, `grad`, `eval_shape`...).

  `jax.core.Tracer` is public in jax 0.10 to 0.12; concrete arrays are
  `jax.Array` but not tracers.
  """
  return isinstance(x, jax.core.Tracer)
