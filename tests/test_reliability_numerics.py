"""Silent wrong answers and confusing errors in the numerics layers.

Non-finite values under jit, float32 overflow, unchecked fake_quant inputs,
size-0 tensors, QuantSpec / Rule field types and shadowed rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import numerics, packing

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


# ------------------------------------------------ NaN and inf under jit (3)

# Row 0 holds a NaN; row 1 an inf, a -inf and 0.5. One scale per row.
ROWS = np.array([[NAN, 0.5, 0.25], [INF, -INF, 0.5]], np.float32)
CLIPPED = jq.int8(channel_axes=(0,), clip=(-1.0, 1.0))
STEP = np.float32(1.0) * np.float32(1.0 / 127)  # the scale of clip (-1, 1)
# Row 1: inf and -inf saturate to the bounds, 0.5 -> round(63.5) = 64.
ROW1 = np.array([127, -127, 64], np.float32) * STEP


def test_fixed_clip_fake_quant_keeps_nan_and_saturates_inf_under_jit():
  out = np.asarray(jax.jit(lambda a: jq.fake_quant(a, CLIPPED))(ROWS))
  assert np.isnan(out[0]).all()  # was [0, 0.503937, 0.251968]
  np.testing.assert_array_equal(out[1], ROW1)


def test_fixed_clip_quantize_makes_a_nan_block_dequantize_to_nan_under_jit():
  q = jax.jit(lambda a: jq.quantize(a, CLIPPED))(ROWS)
  np.testing.assert_array_equal(np.asarray(q.scale), [[NAN], [STEP]])
  out = np.asarray(jax.jit(jq.dequantize)(q))
  assert np.isnan(out[0]).all()
  np.testing.assert_array_equal(out[1], ROW1)
  np.testing.assert_array_equal(np.asarray(q.values[1]), [127, -127, 64])


def test_calibrated_value_range_keeps_nan_under_jit():
  spec = jq.int8(granularity="tensor")
  fq = jax.jit(lambda a: jq.fake_quant(a, spec, value_range=(-1.0, 1.0)))
  out = np.asarray(fq(ROWS))
  assert np.isnan(out).all()  # one block for the tensor: all of it NaN
  out = np.asarray(fq(ROWS[1:]))
  np.testing.assert_array_equal(out[0], ROW1)


def test_fake_quant_with_scale_keeps_nan_elementwise():
  # The engine fake-quantizes activations with this, with its own scales.
  x = jnp.array([NAN, 0.5, INF, -0.25], jnp.float32)
  fq = jax.jit(lambda a: numerics.fake_quant_with_scale(
      a, jnp.float32(STEP), None, jq.int8()))
  np.testing.assert_array_equal(
      np.asarray(fq(x)), np.array([NAN, 64, 127, -32], np.float32) * STEP)


def test_gradient_is_zero_on_a_nan_block_and_clipped_infs():
  grad = jax.jit(jax.grad(lambda a: jq.fake_quant(a, CLIPPED).sum()))(ROWS)
  np.testing.assert_array_equal(np.asarray(grad), [[0, 0, 0], [0, 0, 1]])


def test_data_range_nan_or_inf_still_gives_nan_block_under_jit():
  x = np.array([[1.0, NAN], [-3.0, 3.0], [INF, 1.0]], np.float32)
  spec = jq.int8(channel_axes=(0,))
  for out in (jax.jit(lambda a: jq.fake_quant(a, spec))(x),
              jax.jit(lambda a: jq.quantize(a, spec).dequantize())(x)):
    out = np.asarray(out)
    assert np.isnan(out[[0, 2]]).all()
    np.testing.assert_array_equal(out[1], [-3.0, 3.0])


# -------------------------------------------------- float32 overflow (7)

@pytest.mark.parametrize("spec", [
    jq.uint8(granularity="tensor"),
    jq.int8(symmetric=False, granularity="tensor"),
    jq.int4(symmetric=False, granularity="tensor")])
def test_asymmetric_range_wider_than_float32_stays_finite(spec):
  x = np.array([[3e38, -3e38, 1e38]], np.float32)
  for q in (jq.quantize(x, spec), jax.jit(lambda a: jq.quantize(a, spec))(x)):
    step = np.float32(1.0 / (spec.qmax - spec.qmin))
    scale = np.float32(3e38) * step + np.float32(3e38) * step
    np.testing.assert_array_equal(np.asarray(q.scale), [[scale]])
    out = np.asarray(q.dequantize())  # was [[nan, nan, nan]]
    np.testing.assert_allclose(out[0, :2], x[0, :2], rtol=1e-6)
    assert abs(out[0, 2] - x[0, 2]) <= scale / 2


def test_ordinary_asymmetric_scale_is_unchanged():
  scale, _ = numerics.scale_from_range(-2.0, 6.0, jq.uint8())
  assert float(scale) == np.float32(8.0) * np.float32(1.0 / 255)


@pytest.mark.parametrize("clip", [(-INF, INF), (0.0, INF), (-1e39, 1.0),
                                  (NAN, 1.0)])
def test_non_finite_or_non_float32_clip_is_rejected(clip):
  with pytest.raises(ValueError, match=r"clip=.*clip bounds must be finite "
                     r"float32 values"):
    jq.int8(clip=clip)


def test_float64_beyond_float32_is_rejected_with_the_tensor_name(x64):
  x = jnp.array([[1e300, 1.0], [2.0, -3.0]], jnp.float64)
  assert x.dtype == jnp.float64
  for fn in (jq.quantize, jq.fake_quant):
    with pytest.raises(ValueError, match=r"dec/kernel: 1 value\(s\) beyond "
                       r"the float32 range"):
      fn(x, jq.int8(), where="dec/kernel")
  ok = jnp.array([[1e30, 1.0], [2.0, -3.0]], jnp.float64)
  q = jq.quantize(ok, jq.int8(granularity="tensor"))
  assert q.dequantize().dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(q.dequantize())[0, 0], 1e30,
                             rtol=1e-6)


def test_numpy_float64_beyond_float32_is_named_not_called_inf():
  x = np.array([[1e300, 1.0]], np.float64)  # x64 off: asarray makes it inf
  with pytest.raises(ValueError, match=r"w: 1 value\(s\) beyond the float32"):
    jq.quantize(x, jq.int8(), where="w")


# ----------------------------------------- fake_quant input checks (8)

@pytest.mark.parametrize("x", [np.array([100, -3], np.int32),
                               np.array([True, False])])
def test_fake_quant_rejects_non_float_input(x):
  with pytest.raises(ValueError, match=r"act: cannot quantize dtype "
                     r"(int32|bool); only float tensors"):
    jq.fake_quant(x, jq.int8(), where="act")


def test_fake_quant_rejects_nan_outside_jit():
  x = jnp.array([[1.0, NAN], [2.0, 3.0]])
  with pytest.raises(ValueError, match=r"act: 1 NaN/inf value\(s\)"):
    jq.fake_quant(x, jq.int8(), where="act")


def test_fake_quant_stochastic_without_key_names_the_tensor():
  with pytest.raises(ValueError, match="act: rounding='stochastic' needs"):
    jq.fake_quant(jnp.ones((2, 2)), jq.int8(rounding="stochastic"),
                  where="act")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_nan_is_rejected_outside_jit(dtype):
  x = jnp.array([[1.0, NAN]], dtype)  # bfloat16 has NumPy kind 'V'
  with pytest.raises(ValueError, match=r"w: 1 NaN/inf value\(s\)"):
    jq.quantize(x, jq.int8(), where="w")


# ------------------------------------------------- size-0 tensors (15)

@pytest.mark.parametrize("shape,spec,scale_shape,scale", [
    ((0, 4), jq.int8(), (1, 4), 1.0),
    ((0, 4), jq.int4(group_size=2), (0, 4), 1.0),
    ((0, 4), jq.uint8(granularity="tensor"), (1, 1), 1.0),
    ((4, 0), jq.int3(), (1, 0), 1.0),
    ((0, 5), jq.int2(clip="mse"), (1, 5), 1.0),
    ((2, 0, 3), jq.int8(clip=(-1.0, 1.0)), (1, 1, 3), STEP),
])
def test_size_zero_tensor_quantizes_to_an_empty_qarray(shape, spec,
                                                       scale_shape, scale):
  # Empty blocks get the all-zero tensor's scale 1 (or the fixed clip's).
  x = jnp.zeros(shape, jnp.float32)
  for q in (jq.quantize(x, spec), jax.jit(lambda a: jq.quantize(a, spec))(x)):
    assert q.shape == shape
    assert q.values.shape == shape[:-1] + (
        packing.packed_length(shape[-1], spec.bits),)
    np.testing.assert_array_equal(np.asarray(q.scale),
                                  np.full(scale_shape, scale, np.float32))
    if q.zero_point is not None:
      np.testing.assert_array_equal(np.asarray(q.zero_point),
                                    np.full(scale_shape, spec.qmin))
    out = q.dequantize()
    assert out.shape == shape and out.dtype == jnp.float32
  assert jq.fake_quant(x, spec).shape == shape


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 7)])
def test_packing_size_zero(bits, shape):
  packed = packing.pack(jnp.zeros(shape, jnp.int8), bits)
  assert packed.shape == shape[:-1] + (packing.packed_length(shape[-1], bits),)
  assert packing.unpack(packed, bits, shape, True).shape == shape


# ------------------------------------------------ QuantSpec field types (16)

@pytest.mark.parametrize("kwargs,message", [
    (dict(signed="no"), r"signed='no'; signed must be True or False"),
    (dict(symmetric="false"), r"symmetric='false'; symmetric must be True"),
    (dict(symmetric=1), r"symmetric=1; symmetric must be True or False"),
    (dict(granularity="group", group_size=True),
     r"group_size=True; group_size must be an int"),
    (dict(granularity="group", group_size=4.0),
     r"group_size=4.0; group_size must be an int"),
    (dict(granularity="group", group_size=4, group_axis="0"),
     r"group_axis='0'; group_axis must be an int"),
    (dict(granularity="group", group_size=4, group_axis=False),
     r"group_axis=False; group_axis must be an int"),
    (dict(channel_axes=1.5), r"channel_axes=1.5; give an int or a tuple of"),
    (dict(channel_axes="01"), r"channel_axes='01'; give an int or a tuple"),
    (dict(channel_axes=(0, True)), r"channel_axes=\(0, True\); give an int"),
    (dict(channel_axes=(0, 1.0)), r"channel_axes=\(0, 1.0\); give an int"),
    (dict(clip=5), r"clip=5; give a range \(lo, hi\) of two numbers"),
    (dict(clip=(0.0, 1.0, 2.0)), r"clip=\(0.0, 1.0, 2.0\); give a range"),
    (dict(clip=("-1", "1")), r"clip=\('-1', '1'\); give a range"),
    (dict(clip=(False, True)), r"clip=\(False, True\); give a range"),
    (dict(bits=8.0), r"bits=8.0; bits must be an integer"),
])
def test_quant_spec_field_types_are_checked(kwargs, message):
  with pytest.raises(ValueError, match="invalid QuantSpec: " + message):
    jq.QuantSpec(**kwargs)


def test_int4_shorthand_rejects_bool_group_size():
  with pytest.raises(ValueError, match="group_size=True"):
    jq.int4(group_size=True)


def test_numpy_ints_and_lists_are_normalized_to_python_ints():
  spec = jq.QuantSpec(bits=np.int64(4), channel_axes=[np.int64(1)])
  assert spec == jq.int4(channel_axes=(1,))
  assert hash(spec) == hash(jq.int4(channel_axes=(1,)))
  assert type(spec.bits) is int and type(spec.channel_axes[0]) is int
  grouped = jq.int4(group_size=np.int32(8), group_axis=np.int8(0))
  assert (type(grouped.group_size), type(grouped.group_axis)) == (int, int)
  assert jq.int8(clip=[np.float32(-1), 2]).clip == (-1.0, 2.0)


# ---------------------------------------------------------- Rule (17, 9.9)

@pytest.mark.parametrize("pattern", [5, b".*kernel", None, [".*"]])
def test_rule_pattern_must_be_a_str(pattern):
  with pytest.raises(ValueError, match="Rule pattern must be a str regex"):
    jq.Rule(pattern, weight=jq.int8())


def test_rule_options_are_keyword_only():
  positional = (r".*kernel", jq.int8())  # deliberately positional
  with pytest.raises(TypeError, match="positional"):
    jq.Rule(*positional)
  rule = jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8(), optional=True)
  assert (rule.weight, rule.act, rule.optional) == (jq.int8(), jq.int8(), True)
  with pytest.raises(ValueError, match="optional must be True or False"):
    jq.Rule(r".*kernel", weight=jq.int8(), optional="yes")


KERNELS = ["params/Dense_0/kernel", "params/Dense_1/kernel"]
ALL = KERNELS + ["params/Dense_0/bias", "params/embedding"]


def test_weight_rule_behind_a_broader_one_is_reported_as_shadowed():
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8()),
                      jq.Rule(r".*Dense_0/kernel", weight=jq.int4())])
  with pytest.raises(ValueError) as e:
    recipe.check_used(KERNELS, ALL)
  message = str(e.value)
  assert message.startswith(
      "Rule 1 ('.*Dense_0/kernel') is shadowed by rule 0 ('.*kernel'): ")
  assert "(params/Dense_0/kernel)" in message
  assert "matches no" not in message


def test_shadowing_names_every_earlier_rule():
  recipe = jq.Recipe([jq.Rule(r".*Dense_0/kernel", weight=jq.int8()),
                      jq.Rule(r".*Dense_1/kernel", weight=jq.int4()),
                      jq.Rule(r".*kernel", weight=jq.int2())])
  with pytest.raises(ValueError, match=r"Rule 2 \('\.\*kernel'\) is shadowed "
                     r"by rule 0 \('\.\*Dense_0/kernel'\) and rule 1 "):
    recipe.check_used(KERNELS, ALL, what="matmul parameter")
  optional = jq.Recipe(recipe.rules[:2] + (
      jq.Rule(r".*kernel", weight=jq.int2(), optional=True),))
  optional.check_used(KERNELS, ALL)


def test_keep_float_rule_behind_a_catch_all_is_reported_as_shadowed():
  # The embedding would be quantized by rule 0 although rule 1 says float.
  recipe = jq.Recipe([jq.Rule(r".*", weight=jq.int8()),
                      jq.Rule(r".*embedding", weight=None)])
  with pytest.raises(ValueError, match=r"Rule 1 \('\.\*embedding'\) is "
                     r"shadowed by rule 0 \('\.\*'\).*\(params/embedding\)"):
    recipe.check_used(KERNELS + ["params/embedding"], ALL)
  jq.Recipe(recipe.rules[::-1]).check_used(KERNELS, ALL)


def test_rule_matching_only_non_matmul_paths_says_so():
  recipe = jq.Recipe([jq.Rule(r".*bias", weight=jq.int8())])
  with pytest.raises(ValueError, match=r"(?s)Rule '\.\*bias' matches no "
                     r"matmul parameter \(it matches only paths that are not "
                     r"a matmul parameter: params/Dense_0/bias\).*"
                     r"params/Dense_1/kernel"):
    recipe.check_used(KERNELS, ALL, what="matmul parameter")
