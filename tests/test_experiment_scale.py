"""`experiments.scale --quick`: quantizing leaf by leaf stays near the
quantized size; a float copy of the model would not."""

import json

from experiments import scale


def test_scale_quick(tmp_path):
  report = scale.main(["--quick", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"] == {"d": 1024, "layers": 6, "quick": True}
  for row in report["rows"]:
    assert row["params"] == 6 * 2 * 1024 * 4096 + 6 * (1024 + 4096)
    assert row["quantized_mb"] < 0.3 * row["float_mb"]
    # A float copy of the model (192 MB) would add at least that much.
    # Measured (quick): +96 MB (int8) and +106 MB (int4 g128): the
    # quantized tree and a few leaf-sized temporaries.
    assert 0 < row["growth_mb"] < 0.75 * row["float_mb"], row
