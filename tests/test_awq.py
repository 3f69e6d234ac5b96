"""AWQ and SmoothQuant through the public API, against NumPy references.

Per-input-feature statistics (which activations reach each weight's
features, in which order), the pre-scale each method chooses, the stored
`QArray.in_scale` (codes hold `W * s`), the static activation range of
`x / s`, the int8 engine, checkpoints and errors.

Inputs and Linen params come from NumPy (eager `jax.random` and
`model.init` compile per shape): the file runs on two busy CPU cores.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import jaxquant as jq
import zoo
from jaxquant.engine.prescale import FeatureStats
from jaxquant.methods import SmoothQuant

W4G = jq.int4(group_size=16)
W8A8 = dict(weight=jq.int8(), act=jq.int8(granularity="tensor"))


def rule(pattern=r".*kernel", weight=jq.int4(), method="awq", **kwargs):
  method = {"awq": jq.awq(), "sq": jq.smoothquant(), None: None}.get(
      method, method)
  return jq.Recipe([jq.Rule(pattern, weight=weight, method=method, **kwargs)])


def calibrated(fn, params, recipe, xs):
  return jq.calibrate(fn, params, recipe, xs, progress=False)


def quantized(fn, params, recipe, xs, stats=None, machine=None):
  return jq.quantize_params(fn, params, recipe, xs[0], stats=stats,
                            progress=False, machine=machine)


def normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


def correlated(seed, shape, mix=2.0):
  """Inputs whose features are correlated."""
  d = shape[-1]
  a = np.eye(d) + mix * normal(seed + 1000, (d, d)) / np.sqrt(d)
  return jnp.asarray((normal(seed, shape) @ a).astype(np.float32))


def outliers(seed, shape, spread=30.0, count=4):
  """Gaussian rows with `count` input features `spread` times larger."""
  x = normal(seed, shape)
  cols = np.random.default_rng(seed + 1).choice(
      shape[-1], min(count, shape[-1] // 2), replace=False)
  x[..., cols] *= np.float32(spread)
  return jnp.asarray(x)


def log_spread(seed, shape, decades=3.0):
  """Gaussian rows whose features' magnitudes are evenly spaced in log over
  `decades` powers of 10, in a random order."""
  mag = 10 ** np.linspace(-decades / 2, decades / 2, shape[-1])
  mag = np.random.default_rng(seed + 1).permutation(mag)
  return jnp.asarray((normal(seed, shape) * mag).astype(np.float32))


def init(model, x, seed=0):
  """Params of a Linen model: N(0, 1 / fan-in) kernels, zero biases."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if "bias" in jax.tree_util.keystr(path):
      return jnp.zeros(a.shape, a.dtype)
    return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]),
                       a.dtype)

  return jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(model.init, jax.random.key(0), x))


# --------------------------------------------------------------------------
# Feature statistics


def np_features(rows_list):
  """(sum |x|, min, max, rows) per feature of row blocks, in float64."""
  rows = np.concatenate([np.asarray(r, np.float64).reshape(
      -1, np.shape(r)[-1]) for r in rows_list])
  return np.abs(rows).sum(0), rows.min(0), rows.max(0), rows.shape[0]


