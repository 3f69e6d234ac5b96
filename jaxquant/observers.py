"""Calibration observers: pure `(init, update, finalize)` triples, optax-style.

An `Observer` watches a stream of batches and proposes a clip range:

  state = obs.init(example)           # example: an array (only shape/dtype)
  state = obs.update(state, batch)    # pure, fixed shapes, works under jax.jit
  lo, hi = obs.finalize(state)        # keepdims: size 1 on reduced axes

`axes=None` gives one range for the whole tensor; `axes=(a, ...)` lists the
axes that keep their own range (per channel), e.g. `axes=(-1,)` for the
output channels of a Flax kernel `(in, out)`. `(lo, hi)` broadcasts against
the tensor and feeds `numerics.scale_from_range(lo, hi, spec)` or
`jq.quantize(x, spec, value_range=(lo, hi))` directly. Before the first
update the range is `(0, 0)` (which `scale_from_range` maps to scale 1).

Observers, for the values x_1, x_2, ... of one channel:

  minmax      lo = min_t min(x_t),  hi = max_t max(x_t)
  ema_minmax  lo_1 = min(x_1),  lo_t = d lo_{t-1} + (1 - d) min(x_t)
              (the same for hi with max)
  percentile  from a histogram: the p-th percentile c of |x|, range (-c, c);
              or, symmetric=False, the (100 - p)/2 and (100 + p)/2
              percentiles of x (the central p percent is kept)
  mse         from a histogram: the clip that minimises the expected
              quantization error of a `QuantSpec` (see `mse`)

Histograms have a fixed number of bins per channel, so memory does not grow
with the number of batches. A histogram covers [lo, lo + bins w) (lo = 0 for
|x|). When a batch falls outside it, the bin width grows by a power of two,
w' = 2^k w, and lo moves down by a multiple of w': every new edge is then an
old edge, so the old counts merge into the new bins exactly (no smearing);
only the new bin width limits the resolution. Inside a bin, values are taken
as uniformly spread over the part of the bin inside the observed [min, max].
Counts are int32 (up to 2^31 - 1 values per bin and channel).

Inputs must be finite: outside `jax.jit` a NaN/inf raises ValueError; inside
jit it cannot be checked and poisons that channel's range.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxquant as jq
  >>> from jaxquant import observers
  >>> obs = observers.percentile(99.9, axes=(-1,))
  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> state = obs.init(x)
  >>> update = jax.jit(obs.update)
  >>> for i in range(4):
  ...   state = update(state, jax.random.normal(jax.random.key(i), (256, 16)))
  >>> lo, hi = obs.finalize(state)
  >>> lo.shape, hi.shape
  ((1, 16), (1, 16))
  >>> q = jq.quantize(x, jq.int8(), value_range=(lo, hi))
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import numerics
from jaxquant.spec import QuantSpec

State = Any


class Observer(NamedTuple):
  """A calibration observer; see the module docstring.

  Attributes:
    init: `example -> state`; `example` gives the shape (any array, or a
      `jax.ShapeDtypeStruct`).
    update: `(state, x) -> state`, pure and jittable. `x` may have other sizes
      than the example on reduced axes, never on kept axes.
    finalize: `state -> result`; for the range observers here, the clip
      range `(lo, hi)`, float32, size 1 on reduced axes.
  """

  init: Callable[[jax.Array], State]
  update: Callable[[State, jax.Array], State]
  finalize: Callable[[State], Any]


class MinMaxState(NamedTuple):
  lo: jax.Array      # keepdims-shaped, float32
  hi: jax.Array
  count: jax.Array   # int32 scalar: batches seen


class HistogramState(NamedTuple):
  """Per-channel histogram; channels are the kept axes (keepdims shape K)."""
  counts: jax.Array  # K + (bins,), int32
  lo: jax.Array      # K, float32: left edge of bin 0
  width: jax.Array   # K, float32: bin width
  min: jax.Array     # K, float32: smallest value seen (of |x| if symmetric)
  max: jax.Array     # K, float32: largest value seen
  count: jax.Array   # int32 scalar: batches seen


# ----------------------------------------------------------------- layout


def _kept_axes(axes, ndim: int) -> tuple[int, ...]:
  """Normalised, sorted kept axes; ValueError with the fix when invalid."""
  if axes is None:
    return ()
  if isinstance(axes, int):
    axes = (axes,)
  axes = tuple(axes)
  if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
             for a in axes):
    raise ValueError(f"observer axes={axes!r}; axes must be integers, e.g. "
                     "axes=(-1,) per output channel, or None per tensor")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"observer axes={axes} is out of range for a tensor of rank {ndim}; "
          f"use axes in [{-ndim}, {ndim - 1}] (the axes that keep their own "
          "range, e.g. axes=(-1,) per output channel) or axes=None for one "
          "range per tensor")
  kept = tuple(sorted({int(a) % ndim for a in axes}))
  if len(kept) != len(axes):
    raise ValueError(f"observer axes={axes} names an axis twice; list each "
                     "kept axis once")
  return kept


def _check_axes(axes):
  """Early type / duplicate check; the rank (and range) is known at init."""
  _kept_axes(axes, ndim=64)


def _keep_shape(shape, kept) -> tuple[int, ...]:
  return tuple(d if a in kept else 1 for a, d in enumerate(shape))


def _channels(x, kept) -> jax.Array:
  """`x` as float32 (C, N): kept axes flattened first, the rest after."""
  rest = tuple(a for a in range(x.ndim) if a not in kept)
  x = jnp.transpose(x.astype(jnp.float32), kept + rest)
  return x.reshape(math.prod(x.shape[:len(kept)]), -1)


def _checked(state_shape, x, axes):
  """Kept axes of `x` (static), checking that its shape fits the state."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"observer got dtype {x.dtype}; observe float tensors "
                     "(cast with x.astype(jnp.float32))")
  kept = _kept_axes(axes, x.ndim)
  if _keep_shape(x.shape, kept) != tuple(state_shape):
    raise ValueError(
        f"observer state has kept shape {tuple(state_shape)} but the batch "
        f"has shape {tuple(x.shape)} (keeps {_keep_shape(x.shape, kept)}); "
        "batches may differ from the init example only on reduced axes")
  numerics.check_finite(x, "observer batch")
  return x, kept


