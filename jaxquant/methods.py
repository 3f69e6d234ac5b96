"""Post-training quantization methods beyond round-to-nearest, per rule.

A `Rule`'s `method` says how its weights are rounded; the default (None) is
round-to-nearest (RTN) on each block's range. A method states which
calibration statistics it needs (`needs`); `jq.calibrate` gathers them in the
same pass as the activation ranges and `jq.quantize_params(..., stats=)`
applies the method.

  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32),
                              method=jq.gptq())])
  stats = jq.calibrate(model.apply, params, recipe, batches)
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)

GPTQ (Frantar et al., 2022) quantizes a weight one input feature (column)
at a time and moves each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's calibration
output error, H = sum_x x^T x over the inputs x of the matmul (see
`jaxquant.gptq_core`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

HESSIAN = "hessian"  # H = sum x^T x over the contracted features


@dataclasses.dataclass(frozen=True)
class Gptq:
  """GPTQ settings (build with `jq.gptq`).

  Attributes:
    block_size: columns per lazy batch update (speed only).
    damp: added to H's diagonal, as a fraction of its mean diagonal.
    act_order: quantize columns in order of decreasing H diagonal (the
      inputs with the most energy first); the stored weight keeps its
      layout.
  """

  block_size: int = 128
  damp: float = 0.01
  act_order: bool = True
  name: ClassVar[str] = "gptq"
  needs: ClassVar[tuple[str, ...]] = (HESSIAN,)


def gptq(block_size: int = 128, damp: float = 0.01,
         act_order: bool = True) -> Gptq:
  """GPTQ for a rule: `jq.Rule(pattern, weight=..., method=jq.gptq())`.

  Each matmul weight `W` (contraction x output) is quantized column by
  column (a column: one contracted input feature), in lazy blocks of
  `block_size`: with `U` the upper Cholesky factor of `(H + lambda I)^-1`,
  `lambda = damp * mean(diag H)`, column `j`'s error `e = (w_j - q_j) /
  U_jj` is subtracted from the later columns as `e U_j,k`. A group's scale
  is taken from its columns' current values when its first column is
  reached. The result minimises the layer's output error on the
  calibration inputs far better than rounding each weight alone, most at
  4 bits and below.

  Args:
    block_size: columns per lazy batch update (a positive int).
    damp: relative dampening of H (>= 0; raise it when H is singular).
    act_order: quantize columns by decreasing `diag(H)`.

  Returns:
    A `Gptq` method for `jq.Rule(..., method=)`.

  Example:
    >>> import jaxquant as jq
    >>> rule = jq.Rule(r".*kernel", weight=jq.int4(group_size=32),
    ...                method=jq.gptq(damp=0.01))
    >>> rule.method
    Gptq(block_size=128, damp=0.01, act_order=True)
  """
  if isinstance(block_size, bool) or not isinstance(block_size, int) or (
      block_size < 1):
    raise ValueError(f"gptq(block_size={block_size!r}): use a positive int "
                     "(e.g. 128)")
  if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (
      0 <= damp < float("inf")):
    raise ValueError(f"gptq(damp={damp!r}): use a float >= 0 (e.g. 0.01)")
  if not isinstance(act_order, bool):
    raise ValueError(f"gptq(act_order={act_order!r}): use True or False")
  return Gptq(block_size, float(damp), act_order)


METHODS = (Gptq,)