def assert_features(fs: FeatureStats, rows_list):
  abs_sum, lo, hi, n = np_features(rows_list)
  np.testing.assert_allclose(fs.abs_sum, abs_sum, rtol=1e-5)
  np.testing.assert_allclose(fs.lo, lo, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(fs.hi, hi, rtol=1e-6, atol=1e-7)
  assert fs.rows.shape == () and float(fs.rows) == n
  np.testing.assert_allclose(fs.mean_abs, abs_sum / n, rtol=1e-5)
  np.testing.assert_allclose(fs.abs_max, np.maximum(-lo, hi), rtol=1e-6)


def test_feature_stats_of_a_dense_layer():
  model = nn.Dense(8)
  xs = [correlated(i, (6, 5, 16)) for i in range(3)]
  params = init(model, xs[0])
  stats = calibrated(model.apply, params, rule(method="sq"), xs)
  assert_features(stats.feature_stats("params/kernel"), xs)
  assert dict(stats.feature_axes) == {"params/kernel": (0,)}
  assert dict(stats.hessian_layers) == {"params/kernel": 0}
  assert stats.hessians == {}  # SmoothQuant needs no Hessian


def test_feature_stats_follow_the_weights_contracted_axes():
  # Einsum kernel (h, k, d) contracted over (h, k), x laid out (b, k, h):
  # features in the weight's row-major (h, k) order. x @ w.T: w's axis 1.
  def f(p, x):
    y = jnp.einsum("bkh,hkd->bd", x, p["w_hkd"])
    return y @ p["w_out_in"].T

  params = {"w_hkd": jnp.asarray(normal(0, (4, 3, 16)) / 4),
            "w_out_in": jnp.asarray(normal(1, (6, 16)) / 4)}
  xs = [correlated(i, (10, 12)).reshape(10, 3, 4) for i in range(2)]
  stats = calibrated(f, params, rule(".*", method="sq"), xs)
  assert_features(stats.feature_stats("w_hkd"),
                  [x.transpose(0, 2, 1).reshape(10, 12) for x in xs])
  assert_features(stats.feature_stats("w_out_in"),
                  [jnp.einsum("bkh,hkd->bd", x, params["w_hkd"]) for x in xs])
  assert dict(stats.feature_axes) == {"w_hkd": (0, 1), "w_out_in": (1,)}
  # SmoothQuant's s lines up the same way, on both x and W: s_k =
  # sqrt(max |x_k| / max_n |W_kn|), the weight's max over its other axes.
  q = quantized(f, params, rule(".*", method="sq"), xs, stats)
  x_hk = np.concatenate([x.transpose(0, 2, 1).reshape(10, 12) for x in xs])
  w = np.abs(np.asarray(params["w_hkd"]))
  np.testing.assert_allclose(
      q["w_hkd"].in_scale, np.sqrt(np.abs(x_hk).max(0).reshape(4, 3, 1)
                                   / w.max(2, keepdims=True)), rtol=1e-5)
  y = np.concatenate([jnp.einsum("bkh,hkd->bd", x, params["w_hkd"])
                      for x in xs])
  w = np.abs(np.asarray(params["w_out_in"]))
  np.testing.assert_allclose(
      q["w_out_in"].in_scale, np.sqrt(np.abs(y).max(0) / w.max(0))[None],
      rtol=1e-5)


def test_feature_stats_of_a_convolution_are_per_input_channel():
  model = nn.Conv(4, (3, 3), strides=2)
  xs = [correlated(i, (2, 7, 7, 5)) for i in range(2)]
  params = init(model, xs[0])
  stats = calibrated(model.apply, params, rule(method="sq"), xs)
  # Over the raw input (not the padded patches): every pixel once.
  assert_features(stats.feature_stats("params/kernel"), xs)
  assert dict(stats.feature_axes) == {"params/kernel": (2,)}


def test_a_weight_used_twice_combines_its_feature_stats():
  f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"]
  params = {"w": jnp.asarray(normal(0, (16, 16)) / 4)}
  xs = [correlated(i, (8, 16)) for i in range(2)]
  stats = calibrated(f, params, rule("w", method="sq"), xs)
  assert_features(stats.feature_stats("w"),
                  xs + [jnp.tanh(x @ params["w"]) for x in xs])


def test_a_weight_shared_by_every_step_of_a_scan_combines_over_steps():
  rnn = zoo.rnn_apply  # one w and u for every step
  params = {"w": jnp.asarray(normal(0, (16, 8)) / 4),
            "u": jnp.asarray(normal(1, (8, 8)) / 4)}
  xs = correlated(2, (5, 4, 16))
  stats = calibrated(rnn, params, rule("w|u", method="sq"), [xs])
  assert dict(stats.hessian_layers) == {"w": 0, "u": 0}
  assert_features(stats.feature_stats("w"), [xs])
  hs = rnn(params, xs)
  prev = np.concatenate([np.zeros((1, 4, 8)), np.asarray(hs[:-1])])
  assert_features(stats.feature_stats("u"), [prev])


# --------------------------------------------------------------------------
# AWQ: the scale it chooses and the error it reaches


def test_awq_with_one_grid_point_is_round_to_nearest():
  model = nn.Dense(24)
  xs = [outliers(i, (32, 64)) for i in range(2)]
  params = init(model, xs[0])
  stats = calibrated(model.apply, params, rule(method=jq.awq(grid=1)), xs)
  for spec in (jq.int4(), W4G):  # the stats do not depend on the spec
    rec = rule(weight=spec, method=jq.awq(grid=1))
    q = quantized(model.apply, params, rec, xs, stats)["params"]["kernel"]
    r = quantized(model.apply, params, rule(weight=spec, method=None),
                  xs)["params"]["kernel"]
    np.testing.assert_array_equal(q.in_scale, np.ones((64, 1), np.float32))
    np.testing.assert_array_equal(q.values, r.values)
    np.testing.assert_array_equal(q.scale, r.scale)
    assert q.spec == r.spec and r.in_scale is None
    assert q.nbytes == r.nbytes + 64 * 4  # the float32 in_scale
    np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(r))


