"""Lowering choices (`jaxquant.engine.lowering`): every machine's choice
computes the same numbers; the fast ones really are int8; report names them.

Each profile is forced with `machine=`, so these run on any CI machine.
"""

import dataclasses
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.engine import kernels, lowering

# The VNNI CPU's XLA formulations (pads rows, runs weight-only on int8
# parts), without the native kernel (tests/test_native.py) taking few rows.
FAST = dataclasses.replace(lowering.PROFILES["cpu/x86-vnni"],
                           native_rows=(0, 0))
PLAIN = lowering.Profile()  # the plain kernels: no padding, no parts
# Profiles that force each per-group formulation at every row count.
PER_GROUP = lowering.Profile(min_rows=4, weight_only_parts=10**9,
                             grouped_rows=(0, 10**9))
FLOAT_GROUPS = lowering.Profile(weight_only_parts=10**9, grouped_rows=(0, 0))
MACHINES = {**lowering.PROFILES, "plain": PLAIN, "per group": PER_GROUP,
            "float groups": FLOAT_GROUPS}

MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A8 asym act": dict(weight=jq.int8(), act=jq.uint8(symmetric=False)),
    "W8A16": dict(weight=jq.int8()),
    "U8A16 asym": dict(weight=jq.uint8(symmetric=False)),
    "W4A16 g32": dict(weight=jq.int4(group_size=32)),
    "W4A8 g32": dict(weight=jq.int4(group_size=32), act=jq.int8()),
    "W4A8 g32 asym act": dict(weight=jq.int4(group_size=32),
                              act=jq.uint8(symmetric=False)),
    "W2A16": dict(weight=jq.int2()),
}
WEIGHT_ONLY = {name for name, rule in MODES.items() if "act" not in rule}


def dense(shape, n=48, dtype=jnp.float32, seed=0):
  model = nn.Dense(n, use_bias=False, param_dtype=jnp.float32, dtype=dtype)
  x = jax.random.normal(jax.random.key(seed + 1), shape).astype(dtype)
  return model, model.init(jax.random.key(seed), x), x


def quantized(mode, shape):
  """(model, recipe, params quantized for FAST, x) of a Dense in `mode`."""
  model, params, x = dense(shape)
  recipe = jq.Recipe([jq.Rule(".*kernel", **MODES[mode])])
  return model, recipe, jq.quantize_params(model.apply, params, recipe, x,
                                           machine=FAST), x


def run(model, params, x, mode, machine):
  recipe = jq.Recipe([jq.Rule(".*kernel", **MODES[mode])])
  qparams = jq.quantize_params(model.apply, params, recipe, x,
                               machine=machine)
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe, machine=machine))
  op = jq.report(model.apply, qparams, recipe, x, machine=machine).ops[0]
  return qapply(qparams, x), qparams, op


def rel_err(out, ref):
  out, ref = (np.asarray(a, np.float64) for a in (out, ref))
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 1, 96), (16, 96),
                                   (96,)])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_machine_computes_the_same_numbers(shape, mode):
  model, params, x = dense(shape)
  outs = {name: run(model, params, x, mode, m)
          for name, m in MACHINES.items()}
  ref, qparams, _ = outs["plain"]
  if mode in WEIGHT_ONLY:  # float x on the dequantized weights
    ref = model.apply(jq.dequantize_tree(qparams), x)
  for machine, (out, _, op) in outs.items():
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 2e-6, (machine, op.lowering)


