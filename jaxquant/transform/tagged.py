"""Values the interpreter carries for parameters: `Tagged` and payloads.

A value derived from a parameter leaf by layout-only ops is carried as
`Tagged`: the parameter's path, an `AxisMap` from the value's dimensions back
to the parameter's axes, and a mode-specific payload (the float value, or
integer values with scales) that knows how to follow a layout op.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

# For each dimension of a value, the set of the parameter's axes it is made
# of (a reshape can merge several; a broadcast adds dimensions with none).
AxisMap = tuple[frozenset, ...]


def identity_map(ndim: int) -> AxisMap:
  return tuple(frozenset({i}) for i in range(ndim))


class Payload(Protocol):
  """What a `Tagged` value carries; a pytree."""

  def materialize(self) -> jax.Array:
    """The float value."""

  def apply(self, eqn, others, rule) -> "Payload | None":
    """The payload after layout op `eqn` (`rule` is its `LayoutRule`, with
    the matching move of a keepdims scale); None if it cannot follow."""

  def stackable(self, length: int) -> "Payload":
    """A payload whose every leaf has `length` on axis 0 (for `lax.scan`);
    its static data describes the per-step slice the scan body sees."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tagged:
  """A value derived from parameter `path` by layout ops only."""

  payload: Any
  path: str = dataclasses.field(metadata=dict(static=True))
  axes: AxisMap = dataclasses.field(metadata=dict(static=True))
  # Whether a layout op other than a cast, copy or transpose changed which
  # elements are neighbours along an axis (per-group scales cannot follow).
  regrouped: bool = dataclasses.field(default=False,
                                      metadata=dict(static=True))

  def value(self) -> jax.Array:
    return self.payload.materialize()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatPayload:
  """The float value itself (analysis, fake-quant and observe modes)."""

  x: jax.Array

  def materialize(self):
    return self.x

  def apply(self, eqn, others, rule):
    return dataclasses.replace(
        self, x=eqn.primitive.bind(self.x, *others, **eqn.params))

  def stackable(self, length):
    return self


def value(v):
  """A plain array for any interpreter value."""
  return v.value() if isinstance(v, Tagged) else v


def is_tagged(v) -> bool:
  return isinstance(v, Tagged)
