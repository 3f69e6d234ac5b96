"""`experiments.deep --quick`: the transform's own cost on a deep model."""

import json

from experiments import deep


def test_deep_quick(tmp_path):
  report = deep.main(["--quick", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["quick"] is True
  t = report["transformer"]
  assert t["equations"] > 300 and t["params"] > 3_000_000
  # Measured (quick): quantized compile 1.7x float's; full run in README.
  assert 0 < t["compile_ratio"] < 4
  assert report["memory"]["growth_mb"] > 0
  first, last = report["chains"]
  assert last["equations"] == 4 * first["equations"] == 4000
  # Linear in the equations (measured 0.67 of linear here, warm-up
  # included in the first); quadratic would be 4.
  growth = (last["quantize_s"] / first["quantize_s"]) / 4
  assert growth < 2, report["chains"]
