"""Quantization-aware training with an ordinary optax loop, on real digits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import data
import jaxquant as jq
import models


def test_qat_int4_digits_within_two_points_of_float():
  x_train, y_train, x_test, y_test = data.digits(seed=0)
  model = models.MLP()
  float_params = models.train(model, x_train, y_train, epochs=25)
  float_acc = models.accuracy(model.apply, float_params, x_test, y_test)

  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(), act=jq.int8())])
  qat_apply = jq.fake_quant_apply(model.apply, recipe)
  trained = models.train(model, x_train, y_train, epochs=25,
                         apply_fn=qat_apply)
  qparams = jq.quantize_params(model.apply, trained, recipe, x_test)
  assert all(q.spec.bits == 4 for q in jax.tree_util.tree_leaves(
      qparams, is_leaf=lambda a: isinstance(a, jq.QArray))
             if isinstance(q, jq.QArray))
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
  int_acc = models.accuracy(qapply, qparams, x_test, y_test)
  assert float_acc > 0.95
  assert int_acc >= float_acc - 0.02, (float_acc, int_acc)
  # The int4 tree really is small: packed kernels + float biases.
  assert jq.nbytes(qparams) < 0.2 * jq.nbytes(trained)


@pytest.mark.parametrize("depth", [1, 4, 16])
def test_qat_forward_tracks_int8_on_deep_models(depth):
  # Per layer QAT computes the int8 numbers up to float rounding; through
  # many layers a float difference can flip one activation's rounding and
  # the flips compound. Bound them against the quantization error itself.
  # Measured (512 rows): QAT vs int8 1e-7 / 1.6e-7 / 7.8e-4 at depth
  # 1 / 4 / 16, int8 vs float 6.6e-3 / 1.1e-2 / 1.9e-2.
  class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(depth):
        x = x + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))
      return x

  model = Deep()
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])
  x = jax.random.normal(jax.random.key(1), (512, 32))
  params = model.init(jax.random.key(0), x)
  qparams = jq.quantize_params(model.apply, params, recipe, x, progress=False)
  int8 = jax.jit(jq.quantized_apply(model.apply, recipe))(qparams, x)
  qat = jax.jit(jq.fake_quant_apply(model.apply, recipe))(params, x)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(qat, int8) <= 0.1 * rel(int8, model.apply(params, x))
  if depth == 1:
    assert rel(qat, int8) < 1e-6
