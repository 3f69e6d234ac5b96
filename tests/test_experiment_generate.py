"""`experiments.generate` and its decoder: cached decoding, int8, the table.

All on the TINY decoder. The decoder's KV cache is checked against the
whole sequence run at once; jaxquant's W8A8 is checked to run every Dense
matmul int8 inside the jitted decode loop (`jq.report` and the StableHLO);
the quick run of the script is checked for every variant and sane values
(no speed-up is asked for: timings on a shared 2-core machine are noisy).
"""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from experiments import decoder_model as dm
from experiments import generate, peers

DENSE = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
# An s8 x s8 dot, or jaxquant's own int8 dot (the native kernel that this
# machine's profile runs at a few rows).
I8_DOT = re.compile(r"stablehlo\.(?:dot_general|custom_call "
                    r"@jaxquant_int8_dot)[^\n]*"
                    r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)")


def _prompt(config, batch, length, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, config.vocab, (batch, length)),
                     jnp.int32)


@pytest.mark.parametrize("tied", [False, True])
def test_cached_decoding_equals_the_whole_sequence_at_once(tied):
  config = dm.Config(**{**vars(dm.TINY), "tied": tied})
  model = dm.Decoder(config)
  params = dm.init_params(model, seed=0)
  apply = jax.jit(model.apply)
  tokens = _prompt(config, 2, 12)
  full, _ = apply(params, tokens, dm.init_cache(config, 2), jnp.int32(0))

  # Prefill 5 tokens, then one token per call at positions 5 .. 11.
  logits, cache = apply(params, tokens[:, :5], dm.init_cache(config, 2),
                        jnp.int32(0))
  steps = [logits]
  for t in range(5, 12):
    logits, cache = apply(params, tokens[:, t:t + 1], cache, jnp.int32(t))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full,
                             atol=1e-4, rtol=1e-4)


def test_jitted_decode_loop_is_greedy_decoding_of_the_full_forward():
  config, prompt_len, new = dm.TINY, 6, 5
  model = dm.Decoder(config)
  params = dm.init_params(model, seed=1)
  prompt = _prompt(config, 2, prompt_len)
  prefill, decode = generate.generation_fns(model.apply, prompt_len, new)
  logits, cache = prefill(params, prompt, dm.init_cache(
      config, 2, prompt_len + new))
  first = generate.greedy_pick(logits)
  picks = decode(params, first, cache)
  assert picks.shape == (2, new)

  # Teacher forcing: the whole generated sequence at once picks the same.
  seq = jnp.concatenate([prompt, first[:, None], picks[:, :-1]], axis=1)
  full, _ = model.apply(params, seq, dm.init_cache(config, 2), 0)
  greedy = jnp.argmax(full[:, prompt_len - 1:], axis=-1)
  np.testing.assert_array_equal(greedy, jnp.concatenate(
      [first[:, None], picks], axis=1))


def test_w8a8_runs_every_dense_matmul_int8_in_the_decode_loop():
  config, prompt_len, new = dm.TINY, 8, 4
  model = dm.Decoder(config)
  params = dm.init_params(model, seed=0)
  prompt = _prompt(config, 2, prompt_len)
  cache = dm.init_cache(config, 2, prompt_len + new)
  recipe = jq.Recipe([jq.Rule(r".*kernel", **generate.MODES["W8A8"])])
  qparams = jq.quantize_params(model.apply, params, recipe, prompt, cache, 0)
  qapply = jq.quantized_apply(model.apply, recipe)

  # jq.report at a decode step: every kernel int8, the 2 attention products
  # per layer (no parameter operand) float.
  step = (prompt[:, :1], cache, jnp.int32(prompt_len))
  ops = jq.report(model.apply, qparams, recipe, *step).ops
  kernels = {op.path: op.mode for op in ops if op.path != "-"}
  assert kernels == {
      **{f"params/layer_{i}/{block}/{name}/kernel": "int8"
         for i in range(config.n_layers)
         for block, names in DENSE.items() for name in names},
      "params/lm_head/kernel": "int8"}
  assert [op.mode for op in ops if op.path == "-"] == [
      "float"] * (2 * config.n_layers)

  # The lowered decode loop holds one s8 x s8 dot per Dense layer.
  prefill, decode = generate.generation_fns(qapply, prompt_len, new)
  logits, filled = prefill(qparams, prompt, cache)
  text = decode.lower(qparams, generate.greedy_pick(logits),
                      filled).as_text()
  assert len(I8_DOT.findall(text)) == len(kernels)

  # And the prefill logits stay close to float's.
  float_logits, _ = model.apply(params, prompt, cache, 0)
  assert generate.relative_error(logits, float_logits) < 0.1


