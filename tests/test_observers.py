"""Calibration observers against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import observers


def _run(obs, batches, jit=False):
  state = obs.init(batches[0])
  update = jax.jit(obs.update) if jit else obs.update
  for b in batches:
    state = update(state, b)
  return state, obs.finalize(state)


def _batches(seed=0, shape=(300, 6), n=4, widen=None, shrink=20):
  """Normal batches, batch i `shrink * i` shorter; batch `widen` 10x wider."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    b = rng.normal(size=(shape[0] - shrink * i,) + shape[1:]).astype(np.float32)
    b *= rng.uniform(0.5, 2.0, size=shape[1:]).astype(np.float32)
    out.append(b * (10.0 if i == widen else 1.0))
  return out


def _quant_mse(x, lo, hi, spec):
  """NumPy reference: MSE of symmetric/asymmetric quantization with a range."""
  lo = np.asarray(lo, np.float64)
  hi = np.asarray(hi, np.float64)
  if spec.symmetric:
    s = np.maximum(-lo, hi) / spec.qmax
    q = np.clip(np.round(x / s), spec.qmin, spec.qmax)
    return np.mean((x - q * s) ** 2)
  s = (hi - lo) / (spec.qmax - spec.qmin)
  z = spec.qmin - lo / s
  q = np.clip(np.round(x / s + z), spec.qmin, spec.qmax)
  return np.mean((x - (q - z) * s) ** 2)


@pytest.mark.parametrize("axes,vary", [(None, 0), ((1,), 0), ((-1,), 0),
                                       ((0, 2), 1)])
def test_minmax_matches_numpy(axes, vary):
  """Batches may differ in size on a reduced axis (`vary`)."""
  rng = np.random.default_rng(1)
  batches = []
  for n in (50, 30, 70):
    shape = [5, 4, 3]
    shape[vary] = n
    batches.append(rng.standard_t(4, size=shape).astype(np.float32))
  x = np.concatenate(batches, axis=vary)
  kept = {a % 3 for a in (axes or ())}
  reduce = tuple(a for a in range(3) if a not in kept)
  _, (lo, hi) = _run(observers.minmax(axes), batches)
  np.testing.assert_array_equal(lo, x.min(axis=reduce, keepdims=True))
  np.testing.assert_array_equal(hi, x.max(axis=reduce, keepdims=True))


@pytest.mark.parametrize("axes", [None, (-1,)])
def test_ema_minmax_matches_numpy(axes):
  batches = _batches(n=5, widen=2)
  reduce = 0 if axes else None
  lo = batches[0].min(axis=reduce, keepdims=True)
  hi = batches[0].max(axis=reduce, keepdims=True)
  for b in batches[1:]:
    lo = 0.9 * lo + 0.1 * b.min(axis=reduce, keepdims=True)
    hi = 0.9 * hi + 0.1 * b.max(axis=reduce, keepdims=True)
  _, (got_lo, got_hi) = _run(observers.ema_minmax(0.9, axes), batches)
  assert got_lo.shape == ((1, 6) if axes else (1, 1))
  np.testing.assert_allclose(got_lo, lo, rtol=1e-5)
  np.testing.assert_allclose(got_hi, hi, rtol=1e-5)
  # The first batch initialises the average (not zeros).
  _, (lo1, hi1) = _run(observers.ema_minmax(0.9, axes), batches[:1])
  np.testing.assert_array_equal(hi1, batches[0].max(axis=reduce,
                                                    keepdims=True))


def test_range_before_any_update_is_zero():
  for obs in (observers.minmax(), observers.percentile(),
              observers.mse(jq.int8())):
    lo, hi = obs.finalize(obs.init(jnp.zeros((4, 3))))
    np.testing.assert_array_equal(lo, 0.0)
    np.testing.assert_array_equal(hi, 0.0)


