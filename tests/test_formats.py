"""fp8 and nf4 formats: codes against NumPy / ml_dtypes references, and the
engine end to end (quantize_params, quantized_apply, fake_quant_apply,
report)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jaxquant as jq
from jaxquant import formats
from jaxquant.engine import lowering

FP8 = {"fp8_e4m3": (jq.fp8_e4m3, ml_dtypes.float8_e4m3fn, 448.0),
       "fp8_e5m2": (jq.fp8_e5m2, ml_dtypes.float8_e5m2, 57344.0)}

arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2,
                                                 min_side=1, max_side=9),
                    # XLA:CPU may flush float32 subnormal inputs to zero.
                    elements=st.floats(-1e4, 1e4, width=32,
                                       allow_subnormal=False))


# Fewer examples than the profile's (CI: 40): each is a new shape, which
# compiles quantize's ops anew (0.1 - 0.4 s). fp8: half of them per format
# and granularity (CI: 20, 80 in all); nf4: 5/8 (CI: 25).
@pytest.mark.parametrize("name", sorted(FP8))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@settings(max_examples=settings.default.max_examples // 2)
@given(x=arrays)
def test_fp8_codes_are_the_float8_cast_of_the_scaled_value(name, granularity,
                                                           x):
  make, dtype, top = FP8[name]
  q = jq.quantize(x, make(granularity=granularity))
  absmax = np.abs(x).max(axis=None if granularity == "tensor" else 0,
                  keepdims=True)
  tiny = np.finfo(np.float32).tiny  # scales never underflow to 0
  scale = np.where(absmax > 0, np.maximum(
      absmax.astype(np.float32) * np.float32(1 / top), tiny), 1)
  scale = scale.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(q.scale), scale)
  expected = np.clip(x / scale, -top, top).astype(dtype)
  np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8),
                                expected.view(np.uint8))
  np.testing.assert_array_equal(
      np.asarray(q.dequantize()), expected.astype(np.float32) * scale)


@settings(max_examples=settings.default.max_examples * 5 // 8)
@given(x=arrays)
def test_nf4_codes_are_the_nearest_code_value(x):
  q = jq.quantize(x, jq.nf4(group_size=None))  # per channel
  absmax = np.abs(x).max(axis=0, keepdims=True)
  scale = np.where(absmax > 0, absmax, 1).astype(np.float32)
  v = x / scale
  nearest = np.abs(v[..., None] - formats.NF4).argmin(-1)
  got = np.asarray(q.int_values())
  # Ties between two code values may go either way; the distance may not.
  np.testing.assert_allclose(np.abs(v - formats.NF4[got]),
                             np.abs(v - formats.NF4[nearest]), atol=1e-6)
  # Within half the widest gap between neighbouring codes of the value.
  assert np.all(np.abs(np.asarray(q.dequantize()) - x)
                <= 0.5 * np.max(np.diff(formats.NF4)) * scale + 1e-6)


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_grid_rounding_in_float32_equals_the_float8_cast(name):
  _, dtype, top = FP8[name]
  rng = np.random.default_rng(0)
  v = rng.uniform(-1, 1, 100_000) * 10 ** rng.uniform(-12, 5, 100_000)
  v = np.clip(v, -top, top).astype(np.float32)  # subnormals included
  got = np.asarray(jax.jit(lambda a: formats.round_to_grid(a, name))(v))
  np.testing.assert_array_equal(got, v.astype(dtype).astype(np.float32))


def test_nf4_is_packed_two_per_byte_with_group_scales():
  x = jax.random.normal(jax.random.key(0), (128, 16))
  q = jq.quantize(x, jq.nf4())
  assert q.values.dtype == jnp.uint8 and q.values.shape == (128, 8)
  assert q.scale.shape == (2, 16)  # 128 / 64 groups on the contraction axis
  assert q.nbytes == 128 * 16 // 2 + 2 * 16 * 4
  err_nf4 = jq.sqnr_db(x, q.dequantize())
  err_int4 = jq.sqnr_db(x, jq.quantize(x, jq.int4(group_size=64))
                        .dequantize())
  assert err_nf4 > err_int4  # normal weights: the normal-quantile codebook


def test_fp8_fake_quant_is_jit_invariant_and_keeps_nan():
  x = jnp.array([[1.0, -0.3, jnp.nan], [2.0, 0.1, 0.2]])
  spec = jq.fp8_e4m3(granularity="tensor", clip=(-2.0, 2.0))
  out = np.asarray(jax.jit(lambda a: jq.fake_quant(a, spec))(x))
  assert np.isnan(out).all()  # the NaN's block (the whole tensor) is NaN
  y = x[1:]
  np.testing.assert_array_equal(np.asarray(jq.fake_quant(y, spec)),
                                np.asarray(jax.jit(
                                    lambda a: jq.fake_quant(a, spec))(y)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(format="fp8"), "format='fp8'"),
    (dict(format="fp8_e4m3", bits=4), "bits=4 with format='fp8_e4m3'"),
    (dict(format="nf4", bits=4, symmetric=False), "signed and symmetric"),
    (dict(format="fp8_e5m2", rounding="stochastic"), "rounds to nearest")])
def test_bad_format_specs_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jq.QuantSpec(**kwargs)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(64)(x)))


def _mlp():
  model, x = MLP(), jax.random.normal(jax.random.key(1), (16, 128))
  return model, model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("make", [jq.fp8_e4m3, jq.fp8_e5m2])
def test_fp8_w8a8_runs_fp8_and_matches_fake_quant(make):
  model, params, x = _mlp()
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=make(), act=make())])
  qparams = jq.quantize_params(model.apply, params, recipe, x)
  out = jax.jit(jq.quantized_apply(model.apply, recipe))(qparams, x)
  fq = jax.jit(jq.fake_quant_apply(model.apply, recipe))(params, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fq), atol=2e-5)
  ref = model.apply(params, x)
  assert jq.sqnr_db(ref, out) > (20 if make is jq.fp8_e4m3 else 14)
  rep = jq.report(model.apply, qparams, recipe, x)
  assert rep.count("fp8") == 2
  assert [op.reason for op in rep.ops] == [lowering.FP8_REASON] * 2
  assert "2 fp8" in str(rep)


def test_nf4_runs_weight_only_and_equals_the_dequantized_model():
  model, params, x = _mlp()
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.nf4(group_size=32),
                              act=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, recipe, x)
  out = jax.jit(jq.quantized_apply(model.apply, recipe))(qparams, x)
  deq = jq.dequantize_tree(qparams)
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(model.apply(deq, x)), atol=1e-5)
  rep = jq.report(model.apply, qparams, recipe, x)
  assert [op.reason for op in rep.ops] == ["nf4 weights run weight-only"] * 2
  assert jq.nbytes(qparams) < 0.2 * jq.nbytes(params)


def test_nf4_activation_spec_is_rejected():
  model, params, x = _mlp()
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(), act=jq.nf4())])
  with pytest.raises(ValueError, match="nf4' is a weight format"):
    jq.quantize_params(model.apply, params, recipe, x)