def _init_shape(example, axes):
  shape = tuple(example.shape)
  return _keep_shape(shape, _kept_axes(axes, len(shape)))


# ---------------------------------------------------------- min / max / ema


def minmax(axes=None) -> Observer:
  """Running minimum and maximum: lo = min over all batches, hi = max.

    lo = min_t min(x_t),   hi = max_t max(x_t)

  Args:
    axes: None for one range per tensor, or the axes that keep their own
      range (e.g. `(-1,)` per output channel); checked against the rank at
      `init`.

  Returns:
    An `Observer` whose `finalize` gives `(lo, hi)`, float32, size 1 on
    reduced axes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxquant import observers
    >>> obs = observers.minmax(axes=(1,))
    >>> s = obs.init(jnp.zeros((2, 3)))
    >>> s = obs.update(s, jnp.array([[1., -2., 3.], [0., 5., -1.]]))
    >>> s = obs.update(s, jnp.array([[-4., 0., 0.], [0., 0., 0.]]))
    >>> [v.tolist() for v in obs.finalize(s)]
    [[[-4.0, -2.0, -1.0]], [[1.0, 5.0, 3.0]]]
  """
  _check_axes(axes)
  return _running_range(axes, jnp.minimum, jnp.maximum)


def ema_minmax(decay: float = 0.99, axes=None) -> Observer:
  """Exponential moving average of the per-batch min and max.

    lo_1 = min(x_1),   lo_t = decay * lo_{t-1} + (1 - decay) * min(x_t)

  and the same for hi with max. The first batch initialises the averages
  (no bias towards zero).

  Args:
    decay: d in [0, 1); 0 keeps only the last batch's range.
    axes: None for one range per tensor, or the axes that keep their own
      range (e.g. `(-1,)` per output channel); checked against the rank at
      `init`.

  Returns:
    An `Observer` whose `finalize` gives the averaged `(lo, hi)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxquant import observers
    >>> obs = observers.ema_minmax(decay=0.5)
    >>> s = obs.init(jnp.zeros(3))
    >>> s = obs.update(s, jnp.array([-1., 0., 2.]))
    >>> s = obs.update(s, jnp.array([-3., 0., 4.]))
    >>> [float(v[0]) for v in obs.finalize(s)]
    [-2.0, 3.0]
  """
  if not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
    raise ValueError(f"decay={decay!r}; the EMA decay must be a float in "
                     "[0, 1), e.g. 0.99 (0 keeps only the last batch)")
  _check_axes(axes)
  d = np.float32(decay)
  average = lambda old, new: d * old + (1 - d) * new
  return _running_range(axes, average, average)


