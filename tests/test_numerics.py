"""Quantization math against NumPy references and its error bounds."""

import dataclasses

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxquant as jq
from jaxquant import numerics


def _spec_and_shape(draw):
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
  bits = draw(st.integers(2, 8))
  signed = draw(st.booleans())
  symmetric = draw(st.booleans()) if signed else False
  kind = draw(st.sampled_from(["tensor", "channel", "group"]))
  kwargs = {}
  if kind == "channel":
    kwargs["channel_axes"] = (draw(st.integers(0, len(shape) - 1)),)
  if kind == "group":
    axis = draw(st.integers(0, len(shape) - 1))
    divisors = [d for d in range(1, shape[axis] + 1) if shape[axis] % d == 0]
    kwargs.update(group_axis=axis, group_size=draw(st.sampled_from(divisors)))
  spec = jq.QuantSpec(bits=bits, signed=signed, symmetric=symmetric,
                      granularity=kind, **kwargs)
  return spec, shape


@st.composite
def spec_and_data(draw):
  spec, shape = _spec_and_shape(draw)
  data = draw(hnp.arrays(np.float32, shape, elements=st.floats(
      -100, 100, width=32)))
  return spec, data


def _blocks(x, q):
  """Per element: the scale and zero point that apply to it."""
  scale = q.scale if q.zero_point is None else q.scale
  if q.spec.granularity == "group":
    scale = jnp.repeat(scale, q.spec.group_size, axis=q.spec.group_axis)
    zp = None if q.zero_point is None else jnp.repeat(
        q.zero_point, q.spec.group_size, axis=q.spec.group_axis)
  else:
    zp = q.zero_point
  zp = jnp.zeros_like(scale) if zp is None else zp
  return (np.broadcast_to(np.asarray(scale), x.shape),
          np.broadcast_to(np.asarray(zp), x.shape))


# 5/8 of the profile's examples (25 of CI's 40): every example is a new
# shape, and a new shape compiles every op of quantize / dequantize (about
# 0.3 s each, in both of CI's environments).
FEWER = settings(max_examples=settings.default.max_examples * 5 // 8)


@FEWER
@given(spec_and_data())
def test_round_trip_error_is_at_most_half_a_step_inside_clip_range(case):
  spec, x = case
  q = jq.quantize(x, spec)
  x_hat = np.asarray(q.dequantize())
  scale, zp = _blocks(x, q)
  lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
  slack = scale * 1e-4  # float rounding of lo and hi themselves
  inside = (x >= lo - slack) & (x <= hi + slack)
  err = np.abs(x_hat - x)
  assert np.all(err[inside] <= scale[inside] / 2 * (1 + 1e-5) + 1e-6)
  # Signed specs computed from the data clip nothing.
  if spec.signed:
    assert inside.all()


@FEWER
@given(spec_and_data())
def test_jit_and_no_jit_agree(case):
  spec, x = case
  eager = jq.quantize(x, spec)
  jitted = jax.jit(lambda v: jq.quantize(v, spec))(x)
  chex.assert_trees_all_equal(eager, jitted)


def test_asymmetric_represents_min_and_max_exactly():
  x = np.array([[-3.7, 0.2, 9.1], [1.0, 5.5, 2.25]], np.float32)
  for spec in (jq.int8(symmetric=False, granularity="tensor"), jq.uint8(
      granularity="tensor"), jq.int4(symmetric=False, granularity="tensor")):
    x_hat = np.asarray(jq.quantize(x, spec).dequantize())
    np.testing.assert_allclose(x_hat.min(), x.min(), rtol=1e-6)
    np.testing.assert_allclose(x_hat.max(), x.max(), rtol=1e-6)


def _numpy_group_quantize(x, bits, group_size):
  """Reference: symmetric per-group along axis 0 of an (in, out) matrix."""
  qmax = 2 ** (bits - 1) - 1
  g = x.reshape(x.shape[0] // group_size, group_size, x.shape[1])
  scale = np.abs(g).max(axis=1, keepdims=True) / qmax
  scale = np.where(scale > 0, scale, 1.0)
  q = np.clip(np.round(g / scale), -qmax, qmax)
  return q.reshape(x.shape), scale[:, 0, :], (q * scale).reshape(x.shape)


@pytest.mark.parametrize("bits,group_size", [(4, 8), (4, 32), (2, 16), (8, 4)])
def test_per_group_matches_numpy_reference(bits, group_size):
  x = np.random.default_rng(bits).normal(size=(64, 10)).astype(np.float32)
  q = jq.quantize(x, jq.QuantSpec(bits=bits, granularity="group",
                                  group_size=group_size))
  ref_q, ref_scale, ref_x = _numpy_group_quantize(x, bits, group_size)
  np.testing.assert_array_equal(np.asarray(q.int_values()), ref_q)
  np.testing.assert_allclose(np.asarray(q.scale), ref_scale, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), ref_x, rtol=1e-6)
  assert q.scale.shape == (64 // group_size, 10)


def test_per_channel_matches_numpy_reference():
  x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  q = jq.quantize(x, jq.int8(channel_axes=(1,)))
  scale = np.abs(x).max(axis=0, keepdims=True) / 127
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.values),
                                np.clip(np.round(x / scale), -127, 127))