_DENSE = nn.Dense(32)
_DENSE_PARAMS = init(_DENSE, jnp.ones((1, 64)))
_CONV = nn.Conv(8, (3, 3))
_CONV_PARAMS = init(_CONV, jnp.ones((1, 6, 6, 8)))
_CASES = {  # name: (model, params, weight spec, input shape)
    "int4": (_DENSE, _DENSE_PARAMS, jq.int4(), (64, 64)),
    "int4/g16": (_DENSE, _DENSE_PARAMS, W4G, (64, 64)),
    "int3": (_DENSE, _DENSE_PARAMS, jq.int3(), (64, 64)),
    "conv int4": (_CONV, _CONV_PARAMS, jq.int4(), (4, 6, 6, 8)),
}
_UPDATES = {}


def awq_vs_rtn(case, x):
  """Output error of AWQ and of round-to-nearest on the calibration
  input `x`: |f(W_hat, x) - f(W, x)| for both."""
  model, params, spec, _ = _CASES[case]
  rec = rule(weight=spec)
  cal = jq.calibration(model.apply, rec)
  if case not in _UPDATES:  # one compiled calibration step per case
    _UPDATES[case] = jax.jit(cal.update)
  stats = _UPDATES[case](cal.init(params, x), params, x)
  ref = model.apply(params, x)
  err = lambda q: float(jnp.linalg.norm(
      model.apply(jq.dequantize_tree(q), x) - ref))
  return (err(quantized(model.apply, params, rec, [x], stats)),
          err(quantized(model.apply, params, rule(weight=spec, method=None),
                        [x])))


@pytest.mark.parametrize("case", list(_CASES))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20), spread=st.floats(1.0, 50.0))
def test_awq_is_never_worse_than_round_to_nearest(case, seed, spread):
  x = outliers(seed, _CASES[case][3], spread)
  awq_err, rtn_err = awq_vs_rtn(case, x)
  # alpha = 0 (RTN) is on the grid; float32 Hessian sums aside.
  assert awq_err <= rtn_err * (1 + 1e-4), (awq_err, rtn_err)


@pytest.mark.parametrize("case", list(_CASES))
def test_awq_clearly_beats_round_to_nearest_on_uneven_features(case):
  x = log_spread(7, _CASES[case][3])
  awq_err, rtn_err = awq_vs_rtn(case, x)
  assert awq_err < 0.9 * rtn_err, (awq_err, rtn_err)


def np_awq(w, x, spec, grid):
  """NumPy brute force over the grid: (s, output error) per alpha."""
  x = np.asarray(x, np.float32)
  mean = (np.abs(x.astype(np.float64)).sum(0) / len(x)).astype(np.float32)
  out = []
  for alpha in np.arange(grid, dtype=np.float32) / np.float32(grid):
    s = mean ** alpha
    s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)[:, None]
    w_hat = np.asarray(jq.dequantize(jq.quantize(w * s, spec)),
                       np.float64) / s
    err = np.linalg.norm(x.astype(np.float64) @ (w_hat - w)) ** 2
    out.append((s, err))
  return out