def _running_range(axes, merge_lo, merge_hi) -> Observer:
  """Per-batch (min, max) merged into the state; the first batch sets it."""

  def init(example):
    zeros = jnp.zeros(_init_shape(example, axes), jnp.float32)
    return MinMaxState(zeros, zeros, jnp.zeros((), jnp.int32))

  def update(state, x):
    x, kept = _checked(state.lo.shape, x, axes)
    lo, hi = _batch_range(x, kept)
    first = state.count == 0
    return MinMaxState(jnp.where(first, lo, merge_lo(state.lo, lo)),
                       jnp.where(first, hi, merge_hi(state.hi, hi)),
                       state.count + 1)

  return Observer(init, update, _minmax_range)


def _batch_range(x, kept):
  x = x.astype(jnp.float32)
  reduce = tuple(a for a in range(x.ndim) if a not in kept)
  return (jnp.min(x, axis=reduce, keepdims=True),
          jnp.max(x, axis=reduce, keepdims=True))


def _minmax_range(state: MinMaxState):
  return state.lo, state.hi


# -------------------------------------------------------------- histograms


def _check_bins(bins):
  if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or (
      bins < 2):
    raise ValueError(f"bins={bins!r}; a histogram needs an integer number of "
                     "bins >= 2 (e.g. bins=2048)")


def _histogram(bins: int, axes, absolute: bool):
  """init / update of a `HistogramState` (of |x| when `absolute`)."""
  _check_bins(bins)
  _check_axes(axes)

  def init(example):
    shape = _init_shape(example, axes)
    zeros = jnp.zeros(shape, jnp.float32)
    return HistogramState(jnp.zeros(shape + (bins,), jnp.int32), zeros, zeros,
                          zeros, zeros, jnp.zeros((), jnp.int32))

  def update(state, x):
    x, kept = _checked(state.min.shape, x, axes)
    return _hist_update(state, x, kept=kept, absolute=absolute)

  return init, update


def _flat(a):
  return a.reshape(-1)


