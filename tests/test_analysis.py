"""Per-layer report, sensitivity and automatic mixed precision."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxquant as jq
from experiments import demo


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def trained():
  x_train, y_train, x_test, y_test = demo.digits(seed=0)
  x_train, x_test = x_train[..., None], x_test[..., None]
  model = CNN()
  params = demo.train(model, x_train, y_train, epochs=12)
  return model, params, x_train, x_test, y_test


def nll(y):
  return lambda logits: -float(
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


def test_layer_report_numbers_and_figures(trained, tmp_path):
  model, params, x_train, x_test, _ = trained
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])
  stats = jq.calibrate(model.apply, params, recipe, [x_train[:256]],
                       progress=False)
  rep = jq.layer_report(model.apply, params, recipe, x_test, stats=stats)
  assert [r.path for r in rep.rows] == [
      f"params/{n}/kernel" for n in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")]
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


def test_sensitivity_orders_bit_widths(trained):
  model, params, _, x_test, y_test = trained
  drops = {}
  for spec in (jq.int8(), jq.int2()):
    recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
    drops[spec.bits] = jq.sensitivity(model.apply, params, recipe, x_test)
  for path in drops[8]:
    assert drops[2][path] > 10 * drops[8][path] > 0
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int2())])
  loss_drop = jq.sensitivity(model.apply, params, recipe, x_test,
                             metric=nll(y_test))
  assert loss_drop["params/Dense_0/kernel"] > 0
  all_but = jq.sensitivity(model.apply, params, recipe, x_test,
                           metric=nll(y_test), all_but_one=True)
  assert set(all_but) == set(loss_drop)


def test_auto_recipe_beats_uniform_int4_within_its_size(trained):
  model, params, _, x_test, y_test = trained
  uniform = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4())])
  q4 = jq.quantize_params(model.apply, params, uniform, x_test)
  budget = jq.nbytes(q4)
  metric = nll(y_test)
  auto = jq.auto_recipe(model.apply, params, x_test, budget_bytes=budget,
                        metric=metric)
  assert isinstance(auto, jq.Recipe) and "Rule(" in str(auto)
  qa = jq.quantize_params(model.apply, params, auto, x_test)
  assert jq.nbytes(qa) <= budget
  run = lambda r, q: jq.quantized_apply(model.apply, r)(q, x_test)
  assert metric(run(auto, qa)) > metric(run(uniform, q4))
  with pytest.raises(ValueError, match="below the smallest reachable size"):
    jq.auto_recipe(model.apply, params, x_test, budget_bytes=1000)
