"""jaxquant's C++ kernels (`jaxquant.native`), against NumPy and the XLA path.

The int8 dot must give XLA's `dot(s8, s8) -> s32` integers bit for bit, for
every inner loop this CPU runs, any shape (tails of the vector width, no
rows, one feature, several thread tiles); `quantized_apply` must compute
the same numbers with it as with the XLA formulations, through the shared
scale, zero-point and NaN code, under jit, vmap and grad.

`make test` sets JAXQUANT_REQUIRE_NATIVE=1: there the kernels must have
been built and loaded, so CI cannot skip these tests silently.
"""

import dataclasses
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant import native
from jaxquant.engine import lowering

STATUS = native.status()
needs_kernels = pytest.mark.skipif(not STATUS.loaded, reason=STATUS.reason)
# The profiles whose few-row matmuls run the native kernel, and the same
# without it (the XLA formulations: the reference).
NATIVE = lowering.PROFILES["cpu/other"]
XLA = dataclasses.replace(NATIVE, native_rows=(0, 0))


def test_kernels_are_loaded_where_the_build_must_have_made_them():
  if os.environ.get("JAXQUANT_REQUIRE_NATIVE") == "1":
    assert STATUS.loaded, STATUS.reason
    assert STATUS.variant in STATUS.variants
    # One device (tests/conftest.py): where there are several the planner
    # keeps the XLA formulations, and the engine tests here would not run
    # the kernels at all.
    assert lowering.native_problem() is None, lowering.native_problem()
  else:
    assert STATUS.loaded or "built" in STATUS.reason or "=0" in STATUS.reason


def int8(rng, shape):
  return rng.integers(-128, 128, shape, dtype=np.int8)


def exact(x, w):
  return x.astype(np.int64) @ w.T.astype(np.int64)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(0, 70), n=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_int8_dot_equals_numpy_for_every_variant(m, k, n, seed):
  rng = np.random.default_rng(seed)
  x, w = int8(rng, (m, k)), int8(rng, (n, k))
  for variant in STATUS.variants:
    out = np.asarray(native.int8_dot(x, w, variant=variant))
    assert out.dtype == np.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(out, exact(x, w), err_msg=variant)


@needs_kernels
@pytest.mark.parametrize("variant", STATUS.variants)
def test_int8_dot_extremes_and_thread_tiles_equal_xla(variant):
  # -128 * -128 everywhere: the largest sums (K = 4099: a vector tail);
  # 300 features of K = 4099 span several tiles of the thread pool.
  rng = np.random.default_rng(0)
  x = np.full((5, 4099), -128, np.int8)
  w = np.concatenate([np.full((7, 4099), -128, np.int8),
                      int8(rng, (293, 4099))])
  xla = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  out = jax.jit(lambda a, b: native.int8_dot(a, b, variant))(x, w)
  np.testing.assert_array_equal(out, xla)
  np.testing.assert_array_equal(out, exact(x, w))


@needs_kernels
def test_int8_dot_under_vmap_and_in_the_lowered_program():
  rng = np.random.default_rng(1)
  xb, wb = int8(rng, (3, 5, 33)), int8(rng, (3, 4, 33))
  ref = np.einsum("bmk,bnk->bmn", xb.astype(np.int64), wb.astype(np.int64))
  np.testing.assert_array_equal(
      jax.vmap(native.int8_dot, (0, None))(xb, wb[0]),
      np.stack([exact(a, wb[0]) for a in xb]))
  np.testing.assert_array_equal(jax.vmap(native.int8_dot)(xb, wb), ref)
  np.testing.assert_array_equal(jax.vmap(native.int8_dot, (None, 0))(
      xb[0], wb), np.stack([exact(xb[0], b) for b in wb]))
  text = jax.jit(native.int8_dot).lower(xb[0], wb[0]).as_text()
  assert re.search(r"custom_call.*jaxquant_int8_dot", text)


@needs_kernels
def test_int8_dot_rejects_what_it_cannot_compute():
  x = np.zeros((2, 8), np.int8)
  with pytest.raises(ValueError, match=r"expected int8 \(M, K\) and \(N, K\)"):
    native.int8_dot(x, np.zeros((3, 7), np.int8))
  with pytest.raises(ValueError, match="expected int8"):
    native.int8_dot(x.astype(np.float32), np.zeros((3, 8), np.int8))
  with pytest.raises(ValueError, match="variant='avx9'"):
    native.int8_dot(x, np.zeros((3, 8), np.int8), variant="avx9")


# --------------------------------------------------------------------------
# In the engine


MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A8 asym act": dict(weight=jq.int8(), act=jq.uint8(symmetric=False)),
    "W8A8 asym weight": dict(weight=jq.uint8(symmetric=False),
                             act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 per channel": dict(weight=jq.int4()),
}


