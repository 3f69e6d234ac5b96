"""`experiments.deep --quick`: the transform's own cost on a deep model."""

import json

from experiments import deep


def test_deep_quick(tmp_path):
  report = deep.main(["--quick", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["quick"] is True
  t = report["transformer"]
  # What the transform promises, not what a JAX release traces to (jaxpr
  # equation counts moved between jax 0.12.0 and 0.12.1): every kernel of
  # every block (q, k, v, out, two MLP) is found and quantized.
  assert t["quantized"] == t["kernels"] == 6 * saved["config"]["layers"]
  assert t["equations"] > 0 and t["params"] > 3_000_000
  # Measured (quick): quantized compile 1.7x float's; full run in README.
  assert 0 < t["compile_ratio"] < 4
  assert report["memory"]["growth_mb"] > 0
  first, last = report["chains"]
  for chain in (first, last):
    assert chain["quantized"] == chain["matmuls"]
  # The chain repeats one step, so its equations grow with its matmuls;
  # quantize time must grow linearly with them (measured 0.45-0.67 of
  # linear, warm-up included in the first), where quadratic would be 4.
  assert last["matmuls"] == 4 * first["matmuls"]
  assert last["equations"] * first["matmuls"] == (
      first["equations"] * last["matmuls"])
  growth = (last["quantize_s"] / first["quantize_s"]) / 4
  assert growth < 2, report["chains"]