def test_report_names_the_lowering():
  model, params, x = dense((1, 96))
  lows = {(m, mode): run(model, params, x, mode, m)[2].lowering
          for m in (FAST, PLAIN, "gpu")
          for mode in ("W8A8", "W8A16", "W4A16 g32")}
  # One row on a weight stored (N, K): a float reduction over its codes.
  assert lows[FAST, "W8A8"] == lows[FAST, "W8A16"] == lowering.ROW_REDUCE
  assert lows[FAST, "W4A16 g32"] == (
      "grouped int8 dot, activation as 3 int8 parts, rows padded to 4")
  assert lows[PLAIN, "W8A8"] == "int8 dot"
  assert lows[PLAIN, "W8A16"] == "float dot of the dequantized weight"
  assert lows[PLAIN, "W4A16 g32"] == "float dot of the dequantized weight"
  assert lows["gpu", "W8A16"] == (
      "int8 dot, activation as 3 int8 parts, rows padded to 4")
  # On a GPU per-group weights take the batched dot up to 64 stacked rows,
  # the float dot beyond (one dot per group: never).
  gpu = {m: (run(*dense((m, 96)), "W4A8 g32", "gpu")[2].lowering,
             run(*dense((m, 96)), "W4A16 g32", "gpu")[2].lowering)
         for m in (21, 22, 64, 65)}
  assert gpu == {
      21: ("grouped int8 dot", "grouped int8 dot, activation as 3 int8 parts"),
      22: ("grouped int8 dot", "float dot of the dequantized weight"),
      64: ("grouped int8 dot", "float dot of the dequantized weight"),
      65: ("float dot of the quantized activation and dequantized weight",
           "float dot of the dequantized weight")}
  # Per-group weights by (stacked) row count: batched up to 12 stacked
  # rows (weight-only stacks 3 parts per row), per group, float.
  batched, per_group = "grouped int8 dot", "int8 dot per group"
  parts = ", activation as 3 int8 parts"
  by_rows = {m: (run(*dense((m, 96)), "W4A8 g32", FAST)[2].lowering,
                 run(*dense((m, 96)), "W4A16 g32", FAST)[2].lowering)
             for m in (1, 2, 4, 5, 12, 13, 1024)}
  assert by_rows == {
      1: (batched + ", rows padded to 4",
          batched + parts + ", rows padded to 4"),
      2: (batched + ", rows padded to 4", batched + parts),
      4: (batched, batched + parts),
      5: (batched, per_group + parts),
      12: (batched, per_group + parts),
      13: (per_group, per_group + parts),
      # 3 groups x 1024 rows > 2048: float.
      1024: ("float dot of the quantized activation and dequantized weight",
             "float dot of the dequantized weight")}
  assert run(*dense((3, 96)), "W8A8", FAST)[2].lowering == (
      "int8 dot, rows padded to 4")
  # Per-channel weight-only parts while rows x 3 <= half the features.
  assert run(*dense((8, 96)), "W8A16", FAST)[2].lowering == (
      "int8 dot, activation as 3 int8 parts")
  assert run(*dense((9, 96)), "W8A16", FAST)[2].lowering == (
      "float dot of the dequantized weight")
  # More groups than MAX_GROUP_DOTS stay one batched dot.
  groups = lowering.MAX_GROUP_DOTS + 1
  assert run(*dense((8, 32 * groups), n=8), "W4A8 g32", FAST)[2].lowering == (
      "grouped int8 dot")
  model, params, x = dense((64, 96))
  assert run(model, params, x, "W8A8", FAST)[2].lowering == "int8 dot"
  # One-dimensional activations have no row axis to stack parts along.
  model, params, x = dense((96,))
  assert run(model, params, x, "W8A16", "gpu")[2].lowering == (
      "float dot of the dequantized weight")
  assert run(model, params, x, "W8A16", FAST)[2].lowering == (
      lowering.ROW_REDUCE)
  table = str(jq.report(model.apply, params, jq.Recipe(
      [jq.Rule(".*kernel", weight=jq.int8())]), x, machine=FAST))
  assert "lowering" in table.splitlines()[0]


def _i8_dots(fn, *args) -> int:
  text = jax.jit(fn).lower(*args).as_text()
  return len(re.findall(r"dot_general[^\n]*tensor<[^>]*xi8>", text))