def test_leading_matches_takes_the_minimum_over_the_batch():
  ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  assert generate.leading_matches(ref, ref) == 4
  assert generate.leading_matches([[1, 2, 0, 4], [5, 6, 7, 0]], ref) == 2
  assert generate.leading_matches([[0, 2, 3, 4], [5, 6, 7, 8]], ref) == 0


def _check_quick_run(tmp_path, with_peers: bool):
  """Runs `generate --quick` and checks the table, JSON and figure."""
  argv = ["--quick", "--out", str(tmp_path)] + (["--peers"] if with_peers
                                                else [])
  report = generate.main(argv)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(report["rows"]))
  assert (tmp_path / "decode.png").stat().st_size > 0
  names = ["float", *generate.MODES]
  if with_peers and peers.available()["qwix"]:
    names += ["Qwix W8A8", "Qwix W8A16"]
  rows = {(r["variant"], r["batch"]): r for r in report["rows"]}
  assert list(rows) == [(n, b) for b in (1, 2) for n in names]
  float_mb = rows["float", 1]["param MB"]
  for (name, batch), row in rows.items():
    for key in ("prefill tok/s", "decode tok/s"):
      assert math.isfinite(row[key]) and row[key] > 0, row
    assert 0.05 < row["decode time / float"] < 20, row
    assert 0 <= row["greedy tokens = float"] <= 8
    assert 0 <= row["prompt top-1 = float %"] <= 100
    if name == "float":
      assert row["greedy tokens = float"] == 8, row
      assert row["prompt top-1 = float %"] == 100.0, row
      assert row["logits rel. err"] == 0.0 and row["param MB"] == float_mb
    else:  # int8 weights are ~1/4 of float32, int4 ~1/8 (+ scales)
      assert row["param MB"] < 0.35 * float_mb, row
    if name in ("W8A8", "W8A16", "Qwix W8A8", "Qwix W8A16"):
      assert row["logits rel. err"] < 0.1, row
      assert row["prompt top-1 = float %"] >= 50, row

  table = (tmp_path / "results.md").read_text()
  assert ("| variant | batch | prefill tok/s | decode tok/s | decode time / "
          "float | param MB | greedy tokens = float | prompt top-1 = float % "
          "| logits rel. err |" in table)
  assert "| float | 1 | " in table and "| 8/8 | 100.0 | 0 |" in table
  for batch in (1, 2):
    assert saved["lowering"][str(batch)]["W8A8"].startswith("int8")


# Not marked slow (14-24 s here, most of it compiling 16 small functions): the
# only run of the script in CI.
def test_generate_quick_runs_and_writes_results(tmp_path):
  _check_quick_run(tmp_path, with_peers=False)


@pytest.mark.slow
def test_generate_quick_with_peers(tmp_path):
  _check_quick_run(tmp_path, with_peers=True)


def test_qwix_decoder_is_close_to_float():
  pytest.importorskip("qwix")
  config = dm.TINY
  model = dm.Decoder(config)
  params = dm.init_params(model, seed=0)
  args = (_prompt(config, 2, 8), dm.init_cache(config, 2, 12), jnp.int32(0))
  float_logits, _ = model.apply(params, *args)
  for act in (True, False):
    apply, qparams = generate.qwix_decoder(model, params, args, act=act)
    logits, _ = jax.jit(apply)(qparams, *args)
    assert generate.relative_error(logits, float_logits) < 0.1
