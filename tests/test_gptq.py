"""GPTQ through the public API: Hessian collection, quantize_params, errors.

The algorithm itself is checked against a NumPy reference in
test_gptq_core.py; here the plumbing: which inputs reach each weight's
Hessian, how a leaf maps to GPTQ's (N, K) problems and back, and that the
result runs in the int8 engine.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import zoo

W4G = jq.int4(group_size=16)


def correlated(key, shape, mix=2.0):
  """Inputs whose features are strongly correlated (where GPTQ helps)."""
  k1, k2 = jax.random.split(key)
  # Drawn flat: the same values, but XLA:CPU (jax 0.12.1) took 4 minutes to
  # compile `jax.random.normal` of shape (8, 8, 8, 12), 0.5 s flat.
  z = jax.random.normal(k1, (math.prod(shape),)).reshape(shape)
  a = jnp.eye(shape[-1]) + mix * jax.random.normal(
      k2, (shape[-1], shape[-1])) / np.sqrt(shape[-1])
  return z @ a


def batches(shape, n=4, seed=1):
  return [correlated(jax.random.key(seed + i), shape) for i in range(n)]


def gram(rows):
  rows = np.asarray(rows, np.float64).reshape(-1, np.shape(rows)[-1])
  return rows.T @ rows


def assert_gram_close(actual, expected):
  """float32 sums of products: relative to the largest entry."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=2e-5,
                             atol=2e-6 * np.abs(expected).max())


def recipe(spec=W4G, pattern=r".*kernel", **method):
  return jq.Recipe([jq.Rule(pattern, weight=spec, method=jq.gptq(**method))])


def rtn(spec=W4G, pattern=r".*kernel"):
  return jq.Recipe([jq.Rule(pattern, weight=spec)])


def test_hessian_of_a_dense_layer_is_the_sum_of_xtx():
  model = nn.Dense(24)
  xs = batches((8, 5, 32))
  params = model.init(jax.random.key(0), xs[0])
  stats = jq.calibrate(model.apply, params, recipe(), xs, progress=False)
  assert_gram_close(stats.hessian("params/kernel"), sum(gram(x) for x in xs))


def test_hessian_features_follow_the_weights_contracted_axes():
  # Einsum kernel (h, f, d) contracts (h, f); x @ w.T contracts w's axis 1.
  def f(p, x):
    y = jnp.einsum("bhf,hfd->bd", x, p["w_hfd"])
    return y @ p["w_out_in"].T

  params = {"w_hfd": jnp.ones((4, 8, 16)), "w_out_in": jnp.ones((6, 16))}
  xs = [correlated(jax.random.key(i), (10, 4, 8)) for i in range(3)]
  stats = jq.calibrate(f, params, recipe(W4G, ".*"), xs, progress=False)
  assert_gram_close(stats.hessian("w_hfd"),
                    sum(gram(x.reshape(10, 32)) for x in xs))
  outs = [np.asarray(jnp.einsum("bhf,hfd->bd", x, params["w_hfd"]))
          for x in xs]
  assert_gram_close(stats.hessian("w_out_in"), sum(gram(o) for o in outs))


def test_a_weight_used_twice_sums_both_hessians():
  f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"]
  params = {"w": jax.random.normal(jax.random.key(0), (16, 16)) / 4}
  xs = batches((8, 16), n=2)
  stats = jq.calibrate(f, params, recipe(W4G, "w"), xs, progress=False)
  expected = sum(gram(x) + gram(jnp.tanh(x @ params["w"])) for x in xs)
  assert_gram_close(stats.hessian("w"), expected)