@pytest.mark.parametrize("mode", ["W8A16", "W4A16 g32"])
def test_weight_only_parts_lower_to_int8_dots(mode):
  model, recipe, qparams, x = quantized(mode, (5, 96))
  fast = jq.quantized_apply(model.apply, recipe, machine=FAST)
  slow = jq.quantized_apply(model.apply, recipe, machine=PLAIN)
  # Parts stacked as rows: one dot, or one per group (5 x 3 parts = 15
  # rows, past the batched dot's 12).
  assert _i8_dots(fast, qparams, x) == (1 if mode == "W8A16" else 96 // 32)
  assert _i8_dots(slow, qparams, x) == 0


def test_padded_rows_keep_one_int8_dot_and_slice_them_off():
  model, recipe, qparams, x = quantized("W8A8", (2, 96))
  text = jax.jit(jq.quantized_apply(model.apply, recipe, machine=FAST)).lower(
      qparams, x).as_text()
  assert re.search(r"dot_general[^\n]*tensor<4x96xi8>", text)


@pytest.mark.parametrize("machine,order", [(FAST, (1, 0)), ("cpu/other", (1, 0)),
                                           ("gpu", None), (PLAIN, None)])
def test_weights_are_stored_contracted_axes_last_where_the_machine_says(
    machine, order, tmp_path):
  model, params, x = dense((3, 96))
  recipe = jq.Recipe([jq.Rule(".*kernel", **MODES["W8A8"])])
  q = jq.quantize_params(model.apply, params, recipe, x, machine=machine)
  ref = jq.quantize_params(model.apply, params, recipe, x, machine=PLAIN)
  k, k_ref = q["params"]["kernel"], ref["params"]["kernel"]
  assert k.order == order and k.shape == (96, 48)
  np.testing.assert_array_equal(
      k.values, k_ref.values if order is None else k_ref.values.T)
  np.testing.assert_array_equal(k.int_values(), k_ref.int_values())
  np.testing.assert_array_equal(k.dequantize(), k_ref.dequantize())
  # Saved and loaded as stored; loaded into another machine's layout.
  jq.save(tmp_path / "q.jq", q)
  assert jq.load(tmp_path / "q.jq", like=q)["params"]["kernel"].order == order
  back = jq.load(tmp_path / "q.jq", like=ref)["params"]["kernel"]
  assert back.order is None
  np.testing.assert_array_equal(back.values, k_ref.values)


def test_one_row_reduces_the_stored_int8_codes_without_a_dot():
  model, recipe, qparams, x = quantized("W8A8", (1, 96))
  assert qparams["params"]["kernel"].order == (1, 0)
  f = jax.jit(jq.quantized_apply(model.apply, recipe, machine=FAST))
  text = f.lower(qparams, x).as_text()
  assert "dot_general" not in text
  assert re.search(r"convert[^\n]*tensor<48x96xi8>", text)
  assert re.search(r"reduce", text)
  # Two rows: the int8 dot on the stored (N, K) layout.
  x2 = jnp.concatenate([x, x])
  assert _i8_dots(f, qparams, x2) == 1


@pytest.mark.parametrize("dtype,parts", [(jnp.float32, 3), (jnp.bfloat16, 2),
                                         (jnp.float16, 2)])
def test_split_activation_matches_numpy_bound(dtype, parts):
  assert lowering.act_parts(dtype) == parts
  x = jax.random.normal(jax.random.key(0), (5, 300)) * jnp.array(
      [[1.0], [1e-3], [1e4], [0.0], [3.0]])
  x = x.at[4, 7].set(250.0)  # one outlier per row sets the scale
  # split_activation reads only the activation's contracted axes.
  rows = type("Site", (), {"act_contract": (1,)})()
  codes, sx = kernels.split_activation(x, rows, parts)
  assert all(c.dtype == jnp.int8 for c in codes)
  xs = np.asarray(x, np.float64)
  rebuilt = sum(np.asarray(c, np.float64) / 254.0**i
                for i, c in enumerate(codes)) * np.asarray(sx, np.float64)
  step = np.abs(xs).max(1, keepdims=True) / 127
  # The parts' own error, plus float32 rounding of x / s_x (|r| <= 127).
  bound = step * (0.5 / 254.0 ** (parts - 1) + 130 * 2.0**-24)
  assert np.all(np.abs(rebuilt - xs) <= bound)


def test_weight_only_parts_keep_nan_rows_to_themselves():
  model, params, x = dense((4, 96))
  x = x.at[1, 5].set(jnp.nan).at[2, 0].set(jnp.inf)
  for mode in ("W8A16", "W4A16 g32"):
    out, qparams, op = run(model, params, x, mode, FAST)
    assert "int8 parts" in op.lowering
    ref = model.apply(jq.dequantize_tree(qparams), x)
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))
    chex.assert_trees_all_close(out[np.array([0, 3])], ref[np.array([0, 3])],
                                rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("mode", ["W8A16", "W4A16 g32"])
def test_weight_only_parts_have_the_float_gradient(mode, rows):
  model, recipe, qparams, x = quantized(mode, (rows, 96))
  fast = jq.quantized_apply(model.apply, recipe, machine=FAST)
  deq = jq.dequantize_tree(qparams)
  loss = lambda f, p: lambda x: jnp.sum(jnp.sin(f(p, x)))
  g = jax.grad(loss(fast, qparams))(x)
  g_ref = jax.grad(loss(model.apply, deq))(x)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_einsum_weight_contracted_on_its_last_axis_and_bf16():
  # The weight (n, k) is contracted on axis 1; rows padded on the act.
  w = jax.random.normal(jax.random.key(0), (40, 64))
  f = lambda p, x: jnp.einsum("btk,nk->btn", x, p["w"])
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.random.normal(jax.random.key(1), (1, 1, 64)).astype(dtype)
    params = {"w": w.astype(dtype)}
    for mode in ("W8A8", "W8A16"):
      recipe = jq.Recipe([jq.Rule("w", **MODES[mode])])
      qparams = jq.quantize_params(f, params, recipe, x)
      out = jax.jit(jq.quantized_apply(f, recipe, machine=FAST))(qparams, x)
      ref = jax.jit(jq.quantized_apply(f, recipe, machine=PLAIN))(qparams, x)
      assert out.dtype == dtype
      tol = 2e-6 if dtype == jnp.float32 else 1e-2
      assert rel_err(out, ref) < tol, (dtype, mode)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("mode", ["W8A8", "W8A16", "W4A16 g32", "W4A8 g32"])
def test_weight_on_the_left_of_the_dot(mode, m):
  f = lambda p, x: p["w"] @ x  # (n, k) @ (k, m): the rows are x's axis 1
  params = {"w": jax.random.normal(jax.random.key(0), (40, 64))}
  x = jax.random.normal(jax.random.key(1), (64, m))
  recipe = jq.Recipe([jq.Rule("w", **MODES[mode])])
  qparams = jq.quantize_params(f, params, recipe, x)
  ref = (jax.jit(jq.quantized_apply(f, recipe, machine=PLAIN))(qparams, x)
         if mode not in WEIGHT_ONLY else f(jq.dequantize_tree(qparams), x))
  for machine in (FAST, PER_GROUP):
    out = jax.jit(jq.quantized_apply(f, recipe, machine=machine))(qparams, x)
    assert rel_err(out, ref) < 2e-6, machine


def test_static_activation_scales_under_every_grouped_lowering():
  model, params, x = dense((8, 96))
  recipe = jq.Recipe([jq.Rule(".*kernel", **MODES["W4A8 g32 asym act"])])
  batches = [jax.random.normal(jax.random.key(i), (8, 96)) for i in range(3)]
  stats = jq.calibrate(model.apply, params, recipe, batches)
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)
  outs = [jax.jit(jq.quantized_apply(model.apply, recipe, machine=m))(
      qparams, x) for m in (PLAIN, PER_GROUP, FLOAT_GROUPS)]
  assert all(rel_err(out, outs[0]) < 2e-6 for out in outs[1:])
  ops = [jq.report(model.apply, qparams, recipe, x, machine=m).ops[0]
         for m in (PER_GROUP, FLOAT_GROUPS)]
  assert [op.reason for op in ops] == ["static activation scale"] * 2


