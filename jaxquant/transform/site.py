"""Where a matmul meets a parameter: `Site`, read off the dimension numbers."""

from __future__ import annotations

import dataclasses

from jaxquant import compat
from jaxquant.transform.tagged import Tagged


@dataclasses.dataclass(frozen=True)
class Site:
  """A matmul with a parameter operand, in the terms of its dimensions."""

  path: str
  primitive: str
  weight_index: int
  weight_contract: tuple[int, ...]
  weight_batch: tuple[int, ...]
  act_contract: tuple[int, ...]
  act_batch: tuple[int, ...]
  param_contract: frozenset
  weight_shape: tuple[int, ...]
  act_shape: tuple[int, ...]
  eqn_id: int  # id() of the jaxpr equation, to tell sites apart
  batch_groups: int = 1  # a convolution's batch_group_count
  # The weight went through a layout op other than a cast, copy or transpose.
  regrouped: bool = False

  @property
  def act_index(self) -> int:
    return 1 - self.weight_index


def find_site(eqn, invals) -> Site | None:
  """The parameter operand of a dot / conv, or None when there is none.

  When both operands come from parameters, the right-hand one is the weight.
  A convolution's weight must be its kernel (right-hand) operand.
  """
  tagged = [i for i, v in enumerate(invals[:2]) if isinstance(v, Tagged)]
  if not tagged:
    return None
  w = 1 if 1 in tagged else 0
  a = 1 - w
  shapes = [v.aval.shape for v in eqn.invars[:2]]
  if eqn.primitive.name == compat.DOT_GENERAL:
    contract, batch = eqn.params["dimension_numbers"]
    wc, wb, ac, ab = contract[w], batch[w], contract[a], batch[a]
  else:
    if w != 1:
      return None
    lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
    wc, wb = tuple(rhs_spec[1:]), ()
    ac, ab = tuple(lhs_spec[1:]), (lhs_spec[0],)
  axes = invals[w].axes
  contracted = frozenset().union(*(axes[d] for d in wc))
  return Site(invals[w].path, eqn.primitive.name, w, tuple(wc), tuple(wb),
              tuple(ac), tuple(ab), contracted, tuple(shapes[w]),
              tuple(shapes[a]), id(eqn),
              eqn.params.get("batch_group_count", 1), invals[w].regrouped)
