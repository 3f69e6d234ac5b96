"""Models from other libraries, small random configs, no downloads.

The models are in `zoo_models.py`: Hugging Face Flax (GPT-2, BERT, Llama,
ViT, T5, CLIP text, Whisper, Wav2Vec2), dm-haiku (MLP, CNN with BatchNorm
state, LSTM, transformer), Equinox (MLP, CNN, GRU under `lax.scan`,
transformer), Flax NNX (CNN with BatchNorm, transformer, LSTM under
`nnx.scan`) and `jax.example_libraries.stax`. Hugging Face (`transformers<5`,
no torch) and dm-haiku come from the `zoo` extra (`pip install -e
".[zoo]"`; CI's newest environment installs it); each model is skipped
where its library is missing.

Per model: W8A8 runs every weight matmul int8 (counted by `jq.report` and in
the StableHLO), its output is within 3e-2 relative L2 of float with at least
97% argmax agreement, grouped W4A8 runs int8 too (weights transposed before
their matmul included), QAT gradients are finite and the quantized params
survive `jq.save` / `jq.load`. What a model changes in these checks is data
in its `zoo_models.Case` (a weight-normalised matmul that runs in float by
design, convolutions that W4A8 quantizes per channel), with the reason.

The configs are as small as these checks allow (one block of every layer
kind, width 16-32): CI's time goes to tracing and compiling. Parameters come
from a jitted init and every forward / gradient runs jitted, never eagerly.
CI (`-m 'not slow'`) runs one model per code path: its own test time is
given per model in README.md; the rest are `slow` (`pytest -m slow`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import zoo_models
from jaxquant.tree import leaves_with_paths

# One model per code path in CI:
CI = [
    "gpt2",                 # HF causal LM, tied embedding (x @ wte.T)
    "bert",                 # HF encoder, MLM head
    "llama",                # HF GQA, RoPE, RMSNorm
    "haiku_mlp",            # haiku params dict
    "haiku_cnn_batchnorm",  # convolutions, BatchNorm state (int32 counter)
    "eqx_gru",              # Equinox module tree, (out, in) weights,
                            # lax.scan, weight norm (a computed weight)
    "nnx_lstm",             # NNX State paths, nnx.scan (nnx.RNN)
    "stax_mlp",             # list-of-tuples params
]
SLOW = [
    "vit", "t5", "clip_text", "whisper", "wav2vec2", "haiku_lstm",
    "haiku_transformer",
    "eqx_mlp", "eqx_cnn", "eqx_transformer", "nnx_cnn", "nnx_transformer",
]
assert sorted(CI + SLOW) == sorted(zoo_models.MODELS)


def _recipes(case):
  rule = functools.partial(jq.Rule, act=jq.int8(), optional=True)
  w8a8 = jq.Recipe([rule(case.pattern, weight=jq.int8())])
  per_channel = ([rule(case.w4_per_channel, weight=jq.int4())]
                 if case.w4_per_channel else [])
  w4a8 = jq.Recipe(per_channel +
                   [rule(case.pattern, weight=jq.int4(group_size=16))])
  return w8a8, w4a8


@pytest.mark.parametrize(
    "name", CI + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_model_from_another_library(name, tmp_path):
  case = zoo_models.MODELS[name]()
  apply_fn, params, args = case.apply, case.params, case.args
  ref = np.asarray(jax.jit(apply_fn)(params, *args))
  w8a8, w4a8 = _recipes(case)
  param_paths = {path for path, _ in leaves_with_paths(params)}
  n = None
  for recipe in (w8a8, w4a8):
    qparams = jq.quantize_params(apply_fn, params, recipe, *args,
                                 progress=False)
    # Committed like `jq.load`'s arrays, so both calls below share one
    # compile (jit's cache tells committed arrays from uncommitted ones).
    qparams = jax.device_put(qparams, jax.devices()[0])
    qapply = jax.jit(jq.quantized_apply(apply_fn, recipe))
    rep = jq.report(apply_fn, qparams, recipe, *args)
    weight_ops = [op for op in rep.ops if op.path != "-"]
    computed = [op for op in weight_ops
                if op.reason.startswith("weight computed from")]
    if n is None:  # matmuls with a parameter operand, from W8A8's report
      n = len(weight_ops)
      assert n >= case.min_matmuls, str(rep)
      # Weight normalisation runs in float by design, named by `report`.
      assert len(computed) == case.computed, str(rep)
      assert all(op.mode == "float" for op in computed), str(rep)
      # The paths `report` names are the params' own; NNX's Variable
      # `value` attribute is not one of them, so `.*kernel` matches.
      assert {op.path for op in weight_ops} <= param_paths, str(rep)
      assert not any(op.path.endswith("/value") for op in weight_ops)
    assert len(weight_ops) == n, str(rep)
    assert rep.count("int8") == n - case.computed, str(rep)
    # ... and is computed as one (grouped weights fall back to a float dot
    # of the quantized activation beyond 2048 groups x rows on this CPU).
    assert not any(op.mode == "int8" and op.lowering.startswith("float")
                   for op in rep.ops), str(rep)
    assert jq.int8_ops(qapply, qparams, *args).stablehlo >= (
        n - case.computed)
    if recipe is w8a8:
      # (Checked in NumPy: every eager jnp op would compile.)
      out = np.asarray(qapply(qparams, *args))
      rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
      assert rel < 3e-2, rel
      agree = np.mean(np.argmax(out, case.classes_axis) ==
                      np.argmax(ref, case.classes_axis))
      assert agree >= 0.97, agree
      jq.save(tmp_path / "q.jq", qparams)
      loaded = jq.load(tmp_path / "q.jq", like=qparams)
      np.testing.assert_array_equal(qapply(loaded, *args), out)
  qat = jq.fake_quant_apply(apply_fn, w8a8)
  # allow_int: a BatchNorm state's int32 counter gets a float0 "gradient";
  # every float leaf's gradient is checked.
  grads = jax.jit(jax.grad(lambda p: jnp.mean(qat(p, *args) ** 2),
                           allow_int=True))(params)
  floats = [g for g in jax.tree.leaves(grads) if g.dtype != jax.dtypes.float0]
  assert len(floats) == sum(jnp.issubdtype(p.dtype, jnp.inexact)
                            for p in jax.tree.leaves(params))
  assert all(np.isfinite(g).all() for g in floats)


def test_gpt2_greedy_decode_with_kv_cache():
  """Quantized decoding through Flax GPT-2's KV cache (the `init_cache` /
  `past_key_values` API that `generate` uses): a prefill of the prompt, then
  one token per step, fed float's greedy tokens.

  Teacher-forced rather than free-running: a random model has near-ties
  between its top logits, and one flipped token (measured: 1 of 64 in the
  first decode step) sends the two runs down different sequences, after
  which their tokens say nothing about the quantized cache. Fed the same
  tokens, every step's logits are checked as the model's output is above.
  """
  # Untied: a random tied GPT-2 mostly repeats its input token, whatever
  # the cache holds.
  case = zoo_models.hf_lm("gpt2", tie_word_embeddings=False)
  model = case.model
  batch, prompt_len, new = 32, 4, 4
  prompt = zoo_models.IDS[:, :prompt_len]
  cache = jax.jit(lambda: model.init_cache(batch, prompt_len + new))()
  mask = jnp.ones((batch, prompt_len + new), jnp.int32)

  def step(params, ids, cache, pos):
    out = model(ids, attention_mask=mask, position_ids=pos, params=params,
                past_key_values=cache)
    return out.logits[:, -1], out.past_key_values

  def decode(step, params, tokens=None):
    """Logits (batch, new, vocab); greedy, or fed `tokens`."""
    ids, kv, logits = prompt, cache, []
    pos = np.broadcast_to(np.arange(prompt_len), prompt.shape)
    for t in range(new):
      out, kv = step(params, ids, kv, pos)
      logits.append(np.asarray(out))
      token = logits[-1].argmax(-1) if tokens is None else tokens[:, t]
      ids, pos = token[:, None], np.full((batch, 1), prompt_len + t)
    return np.stack(logits, 1)

  w8a8, _ = _recipes(case)
  pos = np.zeros((batch, 1), np.int32)
  qparams = jq.quantize_params(step, case.params, w8a8, prompt[:, :1], cache,
                               pos, progress=False)
  # Every weight matmul of a decode step runs int8 (attention over the
  # cache is between two activations: float).
  rep = jq.report(step, qparams, w8a8, prompt[:, :1], cache, pos)
  weight_ops = [op for op in rep.ops if op.path != "-"]
  assert len(weight_ops) >= 5 and rep.count("int8") == len(weight_ops), (
      str(rep))
  ref = decode(jax.jit(step), case.params)
  tokens = ref.argmax(-1)
  # Not a model that repeats its last token (the cache would not matter).
  assert np.mean(tokens[:, 1:] != tokens[:, :-1]) > 0.5
  out = decode(jax.jit(jq.quantized_apply(step, w8a8)), qparams, tokens)
  for t in range(new):
    rel = np.linalg.norm(out[:, t] - ref[:, t]) / np.linalg.norm(ref[:, t])
    assert rel < 3e-2, (t, rel)
  agree = np.mean(out.argmax(-1) == tokens)
  assert agree >= 0.97, agree