def test_weights_reading_the_same_input_share_one_hessian(tmp_path):
  class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
      q, k, v = (nn.Dense(16, name=n)(x) for n in "qkv")
      a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2), -1) @ v
      return nn.Dense(8, name="o")(a) + nn.Dense(8, name="skip")(2 * x)

  model = Attention()
  xs = batches((2, 5, 8), n=2)
  params = model.init(jax.random.key(0), xs[0])
  stats = jq.calibrate(model.apply, params, recipe(jq.int4()), xs,
                       progress=False)
  # One accumulator for q, k and v; `skip` reads 2x, `o` the attention.
  assert sorted(stats.hessians) == ["params/o/kernel", "params/q/kernel",
                                    "params/skip/kernel"]
  for name in "qkv":
    assert_gram_close(stats.hessian(f"params/{name}/kernel"),
                      sum(gram(x) for x in xs))
  assert_gram_close(stats.hessian("params/skip/kernel"),
                    sum(gram(2 * x) for x in xs))
  jq.save(tmp_path / "stats", stats)
  like = jq.calibration(model.apply, recipe(jq.int4())).init(params, xs[0])
  loaded = jq.load(tmp_path / "stats", like=like)
  np.testing.assert_array_equal(loaded.hessian("params/v/kernel"),
                                stats.hessian("params/q/kernel"))


def test_scan_stacked_layers_get_one_hessian_each():
  model = zoo.ScannedStack()
  x = correlated(jax.random.key(1), (16, 12))
  params = model.init(jax.random.key(0), x)
  stats = jq.calibrate(model.apply, params, recipe(jq.int4()), [x],
                       progress=False)
  # Dense_1 is the body's inner Dense(64) (Dense_0 is built first).
  path = "params/ScanCheckpointScanBody_0/Dense_1/kernel"
  assert stats.hessian(path).shape == (3, 32, 32)
  assert dict(stats.hessian_layers)[path] == 1
  # Layer 0's input is the first Dense's output.
  first = params["params"]["Dense_0"]
  h0 = x @ first["kernel"] + first["bias"]
  assert_gram_close(stats.hessian(path)[0], gram(h0))
  qparams = jq.quantize_params(model.apply, params, recipe(jq.int4()), x,
                               stats=stats)
  body = qparams["params"]["ScanCheckpointScanBody_0"]
  assert body["Dense_1"]["kernel"].scale.shape == (3, 1, 64)
  q_rtn = jq.quantize_params(model.apply, params, rtn(jq.int4()), x)
  err = lambda q: float(jnp.linalg.norm(
      model.apply(jq.dequantize_tree(q), x) - model.apply(params, x)))
  assert err(qparams) < err(q_rtn)


def test_a_weight_shared_by_every_step_of_a_scan_sums_over_steps():
  rnn = zoo.rnn_apply  # one w and u for every step
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8)) / 4,
            "u": jax.random.normal(jax.random.key(1), (8, 8)) / 4}
  xs = correlated(jax.random.key(2), (5, 4, 16))
  stats = jq.calibrate(rnn, params, recipe(jq.int4(), "w|u"), [xs],
                       progress=False)
  assert dict(stats.hessian_layers) == {"w": 0, "u": 0}
  assert_gram_close(stats.hessian("w"), gram(xs))
  hs = rnn(params, xs)
  prev = np.concatenate([np.zeros((1, 4, 8)), np.asarray(hs[:-1])])
  assert_gram_close(stats.hessian("u"), gram(prev))


def layer_error(params, qparams, x):
  w = np.asarray(params["params"]["kernel"], np.float64)
  w_hat = np.asarray(jq.dequantize(qparams["params"]["kernel"]), np.float64)
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x @ (w_hat - w))


@pytest.mark.parametrize("spec", [jq.int4(), W4G, jq.int3(group_size=16),
                                  jq.int8(), jq.uint8(symmetric=False),
                                  jq.int2(group_size=16), jq.nf4(group_size=16),
                                  jq.fp8_e4m3()],
                         ids=lambda s: s.short())
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(spec):
  model = nn.Dense(48)
  xs = batches((64, 64))
  params = model.init(jax.random.key(0), xs[0])
  stats = jq.calibrate(model.apply, params, recipe(spec), xs, progress=False)
  q_gptq = jq.quantize_params(model.apply, params, recipe(spec), xs[0],
                              stats=stats)
  q_rtn = jq.quantize_params(model.apply, params, rtn(spec), xs[0])
  x = jnp.concatenate(xs)
  gptq_err, rtn_err = (layer_error(params, q, x) for q in (q_gptq, q_rtn))
  assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)
  kernel = q_gptq["params"]["kernel"]
  assert kernel.spec == q_rtn["params"]["kernel"].spec
  assert kernel.scale.shape == q_rtn["params"]["kernel"].scale.shape