def test_unknown_machine_raises():
  model, params, x = dense((1, 96))
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8())])
  with pytest.raises(ValueError, match="machine='tpu-v9'.*cpu/x86-vnni"):
    jq.quantized_apply(model.apply, recipe, machine="tpu-v9")(params, x)


@pytest.mark.parametrize("key", sorted(lowering.PROFILES))
def test_environment_names_the_machine(monkeypatch, key):
  monkeypatch.setenv(lowering.MACHINE_ENV, key)
  assert lowering.machine() == key
  assert lowering.profile() is lowering.PROFILES[key]
  # What quantized_apply runs with machine=None is that profile's lowering.
  model, params, x = dense((1, 96))
  recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, recipe, x)
  assert str(jq.report(model.apply, qparams, recipe, x)) == str(jq.report(
      model.apply, qparams, recipe, x, machine=key))


def test_environment_with_an_unknown_machine_raises(monkeypatch):
  monkeypatch.setenv(lowering.MACHINE_ENV, "cpu/avx2")
  with pytest.raises(ValueError, match=r"JAXQUANT_MACHINE='cpu/avx2': use "
                     r"one of \['cpu/other', 'cpu/x86-vnni', 'gpu', 'tpu'\]"):
    lowering.machine()
  monkeypatch.delenv(lowering.MACHINE_ENV)
  assert lowering.machine() == lowering.detected_machine()


