"""Per-layer report, sensitivity and automatic mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq

KERNELS = [f"params/{n}/kernel" for n in ("Conv_0", "Conv_1", "Dense_0",
                                          "Dense_1")]


@pytest.fixture(scope="module")
def trained(digits_cnn):
  """The session's trained `models.DigitsCNN` (tests/conftest.py)."""
  return (digits_cnn.model, digits_cnn.params, digits_cnn.x_train,
          digits_cnn.x_test, digits_cnn.y_test)


def nll(y):
  return lambda logits: -float(
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


LAYER_MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A8 g32": dict(weight=jq.int8(group_size=32), act=jq.int8()),
    "W4A8 g32": dict(weight=jq.int4(group_size=32), act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 g32": dict(weight=jq.int4(group_size=32)),
    "fp8": dict(weight=jq.fp8_e4m3(), act=jq.fp8_e4m3()),
}


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("mode", sorted(LAYER_MODES))
def test_layer_report_measures_what_quantized_apply_runs(mode, rows, machine):
  """One matmul: its output SQNR in layer_report is that of quantized_apply
  against float, whatever lowering the machine plans for it (per-group
  W8A8 used to crash here: the analysis re-derived the kernel choice)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (64, 48)) / 8}
  x = jax.random.normal(k2, (rows, 64))
  apply_fn = lambda p, x: x @ p["w"]
  recipe = jq.Recipe([jq.Rule("w", **LAYER_MODES[mode])])
  rep = jq.layer_report(apply_fn, params, recipe, x, machine=machine)
  qparams = jq.quantize_params(apply_fn, params, recipe, x, machine=machine)
  out = jq.quantized_apply(apply_fn, recipe, machine=machine)(qparams, x)
  (row,) = rep.rows
  assert row.output_sqnr == pytest.approx(
      jq.sqnr_db(apply_fn(params, x), out), abs=0.01)


# Not marked slow (about 7 s, three PNGs drawn): the only test of
# layer_report's numbers and of its figures.
def test_layer_report_numbers_and_figures(trained, tmp_path):
  model, params, x_train, x_test, _ = trained
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])
  stats = jq.calibrate(model.apply, params, recipe, [x_train[:256]],
                       progress=False)
  rep = jq.layer_report(model.apply, params, recipe, x_test, stats=stats)
  assert [r.path for r in rep.rows] == KERNELS
  row = rep.rows[2]
  w = np.asarray(params["params"]["Dense_0"]["kernel"])
  scale = np.abs(w).max(axis=0, keepdims=True) / 127
  w_hat = np.clip(np.round(w / scale), -127, 127) * scale
  expected = 10 * np.log10((w**2).sum() / ((w - w_hat) ** 2).sum())
  assert row.weight_sqnr == pytest.approx(expected, abs=0.05)
  assert row.weight_range == pytest.approx((w.min(), w.max()))
  assert row.weight_clip == pytest.approx(np.abs(w).max(), rel=1e-6)
  assert row.act_range[0] >= 0 and row.act_clip[1] == pytest.approx(
      row.act_range[1], rel=1e-5)
  assert all(25 < r.output_sqnr < 60 for r in rep.rows), str(rep)
  assert sum(r.param_share for r in rep.rows) < 1.0
  assert row.param_share == pytest.approx(
      w.size / sum(np.size(l) for l in jax.tree_util.tree_leaves(params)))
  assert "params/Dense_0/kernel" in str(rep) and "dB" in str(rep)
  files = rep.plot(tmp_path)
  assert [f.name for f in files] == ["weights.png", "activations.png",
                                     "sqnr.png"]
  assert all(f.stat().st_size > 10_000 for f in files)
  table = str(stats.table())
  assert "params/Conv_1/kernel" in table and "(1 batches observed)" in table


def with_fake_quant_kernels(params, paths, spec):
  """`params` with the kernels at `paths` quantized and dequantized (one
  scale per output channel, the last axis of Dense and Conv kernels)."""
  layers = dict(params["params"])
  for path in paths:
    name = path.split("/")[1]
    kernel = layers[name]["kernel"]
    layers[name] = dict(layers[name],
                        kernel=jq.quantize(kernel, spec).dequantize())
  return {"params": layers}


def test_sensitivity_orders_bit_widths(trained):
  model, params, _, x_test, _ = trained
  drops = {}
  for spec in (jq.int8(), jq.int2()):
    recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
    drops[spec.bits] = jq.sensitivity(model.apply, params, recipe, x_test)
  assert list(drops[8]) == list(drops[2]) == KERNELS
  for path in KERNELS:
    assert drops[2][path] > 10 * drops[8][path] > 0


def test_sensitivity_drops_equal_directly_quantized_models(trained):
  """Each layer's drop, alone and all-but-one, against the metric of the
  model with those kernels quantized by hand (`jq.quantize`)."""
  model, params, _, x_test, y_test = trained
  spec = jq.int2()
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
  metric = nll(y_test)
  reference = metric(model.apply(params, x_test))

  def drop(paths):
    quantized = with_fake_quant_kernels(params, paths, spec)
    return reference - metric(model.apply(quantized, x_test))

  alone = jq.sensitivity(model.apply, params, recipe, x_test, metric=metric)
  all_but = jq.sensitivity(model.apply, params, recipe, x_test,
                           metric=metric, all_but_one=True)
  assert list(alone) == list(all_but) == KERNELS
  for path in KERNELS:
    others = [p for p in KERNELS if p != path]
    assert alone[path] == pytest.approx(drop([path]), rel=1e-4, abs=1e-5)
    assert all_but[path] == pytest.approx(drop(others), rel=1e-4, abs=1e-5)
    assert alone[path] > 0 and all_but[path] > 0  # int2 always costs loss


def test_sensitivity_noise_power_adds_up_across_layers(trained):
  """Without a metric, drops are relative noise powers (10^(-SQNR/10)):
  all-but-one equals the other layers' single-layer noise summed, and one
  layer's equals the output SQNR measured directly."""
  model, params, _, x_test, _ = trained
  spec = jq.int4()
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
  alone = jq.sensitivity(model.apply, params, recipe, x_test)
  all_but = jq.sensitivity(model.apply, params, recipe, x_test,
                           all_but_one=True)
  reference = model.apply(params, x_test)
  path = "params/Dense_0/kernel"
  direct = model.apply(with_fake_quant_kernels(params, [path], spec), x_test)
  assert alone[path] == pytest.approx(
      10 ** (-jq.sqnr_db(reference, direct) / 10), rel=1e-3)
  others = [p for p in KERNELS if p != path]
  direct = model.apply(with_fake_quant_kernels(params, others, spec), x_test)
  assert all_but[path] == pytest.approx(
      10 ** (-jq.sqnr_db(reference, direct) / 10), rel=1e-3)
  # Additive up to how the layers' errors interact (measured: within 17 %).
  total = sum(alone.values())
  for path in KERNELS:
    assert all_but[path] == pytest.approx(total - alone[path], rel=0.3), (
        alone, all_but)


# Not marked slow (about 20 s): the one end-to-end run of auto_recipe's
# default candidates (4 layers x 7 widths, then the proposals), which CI
# must cover; tests/test_transform.py checks its knapsack alone.
def test_auto_recipe_beats_every_uniform_recipe_within_its_budget(trained):
  """Between the sizes of uniform int3 and int4 (the best uniform recipe
  that fits is int3), mixing widths per layer loses far less."""
  model, params, _, x_test, y_test = trained
  metric = nll(y_test)
  run = lambda r, q: jq.quantized_apply(model.apply, r)(q, x_test)
  uniform = {}
  for spec in (jq.int4(), jq.int3()):
    recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
    q = jq.quantize_params(model.apply, params, recipe, x_test)
    uniform[spec.bits] = (jq.nbytes(q), metric(run(recipe, q)))
  budget = (uniform[4][0] + uniform[3][0]) // 2
  auto = jq.auto_recipe(model.apply, params, x_test, budget_bytes=budget,
                        metric=metric)
  assert isinstance(auto, jq.Recipe) and "Rule(" in str(auto)
  qa = jq.quantize_params(model.apply, params, auto, x_test)
  assert jq.nbytes(qa) <= budget
  # Measured: nll 0.063 (int4 0.061, int3 0.123, float 0.059).
  assert metric(run(auto, qa)) > uniform[3][1] + 0.03, (uniform, auto)
  with pytest.raises(ValueError, match="below the smallest reachable size"):
    jq.auto_recipe(model.apply, params, x_test, budget_bytes=1000)


def test_all_but_one_with_rules_naming_single_layers():
  """Rules that each name one layer: with that layer kept float, its rule
  takes nothing, which all_but_one must accept (not 'shadowed')."""
  f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  p = {"w1": jax.random.normal(jax.random.key(0), (8, 8)),
       "w2": jax.random.normal(jax.random.key(1), (8, 2))}
  x = jax.random.normal(jax.random.key(2), (16, 8))
  recipe = jq.Recipe([jq.Rule("w1", weight=jq.int4()),
                      jq.Rule("w2", weight=jq.int2())])
  drops = jq.sensitivity(f, p, recipe, x, all_but_one=True)
  # all_but_one of w1 quantizes only w2 (int2): its noise, measured alone.
  only_w2 = jq.sensitivity(f, p, recipe, x)["w2"]
  assert drops["w1"] == pytest.approx(only_w2, rel=1e-6)
