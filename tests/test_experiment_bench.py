"""`experiments.bench --quick`: every variant timed, sane ratios, real int8.

Timings on a shared 2-core machine are noisy, so no test here asks for a
speed-up: the ratios are checked for presence, finiteness and a broad band
(a silent fallback to a Python loop or a recompilation per call would
leave it), and "int8" is checked in the compiled HLO (`jq.int8_ops`).
"""

import json
import math

from experiments import bench

MLP = "MLP 784-1024-1024-10, batch 256 (quick: /4)"
BLOCK = "Transformer block d512 ff2048 seq128 batch8 (quick: /4)"


def _ratio(value) -> float:
  assert isinstance(value, float), value
  return value


# Not marked slow (about 17 s): the only run of the benchmark script, and the
# only check that its W8A8 functions compile to int8 dots.
def test_bench_quick_runs_and_writes_results(tmp_path):
  report = bench.main(["--quick", "--peers", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  rows = report["rows"]
  assert saved["rows"] == rows and saved["rounds"] == 3
  assert [(r["model"], r["task"]) for r in rows] == [
      (MLP, "W8A8 inference"), (BLOCK, "W8A8 inference"),
      (MLP, "QAT step"), (BLOCK, "QAT step"),
      ("raw dot 64x256x256", "s8 x s8 -> s32")]
  table = (tmp_path / "results.md").read_text()
  assert table.splitlines()[0] == "| " + " | ".join(bench.COLUMNS) + " |"
  for row in rows:
    assert f"| {row['model']} | {row['task']} | " in table
    ratio = _ratio(row["jaxquant / float"])
    assert math.isfinite(ratio) and 0.05 < ratio < 20, row
    for peer in ("qwix / float", "aqt / float"):  # "" unless installed
      assert row[peer] == "" or 0.05 < _ratio(row[peer]) < 20, row
    if row["task"] == "W8A8 inference":  # int8 graphs compile slower
      assert 0.2 < _ratio(row["compile jaxquant / float"]) < 50, row
    else:
      assert row["compile jaxquant / float"] == ""

  # Every weight matmul runs s8 x s8 -> s32, before and after XLA: the MLP's
  # 3 Dense layers; the block's q, k, v, out and 2 MLP projections (the two
  # attention products have no parameter operand and stay float).
  assert saved["int8_ops"] == {
      MLP: {"stablehlo": 3, "compiled": 3, "compiled_matmuls": 3},
      BLOCK: {"stablehlo": 6, "compiled": 6, "compiled_matmuls": 6}}