@pytest.mark.parametrize("spec", [jq.int8(), jq.uint8(), jq.int4(group_size=2),
                                  jq.int8(symmetric=False)])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_zero_and_constant_tensors_round_trip_exactly(spec, value):
  x = jnp.full((4, 6), value, jnp.float32)
  q = jq.quantize(x, spec)
  assert np.all(np.isfinite(np.asarray(q.scale)))
  assert np.all(np.asarray(q.scale) > 0)
  expected = max(value, 0.0) if (not spec.signed and spec.symmetric) else value
  np.testing.assert_allclose(np.asarray(q.dequantize()), expected, rtol=1e-6)


def test_subnormal_range_gives_finite_scale():
  x = jnp.full((3, 3), 1e-42, jnp.float32)
  q = jq.quantize(x, jq.int8())
  assert np.all(np.isfinite(np.asarray(q.dequantize())))


def test_nan_input_raises_outside_jit_and_propagates_inside():
  x = jnp.array([[1.0, jnp.nan], [2.0, 3.0]])
  with pytest.raises(ValueError, match="layer/kernel: 1 NaN/inf"):
    jq.quantize(x, jq.int8(), where="layer/kernel")
  q = jax.jit(lambda v: jq.quantize(v, jq.int8(channel_axes=(0,))))(x)
  out = np.asarray(q.dequantize())
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_fake_quant_forward_equals_quantize_dequantize():
  x = jax.random.normal(jax.random.key(1), (16, 8))
  for spec in (jq.int8(), jq.int4(group_size=4), jq.uint8(granularity="tensor")):
    np.testing.assert_array_equal(np.asarray(jq.fake_quant(x, spec)),
                                  np.asarray(jq.quantize(x, spec).dequantize()))


def test_fake_quant_gradient_is_one_inside_zero_outside():
  x = jnp.linspace(-2.0, 2.0, 41)
  spec = jq.int8(granularity="tensor", clip=(-1.0, 1.0))
  grad = jax.grad(lambda v: jq.fake_quant(v, spec).sum())(x)
  inside = np.abs(np.asarray(x)) <= 1.0
  np.testing.assert_array_equal(np.asarray(grad), inside.astype(np.float32))
  assert inside.sum() == 21
  # Under jit too.
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jax.grad(lambda v: jq.fake_quant(v, spec).sum()))(x)),
      np.asarray(grad))


