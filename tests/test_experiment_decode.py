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
  # Up to 8 rows, jaxquant's C++ kernel where this machine's profile takes
  # it and it is built. Without it, M = 1 is reduced over the stored codes,
  # or padded, on machines that do either; M = 8 is one plain int8 dot.
  prof = lowering.profile()
  native = lowering.native_problem() is None and prof.native_rows[0] >= 8
  for name in ("W8A8", "W8A8 (XLA)"):
    notes = report["lowering"][name]
    if native and name == "W8A8":
      assert notes["int8, " + lowering.NATIVE_DOT] == [
          "128x256 M=1", "128x256 M=8"]
      continue
    one_row = ("int8, " + lowering.ROW_REDUCE if prof.row_reduce
               else "int8, int8 dot, rows padded to 4" if prof.min_rows > 1
               else "int8, int8 dot")
    assert notes[one_row][0] == "128x256 M=1"
    assert "128x256 M=8" in notes["int8, int8 dot"]
  assert report["stream GB/s"] > 0.1
  assert all(g["W8A8"] > 0 for g in report["weight GB/s"])
  limits = report["bytes_limit"]["128x256"]
  # int8 values + one float32 scale per output channel, over float32.
  assert math.isclose(limits["W8A16"], (128 * 256 + 4 * 256) / (4 * 128 * 256))
  assert limits["W4A16 g128"] < limits["W8A16"]
  assert "Bytes-moved limit" in (tmp_path / "results.md").read_text()


def test_lowering_probe_small(tmp_path):
  report = lowering_probe.main(["--rows", "1", "16", "--shape", "128x256",
                                "--rounds", "2", "--out", str(tmp_path)])
  cells = report["cells"]
  assert [c["M"] for c in cells] == [1, 16]
  for cell in cells:
    for mode, forms in lowering_probe.FORMULATIONS.items():
      for form in forms:
        if cell["M"] == 1 or "row reduce" not in form:
          assert math.isfinite(cell[f"{mode}: {form}"])
  suggested = report["suggested"]
  assert suggested["min_rows"] in (1, 4)
  # The probe reports the fraction rounded to 4 decimals.
  assert suggested["weight_only_parts"] in (0, round(3 / 256, 4),
                                            round(48 / 256, 4))
  batched, per_group = suggested["grouped_rows"]
  assert batched in (0, 1, 16) and per_group in (0, 1, 16)  # 1 group
  assert "Supported by these numbers" in (tmp_path / "results.md").read_text()


def test_lowering_probe_suggests_from_the_fastest_formulation():
  def cell(m, w8a8, w8a16, w4a8):
    forms = lowering_probe.FORMULATIONS
    out = {"M": m}
    for mode, times in (("W8A8", w8a8), ("W8A16", w8a16),
                        ("W4A8 g128", w4a8)):
      out.update({f"{mode}: {f}": t for f, t in zip(forms[mode], times)})
    return out
  # W8A8: unpadded, padded, (N, K) padded, (N, K) row reduce (one row
  # only); W8A16: dequantized, parts, (N, K) parts, (N, K) row reduce.
  cells = [cell(1, (5, 0.5, 0.45, 0.4), (4, 0.6, 0.5, 0.45), (1.4, 1.6, 6)),
           cell(8, (0.5, 0.5, 0.4), (3, 0.7, 0.6), (1.5, 0.9, 3)),
           cell(64, (0.4, 0.4, 0.4), (2, 0.8, 0.9), (4, 1.6, 1.5)),
           cell(256, (0.3, 0.3, 0.3), (1.3, 0.8, 0.8), (20, 1.0, 3))]
  assert lowering_probe.suggest(cells, n=4096, groups=32) == {
      "min_rows": 4, "contract_last": True, "row_reduce": True,
      "weight_only_parts": round(3 * 256 / 4096, 4),
      "grouped_rows": (1, 32 * 8)}
  # The (N, K) layout loses at one row count: not stored so.
  cells[2]["W8A8: (N, K) padded"] = 0.45
  cells[0]["W8A16: (N, K) row reduce"] = 0.55
  suggested = lowering_probe.suggest(cells, n=4096, groups=32)
  assert not suggested["contract_last"] and not suggested["row_reduce"]
