"""`experiments.decode` and `experiments.lowering_probe` on tiny shapes:
every cell timed (finite, broad band: no speed is asserted on a shared
machine), lowering notes from `jq.report`, bytes-moved limits from the
params, and the probe's suggested profile row well-formed."""

import json
import math

from experiments import decode, lowering_probe
from jaxquant.engine import lowering


def test_decode_sweep_small(tmp_path):
  report = decode.main(["--rows", "1", "8", "--shapes", "128x256",
                        "--rounds", "2", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["cells"] == report["cells"]
  assert [(c["shape"], c["M"]) for c in report["cells"]] == [
      ("128x256", 1), ("128x256", 8)]
  for cell in report["cells"]:
    for name in [*decode.MODES, "s8 dot"]:
      assert math.isfinite(cell[name]) and 0.01 < cell[name] < 100, cell
  assert report["machine"] == lowering.machine()
  # Row padding shows up at M = 1 only, on machines that pad.
  notes = report["lowering"]["W8A8"]
  pads = lowering.profile().min_rows > 1
  assert ("int8, int8 dot, rows padded to 4" in notes) == pads
  assert notes.get("int8, int8 dot", []) == (
      ["128x256 M=8"] if pads else ["128x256 M=1", "128x256 M=8"])
  limits = report["bytes_limit"]["128x256"]
  # int8 values + one float32 scale per output channel, over float32.
  assert math.isclose(limits["W8A16"], (128 * 256 + 4 * 256) / (4 * 128 * 256))
  assert limits["W4A16 g128"] < limits["W8A16"]
  assert "Bytes-moved limit" in (tmp_path / "results.md").read_text()


def test_lowering_probe_small(tmp_path):
  report = lowering_probe.main(["--rows", "1", "16", "--shape", "128x128",
                                "--rounds", "2", "--out", str(tmp_path)])
  cells = report["cells"]
  assert [c["M"] for c in cells] == [1, 16]
  for cell in cells:
    for mode in lowering_probe.MODES:
      for machine in (lowering_probe.PLAIN, lowering_probe.FAST):
        assert math.isfinite(cell[f"{mode} | {machine}"])
  suggested = report["suggested"]
  assert suggested["min_rows"] in (1, 4)
  assert isinstance(suggested["split_weight_only"], bool)
  assert suggested["split_grouped_rows"] in (0, 3, 48)
  assert "Supported by these numbers" in (tmp_path / "results.md").read_text()
