"""The input Hessian of a matmul, `H = sum x^T x`, in the weight's terms.

GPTQ and AWQ need, per quantized weight, the Gram matrix of the activation rows
that meet it: `H[k, l] = sum_rows x[row, k] x[row, l]` over the contracted
features `k, l`, ordered like the weight's contracted axes (ascending
parameter axes, row-major). `x`'s contracted dimensions are matched to the
weight's through the matmul's dimension numbers and the layout ops between
the parameter and the matmul (a reshape merging or splitting contracted
axes is taken as row-major, as `jnp.reshape` does). A convolution's rows
are its input patches, one per output position (im2col).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant import compat
from jaxquant.transform.site import Site


class HessianKey(NamedTuple):
  """Names a Hessian side value: the weight `path`, the parameter axes the
  matmul's weight operand covers (the others were sliced off by a `scan`:
  one Hessian per stacked layer) and its `source`: which activation of the
  trace (numbered in order of first use) in which feature order, so that
  weights whose Hessians are equal (q, k and v reading one input) can share
  one accumulator."""

  path: str
  covered: frozenset
  source: tuple = ()
  # The parameter axes its features run along (all contracted ones).
  axes: tuple = ()


def feature_order(site: Site, axes, dims) -> tuple[int, ...]:
  """Positions in `dims` (the activation's contracted features, paired with
  the weight's contracted dimensions `site.weight_contract` for a dot, or
  the kernel's (in-features, *spatial) for a conv) in the weight's feature
  order. Raises ValueError (naming the weight) where the features cannot be
  lined up with the parameter's axes."""
  keyed = []
  for i, w_dim in enumerate(dims):
    param_axes = sorted(axes[w_dim])
    if not param_axes:
      raise ValueError(f"{site.path}: method=: a contracted dimension of the "
                       "weight is a broadcast, not a parameter axis; "
                       "quantize it without method=")
    keyed.append(((param_axes[0], w_dim), i))
  return tuple(i for _, i in sorted(keyed))


def rows_of(x, order, contracted):
  """`x` as (rows, features): `contracted` dims last, in `order`."""
  dims = [contracted[i] for i in order]
  rest = [d for d in range(x.ndim) if d not in dims]
  k = int(np.prod([x.shape[d] for d in dims], dtype=int))
  return jnp.transpose(x, (*rest, *dims)).reshape(-1, k)


def check_supported(site: Site, params) -> None:
  """Raises ValueError naming the weight where its matmul's statistics
  cannot be lined up with it: a weight with dot_general batch dimensions,
  or a grouped / depthwise convolution."""
  if site.weight_batch:
    raise ValueError(f"{site.path}: method= needs a weight without batch "
                     "dimensions in its dot_general; quantize it without "
                     "method=")
  if site.primitive != compat.DOT_GENERAL and (
      params["feature_group_count"] != 1 or params["batch_group_count"] != 1):
    raise ValueError(f"{site.path}: its method needs a dense convolution (one "
                     "feature group); quantize this grouped or depthwise conv "
                     "without method=")


def _conv_patches(x, site: Site, params):
  """The conv input as patches, (..., in-features, *window) per output
  position; the kernel dimensions these features pair with."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  window = [site.weight_shape[d] for d in rhs_spec[2:]]
  patches = lax.conv_general_dilated_patches(
      x, window, params["window_strides"], params["padding"],
      params["lhs_dilation"], params["rhs_dilation"],
      params["dimension_numbers"], precision=lax.Precision.HIGHEST)
  # Patch features come in-feature major, then the window in rhs order.
  feature = out_spec[1]
  split = patches.shape[:feature] + (x.shape[lhs_spec[1]], *window) + (
      patches.shape[feature + 1:])
  contracted = tuple(range(feature, feature + 1 + len(window)))
  return patches.reshape(split), contracted, tuple(rhs_spec[1:])


def source(index: int, site: Site, axes) -> tuple:
  """A `HessianKey.source`: activation `index`, and its features' order
  (a dot's contracted activation dims in the weight's feature order); ()
  for a convolution, whose patches are never shared."""
  if site.primitive != compat.DOT_GENERAL:
    return ()
  order = feature_order(site, axes, site.weight_contract)
  return (index, tuple(site.act_contract[i] for i in order))


def gram(x: jax.Array, site: Site, axes, params) -> jax.Array:
  """`x^T x` (float32) over every row of `x`, features in weight order.

  Args:
    x: the activation operand of the matmul.
    site: the matmul (`jaxquant.transform.Site`).
    axes: per dimension of the weight operand, the parameter axes it holds.
    params: the matmul equation's params (a conv's window and strides).
  """
  check_supported(site, params)
  if site.primitive == compat.DOT_GENERAL:
    contracted, dims = site.act_contract, site.weight_contract
  else:
    x, contracted, dims = _conv_patches(x, site, params)
  rows = rows_of(x.astype(jnp.float32), feature_order(site, axes, dims),
               contracted)
  return jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