def test_stochastic_rounding_is_unbiased_and_needs_a_key():
  spec = jq.int8(granularity="tensor", rounding="stochastic", clip=(-127, 127))
  x = jnp.full((20000,), 0.3)
  q = jq.quantize(x, spec, key=jax.random.key(0))
  assert abs(float(q.values.astype(jnp.float32).mean()) - 0.3) < 0.02
  with pytest.raises(ValueError, match="PRNG key"):
    jq.quantize(x, spec)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=0), r"bits=0; bits must be an integer in \[2, 8\]"),
    (dict(bits=33), r"bits=33"),
    (dict(granularity="row"), "granularity='row'"),
    (dict(granularity="group"), "needs a positive integer group_size"),
    (dict(group_size=4), "set granularity='group'"),
    (dict(rounding="up"), "rounding='up'"),
    (dict(clip=(1.0, -1.0)), "lo < hi"),
    (dict(clip="max"), "clip='max'; give a range"),
])
def test_bad_specs_raise_with_the_fix(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jq.QuantSpec(**kwargs)


def test_data_dependent_errors_name_the_path():
  x = jnp.ones((6, 4))
  with pytest.raises(ValueError, match="enc/kernel: group_size=4 does not "
                     "divide axis 0.*divides 6"):
    jq.quantize(x, jq.int4(group_size=4), where="enc/kernel")
  with pytest.raises(ValueError, match="enc/kernel: axis 3 is out of range"):
    jq.quantize(x, jq.int8(channel_axes=(3,)), where="enc/kernel")


def test_scale_from_range_formulas():
  scale, zp = numerics.scale_from_range(-2.0, 6.0, jq.int8(symmetric=False))
  np.testing.assert_allclose(float(scale), 8.0 / 255, rtol=1e-6)
  np.testing.assert_allclose(float(zp), -128 + 2.0 / (8.0 / 255), rtol=1e-6)
  scale, zp = numerics.scale_from_range(-2.0, 6.0, jq.int4())
  np.testing.assert_allclose(float(scale), 6.0 / 7, rtol=1e-6)
  assert zp is None


@pytest.mark.parametrize("spec", [jq.int2(clip="mse"), jq.int4(clip="mse"),
                                  jq.int3(clip="mse", symmetric=False),
                                  jq.int4(group_size=16, clip="mse")])
def test_mse_clip_is_the_best_ratio_of_a_numpy_grid_search(spec):
  x = np.random.default_rng(3).standard_t(3, size=(64, 6)).astype(np.float32)
  q = jq.quantize(x, spec)
  plain = jq.quantize(x, dataclasses.replace(spec, clip=None))
  resolved = numerics.resolve_axes(spec, x.ndim)
  grouped = spec.granularity == "group"

  def blocks(a):  # (blocks, elements) in the layout of the scales
    if grouped:
      return a.reshape(4, 16, 6).transpose(0, 2, 1).reshape(24, 16)
    return a.T

  xb = blocks(x)
  err_of = lambda qa: ((blocks(np.asarray(qa.dequantize())) - xb) ** 2).sum(1)
  lo0 = xb.min(1) if not spec.symmetric else -np.abs(xb).max(1)
  hi0 = xb.max(1) if not spec.symmetric else np.abs(xb).max(1)
  best = np.full(len(xb), np.inf)
  for r in numerics.MSE_RATIOS:
    lo, hi = lo0 * r, hi0 * r
    if spec.symmetric:
      s = np.maximum(-lo, hi) / spec.qmax
      xh = np.clip(np.round(xb / s[:, None]), spec.qmin, spec.qmax) * s[:, None]
    else:
      s = (hi - lo) / (spec.qmax - spec.qmin)
      z = spec.qmin - lo / s
      qv = np.clip(np.round(xb / s[:, None] + z[:, None]), spec.qmin,
                   spec.qmax)
      xh = (qv - z[:, None]) * s[:, None]
    best = np.minimum(best, ((xh - xb) ** 2).sum(1))
  np.testing.assert_allclose(err_of(q), best, rtol=1e-3, atol=1e-6)
  assert (err_of(q) <= err_of(plain) * (1 + 1e-5)).all()
  assert err_of(q).sum() < 0.95 * err_of(plain).sum()
  assert resolved.clip == "mse"