def test_awq_scale_is_the_grid_argmin_of_the_output_error():
  model = nn.Dense(8)
  xs = [outliers(i, (32, 16), spread=20.0) for i in (3, 4)]
  params = init(model, xs[0])
  rec = rule(weight=jq.int4(), method=jq.awq(grid=10))
  stats = calibrated(model.apply, params, rec, xs)
  q = quantized(model.apply, params, rec, xs, stats)["params"]["kernel"]
  w = np.asarray(params["params"]["kernel"])
  cands = np_awq(w, np.concatenate(xs), jq.int4(), 10)
  errors = np.array([e for _, e in cands])
  best = int(np.argmin(errors))
  # A meaningful case: not RTN, and the argmin well separated.
  assert best > 0 and np.sort(errors)[1] > errors[best] * 1.001, errors
  np.testing.assert_allclose(q.in_scale, cands[best][0], rtol=2e-6)
  np.testing.assert_array_equal(
      q.int_values(), jq.quantize(w * q.in_scale, jq.int4()).int_values())
  np.testing.assert_allclose(
      np.linalg.norm(np.concatenate(xs) @ (np.asarray(
          jq.dequantize(q), np.float64) - w)) ** 2, errors[best], rtol=1e-4)
  # s is normalised by the geometric mean of its extremes.
  s = np.asarray(q.in_scale)
  np.testing.assert_allclose(s.max() * s.min(), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------
# SmoothQuant and the static range of x / s


def np_static_act(x, s, act):
  """x quantized as the engine does with a static per-tensor scale."""
  x = np.asarray(x, np.float32) / np.asarray(s, np.float32).reshape(-1)
  q = np.clip(np.round(x / act.scale), act.spec.qmin, act.spec.qmax)
  return q * act.scale


@pytest.fixture(scope="module")
def smoothed():
  """A Dense layer on inputs with outlier features, calibrated for AWQ
  (its stats hold features and a Hessian, enough for both methods)."""
  model = nn.Dense(32)
  xs = [outliers(i, (64, 64), spread=40.0) for i in (5, 6)]
  params = init(model, xs[0])
  stats = calibrated(model.apply, params, rule(**W8A8, method="awq"), xs)
  return model, params, xs, stats


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_scale_is_the_numpy_formula(smoothed, alpha):
  model, params, xs, stats = smoothed
  rec = rule(**W8A8, method=jq.smoothquant(alpha))
  qparams = quantized(model.apply, params, rec, xs, stats)
  q = qparams["params"]["kernel"]
  x = np.concatenate(xs).astype(np.float64)
  w = np.asarray(params["params"]["kernel"])
  s = (np.abs(x).max(0) ** alpha / np.abs(w).max(1) ** (1 - alpha))[:, None]
  np.testing.assert_allclose(q.in_scale, s, rtol=1e-5)
  assert q.in_scale.dtype == jnp.float32 and q.dtype == w.dtype
  # The codes are those of W * s; dequantize divides s back out.
  ref = jq.quantize(w * q.in_scale, jq.int8())
  np.testing.assert_array_equal(q.int_values(), ref.int_values())
  np.testing.assert_array_equal(q.scale, ref.scale)
  np.testing.assert_allclose(jq.dequantize(q) * q.in_scale,
                             jq.dequantize(ref), rtol=1e-6, atol=1e-7)
  # In float, (x / s) @ (W s) = x @ W.
  np.testing.assert_allclose((x / s[:, 0]) @ (w * s), x @ w, rtol=1e-9,
                             atol=1e-9)
  # The static act range is that of x / s: max_k max|x_k| / s_k.
  fs = stats.feature_stats("params/kernel")
  np.testing.assert_allclose(
      q.act.scale * 127,
      np.max(np.maximum(-np.asarray(fs.lo), np.asarray(fs.hi))
             / np.asarray(q.in_scale)[:, 0]), rtol=1e-6)
  # The engine computes (x / s) quantized with that scale times the codes.
  out = jax.jit(jq.quantized_apply(model.apply, rec))(qparams, xs[0])
  expected = np_static_act(xs[0], q.in_scale, q.act) @ (
      np.asarray(ref.values, np.float64) * np.asarray(ref.scale)) + np.asarray(
          params["params"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())


def test_smoothquant_w8a8_beats_plain_w8a8_on_outlier_features(smoothed):
  model, params, xs, stats = smoothed
  ref = model.apply(params, xs[1])
  errs = {}
  for name, method in [("sq", jq.smoothquant()), ("rtn", None)]:
    rec = rule(**W8A8, method=method)
    q = quantized(model.apply, params, rec, xs, stats)
    out = jq.quantized_apply(model.apply, rec)(q, xs[1])  # no jit
    errs[name] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert errs["sq"] < 0.02 and errs["sq"] < 0.5 * errs["rtn"], errs


def test_static_act_range_of_prescaled_weights(smoothed):
  model, params, xs, stats = smoothed
  fs = stats.feature_stats("params/kernel")
  lo, hi = np.asarray(fs.lo), np.asarray(fs.hi)
  for method in (jq.awq(), jq.smoothquant(1.0)):
    rec = rule(weight=jq.int4(), act=jq.uint8(granularity="tensor"),
               method=method)
    q = quantized(model.apply, params, rec, xs, stats)["params"]["kernel"]
    s = np.asarray(q.in_scale)[:, 0]
    a_lo, a_hi = np.min(lo / s), np.max(hi / s)
    np.testing.assert_allclose(q.act.scale * 255, a_hi - a_lo, rtol=1e-6)
    np.testing.assert_allclose(q.act.zero_point, -a_lo / q.act.scale,
                               rtol=1e-6)
    if isinstance(method, SmoothQuant):  # alpha = 1: flat x / s
      assert -1 - 1e-6 <= a_lo < 0 < a_hi <= 1 + 1e-6


# --------------------------------------------------------------------------
# The engine


@pytest.fixture(scope="module")
def plain():
  """zoo.plain_apply calibrated for AWQ on inputs with outlier features."""
  params = {"w1": jnp.asarray(normal(0, (20, 64)) / 4.5),  # as plain_params
            "b1": jnp.zeros(64), "w2": jnp.asarray(normal(1, (64, 10)) / 8)}
  xs = [outliers(i, (64, 20), spread=20.0) for i in (1, 2)]
  stats = calibrated(zoo.plain_apply, params,
                     rule("w.", act=jq.int8(), method="awq"), xs)
  return params, xs, stats


I8_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*xi8>, "
                    r"tensor<[0-9x]*xi8>\)")


# The dot counts are those of one profile's lowerings, on any host (every
# profile's numbers are tested in test_lowering.py).
FAST = "cpu/x86-vnni"


@pytest.mark.parametrize("weight, act, method, mode, label, dots", [
    (jq.int4(), jq.int8(), jq.awq(), "int8", "int4/ch awq", 2),
    # One int8 dot per group (FAST): 20 / 4 + 64 / 4.
    (jq.int4(group_size=4), jq.int8(), jq.awq(), "int8", "int4/g4 awq", 21),
    (jq.int8(), jq.int8(granularity="tensor"), jq.smoothquant(), "int8",
     "int8/ch smoothquant", 2),
    (jq.int4(), None, jq.awq(), "weight-only", "int4/ch awq", 0),
], ids=["W4A8", "W4A8-g4", "W8A8-sq", "W4A16"])
def test_prescaled_weights_run_in_the_engine(plain, weight, act, method,
                                             mode, label, dots):
  params, xs, stats = plain
  fn = zoo.plain_apply
  rec = rule("w.", weight, act=act, method=method)
  qparams = quantized(fn, params, rec, xs, stats, machine=FAST)
  assert qparams["w1"].in_scale.shape == (20, 1)
  assert qparams["w2"].in_scale.shape == (64, 1)
  qapply = jax.jit(jq.quantized_apply(fn, rec, machine=FAST))
  out = qapply(qparams, xs[0])
  # The float model on the dequantized weights Q(W s) / s, up to the
  # activation's rounding (none weight-only).
  ref = fn(jq.dequantize_tree(qparams), xs[0])
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < (2e-2 if act else 1e-5), rel
  rep = jq.report(fn, qparams, rec, xs[0], machine=FAST)
  assert [(op.mode, op.weight_spec) for op in rep.ops] == [(mode, label)] * 2
  assert label in str(rep)
  # The dry run on float params names the method too.
  assert [op.weight_spec for op in jq.report(fn, params, rec, xs[0]).ops] == [
      label] * 2
  text = qapply.lower(qparams, xs[0]).as_text()
  assert len(I8_DOT.findall(text)) == dots, text
  if label == "int4/ch awq" and act is not None:
    assert jq.int8_ops(qapply, qparams, xs[0]).stablehlo == dots


def test_prescaled_weights_without_jit_match_jit(plain):
  params, xs, stats = plain
  rec = rule("w.", act=jq.int8(), method="awq")
  qparams = quantized(zoo.plain_apply, params, rec, xs, stats)
  qapply = jq.quantized_apply(zoo.plain_apply, rec)
  np.testing.assert_allclose(qapply(qparams, xs[1]),
                             jax.jit(qapply)(qparams, xs[1]), rtol=1e-5,
                             atol=1e-5)


def test_awq_on_scan_stacked_layers():
  model = zoo.ScannedStack()
  x = correlated(1, (16, 12))
  params = init(model, x)
  # Only the scan-stacked (3, 32, 64) kernel: each AWQ leaf compiles.
  rec = rule(r".*Body_0/Dense_1/kernel", act=jq.int8(), method="awq")
  stats = calibrated(model.apply, params, rec, [x, 2 * x])
  path = "params/ScanCheckpointScanBody_0/Dense_1/kernel"
  # One feature set per layer; layer 0's input is the first Dense's output.
  assert dict(stats.hessian_layers)[path] == 1
  fs = stats.feature_stats(path)
  assert fs.abs_sum.shape == fs.lo.shape == fs.hi.shape == (3, 32)
  np.testing.assert_array_equal(fs.rows, [32.0] * 3)
  first = params["params"]["Dense_0"]
  h0 = [a @ first["kernel"] + first["bias"] for a in (x, 2 * x)]
  assert_features(FeatureStats(*(a[0] for a in fs[:3]), fs.rows[0]), h0)
  qparams = quantized(model.apply, params, rec, [x], stats)
  q = qparams["params"]["ScanCheckpointScanBody_0"]["Dense_1"]["kernel"]
  assert q.in_scale.shape == (3, 32, 1)
  s = np.asarray(q.in_scale)[..., 0]
  np.testing.assert_allclose(s.max(1) * s.min(1), 1.0, rtol=1e-5)  # per layer
  # One static act scale per layer, from that layer's features.
  assert q.act.scale.shape == (3,)
  np.testing.assert_allclose(
      q.act.scale * 127, np.max(np.asarray(fs.abs_max) / s, 1), rtol=1e-6)
  # Weight-only (a recipe without act), each layer's slice of in_scale
  # divides that layer's input: the float model on Q(W s) / s.
  out = jax.jit(jq.quantized_apply(model.apply, rule(
      r".*Body_0/Dense_1/kernel", method="awq")))(qparams, x)
  ref = model.apply(jq.dequantize_tree(qparams), x)
  np.testing.assert_allclose(out, ref, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(ref).max()))
  # With its act it runs int8 (the int8 numerics: the Dense tests above).
  assert [(op.mode, op.weight_spec) for op in jq.report(
      model.apply, qparams, rec, x).ops if op.path == path] == [
          ("int8", "int4/ch awq")]


