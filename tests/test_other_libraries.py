"""Models from other libraries, small random configs, no downloads.

Hugging Face Flax models (`transformers<5`, no torch) and dm-haiku come
from the `zoo` extra (`pip install -e ".[zoo]"`); each group is skipped
where its library is missing. Per model: W8A8 runs every weight matmul int8
(counted in the StableHLO), its output is within 3e-2 relative L2 of float
with at least 97% argmax agreement, grouped W4A8 runs int8 too (weights
transposed before their matmul included), QAT gradients are finite and
the quantized params survive `jq.save` / `jq.load`.
"""

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
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)))


def _hf(name):
  transformers = pytest.importorskip("transformers")
  if name == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4,
                                  vocab_size=128, n_positions=32)
    model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
  elif name == "bert":
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64,
                                  num_attention_heads=4, intermediate_size=128,
                                  vocab_size=128, max_position_embeddings=32)
    model = transformers.FlaxBertForMaskedLM(cfg, seed=0)
  else:
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=32)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
  apply = lambda params, ids: model(ids, params=params).logits
  return apply, model.params, IDS


def _haiku_mlp():
  hk = pytest.importorskip("haiku")
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([64, 64, 10])(x)))
  x = jax.random.normal(jax.random.key(1), (256, 32))
  return net.apply, net.init(jax.random.key(0), x), x


def _weight_matmuls(apply_fn, params, x) -> int:
  """Matmuls whose operand is a parameter, from the float report."""
  rep = jq.report(apply_fn, params, W8A8, x)
  return sum(op.path != "-" for op in rep.ops)


# Marked slow: about 60 s of CPU for the four (each traces and compiles
# W8A8, W4A8 and QAT), more than CI's time budget has left; run with
# `pytest -m slow tests/test_other_libraries.py` after installing [zoo].
@pytest.mark.slow
@pytest.mark.parametrize("make", ["gpt2", "bert", "llama", "haiku"])
def test_model_from_another_library(make, tmp_path):
  apply_fn, params, x = _haiku_mlp() if make == "haiku" else _hf(make)
  ref = apply_fn(params, x)
  n = _weight_matmuls(apply_fn, params, x)
  assert n >= 3
  for recipe in (W8A8, W4A8):
    qparams = jq.quantize_params(apply_fn, params, recipe, x, progress=False)
    qapply = jax.jit(jq.quantized_apply(apply_fn, recipe))
    rep = jq.report(apply_fn, qparams, recipe, x)
    assert rep.count("int8") == n, str(rep)
    assert jq.int8_ops(qapply, qparams, x).stablehlo >= n
    if recipe is W8A8:
      out = qapply(qparams, x)
      rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
      assert rel < 3e-2, rel
      agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
      assert agree >= 0.97, agree
      jq.save(tmp_path / "q.jq", qparams)
      loaded = jq.load(tmp_path / "q.jq", like=qparams)
      np.testing.assert_array_equal(qapply(loaded, x), out)
  qat = jq.fake_quant_apply(apply_fn, W8A8)
  grads = jax.grad(lambda p: jnp.mean(qat(p, x) ** 2))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