@pytest.mark.parametrize("widen", [None, 0, 2])
@pytest.mark.parametrize("axes", [None, (1,)])
@pytest.mark.parametrize("percent", [99.9, 99.0, 100.0])
def test_percentile_symmetric_within_one_bin(widen, axes, percent):
  batches = _batches(widen=widen)
  x = np.abs(np.concatenate(batches))
  state, (lo, hi) = _run(observers.percentile(percent, bins=512, axes=axes),
                         batches)
  ref = np.percentile(x, percent, axis=0 if axes else None, keepdims=True)
  width = np.asarray(state.width)
  assert hi.shape == ref.shape == width.shape
  assert np.all(np.abs(hi - ref) <= width)
  np.testing.assert_array_equal(lo, -hi)
  if percent == 100.0:  # exact max
    np.testing.assert_array_equal(hi, ref)
  # Memory is fixed; the histogram holds every value exactly once.
  assert state.counts.shape == width.shape + (512,)
  np.testing.assert_array_equal(state.counts.sum(-1), x.shape[0] if axes
                                else x.size)


@pytest.mark.parametrize("widen", [None, 1, 3])
@pytest.mark.parametrize("axes", [None, (1,)])
def test_percentile_asymmetric_takes_each_tail(widen, axes):
  batches = [b + 1.5 for b in _batches(seed=3, widen=widen)]
  x = np.concatenate(batches)
  state, (lo, hi) = _run(
      observers.percentile(99.0, bins=256, axes=axes, symmetric=False),
      batches)
  reduce = 0 if axes else None
  width = np.asarray(state.width)
  for got, q in ((lo, 0.5), (hi, 99.5)):
    ref = np.percentile(x, q, axis=reduce, keepdims=True)
    assert np.all(np.abs(got - ref) <= width), (got, ref, width)


def test_histogram_widening_moves_counts_exactly():
  """After widening, counts equal np.histogram of all data on the new bins."""
  batches = [b[:, :1] for b in _batches(seed=5, n=4, widen=2)]
  batches[3] -= 30.0  # a later batch below the range too
  x = np.concatenate(batches).ravel()
  state, _ = _run(observers.percentile(symmetric=False, bins=128), batches)
  lo, w = float(state.lo[0, 0]), float(state.width[0, 0])
  assert lo <= x.min() and lo + 128 * w >= x.max()
  ref, _ = np.histogram(x, lo + w * np.arange(129))
  got = np.asarray(state.counts).ravel()
  assert got.sum() == x.size
  assert np.abs(got - ref).sum() <= 2  # float rounding at bin edges only


def _grid_search(x, spec, vmax, steps=2000):
  clips = np.linspace(1.0 / steps, 1.0, steps) * vmax
  errs = np.array([_quant_mse(x, -c, c, spec) for c in clips])
  return clips[np.argmin(errs)], errs.min()


@pytest.mark.parametrize("dist,bits", [("laplace", 4), ("t", 3),
                                       ("normal", 2), ("laplace", 8)])
def test_mse_clip_is_best_of_numpy_grid_search(dist, bits):
  rng = np.random.default_rng(bits)
  x = {"laplace": rng.laplace(size=40_000), "normal": rng.normal(size=40_000),
       "t": rng.standard_t(3, size=40_000)}[dist].astype(np.float32)
  spec = jq.QuantSpec(bits=bits, granularity="tensor")
  _, (lo, hi) = _run(observers.mse(spec), np.split(x, 4))
  c = float(hi[0])
  assert float(lo[0]) == -c
  vmax = np.abs(x).max()
  best_clip, best_err = _grid_search(x.astype(np.float64), spec, vmax)
  # Within one candidate step (max / 100) of the grid optimum, and as good.
  assert abs(c - best_clip) <= vmax / 100
  assert _quant_mse(x, -c, c, spec) <= best_err * 1.01


