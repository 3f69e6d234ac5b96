"""Calibration, static-range PTQ and its errors, on a digits CNN."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import models
import zoo


@pytest.fixture(scope="module")
def trained(digits_cnn):
  """The session's trained `models.DigitsCNN` (tests/conftest.py), with 8
  calibration batches of 128 training images."""
  batches = [digits_cnn.x_train[i:i + 128] for i in range(0, 1024, 128)]
  return (digits_cnn.model, digits_cnn.params, batches, digits_cnn.x_test,
          digits_cnn.y_test)


def w8a8(act=None):
  return jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(),
                            act=act or jq.int8())])


@pytest.mark.parametrize("act", [jq.int8(), jq.uint8()])
def test_static_w8a8_ptq_within_one_point_of_float(trained, act):
  model, params, batches, x_test, y_test = trained
  recipe = w8a8(act)
  stats = jq.calibrate(model.apply, params, recipe, batches, progress=False)
  assert stats.num_batches == 8 and len(stats.states) == 4
  qparams = jq.quantize_params(model.apply, params, recipe, x_test,
                               stats=stats)
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
  float_acc = models.accuracy(model.apply, params, x_test, y_test)
  static_acc = models.accuracy(qapply, qparams, x_test, y_test)
  assert float_acc > 0.95
  assert static_acc >= float_acc - 0.01, (float_acc, static_acc)
  rep = jq.report(model.apply, qparams, recipe, x_test)
  assert rep.count("int8") == 4, str(rep)
  dense = qparams["params"]["Dense_0"]["kernel"]
  assert dense.act.scale.shape == ()
  lo, hi = stats.act_range("params/Dense_0/kernel")
  assert float(lo) >= 0 and float(hi) > 0  # after a ReLU
  if not act.symmetric:  # uint8: [min, max] maps onto [0, 255]
    np.testing.assert_allclose(float(dense.act.scale), float(hi - lo) / 255,
                               rtol=1e-6)


# Not marked slow (about 5 s, compiling a conv model three ways): the only
# check of the asymmetric zero-point correction against a float reference.
def test_uint8_activation_zero_point_matches_reference_in_conv_and_dense():
  """Zero-point corrections (incl. padded conv borders) against float math."""
  x = jax.random.uniform(jax.random.key(0), (4, 6, 6, 3), minval=-0.5,
                         maxval=2.0)
  model = nn.Sequential([nn.Conv(5, (3, 3), padding="SAME"),
                         lambda h: h.reshape(h.shape[0], -1), nn.Dense(7)])
  params = model.init(jax.random.key(1), x)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.uint8())])
  stats = jq.calibrate(model.apply, params, recipe, [x], progress=False)
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)
  out = jq.quantized_apply(model.apply, recipe)(qparams, x)
  # Reference: fake-quantize the activations on the same static grid.
  def reference(h, q):
    s, z = q.act.scale, q.act.zero_point
    return (jnp.clip(jnp.round(h / s + z), 0, 255) - z) * s
  w = jq.dequantize_tree(qparams)["params"]
  conv_q = qparams["params"]["layers_0"]["kernel"]
  h = nn.Conv(5, (3, 3), padding="SAME").apply(
      {"params": w["layers_0"]}, reference(x, conv_q))
  h = h.reshape(4, -1)
  ref = reference(h, qparams["params"]["layers_2"]["kernel"]) @ w[
      "layers_2"]["kernel"] + w["layers_2"]["bias"]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4,
                             atol=1e-4)


def test_static_scales_keep_s8_ops_and_no_reduction_over_activations(trained):
  model, params, batches, x_test, _ = trained
  recipe = w8a8()
  stats = jq.calibrate(model.apply, params, recipe, batches[:2],
                       progress=False)
  qparams = jq.quantize_params(model.apply, params, recipe, x_test,
                               stats=stats)
  x = x_test[:37]  # a batch size that no weight has
  text = jax.jit(jq.quantized_apply(model.apply, recipe)).lower(
      qparams, x).as_text()
  i8 = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*"
                  r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)", text)
  assert len(i8) == 4
  # No max-reduction over the activation computes a scale at run time; the
  # one add-reduction per matmul is the NaN check (a row's sum of x * 0).
  reduce = r"stablehlo\.reduce\([^\n]*applies stablehlo\.(\w+)[^\n]*\(tensor<37x"
  assert sorted(re.findall(reduce, text)) == ["add"] * 4
  dynamic = jax.jit(jq.quantized_apply(model.apply, recipe)).lower(
      jq.quantize_params(model.apply, params, recipe, x), x).as_text()
  # Dynamic per-row scales find NaN rows within their own max-reduction.
  assert sorted(re.findall(reduce, dynamic)) == ["maximum"] * 4


# Not marked slow (about 7 s: three calibrations over 8 batches): the only
# end-to-end comparison of the observers on a trained model.
def test_mse_and_percentile_beat_minmax_for_4bit_activations(trained):
  model, params, batches, x_test, _ = trained
  recipe = w8a8(jq.QuantSpec(bits=4, signed=False, symmetric=False))
  ref = model.apply(params, x_test)
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
  scores = {}
  for observer, kwargs in [("minmax", {}), ("mse", {}),
                           ("percentile", {"percent": 99.9})]:
    stats = jq.calibrate(model.apply, params, recipe, batches,
                         observer=observer, observer_options=kwargs,
                         progress=False)
    qparams = jq.quantize_params(model.apply, params, recipe, x_test,
                                 stats=stats)
    scores[observer] = jq.sqnr_db(ref, qapply(qparams, x_test))
  assert max(scores["mse"], scores["percentile"]) > scores["minmax"] + 0.5, (
      scores)


def test_bad_calibration_input_raises(trained):
  model, params, batches, x_test, _ = trained
  recipe = w8a8()
  with pytest.raises(ValueError, match="no batches"):
    jq.calibrate(model.apply, params, recipe, [])
  with pytest.raises(ValueError, match=r"batch 1 has shapes \[\(128, 8, 9, 1\)"):
    jq.calibrate(model.apply, params, recipe,
                 [batches[0], jnp.ones((128, 8, 9, 1))], progress=False)
  poisoned = np.array(batches[1])
  poisoned[3, 2, 2, 0] = np.nan
  with pytest.raises(ValueError, match="batch 1: NaN/inf in the activation "
                     "entering params/Conv_0/kernel"):
    jq.calibrate(model.apply, params, recipe, [batches[0], poisoned],
                 progress=False)
  # Stats from another model.
  other = models.MLP()
  other_params = other.init(jax.random.key(0), x_test)
  stats = jq.calibrate(other.apply, other_params, recipe, [x_test[:32]],
                       progress=False)
  with pytest.raises(ValueError, match="stats come from another model: "
                     "params/Dense_0/.* here, .* when calibrated"):
    jq.quantize_params(model.apply, params, recipe, x_test, stats=stats)


def test_stats_of_another_recipe_name_the_layer(trained):
  model, params, batches, x_test, _ = trained
  only_dense = jq.Recipe([jq.Rule(r".*Dense.*kernel", weight=jq.int8(), act=jq.int8())])
  stats = jq.calibrate(model.apply, params, only_dense, batches[:1],
                       progress=False)
  with pytest.raises(ValueError, match="params/Conv_0/kernel: no calibration "
                     "statistics"):
    jq.quantize_params(model.apply, params, w8a8(), x_test, stats=stats)


def test_scan_stacked_layers_get_one_activation_scale_per_layer():
  model = zoo.ScannedStack()
  x = jax.random.normal(jax.random.key(1), (128, 16))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*", weight=jq.int8(), act=jq.int8())])
  stats = jq.calibrate(model.apply, params, recipe, [x[:64], x[64:]],
                       progress=False)
  path = "params/ScanCheckpointScanBody_0/Dense_1/kernel"
  lo, hi = stats.act_range(path)
  assert hi.shape == (3,) and len(set(np.asarray(hi).round(5))) == 3
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)
  out = jax.jit(jq.quantized_apply(model.apply, recipe))(qparams, x)
  ref = model.apply(params, x)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 3e-2


def test_batches_of_different_sizes_are_observed(trained):
  model, params, batches, x_test, _ = trained
  recipe = w8a8()
  uneven = [batches[0], batches[1][:37]]  # a ReLU model: nested jaxprs
  stats = jq.calibrate(model.apply, params, recipe, uneven, progress=False)
  whole = jq.calibrate(model.apply, params,
                       recipe, [np.concatenate(uneven)], progress=False)
  for path in stats.states:
    np.testing.assert_allclose(np.asarray(stats.act_range(path)),
                               np.asarray(whole.act_range(path)), rtol=1e-6)


def test_calibration_pair_matches_calibrate_and_stats_round_trip(tmp_path):
  """`calibration`'s pure init / update gives `calibrate`'s Stats, and Stats
  survive jq.save / jq.load (custom node: rebuilt from `like=`)."""
  model = nn.Dense(4)
  batches = [jax.random.normal(jax.random.key(i), (8, 16)) for i in range(3)]
  params = model.init(jax.random.key(0), batches[0])
  recipe = w8a8()
  cal = jq.calibration(model.apply, recipe, observer="ema",
                       observer_options={"decay": 0.5})
  stats = cal.init(params, batches[0])
  update = jax.jit(cal.update)
  for batch in batches:
    stats = update(stats, params, batch)
  loop = jq.calibrate(model.apply, params, recipe, batches, observer="ema",
                      observer_options={"decay": 0.5}, progress=False)
  assert int(stats.num_batches) == int(loop.num_batches) == 3
  for a, b in zip(stats.act_range("params/kernel"),
                  loop.act_range("params/kernel")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jq.save(tmp_path / "stats.jq", stats)
  restored = jq.load(tmp_path / "stats.jq", like=cal.init(params, batches[0]))
  assert int(restored.num_batches) == 3
  q1 = jq.quantize_params(model.apply, params, recipe, batches[0],
                          stats=stats)
  q2 = jq.quantize_params(model.apply, params, recipe, batches[0],
                          stats=restored)
  k1, k2 = q1["params"]["kernel"], q2["params"]["kernel"]
  assert float(k1.act.scale) == float(k2.act.scale)
  with pytest.raises(ValueError, match="like="):
    jq.load(tmp_path / "stats.jq")
