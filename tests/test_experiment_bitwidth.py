"""`experiments.bitwidth_sweep --quick`: files and physically sensible SQNR."""

import json

import numpy as np
import pytest

from experiments import bitwidth_sweep, common


# Not marked slow (about 25 s): the quick sweep is CI's only run of the
# script, shared by every test in this file.
@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bitwidth_sweep")
  bitwidth_sweep.main(["--quick", "--out", str(out)])
  return out, json.loads((out / "results.json").read_text())


def _sqnr(report, dataset, granularity, clip):
  (row,) = [r for r in report["results"] if (r["dataset"], r["granularity"],
                                             r["clip"]) == (dataset,
                                                            granularity, clip)]
  return np.array(row["sqnr_db"])


def test_writes_table_json_and_figure(report):
  out, data = report
  for name in ("results.md", "results.json", "sqnr_vs_bits.png"):
    assert (out / name).stat().st_size > 0
  assert (out / "sqnr_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (out / "results.md").read_text()
  assert "| gaussian | channel | absmax |" in table
  assert data["config"]["bits"] == [2, 3, 4, 5, 6, 7, 8]
  settings = {(r["dataset"], r["granularity"], r["clip"])
              for r in data["results"]}
  assert len(settings) == 3 * 4 * 3
  # The MLP learned something (its kernels are trained, not random).
  assert data["config"]["mlp_test_accuracy"] > 0.8


def test_sqnr_increases_with_bits_for_every_setting(report):
  _, data = report
  for r in data["results"]:
    sqnr = np.array(r["sqnr_db"])
    assert np.all(np.isfinite(sqnr)), r
    assert np.all(np.diff(sqnr) > 0), r
    if r["clip"] != "percentile":  # (percentile clipping may saturate)
      assert sqnr[-1] > 20, r  # 8 bits is never worse than 20 dB here


def test_8_bit_per_channel_gaussian_matches_6_dB_per_bit_theory(report):
  _, data = report
  (theory,) = [t for t in data["theory"]
               if (t["dataset"], t["granularity"]) == ("gaussian", "channel")]
  # The crest factor (max / rms) of 128 Gaussian samples is about 2.5 - 4.
  assert 8.0 < theory["crest_db"] < 12.0
  expected = 6.02 * 8 + 4.77 - theory["crest_db"]
  measured = _sqnr(data, "gaussian", "channel", "absmax")
  assert abs(measured[-1] - expected) < 3.0
  # And ~6 dB per bit from 4 to 8 bits.
  slope = np.polyfit(np.arange(4, 9), measured[2:], 1)[0]
  assert 5.5 < slope < 6.5


def test_per_channel_beats_per_tensor_on_scale_varied_weights(report):
  _, data = report
  for clip in ("absmax", "percentile", "mse"):
    tensor = _sqnr(data, "heavy", "tensor", clip)
    channel = _sqnr(data, "heavy", "channel", clip)
    assert np.all(channel > tensor), clip
  # With channel scales over two decades, by a wide margin at 8 bits.
  assert (_sqnr(data, "heavy", "channel", "absmax")[-1]
          - _sqnr(data, "heavy", "tensor", "absmax")[-1]) > 6.0


def test_mse_clipping_is_never_worse_and_wins_at_low_bits(report):
  _, data = report
  for r in data["results"]:
    if r["clip"] != "mse":
      continue
    setting = (data, r["dataset"], r["granularity"])
    mse = np.array(r["sqnr_db"])
    # absmax is one of the candidates the MSE search compares.
    assert np.all(mse >= _sqnr(*setting, "absmax") - 0.05), r
    assert np.all(mse >= _sqnr(*setting, "percentile") - 0.05), r
    assert np.all(mse[:2] > _sqnr(*setting, "absmax")[:2] + 0.5), r


def test_sqnr_db_and_table_helpers(tmp_path):
  x = np.array([3.0, 4.0])
  assert common.sqnr_db(x, x + [0.0, 0.5]) == pytest.approx(
      10 * np.log10(25 / 0.25))
  assert common.sqnr_db(x, x) == float("inf")
  assert common.sqnr_db([x, x], [x, x + 1.0]) == pytest.approx(
      10 * np.log10(50 / 2))
  text = common.write_table([{"a": 1, "b": 2.345}, {"a": 2, "c": "x"}],
                            tmp_path / "t.md")
  assert text.splitlines() == ["| a | b | c |", "|---|---|---|",
                               "| 1 | 2.35 |  |", "| 2 |  | x |"]
  common.write_json({"v": np.float32(1.5), "inf": float("inf")},
                    tmp_path / "t.json")
  assert json.loads((tmp_path / "t.json").read_text()) == {"v": 1.5,
                                                          "inf": "inf"}
  assert common.results_dir("x", tmp_path / "new").is_dir()
