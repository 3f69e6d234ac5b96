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

Three methods exist:

  jq.gptq()          error compensation through the inputs' Hessian
  jq.awq()           activation-aware per-input-feature weight scaling
  jq.smoothquant()   moves activation outliers into the weight (W8A8)

GPTQ (Frantar et al., 2022) quantizes a weight one input feature (column)
at a time and moves each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's calibration
output error, H = sum_x x^T x over the inputs x of the matmul (see
`jaxquant.gptq_core`). AWQ (Lin et al., 2023) and SmoothQuant (Xiao et al.,
2022) store `Q(W * s)` and divide the activation by `s` in the engine (see
`jaxquant.engine.prescale`); they differ in how they choose `s`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

HESSIAN = "hessian"  # H = sum x^T x over the contracted features
FEATURES = "features"  # per input feature: mean |x|, min x, max x


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
  prescales: ClassVar[bool] = False  # stores an in_scale


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


@dataclasses.dataclass(frozen=True)
class Awq:
  """AWQ settings (build with `jq.awq`).

  Attributes:
    grid: number of exponents alpha = 0, 1/grid, ..., (grid-1)/grid tried.
  """

  grid: int = 20
  name: ClassVar[str] = "awq"
  needs: ClassVar[tuple[str, ...]] = (HESSIAN, FEATURES)
  prescales: ClassVar[bool] = True


def awq(grid: int = 20) -> Awq:
  """AWQ for a rule: `jq.Rule(pattern, weight=..., method=jq.awq())`.

  Input features that carry large activations matter most to the output;
  AWQ scales them up in the weight before rounding, so their relative
  rounding error shrinks, and divides the activation by the same factor:
  per input feature `k`,

    s_k = mean|x_k|^alpha / sqrt(max_j mean|x_j|^alpha *
                                 min_j mean|x_j|^alpha),

  and the stored weight is `Q(W * s)` with `s` as its `in_scale`. `alpha`
  is searched over `grid` values in [0, 1), per layer (per scan-stacked
  layer), minimising the calibration output error
  `tr(D^T H D)`, `D = Q(W * s) / s - W`, `H = sum x^T x` -- the same as
  `sum_x |x Q(W*s)/s - x W|^2` over the calibration rows, without storing
  them. alpha = 0 is round-to-nearest, so AWQ never does worse than RTN on
  the calibration data.

  Args:
    grid: how many alphas to try (a positive int; 1 tries only RTN).

  Returns:
    An `Awq` method for `jq.Rule(..., method=)`.

  Example:
    >>> import jaxquant as jq
    >>> jq.Rule(r".*kernel", weight=jq.int4(group_size=32),
    ...         method=jq.awq(grid=10)).method
    Awq(grid=10)
  """
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
    raise ValueError(f"awq(grid={grid!r}): use a positive int (e.g. 20)")
  return Awq(grid)


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
  """SmoothQuant settings (build with `jq.smoothquant`).

  Attributes:
    alpha: migration strength in [0, 1]: how much of the activation's
      range moves into the weight.
  """

  alpha: float = 0.5
  name: ClassVar[str] = "smoothquant"
  needs: ClassVar[tuple[str, ...]] = (FEATURES,)
  prescales: ClassVar[bool] = True


def smoothquant(alpha: float = 0.5) -> SmoothQuant:
  """SmoothQuant for a rule: `method=jq.smoothquant(alpha=0.5)`.

  A few input features with large activations (outliers) force a coarse
  per-tensor activation scale on all of them. SmoothQuant divides each
  input feature `k` of the activation by

    s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha)

  and multiplies the weight's row `k` by it, which leaves `x @ W` unchanged
  in exact arithmetic and balances the two ranges; it is meant for W8A8
  with static per-tensor activation scales. The static range is then
  `[min_k min x_k / s_k, max_k max x_k / s_k]` from calibration (the
  per-feature min / max, whatever the observer).

  Args:
    alpha: a float in [0, 1] (0: only the weight's range counts, so the
      activation keeps its outliers; 1: the activation becomes flat).

  Returns:
    A `SmoothQuant` method for `jq.Rule(..., method=)`.

  Example:
    >>> import jaxquant as jq
    >>> jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8(
    ...     granularity="tensor"), method=jq.smoothquant(0.5)).method
    SmoothQuant(alpha=0.5)
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
      0 <= alpha <= 1):
    raise ValueError(f"smoothquant(alpha={alpha!r}): use a float in [0, 1] "
                     "(e.g. 0.5)")
  return SmoothQuant(float(alpha))


METHODS = (Gptq, Awq, SmoothQuant)