def _scan_layers(p, x):
  def step(h, w):
    return jnp.tanh(h @ w), None
  return jax.lax.scan(step, x, p["w"])[0]


# Weights of several layouts: (function, weight shape, activation shape
# without rows, the order FAST stores).
LAYOUTS = {
    "two contracted axes": (lambda p, x: jnp.einsum("...hd,hdn->...n", x,
                                                    p["w"]),
                            (4, 24, 40), (4, 24), (2, 0, 1)),
    "stored (n, k) already": (lambda p, x: x @ p["w"].T, (40, 64), (64,),
                              None),
    "transposed twice": (lambda p, x: x @ p["w"].T.T, (64, 40), (64,),
                         (1, 0)),
    "scan-stacked": (_scan_layers, (3, 32, 32), (32,), (0, 2, 1)),
    "sliced": (lambda p, x: x @ p["w"][1], (2, 64, 40), (64,), None),
    "two contractions": (lambda p, x: (x @ p["w"]) @ p["w"].T, (64, 40),
                         (64,), None),
}


@pytest.mark.parametrize("mode,rows", [
    ("W8A8", (1,)), ("W8A8", (3,)), ("W8A8 asym act", (1,)), ("W8A16", ()),
    ("W8A16", (2, 1)), ("U8A16 asym", (1,))])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stored_layouts_compute_the_same_numbers(layout, mode, rows):
  f, w_shape, x_shape, order = LAYOUTS[layout]
  params = {"w": jax.random.normal(jax.random.key(0), w_shape)}
  x = jax.random.normal(jax.random.key(1), rows + x_shape)
  recipe = jq.Recipe([jq.Rule("w", **MODES[mode])])
  stored = jq.quantize_params(f, params, recipe, x, machine=FAST)
  plain = jq.quantize_params(f, params, recipe, x, machine=PLAIN)
  assert stored["w"].order == order and plain["w"].order is None
  ref = (jax.jit(jq.quantized_apply(f, recipe, machine=PLAIN))(plain, x)
         if mode not in WEIGHT_ONLY else f(jq.dequantize_tree(plain), x))
  for machine in (FAST, "cpu/other", PLAIN):
    out = jax.jit(jq.quantized_apply(f, recipe, machine=machine))(stored, x)
    assert rel_err(out, ref) < 2e-6, machine