def layouts(p, x, img):
  """Weights in every layout the engine lines in_scale up with."""
  y = jnp.einsum("bkh,hkd->bd", x.reshape(-1, 3, 4), p["hkd"])
  y = y @ p["out_in"].T                            # features on axis 1
  z = x @ p["flat"].reshape(12, 8)                 # (4, 3, 8) reshaped

  def step(h, xt):                                 # reused at every step
    h = jnp.tanh(xt @ p["rnn"] + h)
    return h, h

  r = jax.lax.scan(step, jnp.zeros((x.shape[0], 4)),
                   x.reshape(-1, 3, 4).transpose(1, 0, 2))[1]
  c = jax.lax.conv_general_dilated(img, p["oihw"], (1, 1), "SAME",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return y, z, r, c


def test_prescaled_weights_line_up_with_every_layout():
  params = {"hkd": (4, 3, 16), "out_in": (6, 16), "flat": (4, 3, 8),
            "rnn": (4, 4), "oihw": (7, 5, 3, 3)}
  params = {k: jnp.asarray(normal(i, v) / 2) for i, (k, v) in enumerate(
      params.items())}
  x = outliers(0, (16, 12))
  img = jnp.asarray(np.moveaxis(np.asarray(outliers(1, (2, 6, 6, 5))), 3, 1))
  w8a8 = rule(".*", jq.int8(), act=jq.int8(), method="sq")
  stats = calibrated(layouts, params, w8a8, [(x, img)])
  assert dict(stats.feature_axes) == {
      "hkd": (0, 1), "out_in": (1,), "flat": (0, 1), "rnn": (0,),
      "oihw": (1,)}
  q = jq.quantize_params(layouts, params, w8a8, x, img, stats=stats,
                         progress=False)
  assert q["oihw"].in_scale.shape == (1, 5, 1, 1)
  # SmoothQuant on the NCHW conv: per input channel c, over the raw image.
  np.testing.assert_allclose(q["oihw"].in_scale[0, :, 0, 0], np.sqrt(
      np.abs(np.asarray(img)).max((0, 2, 3))
      / np.abs(np.asarray(params["oihw"])).max((0, 2, 3))), rtol=1e-5)
  # Weight-only (a recipe without act), each x / s times Q(W s) is exactly
  # x times Q(W s) / s: s lines up with x's features.
  refs = jax.jit(layouts)(jq.dequantize_tree(q), x, img)
  outs = jax.jit(jq.quantized_apply(layouts, rule(".*", jq.int8(),
                                                  method="sq")))(q, x, img)
  for out, ref in zip(outs, refs):
    np.testing.assert_allclose(out, ref, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(ref).max()))
  # With int8 activations every one of them runs int8.
  rep = jq.report(layouts, q, w8a8, x, img)
  assert [(op.mode, op.reason) for op in rep.ops if op.path != "-"] == [
      ("int8", "static activation scale")] * 5


