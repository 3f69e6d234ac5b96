"""QArray storage: packing, pytree behaviour, sizes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import packing, qarray


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 9), (4, 16)])
def test_packing_round_trip(bits, signed, shape):
  rng = np.random.default_rng(bits * 100 + len(shape))
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (
      0, 2**bits - 1)
  q = rng.integers(lo, hi + 1, size=shape).astype(
      np.int8 if signed else np.uint8)
  packed = packing.pack(jnp.asarray(q), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == shape[:-1] + (packing.packed_length(shape[-1], bits),)
  np.testing.assert_array_equal(
      np.asarray(packing.unpack(packed, bits, shape, signed)), q)


def test_int4_tree_takes_about_an_eighth_of_float32():
  x = jax.random.normal(jax.random.key(0), (512, 256))
  q = jq.quantize(x, jq.int4(group_size=128))
  assert q.values.shape == (512, 128) and q.values.dtype == jnp.uint8
  ratio = q.nbytes / x.nbytes
  assert 0.125 <= ratio < 0.135, ratio
  assert jq.quantize(x, jq.int2()).values.shape == (512, 64)
  assert jq.quantize(x, jq.int3()).values.shape == (512, 96)  # 3 bits each
  assert jq.quantize(x, jq.QuantSpec(bits=6)).values.shape == (512, 192)
  assert jq.quantize(x, jq.int8()).nbytes / x.nbytes == pytest.approx(
      0.25, abs=0.01)


def test_qarray_is_a_pytree_with_static_spec():
  q = jq.quantize(jnp.arange(12.0).reshape(3, 4), jq.int4())
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 2  # values, scale (no zero point when symmetric)
  assert jax.tree_util.tree_unflatten(treedef, leaves).spec == q.spec
  out = jax.jit(lambda a: a.dequantize())(q)
  chex.assert_trees_all_close(out, q.dequantize())
  assert q.shape == (3, 4) and q.dtype == jnp.float32 and q.ndim == 2


def test_bit_stream_layout_matches_the_documented_bit_positions():
  q = jnp.array([[1, -2, 3, 0, -1]], jnp.int8)  # 3-bit two's complement
  packed = np.asarray(packing.pack(q, 3))[0]
  stream = "".join(f"{v & 7:03b}"[::-1] for v in [1, -2, 3, 0, -1])
  stream += "0" * (-len(stream) % 8)
  expected = [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)]
  np.testing.assert_array_equal(packed, expected)


def test_odd_sizes_and_negatives_survive_int2_storage():
  x = jnp.array([[-1.0, 0.0, 1.0, -1.0, 1.0]])
  q = jq.quantize(x, jq.int2(granularity="tensor"))
  np.testing.assert_array_equal(np.asarray(q.int_values()), [[-1, 0, 1, -1, 1]])
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))


def test_bfloat16_input_dequantizes_to_bfloat16():
  x = jnp.linspace(-1, 1, 16, dtype=jnp.bfloat16).reshape(4, 4)
  q = jq.quantize(x, jq.int8())
  assert q.dequantize().dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(q.dequantize(), np.float32),
                             np.asarray(x, np.float32), atol=0.01)


@pytest.mark.parametrize("spec", [jq.int8(), jq.int4(), jq.int4(group_size=4),
                                  jq.int8(symmetric=False)])
@pytest.mark.parametrize("order", [(1, 0, 2), (2, 0, 1)])
def test_quantize_in_a_stored_order_equals_re_laying_afterwards(spec, order):
  x = jax.random.normal(jax.random.key(0), (3, 8, 6))
  ref = qarray.with_order(jq.quantize(x, spec), order)
  got = jq.quantize(x, spec, order=order)
  assert got.order == ref.order == order
  assert got.shape == ref.shape == (3, 8, 6)
  chex.assert_trees_all_equal(got, ref)
  np.testing.assert_array_equal(got.int_values(),
                                jq.quantize(x, spec).int_values())
  # The identity order is stored as None, like with_order's.
  assert jq.quantize(x, spec, order=(0, 1, 2)).order is None


def test_quantize_names_the_path_of_a_bad_order():
  with pytest.raises(ValueError, match=r"layer/kernel: order=\(1, 1\)"):
    jq.quantize(jnp.ones((2, 3)), jq.int8(), order=(1, 1),
                where="layer/kernel")