@functools.partial(jax.jit, static_argnames=("kept", "absolute"))
def _hist_update(state: HistogramState, x, *, kept, absolute):
  """Adds batch `x` to the histogram, widening it first when needed.

  Widening: with span = new max - new min, the width grows by 2^k with the
  smallest k >= 0 such that (bins - 1) w 2^k >= span, and lo moves down by
  m w' (m >= 0 an integer). Old bin i then lies inside new bin
  m + floor(i / 2^k), so the old counts are moved, not re-estimated.
  """
  shape = state.min.shape
  bins = state.counts.shape[-1]
  xs = _channels(x, kept)
  if absolute:
    xs = jnp.abs(xs)
  counts = state.counts.reshape(-1, bins)
  lo, width = _flat(state.lo), _flat(state.width)
  first = state.count == 0
  bmin, bmax = xs.min(axis=1), xs.max(axis=1)
  vmin = jnp.where(first, bmin, jnp.minimum(_flat(state.min), bmin))
  vmax = jnp.where(first, bmax, jnp.maximum(_flat(state.max), bmax))
  grid_min = jnp.zeros_like(vmin) if absolute else vmin
  span = vmax - grid_min
  # A fresh grid spans exactly [grid_min, vmax]; a zero span gets a width
  # below the float resolution of the values (but never zero).
  floor = jnp.maximum(jnp.maximum(jnp.abs(vmin), jnp.abs(vmax)) * 2.0**-24,
                      2.0**-100)
  lo = jnp.where(first, grid_min, lo)
  width = jnp.where(first, jnp.maximum(span, floor) / bins, width)
  grow = ~first & ((grid_min < lo) | (vmax > lo + bins * width))
  need = jnp.log2(jnp.maximum(span, floor)) - jnp.log2((bins - 1) * width)
  k = jnp.where(grow, jnp.clip(jnp.ceil(need), 0, 126), 0).astype(jnp.int32)
  new_width = width * jnp.exp2(k.astype(jnp.float32))
  m = jnp.where(grow, jnp.clip(jnp.ceil((lo - grid_min) / new_width), 0,
                               bins - 1), 0).astype(jnp.int32)
  new_lo = lo - m.astype(jnp.float32) * new_width
  rows = jnp.arange(counts.shape[0])[:, None]
  old = jnp.right_shift(jnp.arange(bins, dtype=jnp.int32)[None, :],
                        jnp.minimum(k, 31)[:, None])
  moved = jnp.zeros_like(counts).at[rows, jnp.clip(m[:, None] + old, 0,
                                                   bins - 1)].add(counts)
  idx = jnp.floor((xs - new_lo[:, None]) / new_width[:, None])
  idx = jnp.clip(idx, 0, bins - 1).astype(jnp.int32)
  counts = moved.at[rows, idx].add(1)
  return HistogramState(counts.reshape(shape + (bins,)),
                        new_lo.reshape(shape), new_width.reshape(shape),
                        vmin.reshape(shape), vmax.reshape(shape),
                        state.count + 1)


def _edges(state: HistogramState):
  """Flattened (C, bins), (C, bins + 1) edges clipped to the seen [min, max]."""
  bins = state.counts.shape[-1]
  counts = state.counts.reshape(-1, bins).astype(jnp.float32)
  lo, width = state.lo.reshape(-1, 1), state.width.reshape(-1, 1)
  edges = lo + width * jnp.arange(bins + 1, dtype=jnp.float32)
  edges = jnp.clip(edges, state.min.reshape(-1, 1), state.max.reshape(-1, 1))
  return counts, edges


@jax.jit
def _quantile(state: HistogramState, q):
  """The q-quantile (q in [0, 1]) per channel, as `np.percentile` defines it.

  With N values and h = q (N - 1), j = floor(h): the quantile is
  x_(j+1) + (h - j) (x_(j+2) - x_(j+1)), x_(r) the r-th smallest (1-based).
  x_(r) is read from the histogram: in the bin b where the cumulative count
  reaches r, at a + (b_hi - a) (r - before - 1/2) / n_b (the n_b values of
  the bin evenly spread), and exactly min / max for r = 1 / N. Each x_(r)
  is off by less than one bin width, so the quantile is too.
  """
  counts, edges = _edges(state)
  cum = jnp.cumsum(counts, axis=1)
  total = cum[:, -1:]
  h = q * jnp.maximum(total - 1.0, 0.0)
  j = jnp.floor(h)
  vmin, vmax = state.min.reshape(-1, 1), state.max.reshape(-1, 1)

  def order_stat(r):
    i = jnp.minimum(jnp.sum(cum < r, axis=1, keepdims=True),
                    counts.shape[1] - 1)
    n = jnp.take_along_axis(counts, i, axis=1)
    before = jnp.take_along_axis(cum, i, axis=1) - n
    frac = jnp.clip((r - before - 0.5) / jnp.maximum(n, 1.0), 0.0, 1.0)
    a = jnp.take_along_axis(edges, i, axis=1)
    b = jnp.take_along_axis(edges, i + 1, axis=1)
    v = a + frac * (b - a)
    return jnp.where(r <= 1, vmin, jnp.where(r >= total, vmax, v))

  lower = order_stat(j + 1)
  upper = order_stat(jnp.minimum(j + 2, total))
  return (lower + (h - j) * (upper - lower)).reshape(state.min.shape)