def test_gptq_weights_run_int8_in_the_engine():
  model = zoo.MLP()
  xs = batches((32, 20))
  params = model.init(jax.random.key(0), xs[0])
  spec = dict(weight=jq.int4(group_size=4), act=jq.int8())
  rec = jq.Recipe([jq.Rule(r".*kernel", **spec, method=jq.gptq())])
  stats = jq.calibrate(model.apply, params, rec, xs, progress=False)
  qparams = jq.quantize_params(model.apply, params, rec, xs[0], stats=stats)
  qapply = jax.jit(jq.quantized_apply(model.apply, rec))
  out = qapply(qparams, xs[0])
  # The engine computes with the stored GPTQ weights: the float model on
  # the dequantized weights, up to activation rounding.
  ref = model.apply(jq.dequantize_tree(qparams), xs[0])
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 2e-2
  assert jq.int8_ops(qapply, qparams, xs[0]).stablehlo >= 3
  for p in (qparams, params):  # float params: a dry run, rounded to nearest
    rep = jq.report(model.apply, p, rec, xs[0])
    assert [op.weight_spec for op in rep.ops] == ["int4/g4 gptq"] * 3


def test_gptq_on_nnx_and_plain_jax_models():
  graphdef, state = nnx.split(zoo.NNXMLP(nnx.Rngs(0)))
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  xs = batches((32, 20))
  for fn, params, pattern in [(apply_fn, state, r".*kernel.*"),
                              (zoo.plain_apply,
                               zoo.plain_params(jax.random.key(0)), "w.")]:
    rec = recipe(jq.int4(), pattern)
    stats = jq.calibrate(fn, params, rec, xs, progress=False)
    qparams = jq.quantize_params(fn, params, rec, xs[0], stats=stats)
    q_rtn = jq.quantize_params(fn, params, rtn(jq.int4(), pattern), xs[0])
    ref = fn(params, xs[1])
    err = lambda q: float(jnp.linalg.norm(fn(jq.dequantize_tree(q), xs[1])
                                          - ref))
    assert err(qparams) < err(q_rtn)


def test_gptq_without_statistics_names_the_weight():
  model = nn.Dense(8)
  x = jnp.ones((4, 16))
  params = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="params/kernel.*jq.calibrate"):
    jq.quantize_params(model.apply, params, recipe(), x)
  stats = jq.calibrate(model.apply, params, rtn(), [x], progress=False)
  with pytest.raises(ValueError, match="params/kernel: no Hessian"):
    jq.quantize_params(model.apply, params, recipe(), x, stats=stats)


def test_a_singular_hessian_names_the_weight():
  model = nn.Dense(8)
  x = jnp.ones((4, 16))  # rank 1
  params = model.init(jax.random.key(0), x)
  rec = recipe(jq.int4(), damp=0.0)
  stats = jq.calibrate(model.apply, params, rec, [x], progress=False)
  with pytest.raises(ValueError, match="params/kernel.*damp"):
    jq.quantize_params(model.apply, params, rec, x, stats=stats)


@pytest.mark.parametrize("padding, stride, dilation",
                         [("SAME", 1, 1), ("VALID", 2, 1), ("SAME", 1, 2)])
