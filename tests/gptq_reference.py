"""GPTQ in plain NumPy (float64), one column at a time.

The steps of `jaxquant.gptq_core` (see its docstring), written the obvious
way: explicit loops, the textbook U = chol(H^-1)^T, and its own rounding
onto integer grids, so the test compares two independent implementations.
"""

import numpy as np


def gptq_reference(w, h, group_ids, spec, *, block_size=128, damp=0.01,
                   act_order=False, per_tensor=False):
  """(w_hat, lo, hi, ok) as `gptq_core`; integer specs only."""
  assert spec.format == "int" and spec.rounding == "nearest"
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  ids = np.asarray(group_ids)
  n, k = w.shape
  groups = ids.max() + 1

  diag = np.diag(h).copy()
  dead = diag == 0
  h[dead, dead] = 1.0
  diag[dead] = 1.0
  h += damp * diag.mean() * np.eye(k)
  perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
  w, h, ids = w[:, perm], h[np.ix_(perm, perm)], ids[perm]
  try:
    hinv = np.linalg.inv(np.linalg.cholesky(h))
    hinv = hinv.T @ hinv
    u = np.linalg.cholesky((hinv + hinv.T) / 2).T
  except np.linalg.LinAlgError:
    return None, None, None, False

  rows = 1 if per_tensor else n
  lo, hi = np.zeros((rows, groups)), np.zeros((rows, groups))
  seen = set()
  for start in range(0, k, block_size):
    end = min(start + block_size, k)
    err = np.zeros((n, end - start))
    for j in range(start, end):
      g = ids[j]
      if g not in seen:
        seen.add(g)
        lo[:, g], hi[:, g] = block_range(w[:, ids == g], spec, per_tensor)
      q = quantize_dequantize(w[:, j], lo[:, g], hi[:, g], spec)
      e = (w[:, j] - q) / u[j, j]
      w[:, j] = q
      w[:, j + 1:end] -= np.outer(e, u[j, j + 1:end])
      err[:, j - start] = e
    w[:, end:] -= err @ u[start:end, end:]
  w_hat = np.empty_like(w)
  w_hat[:, perm] = w
  return w_hat, lo, hi, True


def block_range(vals, spec, per_tensor):
  """(lo, hi) of one group's columns, per row (or over all rows)."""
  axis = None if per_tensor else 1
  if isinstance(spec.clip, tuple):
    return spec.clip
  if spec.symmetric:
    top = np.abs(vals).max(axis=axis)
    return -top, top
  return vals.min(axis=axis), vals.max(axis=axis)


def scale_zero_point(lo, hi, spec):
  """s and z for [lo, hi] (z = 0 when symmetric), guards as in numerics."""
  lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  if spec.symmetric:
    top = np.maximum(-lo, hi) if spec.signed else np.maximum(hi, 0.0)
    return np.where(top > 0, top / spec.qmax, 1.0), np.zeros_like(top)
  levels = spec.qmax - spec.qmin
  scale = np.where(hi - lo > 0, (hi - lo) / levels,
                   np.where(np.abs(lo) > 0, np.abs(lo) / levels, 1.0))
  return scale, spec.qmin - lo / scale


def codes(x, lo, hi, spec):
  """Integer codes of x on the grid of [lo, hi] (round half to even)."""
  s, z = scale_zero_point(lo, hi, spec)
  return np.clip(np.round(x / s + z), spec.qmin, spec.qmax)


def quantize_dequantize(x, lo, hi, spec):
  s, z = scale_zero_point(lo, hi, spec)
  return (codes(x, lo, hi, spec) - z) * s