def percentile(percent: float = 99.99, bins: int = 2048, axes=None,
               symmetric: bool = True) -> Observer:
  """Percentile clipping from a fixed-size histogram.

  symmetric=True:  c = P_p(|x|), the p-th percentile of |x| over all batches;
                   range (-c, c).
  symmetric=False: lo = P_{(100 - p)/2}(x), hi = P_{(100 + p)/2}(x): the
                   central p percent is kept, (100 - p)/2 percent is clipped
                   on each side.

  Percentiles follow `np.percentile` (linear between order statistics),
  with each order statistic read from the histogram to within one bin
  width (see `_quantile`); percent=100 gives the exact min / max. See the
  module docstring for how the histogram widens.

  Args:
    percent: p in (0, 100].
    bins: histogram bins per channel (>= 2).
    axes: None for one range per tensor, or the axes that keep their own
      range (e.g. `(-1,)` per output channel); checked against the rank at
      `init`.
    symmetric: a range (-c, c) from |x|, or the central p percent of x.

  Returns:
    An `Observer` whose `finalize` gives `(lo, hi)`.

  Example:
    >>> import numpy as np
    >>> from jaxquant import observers
    >>> x = np.arange(1000, dtype=np.float32) - 500     # -500 .. 499
    >>> obs = observers.percentile(99.0, bins=1000)
    >>> state = obs.update(obs.init(x), x)
    >>> lo, hi = obs.finalize(state)
    >>> float(state.width[0])                           # bin width
    0.5
    >>> bool(abs(hi[0] - np.percentile(np.abs(x), 99.0)) < 0.5)
    True
  """
  if not isinstance(percent, numbers.Real) or not 0.0 < percent <= 100.0:
    raise ValueError(f"percent={percent!r}; percent must be in (0, 100], "
                     "e.g. 99.99 (100 keeps the full min/max range)")
  init, update = _histogram(bins, axes, absolute=symmetric)

  def range_(state):
    if symmetric:
      c = _quantile(state, jnp.float32(percent / 100.0))
      return -c, c
    tail = (100.0 - percent) / 200.0
    return (_quantile(state, jnp.float32(tail)),
            _quantile(state, jnp.float32(1.0 - tail)))

  return Observer(init, update, range_)


# --------------------------------------------------------------------- MSE


def _error_integral(x, lo, hi, step):
  """H(x) = int_lo^x e(t)^2 dt for the error e of a uniform grid.

  The grid has points lo, lo + step, ..., hi; values below lo clip to lo,
  above hi to hi. Inside, with y = x - lo = j step + r (j = round(y / step),
  |r| <= step / 2), every whole period adds step^3 / 12:
    H(x) = j step^3 / 12 + r^3 / 3                 (lo <= x <= hi)
    H(x) = -(lo - x)^3 / 3                         (x < lo)
    H(x) = H(hi) + (x - hi)^3 / 3                  (x > hi)
  """
  def sawtooth(y):
    j = jnp.round(y / step)
    r = y - j * step
    return j * step**3 / 12.0 + r**3 / 3.0
  inside = sawtooth(jnp.clip(x, lo, hi) - lo)
  below = jnp.minimum(x - lo, 0.0) ** 3 / 3.0
  above = jnp.maximum(x - hi, 0.0) ** 3 / 3.0
  return inside + below + above


def _error_at(x, lo, hi, step):
  """e(x)^2 for the same grid (clipping outside [lo, hi])."""
  y = jnp.clip(x, lo, hi) - lo
  r = y - jnp.round(y / step) * step
  return r**2 + jnp.maximum(lo - x, 0.0) ** 2 + jnp.maximum(x - hi, 0.0) ** 2


