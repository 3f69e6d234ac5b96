"""`jaxquant.gptq_core` against the NumPy reference, RTN, jit and vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxquant as jq
from jaxquant import numerics
from jaxquant.gptq_core import gptq_core

import gptq_reference as ref

STATIC = ("spec", "block_size", "damp", "act_order", "per_tensor")


def layer(seed, n, k, mix=0.9, samples=None):
  """w (N, K), inputs x with correlated features, and h = x^T x."""
  rng = np.random.default_rng(seed)
  a = np.eye(k) + mix * rng.normal(size=(k, k)) / np.sqrt(k)
  x = (rng.normal(size=(samples or 4 * k, k)) @ a).astype(np.float32)
  w = rng.normal(size=(n, k)).astype(np.float32)
  return w, x, x.T @ x


def groups_of(k, size):
  return np.zeros(k, np.int32) if size is None else np.arange(k) // size


def rtn(w, ids, spec, per_tensor=False):
  """Round-to-nearest with each (row, group)'s own range, via numerics."""
  lo, hi = np.zeros((2, 1 if per_tensor else w.shape[0], ids.max() + 1))
  for g in range(ids.max() + 1):
    lo[:, g], hi[:, g] = ref.block_range(w[:, ids == g], spec, per_tensor)
  return np.asarray(qdq(w, lo, hi, ids, spec))


def qdq(w, lo, hi, ids, spec):
  scale, zero_point = numerics.scale_from_range(
      np.asarray(lo)[:, ids], np.asarray(hi)[:, ids], spec)
  return numerics.quantize_dequantize(jnp.asarray(w), scale, zero_point, spec)


def output_error(x, w, w_hat):
  return float(np.linalg.norm(x.astype(np.float64) @ (
      np.asarray(w_hat, np.float64) - w).T))


