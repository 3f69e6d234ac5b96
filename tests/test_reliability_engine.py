"""No silent wrong answers from the engine: overflow, NaN, gradients, specs
that the engine cannot honour, params that disagree with the recipe, and
tracing errors that name their cause."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


def matmul(p, x):
  return x @ p["w"]


def w8(act):
  return jq.Recipe([jq.Rule("w", weight=jq.int8(), act=act)])


@pytest.mark.parametrize("act", [jq.int8(), jq.uint8()])
def test_long_contraction_does_not_overflow_int32(act):
  # 127 * 127 * 2**18 > 2**31: one int32 accumulator would wrap around.
  k = 2**18
  # Two rows: an int8 dot (one row may reduce in float: `ROW_REDUCE`).
  params, x = {"w": jnp.ones((k, 2))}, jnp.ones((2, k))
  qparams = jq.quantize_params(matmul, params, w8(act), x)
  qapply = jax.jit(jq.quantized_apply(matmul, w8(act)))
  np.testing.assert_allclose(np.asarray(qapply(qparams, x)),
                             [[float(k), float(k)]] * 2, rtol=1e-6)
  # One row may sum the int8 products in float32 (`lowering.ROW_REDUCE`):
  # float32 rounding over 2^18 terms, as a float matmul would have.
  one_row = jax.jit(jq.quantized_apply(matmul, w8(act)))(qparams, x[:1])
  np.testing.assert_allclose(np.asarray(one_row), [[float(k)] * 2],
                             rtol=1e-4)
  assert jq.report(matmul, qparams, w8(act), x).count("int8") == 1
  assert jq.int8_ops(qapply, qparams, x).stablehlo == 2  # split in two


def test_long_contraction_with_random_values_matches_float():
  k = 140_000
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(kx, (3, k), minval=0.9, maxval=1.0)
  params = {"w": jax.random.uniform(kw, (k, 4), minval=0.9, maxval=1.0)}
  qparams = jq.quantize_params(matmul, params, w8(jq.int8()), x)
  out = jax.jit(jq.quantized_apply(matmul, w8(jq.int8())))(qparams, x)
  ref = x @ params["w"]
  assert float(jnp.max(jnp.abs(out - ref) / ref)) < 1e-2


def test_grouped_weights_bounded_by_group_size_run_int8():
  k = 2**18
  recipe = jq.Recipe([jq.Rule("w", weight=jq.int8(group_size=1024),
                              act=jq.int8())])
  params, x = {"w": jnp.ones((k, 2))}, jnp.ones((1, k))
  qparams = jq.quantize_params(matmul, params, recipe, x)
  out = jax.jit(jq.quantized_apply(matmul, recipe))(qparams, x)
  np.testing.assert_allclose(np.asarray(out), [[float(k)] * 2], rtol=1e-6)
  assert jq.report(matmul, qparams, recipe, x).count("int8") == 1


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x)


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3))(x)


def _nan_model(model_cls, shape, where):
  model = model_cls()
  x = jax.random.normal(jax.random.key(1), shape)
  params = model.init(jax.random.key(0), x)
  return model, params, x, x.at[where].set(jnp.nan)


@pytest.mark.parametrize("model_cls,shape,where", [
    (Dense, (3, 8), (1, 2)), (Conv, (3, 6, 6, 2), (1, 2, 3, 0))])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nan_or_inf_rows_give_nan_rows(model_cls, shape, where, bad):
  model, params, x, _ = _nan_model(model_cls, shape, where)
  poisoned = x.at[where].set(bad)
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=jq.int8())])
  stats = jq.calibrate(model.apply, params, recipe, [x], progress=False)
  outs = {
      "dynamic": jax.jit(jq.quantized_apply(model.apply, recipe))(
          jq.quantize_params(model.apply, params, recipe, x), poisoned),
      "static": jax.jit(jq.quantized_apply(model.apply, recipe))(
          jq.quantize_params(model.apply, params, recipe, x, stats=stats),
          poisoned),
      "fake-quant": jax.jit(jq.fake_quant_apply(model.apply, recipe))(
          params, poisoned),
  }
  clean = jq.quantized_apply(model.apply, recipe)(
      jq.quantize_params(model.apply, params, recipe, x), x)
  for name, out in outs.items():
    out = np.asarray(out)
    assert np.isnan(out[1]).all(), name  # the poisoned row / example
    rest = np.delete(out, 1, axis=0)
    assert np.isfinite(rest).all(), name
  np.testing.assert_array_equal(np.delete(np.asarray(outs["dynamic"]), 1, 0),
                                np.delete(np.asarray(clean), 1, 0))


def test_grad_through_quantized_apply_wrt_inputs_raises():
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, recipe, x)
  qapply = jq.quantized_apply(model.apply, recipe)
  with pytest.raises(ValueError, match="fake_quant_apply"):
    jax.grad(lambda v: qapply(qparams, v).sum())(x)


def test_grad_through_quantized_apply_wrt_float_bias_flows():
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, recipe, x)
  qapply = jq.quantized_apply(model.apply, recipe)

  def loss(bias):
    p = {"params": {**qparams["params"], "Dense_0": {
        "kernel": qparams["params"]["Dense_0"]["kernel"], "bias": bias}}}
    return qapply(p, x).sum()

  grad = jax.grad(loss)(params["params"]["Dense_0"]["bias"])
  np.testing.assert_array_equal(np.asarray(grad), np.full(4, 3.0))


def test_fixed_activation_clip_is_honoured():
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  clip = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
                            act=jq.int8(clip=(-0.1, 0.1)))])
  weight_only = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, clip, x)
  out = jax.jit(jq.quantized_apply(model.apply, clip))(qparams, x)
  # Reference: the input clipped to [-0.1, 0.1] on a 127-level grid.
  clipped = jnp.round(jnp.clip(x, -0.1, 0.1) / (0.1 / 127)) * (0.1 / 127)
  wq = jq.quantize_params(model.apply, params, weight_only, x)
  ref = jq.quantized_apply(model.apply, weight_only)(wq, clipped)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  fq = jax.jit(jq.fake_quant_apply(model.apply, clip))(params, x)
  np.testing.assert_allclose(np.asarray(fq), np.asarray(ref), atol=1e-5)
  assert qparams["params"]["Dense_0"]["kernel"].act is not None


@pytest.mark.parametrize("act,field", [
    (jq.int8(clip="mse"), "clip='mse'"), (jq.int8(group_size=2), "group_size"),
    (jq.int8(channel_axes=(0,)), "channel_axes"),
    (jq.int8(rounding="stochastic"), "stochastic")])
def test_activation_fields_the_engine_cannot_honour_are_rejected(act, field):
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=act)])
  for call in (lambda: jq.quantize_params(model.apply, params, recipe, x),
               lambda: jq.quantized_apply(model.apply, recipe),
               lambda: jq.fake_quant_apply(model.apply, recipe)):
    with pytest.raises(ValueError, match=f"rule 0.*kernel.*{field}"):
      call()


def test_params_and_recipe_that_disagree_raise():
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  int8 = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=jq.int8())])
  int4 = jq.Recipe([jq.Rule(".*kernel", weight=jq.int4(), act=jq.int8())])
  keep = jq.Recipe([jq.Rule(".*kernel", weight=None)])
  qparams = jq.quantize_params(model.apply, params, int8, x)
  cases = [(qparams, int4, "hold int8/ch, the recipe says int4/ch"),
           (qparams, keep, "hold int8/ch but the recipe keeps"),
           (params, int8, "are float but the recipe quantizes")]
  for p, recipe, message in cases:
    with pytest.raises(ValueError, match="params/Dense_0/kernel: params " + message):
      jq.quantized_apply(model.apply, recipe)(p, x)
  # report() describes the disagreement instead of raising.
  rep = jq.report(model.apply, qparams, int4, x)
  assert "recipe says int4/ch" in str(rep)


def test_stochastic_weight_rounding_takes_a_key():
  model, params, x, _ = _nan_model(Dense, (3, 8), (0, 0))
  recipe = jq.Recipe([jq.Rule(".*kernel",
                              weight=jq.int4(rounding="stochastic"))])
  with pytest.raises(ValueError, match="params/Dense_0/kernel.*key="):
    jq.quantize_params(model.apply, params, recipe, x)
  a = jq.quantize_params(model.apply, params, recipe, x,
                         key=jax.random.key(0))
  b = jq.quantize_params(model.apply, params, recipe, x,
                         key=jax.random.key(1))
  va, vb = (p["params"]["Dense_0"]["kernel"].int_values() for p in (a, b))
  assert not np.array_equal(np.asarray(va), np.asarray(vb))
  w = params["params"]["Dense_0"]["kernel"]
  deq = a["params"]["Dense_0"]["kernel"].dequantize()
  step = a["params"]["Dense_0"]["kernel"].scale
  assert float(jnp.max(jnp.abs(deq - w) / step)) <= 1.0


def test_python_control_flow_on_values_gets_its_own_hint():
  def branchy(p, x):
    return x @ p["w"] if x.sum() > 0 else x
  with pytest.raises(ValueError, match="branches on.*jax.lax.cond"):
    jq.quantize_params(branchy, {"w": jnp.ones((8, 2))}, w8(jq.int8()),
                       jnp.ones((1, 8)))


def test_non_array_param_leaf_is_named():
  params = {"w": jnp.ones((8, 2)), "act": jax.nn.relu}
  with pytest.raises(ValueError, match="params leaf act is a .*eqx.partition"):
    jq.quantize_params(matmul, params, w8(None), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="params leaf scale is a float"):
    jq.quantize_params(matmul, {"w": jnp.ones((8, 2)), "scale": 2.0},
                       w8(None), jnp.ones((1, 8)))


def test_unknown_options_are_not_forwarded_to_the_model():
  params, x = {"w": jnp.ones((8, 2))}, jnp.ones((1, 8))
  with pytest.raises(TypeError, match="stat"):
    jq.quantize_params(matmul, params, w8(None), x, stat=None)
  scaled = lambda p, x, *, factor: factor * (x @ p["w"])
  q = jq.quantize_params(scaled, params, w8(None), x,
                         model_kwargs={"factor": 2.0})
  out = jq.quantized_apply(scaled, w8(None))(q, x, factor=2.0)
  np.testing.assert_allclose(np.asarray(out), [[16.0, 16.0]], rtol=1e-6)
