"""The transform engine on a model zoo, each against its float model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.engine import lowering
import zoo

# The plain kernels: no row padding, no activation parts, per-group weights as
# one batched int8 dot (`lowering.choose_*` picks others by machine).
PLAIN = lowering.Profile()
W8A8 = jq.Recipe([jq.Rule(r".*", weight=jq.int8(), act=jq.int8())])


def count_int8_ops(fn, *args):
  """(StableHLO dot/conv with i8 operands, compiled dot/conv on s8 operands)."""
  ops = jq.int8_ops(fn, *args)
  return ops.stablehlo, ops.compiled


def rel_err(out, ref):
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def agreement(out, ref):
  return float((jnp.argmax(out, -1) == jnp.argmax(ref, -1)).mean())


def check_w8a8(apply_fn, params, *args, machine, recipe=W8A8,
               expect_int8=None, upcast_by_xla=None):
  """W8A8 under lowering profile `machine` against the float model and
  against fake-quant. `upcast_by_xla`: backend -> int8 matmuls that XLA
  computes on converted operands there (seen in the compiled HLO, not chosen
  by jaxquant)."""
  qparams = jq.quantize_params(apply_fn, params, recipe, *args,
                               machine=machine)
  qapply = jq.quantized_apply(apply_fn, recipe, machine=machine)
  ref = apply_fn(params, *args)
  out = jax.jit(qapply)(qparams, *args)
  assert rel_err(out, ref) < 3e-2
  assert agreement(out, ref) >= 0.97
  rep = jq.report(apply_fn, qparams, recipe, *args, machine=machine)
  n = rep.count("int8")
  assert n == expect_int8, str(rep)
  # Where XLA has no s8 x s8 -> s32 conv (GPU) the engine convolves the int8
  # values in float32 and says so; those are no int8 ops in the HLO.
  native = n - sum(lowering.INT8_CONV_EMULATED in op.reason for op in rep.ops)
  upcast = (upcast_by_xla or {}).get(jax.default_backend(), 0)
  assert count_int8_ops(qapply, qparams, *args) == (native, native - upcast)
  fq = jax.jit(jq.fake_quant_apply(apply_fn, recipe))(params, *args)
  check_tracks_fake_quant(fq, out, ref)
  return qparams, rep


def check_tracks_fake_quant(fq, out, ref):
  """int8 output `out` is fake-quant's `fq` up to activation rounding flips.

  Both round the same activations, but their float arithmetic differs
  (exact int32 sums against float32 ones, fused or not), so an activation
  within float rounding of a rounding boundary can get codes one step
  apart, and the flip reaches every output row downstream of it (a whole
  sequence through attention). How many flips a model sees depends on its
  size, the CPU's float kernels and the lowering, so the bounds follow from
  what a flip is, not from a count of agreeing elements seen on one host:
  - rounding errs by up to half a step in every element (RMS step / sqrt(12)),
    a flip by one step in a fraction p of them (RMS step sqrt(p)): their
    error relative to the quantization error `out - ref` is sqrt(12 p),
    under 1/4 while p < 1/200. A scale 1% off errs by 1% of the output, over
    a quarter of any quantization error `check_w8a8` admits (3e-2), and
    fails;
  - rows no flip reaches agree to float32 rounding, and those are most rows:
    a systematic difference (another scale, another rounding rule) reaches
    every row and fails.
  """
  out, fq, ref = (np.asarray(a, np.float32) for a in (out, fq, ref))
  assert rel_err(fq, out) <= 0.25 * rel_err(out, ref)
  atol = 1e-5 * float(np.abs(ref).max())
  rows = np.isclose(fq, out, rtol=1e-4, atol=atol).reshape(
      -1, out.shape[-1]).all(axis=1)
  assert rows.mean() > 0.5, f"{rows.mean():.2f} of rows agree"


def test_linen_mlp(machine):
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (256, 64))
  params = model.init(jax.random.key(0), x)
  qparams, _ = check_w8a8(model.apply, params, x, machine=machine,
                          expect_int8=3)
  kernel = qparams["params"]["Dense_0"]["kernel"]
  assert kernel.scale.shape == (1, 128) and kernel.values.dtype == jnp.int8
  assert isinstance(qparams["params"]["Dense_0"]["bias"], jax.Array)


def test_cnn_with_batchnorm_and_pooling(machine):
  model = zoo.CNN()
  x = jax.random.normal(jax.random.key(1), (128, 12, 12, 3))
  variables = model.init(jax.random.key(0), x)
  # Non-trivial running statistics, as after training.
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {**variables, **state}
  # The 3-channel input conv is too small for XLA:CPU's int8 kernels.
  qparams, _ = check_w8a8(model.apply, variables, x, machine=machine,
                          expect_int8=3, upcast_by_xla={"cpu": 1})
  assert qparams["params"]["Conv_0"]["kernel"].scale.shape == (1, 1, 1, 16)
  # Mutable collections pass through the quantized function.
  qapply = jq.quantized_apply(model.apply, W8A8, machine=machine)
  out, new_state = qapply(qparams, x, train=True, mutable=["batch_stats"])
  ref, ref_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert rel_err(out, ref) < 3e-2
  mean = new_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert rel_err(mean, ref_state["batch_stats"]["BatchNorm_0"]["mean"]) < 3e-2


def test_transformer_block_with_dense_general_and_einsum(machine):
  model = zoo.Classifier()
  x = jax.random.normal(jax.random.key(1), (128, 16, 24))
  params = model.init(jax.random.key(0), x)
  # On an H100 (jax 0.11.2) XLA:GPU ran 6 of the 8 int8 dots on s8 operands.
  qparams, rep = check_w8a8(model.apply, params, x, machine=machine,
                            expect_int8=8, upcast_by_xla={"gpu": 2})
  p = qparams["params"]["TransformerBlock_0"]
  # DenseGeneral kernel (d, heads, f): one scale per (head, feature).
  assert p["DenseGeneral_0"]["kernel"].scale.shape == (1, 4, 32)
  # Einsum kernel (heads, f, d) contracts heads and f: one scale per d.
  assert p["Einsum_0"]["kernel"].scale.shape == (1, 1, 64)
  # Attention output projection (heads, head_dim, d).
  assert p["MultiHeadDotProductAttention_0"]["out"]["kernel"].scale.shape == (
      1, 1, 64)
  # The attention score and value einsums have no parameter operand.
  assert rep.count("float") == 2


def test_scan_with_remat_stacked_layers(machine):
  model = zoo.ScannedStack()
  x = jax.random.normal(jax.random.key(1), (256, 16))
  params = model.init(jax.random.key(0), x)
  qparams, _ = check_w8a8(model.apply, params, x, machine=machine,
                          expect_int8=4)
  body = qparams["params"]["ScanCheckpointScanBody_0"]
  stacked = body["Dense_1"]["kernel"]  # (layers, in, out): a scale per layer
  assert stacked.shape == (3, 32, 64) and stacked.scale.shape == (3, 1, 64)


def test_nnx_model_through_split_and_merge(machine):
  model = zoo.NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
  x = jax.random.normal(jax.random.key(1), (256, 20))
  qparams, _ = check_w8a8(apply_fn, state, x, machine=machine, expect_int8=2)
  paths = [p for p, leaf in jq.tree.leaves_with_paths(qparams)
           if isinstance(leaf, jq.QArray)]
  assert len(paths) == 2 and all("kernel" in p for p in paths), paths
  # NNX Variables keep their array in `.value`; paths leave it out, so the
  # README's r".*kernel" recipe matches NNX kernels as it matches Linen's.
  assert all(p.endswith("/kernel") for p in paths), paths
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8()),
                      jq.Rule(r".*bias", weight=None)])
  assert jq.report(apply_fn, state, recipe, x,
                   machine=machine).count("weight-only") == 2


def test_plain_jax_function(machine):
  params = zoo.plain_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (256, 20))
  qparams, _ = check_w8a8(zoo.plain_apply, params, x, machine=machine,
                          expect_int8=2)
  assert qparams["w1"].scale.shape == (1, 64)
  assert not isinstance(qparams["b1"], jq.QArray)


def test_tied_embeddings(machine):
  model = zoo.TiedLM()
  ids = jax.random.randint(jax.random.key(1), (64, 8), 0, 50)
  params = model.init(jax.random.key(0), ids)
  qparams, rep = check_w8a8(model.apply, params, ids, machine=machine,
                            expect_int8=2)
  emb = qparams["params"]["Embed_0"]["embedding"]
  # attend() contracts the feature axis: one scale per vocabulary row, which
  # is also right for the lookup.
  assert emb.scale.shape == (50, 1)


def test_weight_only_modes_dequantize_and_run_float():
  # With the plain kernels (PLAIN; the lowerings that pad rows or split the
  # activation are in test_lowering.py), weight-only dequantizes, runs float.
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (64, 64))
  params = model.init(jax.random.key(0), x)
  for recipe, bound in [
      (jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8())]), 1e-2),
      (jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32))]), 0.2)]:
    qparams = jq.quantize_params(model.apply, params, recipe, x,
                                 machine=PLAIN)
    qapply = jq.quantized_apply(model.apply, recipe, machine=PLAIN)
    out = jax.jit(qapply)(qparams, x)
    assert rel_err(out, model.apply(params, x)) < bound
    # Exactly the float model on the dequantized weights.
    dequantized = model.apply(jq.dequantize_tree(qparams), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dequantized),
                               rtol=1e-5, atol=1e-5)
    assert count_int8_ops(qapply, qparams, x) == (0, 0)
    assert jq.report(model.apply, qparams, recipe, x,
                     machine=PLAIN).count("weight-only") == 3
  # Groups run along the contraction axis.
  assert qparams["params"]["Dense_1"]["kernel"].scale.shape == (4, 128)


def test_grouped_weights_with_int8_activations_run_grouped_int8_dots():
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (64, 64))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32),
                              act=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, recipe, x, machine=PLAIN)
  # One batched int8 dot per matmul (PLAIN; other lowerings of
  # per-group weights, e.g. one dot per group, are tested in
  # test_lowering.py).
  qapply = jq.quantized_apply(model.apply, recipe, machine=PLAIN)
  out = jax.jit(qapply)(qparams, x)
  assert jq.report(model.apply, qparams, recipe, x,
                   machine=PLAIN).count("int8") == 3
  assert count_int8_ops(qapply, qparams, x) == (3, 3)
  # Reference: dequantized int4 weights times per-row fake-quant int8 inputs.
  fq = jax.jit(jq.fake_quant_apply(model.apply, recipe))(params, x)
  assert rel_err(out, fq) < 1e-5
  weight_only = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32))])
  w_out = jq.quantized_apply(model.apply, weight_only, machine=PLAIN)(
      qparams, x)
  assert 0 < rel_err(out, w_out) < 3e-2  # only the activation rounding


def test_grouped_weights_fall_back_where_groups_cannot_be_split_and_say_so(machine):
  model = zoo.Classifier()
  x = jax.random.normal(jax.random.key(1), (4, 16, 24))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*", weight=jq.int8(group_size=8),
                              act=jq.int8())])
  rep = jq.report(model.apply, params, recipe, x, machine=machine)
  # The Einsum and attention-output kernels contract two axes.
  assert rep.count("int8") == 6 and rep.count("weight-only") == 2
  assert "group axis to be the only contracted axis" in str(rep)
  qparams = jq.quantize_params(model.apply, params, recipe, x,
                               machine=machine)
  out = jq.quantized_apply(model.apply, recipe, machine=machine)(qparams, x)
  fq = jq.fake_quant_apply(model.apply, recipe)(params, x)
  assert rel_err(out, fq) < 1e-5


def test_pytorch_layout_convs_group_their_input_channels(machine):
  """An (out, in, kh, kw) conv kernel (Equinox, PyTorch layout) contracts
  in, kh and kw; groups run along the last of them that the group size
  divides (in), as for a Flax (kh, kw, in, out) kernel, not along kw."""
  def apply_fn(p, x):
    return jax.lax.conv_general_dilated(x, p["weight"], (1, 1), "SAME",
                                        dimension_numbers=("NCHW", "OIHW",
                                                           "NCHW"))

  params = {"weight": jax.random.normal(jax.random.key(0), (8, 32, 3, 3))}
  x = jax.random.normal(jax.random.key(1), (2, 32, 6, 6))
  recipe = jq.Recipe([jq.Rule("weight", weight=jq.int4(group_size=16))])
  q = jq.quantize_params(apply_fn, params, recipe, x,
                         machine=machine)["weight"]
  assert q.spec.group_axis == 1 and q.scale.shape == (8, 2, 3, 3)
  w = np.asarray(params["weight"])
  scale = np.abs(w.reshape(8, 2, 16, 3, 3)).max(2) / 7  # per 16 inputs
  np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
  out = jq.quantized_apply(apply_fn, recipe, machine=machine)(
      jq.quantize_params(apply_fn, params, recipe, x, machine=machine), x)
  ref = apply_fn(params, x)
  assert rel_err(out, ref) < 0.1
  # A group size no contracted axis takes names the last one.
  bad = jq.Recipe([jq.Rule("weight", weight=jq.int4(group_size=5))])
  with pytest.raises(ValueError, match="weight: group_size=5 does not divide "
                     "axis 3"):
    jq.quantize_params(apply_fn, params, bad, x)


def test_grouped_weights_follow_transposes(machine):
  """(out, in)-stored kernels used as `x @ w.T` (Hugging Face GPT-2 style)
  and a tied embedding's `x @ embedding.T` keep their per-group scales
  through the transpose and run grouped int8 dots."""
  def apply_fn(p, ids):
    h = p["embedding"][ids]                     # (b, t, d) lookup
    h = jax.nn.relu(h @ p["w_out_in"].T)        # w stored (out, in)
    return h @ p["embedding"].T                 # tied output layer

  kp, kw, ki = jax.random.split(jax.random.key(0), 3)
  params = {"embedding": jax.random.normal(kp, (50, 64)),
            "w_out_in": jax.random.normal(kw, (64, 64)) / 8}
  ids = jax.random.randint(ki, (4, 8), 0, 50)
  recipe = jq.Recipe([jq.Rule(r".*", weight=jq.int4(group_size=16),
                              act=jq.int8())])
  qparams = jq.quantize_params(apply_fn, params, recipe, ids, machine=machine)
  # Groups run along each weight's contracted axis (axis 1 of both).
  assert qparams["w_out_in"].scale.shape == (64, 4)
  assert qparams["embedding"].scale.shape == (50, 4)
  rep = jq.report(apply_fn, qparams, recipe, ids, machine=machine)
  assert rep.count("int8") == 2, str(rep)
  plain = jax.jit(jq.quantized_apply(apply_fn, recipe, machine=PLAIN))
  assert count_int8_ops(plain, qparams, ids)[0] == 2  # one batched dot each
  out = jax.jit(jq.quantized_apply(apply_fn, recipe, machine=machine))(
      qparams, ids)
  fq = jax.jit(jq.fake_quant_apply(apply_fn, recipe))(params, ids)
  assert rel_err(out, fq) < 1e-5
  assert rel_err(out, apply_fn(params, ids)) < 0.2  # int4 weights


def test_report_flags_params_quantized_with_another_recipe():
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (8, 64))
  params = model.init(jax.random.key(0), x)
  int4 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(), act=jq.int8())])
  qparams = jq.quantize_params(model.apply, params, int4, x)
  rep = jq.report(model.apply, qparams, W8A8, x)
  assert "params hold int4/ch, the recipe says int8/ch" in str(rep)
  with pytest.raises(ValueError, match="hold int4/ch, the recipe says int8"):
    jq.quantized_apply(model.apply, W8A8)(qparams, x)


def test_dropout_rngs_and_kwargs_pass_through(machine):
  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic):
      x = nn.Dense(32)(x)
      x = nn.Dropout(0.5)(x, deterministic=deterministic)
      return nn.Dense(4)(x)

  model = Drop()
  x = jax.random.normal(jax.random.key(1), (8, 16))
  params = model.init(jax.random.key(0), x, True)
  qparams = jq.quantize_params(model.apply, params, W8A8, x, True,
                               machine=machine)
  qapply = jq.quantized_apply(model.apply, W8A8, machine=machine)
  rngs = {"dropout": jax.random.key(3)}
  out = qapply(qparams, x, deterministic=False, rngs=rngs)
  ref = model.apply(params, x, deterministic=False, rngs=rngs)
  assert rel_err(out, ref) < 3e-2
  other = qapply(qparams, x, deterministic=False,
                 rngs={"dropout": jax.random.key(4)})
  assert rel_err(other, out) > 0.1  # the key really reached the dropout


def test_fake_quant_trains_with_optax_under_jit_and_vmap():
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (32, 64))
  params = model.init(jax.random.key(0), x)
  fq = jq.fake_quant_apply(model.apply, jq.Recipe([jq.Rule(
      r".*kernel", weight=jq.int4(), act=jq.int8())]))
  grads = jax.jit(jax.grad(lambda p: (fq(p, x) ** 2).mean()))(params)
  g = grads["params"]["Dense_0"]["kernel"]
  assert g.shape == (64, 128) and float(jnp.abs(g).sum()) > 0
  per_example = jax.vmap(fq, in_axes=(None, 0))(params, x[:, None])
  np.testing.assert_allclose(np.asarray(per_example[:, 0]),
                             np.asarray(jax.vmap(lambda r: fq(params, r[None])
                                                 )(x)[:, 0]), rtol=1e-6)


def test_rule_matching_no_op_raises_listing_paths():
  model = zoo.MLP()
  x = jnp.ones((2, 64))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*Conv_0/kernel", weight=jq.int8())])
  with pytest.raises(ValueError, match=r"(?s)Conv_0/kernel' matches no matmul"
                     r" parameter.*params/Dense_0/kernel"):
    jq.quantize_params(model.apply, params, recipe, x)
  # A bias is a parameter but not a matmul operand.
  recipe = jq.Recipe([jq.Rule(r".*bias", weight=jq.int8())])
  with pytest.raises(ValueError, match="matches no matmul parameter"):
    jq.quantize_params(model.apply, params, recipe, x)


def test_params_that_do_not_fit_the_model_raise():
  model = zoo.MLP()
  x = jnp.ones((2, 64))
  params = model.init(jax.random.key(0), x)
  qparams = jq.quantize_params(model.apply, params, W8A8, x)
  qapply = jq.quantized_apply(model.apply, W8A8)
  wrong = jax.tree_util.tree_map(lambda a: a, qparams,
                                 is_leaf=lambda a: isinstance(a, jq.QArray))
  wrong["params"]["Dense_7"] = wrong["params"].pop("Dense_1")
  with pytest.raises(ValueError, match="(?s)tracing apply_fn failed.*Dense_1.*do not fit apply_fn"):
    qapply(wrong, x)
  with pytest.raises(ValueError, match="arguments that do not fit apply_fn"):
    qapply(qparams, jnp.ones((2, 63)))


def test_model_without_matmul_raises():
  fn = lambda params, x: jnp.tanh(x * params["scale"])
  with pytest.raises(ValueError, match="no dot_general or conv_general_dilated"):
    jq.quantize_params(fn, {"scale": jnp.ones(3)}, W8A8, jnp.ones(3))


def test_bfloat16_model_runs_int8_and_returns_bfloat16(machine):
  model = nn.Sequential([nn.Dense(64, dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16), nn.relu,
                         nn.Dense(10, dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16)])
  x = jax.random.normal(jax.random.key(1), (128, 32), jnp.bfloat16)
  params = model.init(jax.random.key(0), x)
  qparams = jq.quantize_params(model.apply, params, W8A8, x, machine=machine)
  qapply = jq.quantized_apply(model.apply, W8A8, machine=machine)
  out = jax.jit(qapply)(qparams, x)
  assert out.dtype == jnp.bfloat16
  ref = model.apply(params, x).astype(jnp.float32)
  assert rel_err(out.astype(jnp.float32), ref) < 3e-2
  assert count_int8_ops(qapply, qparams, x) == (2, 2)


def test_calibrated_params_survive_a_checkpoint(tmp_path, machine):
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (64, 64))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32), act=jq.uint8())])
  stats = jq.calibrate(model.apply, params, W8A8, [x], progress=False)
  qparams = jq.quantize_params(model.apply, params, W8A8, x, stats=stats,
                               machine=machine)
  jq.save(tmp_path / "m.jq", qparams)
  restored = jq.load(tmp_path / "m.jq", like=qparams)
  qapply = jax.jit(jq.quantized_apply(model.apply, W8A8, machine=machine))
  np.testing.assert_array_equal(np.asarray(qapply(restored, x)),
                                np.asarray(qapply(qparams, x)))
  kernel = restored["params"]["Dense_1"]["kernel"]
  assert kernel.act is not None and kernel.act.spec.granularity == "tensor"
  grouped = jq.quantize_params(model.apply, params, recipe, x,
                               machine=machine)
  jq.save(tmp_path / "g.jq", grouped)
  grouped_apply = jq.quantized_apply(model.apply, recipe, machine=machine)
  np.testing.assert_array_equal(
      np.asarray(grouped_apply(jq.load(tmp_path / "g.jq"), x)),
      np.asarray(grouped_apply(grouped, x)))


def test_weights_inside_while_loops_and_cond_branches(machine):
  def rnn(params, x):
    def step(_, h):
      return jnp.tanh(h @ params["w_h"] + x @ params["w_x"])
    h = jax.lax.fori_loop(0, 4, step, jnp.zeros((x.shape[0], 32)))
    return jax.lax.cond(x.sum() > 0, lambda: h @ params["out"],
                        lambda: -(h @ params["out"]))

  k = jax.random.split(jax.random.key(0), 3)
  params = {"w_h": jax.random.normal(k[0], (32, 32)) / 6,
            "w_x": jax.random.normal(k[1], (16, 32)) / 4,
            "out": jax.random.normal(k[2], (32, 10)) / 6}
  x = jax.random.normal(jax.random.key(1), (64, 16))
  qparams, rep = check_w8a8(rnn, params, x, machine=machine, expect_int8=4)
  assert qparams["w_h"].scale.shape == (1, 32)
  # The cond's two branches each hold a matmul with `out`.
  assert sum(op.path == "out" for op in rep.ops) == 2


def test_grouped_weights_use_calibrated_activation_scales():
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(1), (64, 64))
  params = model.init(jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=32),
                              act=jq.uint8())])
  stats = jq.calibrate(model.apply, params, recipe, [x], progress=False)
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats,
                               machine=PLAIN)
  qapply = jq.quantized_apply(model.apply, recipe, machine=PLAIN)  # batched
  rep = jq.report(model.apply, qparams, recipe, x, machine=PLAIN)
  assert rep.count("int8") == 3 and "static activation scale" in str(rep)
  assert count_int8_ops(qapply, qparams, x) == (3, 3)
  dynamic = jq.quantize_params(model.apply, params, recipe, x, machine=PLAIN)
  ref = model.apply(params, x)
  static_out, dynamic_out = qapply(qparams, x), qapply(dynamic, x)
  assert rel_err(static_out, ref) < 0.2 and rel_err(static_out,
                                                    dynamic_out) > 1e-4


def test_report_names_weights_computed_from_params():
  """Weight normalisation (w = g v / |v|, as in Wav2Vec2's conv) is not a
  layout op: the matmul runs float, and report says which params the weight
  is computed from; attention-style products of activations say no
  parameter operand."""
  def apply_fn(p, x):
    w = p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=0, keepdims=True)
    h = x @ w                                  # computed weight
    scores = h @ h.T                           # activations only
    return jax.nn.relu(scores @ h) @ p["out"]  # a plain weight

  rep = _weight_norm_report(apply_fn, (1, 8), (16, 8))
  reasons = {op.reason for op in rep.ops if op.mode == "float"}
  assert ("weight computed from g, v by arithmetic, not layout ops alone: "
          "runs in float") in reasons
  assert "no parameter operand" in reasons
  assert rep.count("int8") == 1 and rep.count("float") == 3
  computed = [op for op in rep.ops if op.path == "g"]
  assert [(op.weight_shape, op.act_shape) for op in computed] == [
      ((16, 8), (4, 16))]


def test_report_shapes_of_a_computed_weight_on_the_left():
  # Equinox-style `w @ x`: the computed weight is operand 0.
  def apply_fn(p, x):
    w = p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=1, keepdims=True)
    return (w @ x.T).T @ p["out"]

  rep = _weight_norm_report(apply_fn, (8, 1), (8, 16))
  computed = [op for op in rep.ops if op.path == "g"]
  assert [(op.weight_shape, op.act_shape) for op in computed] == [
      ((8, 16), (16, 4))], str(rep)


def _weight_norm_report(apply_fn, g_shape, v_shape):
  """`jq.report` of `apply_fn` on params g, v (a weight-normed weight) and
  out (8, 2), int8 only for `out`, on 4 rows of 16 features."""
  params = {"g": jnp.ones(g_shape), "v": jax.random.normal(
      jax.random.key(0), v_shape), "out": jnp.ones((8, 2))}
  x = jax.random.normal(jax.random.key(1), (4, 16))
  recipe = jq.Recipe([jq.Rule("out", weight=jq.int8(), act=jq.int8()),
                      jq.Rule(".*", weight=None, optional=True)])
  return jq.report(apply_fn, params, recipe, x)