class Heads(nn.Module):
  """A projection to heads (a weight with two free axes) and back from them
  (two contracted axes), and a weight on the left of its matmul."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((4, 8), name="qkv")(x)  # (..., 4, 8)
    y = nn.DenseGeneral(24, axis=(-2, -1), name="out")(jnp.tanh(h))
    w = self.param("left", nn.initializers.normal(1.0), (16, 24))
    return jnp.einsum("nk,...k->...n", w, y)


def outputs(mode, rows, machine, x=None):
  model = Heads()
  x = jax.random.normal(jax.random.key(1), (rows, 24)) if x is None else x
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(".*(kernel|left)", **MODES[mode])])
  qparams = jq.quantize_params(model.apply, params, recipe, x,
                               machine=machine, progress=False)
  f = jax.jit(jq.quantized_apply(model.apply, recipe, machine=machine))
  return f, qparams, x, jq.report(model.apply, qparams, recipe, x,
                                  machine=machine)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_quantized_apply_computes_the_xla_numbers(mode, rows):
  f, qp, x, rep = outputs(mode, rows, NATIVE)
  f_ref, qp_ref, _, rep_ref = outputs(mode, rows, XLA)
  assert all(op.lowering.startswith(lowering.NATIVE_DOT) for op in rep.ops)
  assert lowering.NATIVE_DOT not in str(rep_ref)
  out, ref = f(qp, x), f_ref(qp_ref, x)
  assert out.shape == ref.shape == (rows, 16)
  # int8 activations: the same int32 sums through the same float code.
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * float(
      jnp.abs(ref).max(initial=1.0)))
  text = f.lower(qp, x).as_text()
  assert text.count("jaxquant_int8_dot") == 3


@needs_kernels
def test_nan_rows_stay_nan_rows():
  x = jax.random.normal(jax.random.key(1), (3, 24)).at[1, 5].set(jnp.nan)
  for mode in ("W8A8", "W8A16"):
    f, qp, x, _ = outputs(mode, 3, NATIVE, x)
    out = np.asarray(f(qp, x))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all(), mode


@needs_kernels
def test_vmap_and_weight_only_gradients_match_the_xla_path():
  xs = jax.random.normal(jax.random.key(2), (5, 2, 24))
  for mode in ("W8A8", "W8A16"):
    f, qp, _, _ = outputs(mode, 2, NATIVE, xs[0])
    f_ref, qp_ref, _, _ = outputs(mode, 2, XLA, xs[0])
    np.testing.assert_allclose(jax.vmap(f, (None, 0))(qp, xs),
                               jax.vmap(f_ref, (None, 0))(qp_ref, xs),
                               rtol=1e-5, atol=1e-5)
  # Weight-only: the activation parts represent x, so gradients are float's.
  grad = lambda f, qp: jax.grad(lambda x: f(qp, x).sum())(xs[0])
  np.testing.assert_allclose(grad(f, qp), grad(f_ref, qp_ref), rtol=1e-5,
                             atol=1e-6)


@needs_kernels
def test_more_rows_than_the_profile_takes_run_xla():
  _, _, _, rep = outputs("W8A8", 17, NATIVE)  # native_rows[0] == 16
  assert lowering.NATIVE_DOT not in str(rep)
  _, _, _, rep = outputs("W8A16", 22, NATIVE)  # 22 x 3 parts > 64
  assert lowering.NATIVE_DOT not in str(rep)
  _, _, _, rep = outputs("W8A16", 21, NATIVE)
  assert rep.ops[0].lowering.startswith(lowering.NATIVE_DOT)


def test_switched_off_the_xla_path_runs_and_the_report_says_why():
  code = ("import jax, jaxquant as jq, jaxquant.native as n, flax.linen as nn;"
          "m = nn.Dense(8); x = jax.numpy.ones((1, 16));"
          "p = m.init(jax.random.key(0), x);"
          "r = jq.Recipe([jq.Rule('.*kernel', weight=jq.int8(), "
          "act=jq.int8())]);"
          "q = jq.quantize_params(m.apply, p, r, x, machine='cpu/other', "
          "progress=False);"
          "print(n.status().reason);"
          "print(jq.report(m.apply, q, r, x, machine='cpu/other').ops[0]);"
          "print(jq.quantized_apply(m.apply, r)(q, x).shape)")
  env = dict(os.environ, JAXQUANT_NATIVE="0")
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, check=True).stdout
  assert out.splitlines()[0] == "JAXQUANT_NATIVE=0"
  assert "no native kernel: JAXQUANT_NATIVE=0" in out
  assert "int8 dot" in out and "(1, 8)" in out