def test_a_weight_sliced_along_its_input_features_is_refused_by_name():
  # x @ w[:8] sees 8 of w's 16 input features: there is no in_scale for w.
  # Expected: a ValueError naming w (as for batch dimensions or a weight
  # contracted two ways), not a TypeError from a reshape deep inside.
  f = lambda p, x: x @ p["w"][:8]
  params = {"w": jnp.asarray(normal(0, (16, 12)))}
  x = outliers(1, (16, 8))
  for method in (jq.smoothquant(), jq.awq()):
    rec = rule("w", jq.int8(), method=method)
    with pytest.raises(ValueError, match=r"^w: .*method="):
      quantized(f, params, rec, [x], calibrated(f, params, rec, [x]))


def test_awq_on_an_nnx_model():
  graphdef, state = nnx.split(zoo.NNXMLP(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  xs = [outliers(i, (32, 20)) for i in (1, 2)]
  rec = rule(r".*kernel.*", method="awq")
  stats = calibrated(fn, state, rec, xs)
  qstate = quantized(fn, state, rec, xs, stats)
  assert qstate["linear1"]["kernel"].get_value().in_scale.shape == (20, 1)
  assert qstate["linear2"]["kernel"].get_value().in_scale.shape == (64, 1)
  out = jax.jit(jq.quantized_apply(fn, rec))(qstate, xs[0])
  ref = fn(jq.dequantize_tree(qstate), xs[0])
  np.testing.assert_allclose(out, ref, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(ref).max()))


# --------------------------------------------------------------------------
# Reports, checkpoints, errors


def test_layer_report_shows_awq_and_its_gain_over_rtn(plain):
  params, xs, stats = plain
  x = jnp.concatenate(xs)  # the calibration inputs
  rec = rule("w.", jq.int4(), method="awq")
  rep = jq.layer_report(zoo.plain_apply, params, rec, x, stats=stats)
  rows = {r.path: r for r in rep.rows}
  assert [rows[p].method for p in ("w1", "w2")] == ["awq", "awq"]
  # w1 sees the outlier features; w2 (after a ReLU) at least ties RTN.
  assert rows["w1"].gain_over_rtn > 1.0, rows["w1"]
  assert rows["w2"].gain_over_rtn > -1e-3, rows["w2"]
  rtn = jq.layer_report(zoo.plain_apply, params, rule("w.", jq.int4(),
                                                      method=None), x)
  rtn = {r.path: r for r in rtn.rows}
  assert rows["w1"].gain_over_rtn == pytest.approx(
      rows["w1"].output_sqnr - rtn["w1"].output_sqnr, abs=1e-3)
  # The weight clip reads the stored scales divided by the pre-scale.
  q = rep.quantized["w1"]
  np.testing.assert_allclose(rows["w1"].weight_clip, np.max(
      np.asarray(q.scale) * 7 / np.asarray(q.in_scale)), rtol=1e-6)


def test_prescaled_qarrays_and_feature_stats_save_and_load(plain, tmp_path):
  params, xs, stats = plain
  rec = rule("w.", act=jq.int8(), method="awq")
  qparams = quantized(zoo.plain_apply, params, rec, xs, stats)
  jq.save(tmp_path / "q", qparams)
  for back in (jq.load(tmp_path / "q"), jq.load(tmp_path / "q",
                                                  like=qparams)):
    for path in ("w1", "w2"):
      a, b = back[path], qparams[path]
      assert a.in_scale.dtype == jnp.float32 and a.spec == b.spec
      for name in ("values", "scale", "in_scale"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
      np.testing.assert_array_equal(a.act.scale, b.act.scale)
  jq.save(tmp_path / "stats", stats)
  like = jq.calibration(zoo.plain_apply, rec).init(params, xs[0])
  back = jq.load(tmp_path / "stats", like=like)
  for path in ("w1", "w2"):
    for a, b in zip(back.feature_stats(path), stats.feature_stats(path)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.hessian(path), stats.hessian(path))
  assert back.feature_axes == stats.feature_axes
  assert back.hessian_layers == stats.hessian_layers


@pytest.mark.parametrize("method", [jq.awq(), jq.smoothquant()],
                         ids=["awq", "smoothquant"])
def test_prescaling_without_the_statistics_names_the_weight(method):
  f = lambda p, x: x @ p["w"]
  params = {"w": jnp.asarray(normal(0, (16, 8)))}
  x = correlated(0, (8, 16))
  rec = rule("w", method=method)
  with pytest.raises(ValueError, match=f"w: its rule has method="
                     f"{method.name}.*jq.calibrate"):
    quantized(f, params, rec, [x])
  # Stats calibrated for GPTQ (a Hessian, no feature statistics).
  stats = calibrated(f, params, rule("w", method=jq.gptq()), [x])
  with pytest.raises(ValueError, match="w: no per-feature statistics"):
    quantized(f, params, rec, [x], stats)


def test_prescaling_with_round_to_nearest_stats_names_the_weight():
  model = nn.Dense(8)
  x = correlated(0, (8, 16))
  params = init(model, x)
  stats = calibrated(model.apply, params, rule(act=jq.int8(), method=None),
                     [x])
  assert stats.features == {} and stats.hessians == {}
  with pytest.raises(ValueError,
                     match="params/kernel: no per-feature statistics"):
    quantized(model.apply, params, rule(act=jq.int8(), method="sq"), [x],
              stats)
  with pytest.raises(ValueError, match="params/kernel: no Hessian"):
    quantized(model.apply, params, rule(act=jq.int8(), method="awq"), [x],
              stats)


@pytest.mark.parametrize("make, match", [
    (lambda: jq.awq(grid=0), r"awq\(grid=0\)"),
    (lambda: jq.awq(grid=1.5), r"awq\(grid=1.5\)"),
    (lambda: jq.awq(grid=True), r"awq\(grid=True\)"),
    (lambda: jq.smoothquant(alpha=1.5), r"smoothquant\(alpha=1.5\)"),
    (lambda: jq.smoothquant(alpha=-0.1), r"smoothquant\(alpha=-0.1\)"),
    (lambda: jq.smoothquant(alpha=True), r"smoothquant\(alpha=True\)"),
    (lambda: jq.smoothquant(alpha=float("nan")), r"alpha=nan"),
], ids=["grid0", "grid1.5", "gridTrue", "alpha1.5", "alpha-0.1",
        "alphaTrue", "alphaNaN"])
def test_bad_awq_and_smoothquant_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("method", [jq.awq(), jq.smoothquant()],
                         ids=["awq", "smoothquant"])
def test_prescaling_rules_refuse_what_they_cannot_honour(method):
  with pytest.raises(ValueError, match=r"Rule '\.\*'.*act clip=\(-1\.0, 1\.0\)"):
    jq.Rule(".*", weight=jq.int8(), act=jq.int8(clip=(-1, 1)), method=method)
  with pytest.raises(ValueError, match="without weight="):
    jq.Rule(".*", method=method)
  with pytest.raises(ValueError, match="stochastic"):
    jq.Rule(".*", weight=jq.int4(rounding="stochastic"), method=method)
  # A calibrated (static) act range is fine.
  jq.Rule(".*", weight=jq.int8(), act=jq.int8(), method=method)


@pytest.mark.parametrize("method", [jq.awq(), jq.smoothquant()],
                         ids=["awq", "smoothquant"])
def test_prescaling_a_depthwise_convolution_is_refused_at_calibration(method):
  model = nn.Conv(4, (3, 3), feature_group_count=4)
  x = jnp.ones((2, 6, 6, 4))
  params = init(model, x)
  with pytest.raises(ValueError, match="params/kernel.*depthwise"):
    calibrated(model.apply, params, rule(method=method), [x])
