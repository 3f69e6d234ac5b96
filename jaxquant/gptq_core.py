"""GPTQ on one matrix: column-by-column rounding with error feedback.

GPTQ (Frantar et al. 2022) quantizes a weight W (N, K) (rows: output
channels; columns: contracted features) one column at a time and spreads
each column's rounding error over the columns not yet quantized, so that
the layer output on the calibration inputs x moves as little as possible:
it greedily minimises ||x W_hat^T - x W^T||_F^2 with H = sum x^T x.

Steps (tests/gptq_reference.py follows them with plain loops):

  1. Dead columns (no input reaches them): H_ii = 0 -> H_ii = 1. They are
     rounded plainly; their weights are kept.
  2. Damping: H += damp * mean(diag H) * I.
  3. act_order: perm = stable argsort(-diag H), H's diagonal from step 1
     (damping adds one constant, but could round two values into a tie);
     W's columns, H's rows and columns and the group ids are permuted.
     Otherwise perm is the identity.
  4. U = upper Cholesky factor of H^-1 (H^-1 = U^T U); ok = all(U finite).
  5. For j = 0 .. K-1, in blocks [b, e) of `block_size` columns:
       if j is the first column of its group g (in this order):
         (lo_g, hi_g) = range of W[:, columns of g], per row (per tensor:
           over rows too): [-absmax, absmax] if symmetric, else [min, max];
           a fixed `spec.clip` range instead when given
       q_j = quantize_dequantize(W[:, j], scale_from_range(lo_g, hi_g))
       E_j = (W[:, j] - q_j) / U_jj
       W[:, j] = q_j;  W[:, j+1:e] -= E_j U[j, j+1:e]
     and at the end of the block: W[:, e:] -= E[:, b:e] U[b:e, e:].
     A group's range is read from the working W: its columns in the block
     carry every update so far, later ones the updates of earlier blocks.
  6. W_hat = W with perm undone; lo, hi per original group id.

U comes from H without forming H^-1: with J the reversal permutation and
J H J = L L^T, H = V V^T for the upper V = J L J, so U = V^-1: the same
factor as chol(H^-1)^T, without rounding through an explicit H^-1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant import compat, numerics
from jaxquant.spec import QuantSpec

_HIGHEST = lax.Precision.HIGHEST


def gptq_core(w, h, group_ids, spec: QuantSpec, *, block_size: int = 128,
              damp: float = 0.01, act_order: bool = False,
              per_tensor: bool = False):
  """GPTQ-quantizes `w` against the Hessian `h` (see the module docstring).

  Args:
    w: (N, K) weight; rows are output channels, columns contracted features.
    h: (K, K) `sum x^T x` over calibration inputs (symmetric PSD).
    group_ids: (K,) concrete ints 0..G-1, the scale group of each column
      (all zeros: per channel); every group must have a column.
    spec: the grid (`bits`, `signed`, `symmetric`, `clip`, `format`);
      its granularity is ignored: `group_ids` and `per_tensor` say it.
    block_size: columns per lazy batch update.
    damp: dampening, relative to the mean of diag(h).
    act_order: quantize columns by decreasing diag(h).
    per_tensor: one range per group shared by all rows.

  Returns:
    (w_hat, lo, hi, ok): the quantize-dequantized (N, K) weight in the
    original column order; the (N, G) ((1, G) per tensor) range of each
    block, whose `scale_from_range` gives back w_hat's codes; and a bool
    scalar, False when the damped Hessian is not positive definite.
  """
  if spec.rounding == "stochastic":
    raise ValueError("GPTQ compensates each column's rounding error "
                     "deterministically; use rounding='nearest'")
  if spec.clip == "mse":
    raise ValueError("GPTQ picks each group's range as its columns are "
                     "reached; clip='mse' is not supported")
  if compat.is_tracer(group_ids):
    raise ValueError("group_ids must be concrete (a NumPy array known at "
                     "trace time); close over it instead of passing it "
                     "through jax.jit")
  ids = np.asarray(group_ids)
  k = np.shape(w)[-1]
  if ids.shape != (k,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"group_ids: need {k} ints (one per column of w of "
                     f"shape {np.shape(w)}), got {ids.dtype}{ids.shape}")
  if np.ndim(w) != 2 or np.shape(h) != (k, k):
    raise ValueError(f"need w (N, K) and h (K, K), got {np.shape(w)} and "
                     f"{np.shape(h)}")
  if k == 0 or ids.min() < 0 or not np.bincount(ids).all():
    raise ValueError("group_ids must number the groups 0..G-1, each with "
                     "at least one column")
  if block_size < 1:
    raise ValueError(f"block_size={block_size}; need a positive int")
  return _gptq(w, h, tuple(ids.tolist()), spec, int(block_size),
               float(damp), bool(act_order), bool(per_tensor))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _gptq(w, h, ids, spec, block_size, damp, act_order, per_tensor):
  ids = np.asarray(ids, np.int32)
  (n, k), groups = w.shape, int(ids.max()) + 1
  b = min(block_size, k)
  kp = -(-k // b) * b   # padded to whole blocks; pad columns come last
  w = jnp.asarray(w, jnp.float32)
  h = jnp.asarray(h, jnp.float32)

  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  diag = jnp.where(dead, 1.0, diag)
  h = h + damp * jnp.mean(diag) * jnp.eye(k, dtype=jnp.float32)
  if act_order:
    perm = jnp.argsort(-diag, stable=True)
    inv = jnp.argsort(perm)
    w, h, gid = w[:, perm], h[perm][:, perm], jnp.asarray(ids)[perm]
  else:
    inv, gid = np.arange(k), ids
  u = _inverse_cholesky_upper(h)
  ok = jnp.all(jnp.isfinite(u))

  # Pad columns: zero weights, unit pivots, no group's first column.
  w = jnp.pad(w, ((0, 0), (0, kp - k)))
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.arange(kp) >= k).astype(jnp.float32)
  gid = jnp.pad(jnp.asarray(gid), (0, kp - k))

  # Each group's columns, as positions in processing order (padded table).
  size = np.bincount(ids).max()
  members = np.zeros((groups, size), np.int32)
  valid = np.zeros((groups, size), bool)
  for g in range(groups):
    cols = np.flatnonzero(ids == g)
    members[g, :cols.size], valid[g, :cols.size] = cols, True
  pos = jnp.asarray(inv)[members]
  first = jnp.min(jnp.where(valid, pos, kp), axis=1)

  rows = 1 if per_tensor else n
  # Ranges fixed up front: a clip, or one group first reached at j = 0
  # (under vmap with act_order, the per-column cond would run every time).
  fixed = isinstance(spec.clip, tuple) or groups == 1
  if isinstance(spec.clip, tuple):
    lo = jnp.full((rows, groups), spec.clip[0], jnp.float32)
    hi = jnp.full((rows, groups), spec.clip[1], jnp.float32)
  elif groups == 1:
    lo, hi = (r[:, None] for r in _range(w[:, :k], True, spec, per_tensor))
  else:
    lo = hi = jnp.zeros((rows, groups), jnp.float32)

  def group_range(w, g):
    vals = jnp.take(w, pos[g], axis=1)
    return _range(vals, jnp.asarray(valid)[g], spec, per_tensor)

  def column(i, carry, start):
    w, err, lo, hi = carry
    j = start + i
    g = gid[j]
    if not fixed:
      def fresh(ranges):
        new = group_range(w, g)
        return tuple(lax.dynamic_update_slice(r, x[:, None], (0, g))
                     for r, x in zip(ranges, new))
      lo, hi = lax.cond(first[g] == j, fresh, lambda r: r, (lo, hi))
    scale, zero_point = numerics.scale_from_range(lo[:, g], hi[:, g], spec)
    blk = lax.dynamic_slice(w, (0, start), (n, b))
    col = lax.dynamic_index_in_dim(blk, i, axis=1, keepdims=False)
    q = numerics.quantize_dequantize(col, scale, zero_point, spec)
    e = (col - q) / u[j, j]
    later = jnp.arange(b) > i
    u_row = lax.dynamic_slice(u, (j, start), (1, b))
    blk = jnp.where(later, blk - e[:, None] * u_row, blk)
    blk = lax.dynamic_update_slice(blk, q[:, None], (0, i))
    w = lax.dynamic_update_slice(w, blk, (0, start))
    err = lax.dynamic_update_slice(err, e[:, None], (0, i))
    return w, err, lo, hi

  def block(t, carry):
    w, lo, hi = carry
    start = t * b
    err = jnp.zeros((n, b), jnp.float32)
    w, err, lo, hi = lax.fori_loop(
        0, b, functools.partial(column, start=start), (w, err, lo, hi))
    # Lazy batch update of the columns after the block (U is upper
    # triangular: rows of the block reach only columns >= start).
    u_rows = lax.dynamic_slice(u, (start, 0), (b, kp))
    update = jnp.matmul(err, u_rows, precision=_HIGHEST)
    w = w - jnp.where(jnp.arange(kp) >= start + b, update, 0.0)
    return w, lo, hi

  w, lo, hi = lax.fori_loop(0, kp // b, block, (w, lo, hi))
  w = w[:, :k]
  return (w[:, inv] if act_order else w), lo, hi, ok


def _inverse_cholesky_upper(h):
  """U upper with H^-1 = U^T U (NaN where H is not positive definite)."""
  flip = h[::-1, ::-1]
  v = jnp.linalg.cholesky(flip)[::-1, ::-1]   # H = V V^T, V upper
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  return lax.linalg.triangular_solve(v, eye, left_side=True, lower=False)


def _range(vals, valid, spec: QuantSpec, per_tensor: bool):
  """(lo, hi) over the valid columns of `vals`, per row or over all."""
  axes = (0, 1) if per_tensor else 1
  # A NaN/inf widens the range to inf, as in numerics.data_range.
  finite = jnp.isfinite(vals)
  if spec.symmetric:
    mag = jnp.where(finite, jnp.abs(vals), jnp.inf)
    hi = jnp.max(jnp.where(valid, mag, 0.0), axis=axes, keepdims=True)
    lo = -hi
  else:
    lo = jnp.min(jnp.where(valid, jnp.where(finite, vals, -jnp.inf),
                           jnp.inf), axis=axes, keepdims=True)
    hi = jnp.max(jnp.where(valid, jnp.where(finite, vals, jnp.inf),
                           -jnp.inf), axis=axes, keepdims=True)
  return lo.reshape(-1), hi.reshape(-1)
