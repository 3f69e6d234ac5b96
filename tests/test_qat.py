"""Quantization-aware training with an ordinary optax loop, on real digits."""

import jax

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