# name: (spec, groups, K, block_size, act_order, per_tensor); groups: None
# (per channel), a group size, or "scattered" (unequal, non-contiguous).
CASES = {
    "int4_channel": (jq.int4(), None, 48, 16, False, False),
    "int4_channel_act": (jq.int4(), None, 40, 16, True, False),
    "int4_g8": (jq.int4(), 8, 48, 16, False, False),
    "int4_g8_act": (jq.int4(), 8, 40, 16, True, False),
    "int3_g8_act": (jq.int3(), 8, 48, 16, True, False),
    "int2_g16": (jq.int2(), 16, 48, 32, False, False),
    "int8_act": (jq.int8(), None, 40, 16, True, False),
    "uint8_asym": (jq.uint8(), None, 40, 16, False, False),
    "uint8_asym_g8_act": (jq.uint8(), 8, 48, 16, True, False),
    "int4_g8_tensor_act": (jq.int4(), 8, 40, 16, True, True),
    "int4_tensor": (jq.int4(), None, 48, 16, False, True),
    "int4_clip": (jq.int4(clip=(-1.5, 1.5)), 8, 40, 16, True, False),
    "int4_scattered": (jq.int4(), "scattered", 40, 16, True, False),
    "int4_one_block": (jq.int4(), 8, 40, 128, False, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name, seed):
  spec, groups, k, block_size, act_order, per_tensor = CASES[name]
  ids = (np.random.default_rng(7).permutation(np.arange(k) * 5 // k)
         if groups == "scattered" else groups_of(k, groups))
  w, _, h = layer(seed, 16, k)
  kwargs = dict(block_size=block_size, act_order=act_order,
                per_tensor=per_tensor)
  w_hat, lo, hi, ok = gptq_core(w, h, ids, spec, **kwargs)
  w_ref, lo_ref, hi_ref, ok_ref = ref.gptq_reference(w, h, ids, spec,
                                                     **kwargs)
  assert bool(ok) and ok_ref
  assert lo.shape == hi.shape == (1 if per_tensor else 16, ids.max() + 1)
  np.testing.assert_allclose(lo, lo_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hi, hi_ref, rtol=1e-5, atol=1e-6)
  same = ref.codes(np.asarray(w_hat), lo_ref[:, ids], hi_ref[:, ids],
                   spec) == ref.codes(w_ref, lo_ref[:, ids], hi_ref[:, ids],
                                      spec)
  assert same.mean() >= 0.999
  np.testing.assert_array_less(np.abs(w_hat - w_ref), 1e-4 * np.abs(w).max())
  # GPTQ moved the weights off plain rounding (with a fixed clip, RTN
  # itself uses the same range).
  assert not np.array_equal(w_hat, rtn(w, ids, spec, per_tensor))


@pytest.mark.parametrize("spec", [jq.int4(), jq.uint8(), jq.nf4(),
                                  jq.fp8_e4m3(), jq.int3(clip=(-1.0, 2.0))],
                         ids=lambda s: s.short())
def test_ranges_give_back_the_codes(spec):
  w, _, h = layer(2, 8, 32)
  ids = groups_of(32, 8)
  w_hat, lo, hi, ok = gptq_core(w, h, ids, spec, block_size=8,
                                act_order=True)
  assert bool(ok)
  np.testing.assert_array_equal(qdq(w_hat, lo, hi, ids, spec), w_hat)


@pytest.mark.parametrize("spec,group_size", [
    (jq.int4(), None), (jq.int4(group_size=8), 8), (jq.uint8(), None),
    (jq.int3(group_size=16), 16)], ids=["int4", "int4_g8", "uint8",
                                      "int3_g16"])
def test_identity_hessian_is_round_to_nearest(spec, group_size):
  w, _, _ = layer(3, 12, 48)
  w_hat, _, _, ok = gptq_core(w, np.eye(48, dtype=np.float32),
                              groups_of(48, group_size), spec, block_size=16)
  assert bool(ok)
  # jq.quantize takes a Flax (in, out) kernel: the transpose of (N, K).
  expected = jq.quantize(jnp.asarray(w.T), spec).dequantize().T
  np.testing.assert_array_equal(w_hat, expected)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([3, 4]),
       group_size=st.sampled_from([None, 8]), act_order=st.booleans())
def test_output_error_at_most_round_to_nearest(seed, bits, group_size,
                                               act_order):
  spec = jq.QuantSpec(bits=bits)
  w, x, h = layer(seed, 16, 32)
  ids = groups_of(32, group_size)
  w_hat, _, _, ok = gptq_core(w, h, ids, spec, block_size=16,
                              act_order=act_order)
  assert bool(ok)
  assert output_error(x, w, w_hat) <= output_error(x, w, rtn(w, ids, spec))


@pytest.mark.parametrize("act_order,group_size,per_tensor", [
    (False, None, False), (True, 8, False), (True, None, True)])
def test_jit_and_vmap_match_per_layer_calls(act_order, group_size,
                                            per_tensor):
  ids = groups_of(40, group_size)
  layers = [layer(seed, 8, 40) for seed in range(3)]
  w = np.stack([l[0] for l in layers])
  h = np.stack([l[2] for l in layers])
  # One layer's Hessian is singular: ok is per layer.
  h[1] = 0.0
  h[1, :, :] = 4.0
  core = jax.jit(functools.partial(gptq_core, group_ids=ids),
                 static_argnames=STATIC)
  kwargs = dict(spec=jq.int4(), block_size=16, damp=0.0,
                act_order=act_order, per_tensor=per_tensor)
  stacked = jax.vmap(lambda w, h: core(w, h, **kwargs))(w, h)
  np.testing.assert_array_equal(stacked[3], [True, False, True])
  for i in (0, 2):
    single = gptq_core(w[i], h[i], ids, **kwargs)
    for got, want in zip(stacked, single):
      np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_singular_hessian_is_not_ok():
  _, x, _ = layer(4, 8, 32, samples=12)   # rank 12 < K = 32
  w, _, _ = layer(5, 8, 32)
  h = x.T @ x
  ids = groups_of(32, None)
  assert not bool(gptq_core(w, h, ids, jq.int4(), damp=0.0)[3])
  assert bool(gptq_core(w, h, ids, jq.int4(), damp=0.01)[3])


@pytest.mark.parametrize("act_order,damp", [(False, 0.01), (True, 0.01),
                                             (True, 0.0)])
def test_dead_column_is_rounded_and_kept(act_order, damp):
  w, x, _ = layer(6, 8, 32)
  x[:, [3, 17]] = 0.0
  h = x.T @ x
  ids = groups_of(32, 8)
  kwargs = dict(block_size=8, damp=damp, act_order=act_order)
  w_hat, lo, hi, ok = gptq_core(w, h, ids, jq.int4(), **kwargs)
  w_ref, _, _, _ = ref.gptq_reference(w, h, ids, jq.int4(), **kwargs)
  # H_ii = 0 -> 1 keeps the Hessian positive definite even undamped.
  assert bool(ok)
  assert np.isfinite(w_hat).all() and np.isfinite(lo).all()
  np.testing.assert_allclose(w_hat, w_ref, atol=1e-4 * np.abs(w).max())
  # Not zeroed: the dead columns keep (rounded) nonzero weights.
  assert np.count_nonzero(w_hat[:, [3, 17]]) > 8


@pytest.mark.parametrize("spec,match", [
    (jq.int4(rounding="stochastic"), "rounding='nearest'"),
    (jq.int4(clip="mse"), "clip='mse' is not supported")])
def test_unsupported_specs_raise(spec, match):
  w, _, h = layer(0, 4, 16)
  with pytest.raises(ValueError, match=match):
    gptq_core(w, h, groups_of(16, None), spec)


@pytest.mark.parametrize("ids,match", [
    (np.zeros(15, np.int32), "16 ints"), (np.arange(16) % 3 * 2, "0..G-1"),
    (np.zeros(16), "16 ints")])
def test_bad_group_ids_raise(ids, match):
  w, _, h = layer(0, 4, 16)
  with pytest.raises(ValueError, match=match):
    gptq_core(w, h, ids, jq.int4())


def test_llm_sized_layer_runs():
  # K = 1536 in 12 blocks of 128: loops, not unrolled (about a second).
  w, x, h = layer(8, 384, 1536, mix=0.5, samples=2048)
  ids = groups_of(1536, 128)
  w_hat, lo, hi, ok = gptq_core(w, h, ids, jq.int4(), act_order=True)
  assert bool(ok) and w_hat.shape == w.shape and lo.shape == (384, 12)
  assert output_error(x, w, w_hat) < 0.8 * output_error(
      x, w, rtn(w, ids, jq.int4()))