def _expected_error(counts, edges, lo, hi, step, bin_width):
  """sum_bins n_b E[e(x)^2 | x uniform on bin b], per channel; (C,) each."""
  lo, hi, step = lo[:, None], hi[:, None], step[:, None]
  h = _error_integral(edges, lo, hi, step)
  a, b = edges[:, :-1], edges[:, 1:]
  wide = (b - a) > 1e-3 * bin_width
  mean = jnp.where(wide, (h[:, 1:] - h[:, :-1]) / jnp.where(wide, b - a, 1.0),
                   _error_at((a + b) / 2, lo, hi, step))
  return jnp.sum(counts * mean, axis=1)


@functools.partial(jax.jit, static_argnames=("mode", "candidates"))
def _mse_search(state: HistogramState, qmin, qmax, *, mode, candidates):
  """Best (lo, hi) per channel among `candidates` shrunk ranges."""
  counts, edges = _edges(state)
  vmin, vmax = state.min.reshape(-1), state.max.reshape(-1)
  bin_width = state.width.reshape(-1, 1)
  anchor = jnp.clip(0.0, vmin, vmax)
  # The smallest and largest values are known exactly: take them out of
  # their bins as point masses (they matter most when clipping).
  bins = counts.shape[1]
  total = counts.sum(axis=1)
  has_max, has_min = (total >= 1)[:, None], (total >= 2)[:, None]
  first = jnp.argmax(counts > 0, axis=1)
  last = bins - 1 - jnp.argmax(counts[:, ::-1] > 0, axis=1)
  onehot = functools.partial(jax.nn.one_hot, num_classes=bins,
                             dtype=counts.dtype)
  counts = counts - has_max * onehot(last) - has_min * onehot(first)

  def grid(alpha):
    """Clip range (lo, hi) and the grid (start, end, step) it gives."""
    if mode == "abs":        # signed symmetric, histogram of |x|
      c = alpha * vmax
      return -c, c, jnp.zeros_like(c), c, c / qmax
    if mode == "unsigned":   # unsigned symmetric: grid 0 .. c
      c = alpha * jnp.maximum(vmax, 0.0)
      return jnp.zeros_like(c), c, jnp.zeros_like(c), c, c / qmax
    lo = anchor + alpha * (vmin - anchor)   # asymmetric: shrink towards 0
    hi = anchor + alpha * (vmax - anchor)   # (or towards the nearest end)
    return lo, hi, lo, hi, (hi - lo) / (qmax - qmin)

  def error(alpha):
    _, _, start, end, step = grid(alpha)
    step = jnp.where(step > 0, step, 1.0)
    points = jnp.stack([vmin, vmax], axis=1)
    point_error = _error_at(points, start[:, None], end[:, None],
                            step[:, None])
    point_error = jnp.sum(point_error * jnp.concatenate(
        [has_min, has_max], axis=1), axis=1)
    return _expected_error(counts, edges, start, end, step,
                           bin_width) + point_error

  alphas = jnp.arange(1, candidates + 1, dtype=jnp.float32) / candidates
  errors = jax.lax.map(error, alphas)            # (candidates, C)
  best = alphas[jnp.argmin(errors, axis=0)]
  lo, hi = grid(best)[:2]
  return lo.reshape(state.min.shape), hi.reshape(state.min.shape)


