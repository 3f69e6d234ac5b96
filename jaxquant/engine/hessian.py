"""The input Hessian of a matmul, `H = sum x^T x`, in the weight's terms.

GPTQ needs, per quantized weight, the Gram matrix of the activation rows
that meet it: `H[k, l] = sum_rows x[row, k] x[row, l]` over the contracted
features `k, l`, ordered like the weight's contracted axes (ascending
parameter axes, row-major). `x`'s contracted dimensions are matched to the
weight's through the matmul's dimension numbers and the layout ops between
the parameter and the matmul (a reshape merging or splitting contracted
axes is taken as row-major, as `jnp.reshape` does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant import compat
from jaxquant.transform.site import Site


class HessianKey(NamedTuple):
  """Names a Hessian side value: the weight `path` and the parameter axes
  the matmul's weight operand covers (the others were sliced off by a
  `scan`: one Hessian per stacked layer)."""

  path: str
  covered: frozenset


def feature_order(site: Site, axes) -> tuple[int, ...]:
  """The activation's contracted dimensions in the weight's feature order.

  `axes` maps each dimension of the weight operand to the parameter axes it
  is made of. Raises ValueError (naming the weight) where the contracted
  features cannot be lined up with the parameter's.
  """
  where = f"{site.path}: GPTQ"
  if site.primitive != compat.DOT_GENERAL:
    raise ValueError(f"{where} supports dot_general matmuls; this weight "
                     "feeds a convolution. Quantize it with a rule without "
                     "method= (round-to-nearest)")
  if site.weight_batch:
    raise ValueError(f"{where} needs a weight without batch dimensions in "
                     "its dot_general; quantize it without method=")
  keyed = []
  for w_dim, a_dim in zip(site.weight_contract, site.act_contract):
    param_axes = sorted(axes[w_dim])
    if not param_axes:
      raise ValueError(f"{where}: a contracted dimension of the weight is a "
                       "broadcast, not a parameter axis; quantize it "
                       "without method=")
    keyed.append(((param_axes[0], w_dim), a_dim))
  return tuple(a for _, a in sorted(keyed))


def gram(x: jax.Array, site: Site, axes) -> jax.Array:
  """`x^T x` (float32) over every row of `x`, features in weight order."""
  order = feature_order(site, axes)
  rest = [d for d in range(x.ndim) if d not in order]
  k = 1
  for d in order:
    k *= x.shape[d]
  rows = jnp.transpose(x, (*rest, *order)).reshape(-1, k)
  rows = rows.astype(jnp.float32)
  return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