def test_mse_per_channel_and_asymmetric_specs():
  rng = np.random.default_rng(7)
  x = (rng.laplace(size=(3000, 3)) * [1.0, 5.0, 0.2]).astype(np.float32)
  spec = jq.QuantSpec(bits=3, granularity="tensor")
  _, (lo, hi) = _run(observers.mse(spec, axes=(1,)), [x[:1000], x[1000:]])
  assert hi.shape == (1, 3)
  for ch in range(3):
    vmax = np.abs(x[:, ch]).max()
    best_clip, best_err = _grid_search(x[:, ch].astype(np.float64), spec, vmax)
    assert abs(float(hi[0, ch]) - best_clip) <= vmax / 100
  # Asymmetric: (lo, hi) shrunk towards 0 together; ReLU-like data (min 0)
  # keeps lo = 0 and clips the top.
  uint4 = jq.QuantSpec(bits=4, signed=False, symmetric=False)
  for spec, data in ((jq.int4(symmetric=False), x[:, 0] + 1.0),
                     (uint4, np.maximum(x[:, 1], 0.0))):
    _, (lo, hi) = _run(observers.mse(spec), [data])
    anchor = np.clip(0.0, data.min(), data.max())
    alphas = np.linspace(0.001, 1.0, 1000)
    errs = [_quant_mse(data, anchor + a * (data.min() - anchor),
                       anchor + a * (data.max() - anchor), spec)
            for a in alphas]
    alpha = (float(hi[0]) - anchor) / (data.max() - anchor)
    assert abs(alpha - alphas[np.argmin(errs)]) <= 0.01 + 1e-6
    assert _quant_mse(data, lo, hi, spec) <= min(errs) * 1.01


def test_mse_and_percentile_beat_minmax_on_heavy_tails_at_4_bits():
  rng = np.random.default_rng(0)
  spec = jq.int4(granularity="tensor")
  for x in (rng.standard_t(3, size=(20_000, 4)),
            rng.laplace(size=(20_000, 4))):
    x = x.astype(np.float32)
    errors = {}
    for name, obs in (("minmax", observers.minmax()),
                      ("percentile", observers.percentile(99.9)),
                      ("mse", observers.mse(spec))):
      _, value_range = _run(obs, np.split(x, 4))
      x_hat = jq.quantize(x, spec, value_range=value_range).dequantize()
      errors[name] = float(np.mean((np.asarray(x_hat) - x) ** 2))
      np.testing.assert_allclose(errors[name],
                                 _quant_mse(x, *value_range, spec), rtol=1e-3)
    assert errors["mse"] < 0.5 * errors["minmax"], errors
    assert errors["percentile"] < errors["minmax"], errors
    assert errors["mse"] <= errors["percentile"], errors


@pytest.mark.parametrize("obs", [
    observers.minmax(axes=(1,)), observers.ema_minmax(0.8),
    observers.percentile(99.0, bins=64, axes=(1,)),
    observers.percentile(99.0, bins=64, symmetric=False),
    observers.mse(jq.int4(), bins=64, candidates=20, axes=(1,)),
    observers.mse(jq.uint8(), bins=64)],
    ids=["minmax", "ema", "percentile", "percentile-asym", "mse", "mse-u8"])
def test_jit_and_no_jit_agree(obs):
  batches = _batches(seed=2, shape=(100, 5), n=3, widen=1, shrink=0)
  eager_state, eager = _run(obs, batches, jit=False)
  jit_state = obs.init(batches[0])
  update = jax.jit(obs.update)
  for b in batches:
    jit_state = update(jit_state, b)
  chex.assert_trees_all_close(eager_state, jit_state, rtol=1e-6)
  chex.assert_trees_all_close(eager, jax.jit(obs.finalize)(jit_state),
                              rtol=1e-6)
  # A jitted update never changes shapes (bounded memory).
  chex.assert_trees_all_equal_shapes(obs.init(batches[0]), jit_state)


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_bfloat16_input(name):
  kw = {"spec": jq.int8()} if name == "mse" else {}
  obs = observers.from_name(name, **kw)
  x = _batches(seed=4)[0]
  x16 = jnp.asarray(x, jnp.bfloat16)
  lo, hi = _run(obs, [x16])[1]
  ref_lo, ref_hi = _run(obs, [np.asarray(x16.astype(jnp.float32))])[1]
  assert lo.dtype == hi.dtype == jnp.float32
  np.testing.assert_array_equal(lo, ref_lo)
  np.testing.assert_array_equal(hi, ref_hi)
  assert float(hi.max()) > 0