def test_a_convolutions_hessian_is_over_its_input_patches(padding, stride,
                                                          dilation):
  model = nn.Conv(4, (3, 2), padding=padding, strides=stride,
                  kernel_dilation=dilation)
  xs = batches((2, 7, 6, 3), n=2)
  params = model.init(jax.random.key(0), xs[0])
  stats = jq.calibrate(model.apply, params, recipe(jq.int4()), xs,
                       progress=False)
  # im2col by a convolution with one-hot kernels: feature k = (h, w, in).
  one_hot = jnp.eye(18).reshape(3, 2, 3, 18)
  patches = [jax.lax.conv_general_dilated(
      x, one_hot, (stride, stride), padding, rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
             for x in xs]
  assert_gram_close(stats.hessian("params/kernel"),
                    sum(gram(p.reshape(-1, 18)) for p in patches))


def test_gptq_on_a_convolution_beats_round_to_nearest():
  model = nn.Conv(16, (3, 3))
  # Neighbouring pixels correlate, as in images: cumulative sums.
  xs = [jnp.cumsum(jnp.cumsum(x, 1), 2) / 8 for x in batches((8, 8, 8, 12))]
  params = model.init(jax.random.key(0), xs[0])
  stats = jq.calibrate(model.apply, params, recipe(jq.int3()), xs,
                       progress=False)
  q_gptq = jq.quantize_params(model.apply, params, recipe(jq.int3()), xs[0],
                              stats=stats)
  q_rtn = jq.quantize_params(model.apply, params, rtn(jq.int3()), xs[0])
  x = jnp.concatenate(xs)
  ref = model.apply(params, x)
  err = lambda q: float(jnp.linalg.norm(model.apply(jq.dequantize_tree(q), x)
                                        - ref))
  assert err(q_gptq) < 0.9 * err(q_rtn)


def test_gptq_on_a_depthwise_convolution_is_refused_at_calibration():
  model = nn.Conv(4, (3, 3), feature_group_count=4)
  x = jnp.ones((2, 8, 8, 4))
  params = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="params/kernel.*depthwise"):
    jq.calibrate(model.apply, params, recipe(jq.int4()), [x], progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size"), (dict(damp=-1.0), "damp"),
    (dict(act_order=1), "act_order")])
def test_bad_gptq_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jq.gptq(**kwargs)


def test_a_method_needs_a_weight_spec_and_nearest_rounding():
  with pytest.raises(ValueError, match="without weight="):
    jq.Rule(".*", method=jq.gptq())
  with pytest.raises(ValueError, match="stochastic"):
    jq.Rule(".*", weight=jq.int4(rounding="stochastic"), method=jq.gptq())
  with pytest.raises(ValueError, match="not a method"):
    jq.Rule(".*", weight=jq.int4(), method="gptq")


def test_layer_report_shows_the_method_and_its_gain_over_rtn():
  model = zoo.MLP()
  xs = batches((64, 20))
  params = model.init(jax.random.key(0), xs[0])
  rec = jq.Recipe([
      jq.Rule(r".*Dense_0/kernel", weight=jq.int4()),
      jq.Rule(r".*kernel", weight=jq.int3(group_size=4), method=jq.gptq())])
  stats = jq.calibrate(model.apply, params, rec, xs, progress=False)
  rep = jq.layer_report(model.apply, params, rec, xs[0], stats=stats)
  rows = {r.path.split("/")[1]: r for r in rep.rows}
  assert (rows["Dense_0"].method, rows["Dense_0"].gain_over_rtn) == (
      "rtn", None)
  for name in ("Dense_1", "Dense_2"):
    assert rows[name].method == "gptq" and rows[name].gain_over_rtn > 0.5
  # The gain is the output SQNR minus that of the same spec rounded to
  # nearest, measured alone.
  rtn_rep = jq.layer_report(model.apply, params, jq.Recipe(
      [jq.Rule(r".*kernel", weight=jq.int3(group_size=4))]), xs[0])
  rtn_sqnr = {r.path.split("/")[1]: r.output_sqnr for r in rtn_rep.rows}
  assert rows["Dense_1"].gain_over_rtn == pytest.approx(
      rows["Dense_1"].output_sqnr - rtn_sqnr["Dense_1"], abs=1e-3)
  head = str(rep).splitlines()[0]
  assert "method" in head and "vs RTN" in head


def test_stats_with_hessians_save_and_load(tmp_path):
  model = nn.Dense(8)
  xs = batches((16, 32), n=2)
  params = model.init(jax.random.key(0), xs[0])
  cal = jq.calibration(model.apply, recipe())
  stats = jq.calibrate(model.apply, params, recipe(), xs, progress=False)
  jq.save(tmp_path / "stats", stats)
  back = jq.load(tmp_path / "stats", like=cal.init(params, xs[0]))
  np.testing.assert_array_equal(back.hessian("params/kernel"),
                                stats.hessian("params/kernel"))
  q_back, q = (jq.quantize_params(model.apply, params, recipe(), xs[0],
                                  stats=s, progress=False)
               for s in (back, stats))
  np.testing.assert_array_equal(q_back["params"]["kernel"].values,
                                q["params"]["kernel"].values)
