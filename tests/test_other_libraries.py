"""Models from other libraries, small random configs, no downloads.

Hugging Face Flax models (`transformers<5`, no torch) and dm-haiku come
from the `zoo` extra (`pip install -e ".[zoo]"`; CI's newest environment
installs it); each group is skipped where its library is missing. Per
model: W8A8 runs every weight matmul int8 (counted in the StableHLO), its
output is within 3e-2 relative L2 of float with at least 97% argmax
agreement, grouped W4A8 runs int8 too (weights transposed before their
matmul included), QAT gradients are finite and the quantized params
survive `jq.save` / `jq.load`.

The configs are as small as these checks allow (one block of every layer
kind, width 32): CI's time goes to tracing and compiling. Parameters come
from a jitted init and every forward / gradient runs jitted, never eagerly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

W8A8 = jq.Recipe([jq.Rule(r".*(kernel|embedding|w)", weight=jq.int8(),
                          act=jq.int8(), optional=True)])
W4A8 = jq.Recipe([jq.Rule(r".*(kernel|embedding|w)",
                          weight=jq.int4(group_size=16), act=jq.int8(),
                          optional=True)])
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (64, 16)))


def _hf(name):
  transformers = pytest.importorskip("transformers")
  small = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
               intermediate_size=64, vocab_size=64,
               max_position_embeddings=16)
  if name == "gpt2":
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4,
                                  vocab_size=64, n_positions=16)
    cls = transformers.FlaxGPT2LMHeadModel
  elif name == "bert":
    cfg = transformers.BertConfig(**small)
    cls = transformers.FlaxBertForMaskedLM
  else:
    cfg = transformers.LlamaConfig(num_key_value_heads=2, **small)
    cls = transformers.FlaxLlamaForCausalLM
  # _do_init=False: the init runs once, jitted (eager init is seconds).
  model = cls(cfg, seed=0, _do_init=False)
  params = jax.jit(functools.partial(model.init_weights,
                                     input_shape=(1, 1)))(model.key)
  apply = lambda params, ids: model(ids, params=params).logits
  return apply, params, IDS


def _haiku_mlp():
  hk = pytest.importorskip("haiku")
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([32, 32, 10])(x)))
  x = jax.random.normal(jax.random.key(1), (1024, 32))
  return net.apply, net.init(jax.random.key(0), x), x


def _weight_matmuls(apply_fn, params, x) -> int:
  """Matmuls whose operand is a parameter, from the float report."""
  rep = jq.report(apply_fn, params, W8A8, x)
  return sum(op.path != "-" for op in rep.ops)


@pytest.mark.parametrize("make", ["gpt2", "bert", "llama", "haiku"])
def test_model_from_another_library(make, tmp_path):
  apply_fn, params, x = _haiku_mlp() if make == "haiku" else _hf(make)
  ref = np.asarray(jax.jit(apply_fn)(params, x))
  n = _weight_matmuls(apply_fn, params, x)
  assert n >= 3
  for recipe in (W8A8, W4A8):
    qparams = jq.quantize_params(apply_fn, params, recipe, x, progress=False)
    qapply = jax.jit(jq.quantized_apply(apply_fn, recipe))
    rep = jq.report(apply_fn, qparams, recipe, x)
    assert rep.count("int8") == n, str(rep)
    assert jq.int8_ops(qapply, qparams, x).stablehlo >= n
    if recipe is W8A8:
      # (Checked in NumPy: every eager jnp op would compile.)
      out = np.asarray(qapply(qparams, x))
      rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
      assert rel < 3e-2, rel
      agree = np.mean(np.argmax(out, -1) == np.argmax(ref, -1))
      assert agree >= 0.97, agree
      jq.save(tmp_path / "q.jq", qparams)
      loaded = jq.load(tmp_path / "q.jq", like=qparams)
      np.testing.assert_array_equal(qapply(loaded, x), out)
  qat = jq.fake_quant_apply(apply_fn, W8A8)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(qat(p, x) ** 2)))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