def test_from_name():
  x = jax.random.normal(jax.random.key(3), (512, 4))
  named = observers.from_name("percentile", percent=90.0, bins=16)
  direct = observers.percentile(percent=90.0, bins=16)
  lo, hi = named.finalize(named.update(named.init(x), x))
  ref_lo, ref_hi = direct.finalize(direct.update(direct.init(x), x))
  np.testing.assert_array_equal(hi, ref_hi)
  np.testing.assert_array_equal(lo, ref_lo)
  assert 1.0 < float(hi.squeeze()) < 2.5  # the 90th percentile of |N(0, 1)| is 1.64
  with pytest.raises(ValueError, match="unknown observer 'max'.*'minmax'"):
    observers.from_name("max")
  with pytest.raises(ValueError, match="needs spec="):
    observers.from_name("mse")


@pytest.mark.parametrize("make,message", [
    (lambda: observers.percentile(0.0), r"percent=0.0; percent must be in"),
    (lambda: observers.percentile(100.5), r"percent must be in \(0, 100\]"),
    (lambda: observers.percentile(bins=1), r"bins=1; .* bins >= 2"),
    (lambda: observers.mse(jq.int4(), bins=0), r"bins=0"),
    (lambda: observers.mse(jq.int4(), candidates=0), r"candidates=0"),
    (lambda: observers.mse("int4"), r"needs a QuantSpec"),
    (lambda: observers.ema_minmax(decay=1.0), r"decay=1.0; .* \[0, 1\)"),
    (lambda: observers.minmax(axes=(0, 0)), r"names an axis twice"),
    (lambda: observers.minmax(axes=(1.0,)), r"axes must be integers"),
    (lambda: observers.minmax(axes=(2,)).init(jnp.zeros((3, 4))),
     r"axes=\(2,\) is out of range for a tensor of rank 2; use axes in "
     r"\[-2, 1\]"),
    (lambda: observers.percentile(axes=(-3,)).init(jnp.zeros((3, 4))),
     r"out of range"),
])
def test_bad_arguments_raise_with_the_fix(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_bad_batches_raise():
  obs = observers.percentile(axes=(1,))
  state = obs.init(jnp.zeros((8, 4)))
  with pytest.raises(ValueError, match=r"kept shape \(1, 4\).*\(8, 5\)"):
    obs.update(state, jnp.zeros((8, 5)))
  with pytest.raises(ValueError, match="1 NaN/inf"):
    obs.update(state, jnp.zeros((8, 4)).at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="float tensors"):
    obs.update(state, jnp.zeros((8, 4), jnp.int32))


@pytest.mark.parametrize("value", [0.0, 5.0, 1e-30])
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_after_a_constant_first_batch(value, symmetric):
  """A zero-width first histogram still widens to any later range."""
  first = np.full((100, 3), value, np.float32)
  later = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
  x = np.concatenate([first, 100 * later])
  state, (lo, hi) = _run(observers.percentile(99.0, bins=256,
                                              symmetric=symmetric),
                         [first, 100 * later])
  ref = (np.percentile(np.abs(x), 99.0) if symmetric
         else np.percentile(x, 99.5))
  assert abs(float(hi[0, 0]) - ref) <= float(state.width[0, 0]) < 5.0
  assert int(state.counts.sum()) == x.size