def mse(spec: QuantSpec, bins: int = 2048, candidates: int = 100,
        axes=None) -> Observer:
  """The clip range that minimises the expected quantization MSE for `spec`.

  Keeps the histogram of `percentile` (of |x| for a signed symmetric spec,
  of x otherwise). `range` tries the shrunk ranges alpha * R for
  alpha = 1/K, 2/K, ..., 1 (K = `candidates`, R the observed range) and
  returns the best per channel. For a clip range with grid points
  g_0 < ... < g_n (step s), the error of a value x is
    e(x) = x - round_to_grid(x)          inside [g_0, g_n]  (rounding)
    e(x) = x - g_0  or  x - g_n          outside             (clipping)
  and the expected error is sum_b n_b mean_{x in bin b} e(x)^2, taking the
  values of bin b as uniform over it (in closed form, see
  `_error_integral`; no s^2 / 12 approximation, which fails for s > bin),
  except the observed min and max, which count as values at exactly those
  points.

  Candidates by spec:
    signed symmetric:   (-c, c), c = alpha max|x|, grid step c / qmax
    unsigned symmetric: (0, c),  c = alpha max(x, 0)
    asymmetric:         lo and hi shrunk towards 0 (towards the nearer end of
                        [min, max] when 0 is outside it) by alpha; the grid
                        step is (hi - lo) / (qmax - qmin)
  Rounding is taken as round-to-nearest, also for a stochastic spec.

  Args:
    spec: the `QuantSpec` the range is for (its grid, sign and symmetry;
      its granularity is not used: `axes` decides).
    bins: histogram bins per channel (>= 2).
    candidates: K, the number of shrunk ranges tried.
    axes: None for one range per tensor, or the axes that keep their own
      range (e.g. `(-1,)` per output channel); checked against the rank at
      `init`.

  Returns:
    An `Observer` whose `finalize` gives the best `(lo, hi)` per channel.

  Example:
    >>> import jax, jaxquant as jq
    >>> from jaxquant import observers
    >>> x = jax.random.laplace(jax.random.key(0), (4096,))
    >>> obs = observers.mse(jq.int4(granularity="tensor"))
    >>> lo, hi = obs.finalize(obs.update(obs.init(x), x))
    >>> bool(hi < 0.6 * abs(x).max())   # clips the long tail
    True
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"spec={spec!r}; mse() needs a QuantSpec, e.g. "
                     "observers.mse(jq.int4())")
  if not isinstance(candidates, (int, np.integer)) or candidates < 1:
    raise ValueError(f"candidates={candidates!r}; use a positive integer "
                     "number of clip values to try, e.g. 100")
  mode = ("abs" if spec.signed else "unsigned") if spec.symmetric else "asym"
  init, update = _histogram(bins, axes, absolute=(mode == "abs"))

  def range_(state):
    return _mse_search(state, jnp.float32(spec.qmin), jnp.float32(spec.qmax),
                       mode=mode, candidates=int(candidates))

  return Observer(init, update, range_)


# ------------------------------------------------------------------ names

_NAMES = {"minmax": minmax, "ema": ema_minmax, "ema_minmax": ema_minmax,
          "percentile": percentile, "mse": mse}


def from_name(name: str, **kwargs) -> Observer:
  """`from_name("percentile", percent=99.9)` == `percentile(percent=99.9)`.

  Names: "minmax", "ema" (or "ema_minmax"), "percentile", "mse" (needs
  `spec=`). `jq.calibrate(..., observer=name, observer_options=kwargs)`
  builds its observers this way.

  Args:
    name: the observer's name (ValueError for any other).
    **kwargs: the keyword arguments of its constructor.

  Returns:
    The `Observer`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxquant import observers
    >>> obs = observers.from_name("ema", decay=0.5)
    >>> s = obs.init(jnp.zeros(2))
    >>> for x in ([0.0, 4.0], [-2.0, 2.0]):
    ...   s = obs.update(s, jnp.array(x))
    >>> [float(v[0]) for v in obs.finalize(s)]   # (0 + -2) / 2, (4 + 2) / 2
    [-1.0, 3.0]
  """
  if name not in _NAMES:
    raise ValueError(f"unknown observer {name!r}; use one of "
                     f"{sorted(_NAMES)}")
  if name == "mse" and "spec" not in kwargs:
    raise ValueError("observer 'mse' needs spec=, e.g. "
                     "from_name('mse', spec=jq.int4())")
  return _NAMES[name](**kwargs)
