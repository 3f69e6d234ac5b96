"""SQNR against bit width, for each granularity and clipping rule.

  python -m experiments.bitwidth_sweep [--quick] [--out DIR] [--seed N]

Symmetric signed quantization (`jq.quantize(x, spec, value_range=(lo, hi))`)
of three weight sets, at 2..8 bits:

  gaussian     N(0, 1) entries, (in, out) = (512, 512)
  heavy        Student-t (df = 3) entries times a per-output-channel scale
               drawn log-uniformly over two decades, 10^U(-1, 1)
  digits-mlp   the three Dense kernels (64x128, 128x128, 128x10) of the
               `experiments.demo` MLP trained on scikit-learn's digits
               (`experiments.data.load_digits_split`)

Granularities: one scale per tensor, per output channel, per group of 32 or
128 inputs (a kernel with fewer inputs than the group uses one group per
column, i.e. per channel; so for these MLP kernels, with at most 128
inputs, group128 is per-channel). Clipping rules choose (lo, hi) per scale block
with `jaxquant.observers`: absmax (`minmax`), `percentile(99.99)`, and
`mse(spec)` (the clip minimising the expected quantization MSE for that bit
width). SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2) over all kernels.

Theory (absmax clipping): with step s = max / qmax per block, qmax =
2^(b-1) - 1, and the rounding error uniform on [-s/2, s/2] (power s^2 / 12),

  SQNR = 10 log10(12 qmax^2) - 20 log10(crest)
       ~ 6.02 b + 4.77 - 20 log10(crest)     (qmax ~ 2^(b-1))

where crest^2 = mean over elements of (block max)^2 / mean x^2. The table and
plot use the first (exact qmax) form; the two differ by 0.07 dB at 8 bits
and 6 dB at 2 bits, where qmax = 1 is half of 2^(b-1). The uniform-noise
model also breaks down at 2-3 bits, where the error is no longer uniform.

Number formats (a separate table, "formats" in results.json, and
formats.png): the same weight sets quantized with each format's own absmax
scale (`jq.quantize(w, spec)`, no observer) at 8 bits, int8 against
fp8_e4m3 and fp8_e5m2, per tensor and per output channel; and at 4 bits,
int4 against nf4, per output channel and per group of 64 inputs. Bits per
weight count the stored scales (float32). Theory: for int, the crest
formula above; for fp8, the same uniform-rounding model per element: an
element with exponent e = floor(log2 |x / s|) (at least the smallest normal
exponent) has step 2^(e - m), m mantissa bits (3 for e4m3, 2 for e5m2), so

  SQNR = 10 log10(sum x^2 / sum ((s 2^(e - m))^2 / 12))

which does not depend on the block's crest as long as nothing falls below
the smallest normal: about 10 log10(12) + 6.02 m + 3.4 dB if mantissas
spread log-uniformly, 32 dB for e4m3 and 26 dB for e5m2 (measured: 31.5
and 25.5 dB on Gaussian weights). nf4 has no closed form here (its 16
levels are normal quantiles, not a uniform grid).

Writes results.md, results.json, sqnr_vs_bits.png and formats.png to
results/bitwidth_sweep/ (or --out). --quick (for CI) uses 128x128 random
tensors and only the 128x128 hidden kernel of an MLP trained for 3 epochs:
one tensor shape, so few XLA compilations.
"""

from __future__ import annotations

import math

import numpy as np

import jaxquant as jq
from experiments import common, demo
from experiments.data import load_digits_split
from jaxquant import formats, observers

NAME = "bitwidth_sweep"

BITS = (2, 3, 4, 5, 6, 7, 8)
GRANULARITIES = ("tensor", "channel", "group32", "group128")
CLIPS = ("absmax", "percentile", "mse")
PERCENT = 99.99
# (format, granularity) rows of the formats table: 8-bit formats against
# int8, 4-bit formats against int4. Each format's own absmax scale.
FORMAT_SETTINGS = (
    ("int8", "tensor"), ("int8", "channel"),
    ("fp8_e4m3", "tensor"), ("fp8_e4m3", "channel"),
    ("fp8_e5m2", "tensor"), ("fp8_e5m2", "channel"),
    ("int4", "channel"), ("int4", "group64"),
    ("nf4", "channel"), ("nf4", "group64"),
)
FORMAT_SPECS = {"int8": jq.int8, "int4": jq.int4, "fp8_e4m3": jq.fp8_e4m3,
                "fp8_e5m2": jq.fp8_e5m2, "nf4": jq.nf4}
FP8_MANTISSA = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}  # (m, min exp)


# ------------------------------------------------------------------ data


def gaussian_weights(rng, shape):
  return [rng.normal(size=shape).astype(np.float32)]


def heavy_weights(rng, shape):
  """Student-t (df=3) with per-output-channel scales over two decades."""
  scales = 10.0 ** rng.uniform(-1.0, 1.0, size=(1, shape[1]))
  return [(rng.standard_t(3, size=shape) * scales).astype(np.float32)]


def mlp_weights(seed: int, epochs: int):
  """Kernels of the demo MLP trained on digits for `epochs` epochs, and its
  test accuracy."""
  x_train, y_train, x_test, y_test = load_digits_split(seed)
  model = demo.MLP()
  params = demo.fit(model, x_train, y_train, epochs=epochs, seed=seed)
  acc = demo.accuracy(model.apply, params, x_test, y_test)
  layers = params["params"]
  kernels = [np.asarray(layers[name]["kernel"]) for name in sorted(layers)]
  return kernels, acc


# ---------------------------------------------------------- quantization


def block_view(w, granularity):
  """(view, observer axes, spec kwargs) for one kernel (in, out)."""
  if granularity == "tensor":
    return w, None, dict(granularity="tensor")
  if granularity == "channel":
    return w, (1,), dict(granularity="channel", channel_axes=(1,))
  size = min(int(granularity[len("group"):]), w.shape[0])
  view = w.reshape(w.shape[0] // size, size, w.shape[1])
  return view, (0, 2), dict(granularity="group", group_size=size,
                            group_axis=0)


def observer_for(clip, spec, view, axes):
  if clip == "absmax":
    return observers.minmax(axes=axes)
  # Bins scale with the block size: a 32-value group needs no 2048 bins, and
  # the MSE search costs blocks x bins x candidates.
  block = view.size // math.prod(view.shape[a] for a in (axes or ()))
  bins = int(np.clip(4 * block, 128, 2048))
  if clip == "percentile":
    return observers.percentile(PERCENT, bins=bins, axes=axes)
  return observers.mse(spec, bins=bins, axes=axes)


def calibrate(obs, view):
  return obs.finalize(obs.update(obs.init(view), view))


def quantized(w, bits, granularity, clip, cache):
  """Dequantized `w` with the clip range chosen by `clip` for `bits` bits."""
  view, axes, kwargs = block_view(w, granularity)
  spec = jq.QuantSpec(bits=bits, **kwargs)
  key = (id(w), granularity, clip, bits if clip == "mse" else None)
  if key not in cache:  # absmax / percentile ranges do not depend on bits
    cache[key] = calibrate(observer_for(clip, spec, view, axes), view)
  return np.asarray(jq.quantize(w, spec, value_range=cache[key]).dequantize())


def crest_db(kernels, granularity):
  """20 log10(crest), crest^2 = mean (block absmax)^2 / mean x^2."""
  peak, power = 0.0, 0.0
  for w in kernels:
    view, axes, _ = block_view(w, granularity)
    reduce = tuple(a for a in range(view.ndim) if a not in (axes or ()))
    block_max = np.abs(view).max(axis=reduce, keepdims=True)
    peak += float(np.sum(np.broadcast_to(block_max, view.shape) ** 2.0))
    power += float(np.sum(view.astype(np.float64) ** 2))
  return 10 * math.log10(peak / power)


def theory_db(bits, crest):
  qmax = 2 ** (bits - 1) - 1
  return 10 * math.log10(12 * qmax**2) - crest


# --------------------------------------------------------------- formats


def format_spec(fmt, granularity, w):
  """The spec of `fmt` at `granularity` for one kernel (in, out)."""
  _, _, kwargs = block_view(w, granularity)
  kwargs.setdefault("group_size", None)  # nf4 would default to groups of 64
  if fmt.startswith("fp8"):
    kwargs.pop("group_size")
  return FORMAT_SPECS[fmt](**kwargs)


def block_scale(w, granularity, top):
  """Each element's absmax scale (block absmax / grid max `top`)."""
  view, axes, _ = block_view(w, granularity)
  reduce = tuple(a for a in range(view.ndim) if a not in (axes or ()))
  peak = np.abs(view).max(axis=reduce, keepdims=True).astype(np.float64)
  return np.broadcast_to(peak / top, view.shape).reshape(w.shape)


def fp8_theory_db(kernels, fmt, granularity):
  """Uniform rounding noise, step 2^(e - m) at each element's exponent e."""
  mantissa, min_exp = FP8_MANTISSA[fmt]
  top = formats.grid_max(fmt)
  noise, power = 0.0, 0.0
  for w in kernels:
    s = block_scale(w, granularity, top)
    v = np.abs(w.astype(np.float64)) / s
    e = np.maximum(np.floor(np.log2(np.maximum(v, 1e-300))), min_exp)
    noise += float(np.sum((s * 2.0 ** (e - mantissa)) ** 2) / 12)
    power += float(np.sum(w.astype(np.float64) ** 2))
  return 10 * math.log10(power / noise)


def format_row(name, kernels, fmt, granularity):
  """SQNR, bits per weight (scales included) and theory of one setting."""
  qs = [jq.quantize(w, format_spec(fmt, granularity, w)) for w in kernels]
  sqnr = common.sqnr_db(kernels, [np.asarray(q.dequantize()) for q in qs])
  size = sum(w.size for w in kernels)
  bits_per_weight = 8 * sum(q.nbytes for q in qs) / size
  if fmt in FP8_MANTISSA:
    theory = fp8_theory_db(kernels, fmt, granularity)
  elif fmt.startswith("int"):
    theory = theory_db(int(fmt[3:]), crest_db(kernels, granularity))
  else:  # nf4: no closed form
    theory = None
  return dict(dataset=name, format=fmt, granularity=granularity,
              bits_per_weight=bits_per_weight, sqnr_db=sqnr,
              theory_db=theory)


# ------------------------------------------------------------------- main


def run(args) -> dict:
  quick, seed = args.quick, args.seed
  timer = common.Timer()
  with timer("run"):
    report = sweep(quick, seed)
  report["config"]["seconds"] = timer.wall["run"]
  return report


def sweep(quick: bool, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shape = (128, 128) if quick else (512, 512)
  epochs = 3 if quick else 20
  kernels, accuracy = mlp_weights(seed, epochs)
  if quick:  # one shape for every tensor: far fewer XLA compilations
    kernels = [w for w in kernels if w.shape == shape]
  datasets = {"gaussian": gaussian_weights(rng, shape),
              "heavy": heavy_weights(rng, shape),
              "digits-mlp": kernels}
  rows, theory = [], []
  settings = [(d, g, c) for d in datasets for g in GRANULARITIES
              for c in CLIPS]
  cache = {}
  for name, granularity, clip in common.progress(settings, "bitwidth sweep"):
    ws = datasets[name]
    sqnr = [common.sqnr_db(ws, [quantized(w, b, granularity, clip, cache)
                                for w in ws]) for b in BITS]
    rows.append(dict(dataset=name, granularity=granularity, clip=clip,
                     sqnr_db=sqnr))
  for name, ws in datasets.items():
    for granularity in GRANULARITIES:
      crest = crest_db(ws, granularity)
      theory.append(dict(dataset=name, granularity=granularity,
                         crest_db=crest,
                         sqnr_db=[theory_db(b, crest) for b in BITS]))
  settings = [(d, f, g) for d in datasets for f, g in FORMAT_SETTINGS]
  format_rows = [format_row(name, datasets[name], fmt, granularity)
                 for name, fmt, granularity in common.progress(settings,
                                                               "formats")]
  config = dict(quick=quick, seed=seed, bits=list(BITS), shape=list(shape),
                mlp_epochs=epochs, mlp_test_accuracy=accuracy,
                percentile=PERCENT, mse_candidates=100,
                mlp_kernel_shapes=[list(w.shape) for w in kernels])
  return dict(config=config, results=rows, theory=theory,
              formats=format_rows)


def tables(report):
  bits = report["config"]["bits"]
  measured = [dict(dataset=r["dataset"], granularity=r["granularity"],
                   clip=r["clip"], **{f"{b}b": v for b, v in
                                      zip(bits, r["sqnr_db"])})
              for r in report["results"]]
  theory = [dict(dataset=t["dataset"], granularity=t["granularity"],
                 crest_dB=t["crest_db"], **{f"{b}b": v for b, v in
                                            zip(bits, t["sqnr_db"])})
            for t in report["theory"]]
  return common.format_table(measured), common.format_table(theory)


def formats_table(report):
  rows = [dict(dataset=r["dataset"], format=r["format"],
               granularity=r["granularity"],
               **{"bits/weight": f"{r['bits_per_weight']:.3f}",
                  "SQNR dB": r["sqnr_db"],
                  "theory dB": ("" if r["theory_db"] is None
                                else r["theory_db"])})
          for r in report["formats"]]
  return common.format_table(rows)


def plot(report, path):
  import matplotlib.pyplot as plt
  bits = np.array(report["config"]["bits"])
  names = list(dict.fromkeys(r["dataset"] for r in report["results"]))
  fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8),
                           sharex=True, squeeze=False)
  colors = dict(zip(GRANULARITIES, ("C0", "C1", "C2", "C3")))
  clip_colors = dict(zip(CLIPS, ("C0", "C4", "C5")))
  for col, name in enumerate(names):
    top, bottom = axes[0, col], axes[1, col]
    for r in report["results"]:
      if r["dataset"] != name:
        continue
      if r["clip"] == "absmax":
        top.plot(bits, r["sqnr_db"], "o-", color=colors[r["granularity"]],
                 label=f"{r['granularity']} (measured)")
      if r["granularity"] in ("tensor", "channel"):
        style = "o-" if r["granularity"] == "tensor" else "s--"
        bottom.plot(bits, r["sqnr_db"], style, color=clip_colors[r["clip"]],
                    label=f"{r['clip']}, {r['granularity']}")
    for t in report["theory"]:
      if t["dataset"] == name:
        top.plot(bits, t["sqnr_db"], ":", color=colors[t["granularity"]],
                 label=f"{t['granularity']} theory")
    top.plot(bits, 6.02 * bits, color="gray", lw=0.8, label="6.02 b (slope)")
    top.set_ylim(bottom=-5)  # the noise model fails far below 0 dB
    top.set_title(f"{name}: granularity (absmax clip)")
    bottom.set_title(f"{name}: clipping rule")
    bottom.set_xlabel("bits")
    for ax in (top, bottom):
      ax.set_ylabel("SQNR (dB)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle("SQNR vs bits; dotted: 10 log10(12 qmax^2) - 20 log10(crest)")
  common.save_figure(fig, path)


def plot_formats(report, path):
  """Grouped bars: SQNR of each (format, granularity) per weight set; the
  8-bit formats on the left, the 4-bit ones on the right."""
  import matplotlib.pyplot as plt
  rows = report["formats"]
  names = list(dict.fromkeys(r["dataset"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
  for ax, bits in zip(axes[0], (8, 4)):
    settings = [s for s in FORMAT_SETTINGS
                if FORMAT_SPECS[s[0]]().bits == bits]
    width = 0.8 / len(settings)
    x = np.arange(len(names))
    for i, (fmt, gran) in enumerate(settings):
      values = [next(r["sqnr_db"] for r in rows if (r["dataset"], r["format"],
                                                    r["granularity"])
                     == (name, fmt, gran)) for name in names]
      ax.bar(x + (i - (len(settings) - 1) / 2) * width, values, width,
             label=f"{fmt}, {gran}",
             hatch="//" if gran == "tensor" else None,
             color=f"C{i // 2}", alpha=0.6 if i % 2 == 0 else 1.0)
    ax.set_xticks(x, names)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"{bits}-bit formats (absmax scales)")
    ax.grid(axis="y", alpha=0.3)
    top = max(r["sqnr_db"] for r in rows
              if FORMAT_SPECS[r["format"]]().bits == bits)
    ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=len(settings) // 2, loc="upper center")
  common.save_figure(fig, path)


def markdown(report) -> str:
  measured, theory = tables(report)
  cfg = report["config"]
  return (f"# SQNR (dB) vs bits\n\n"
          f"Symmetric signed quantization; clip ranges from "
          f"`jaxquant.observers` (percentile {cfg['percentile']}, MSE over "
          f"{cfg['mse_candidates']} candidates). Random tensors "
          f"{tuple(cfg['shape'])}; digits-mlp: kernels "
          f"{[tuple(s) for s in cfg['mlp_kernel_shapes']]} after "
          f"{cfg['mlp_epochs']} epochs (test accuracy "
          f"{cfg['mlp_test_accuracy']:.4f}). Seed {cfg['seed']}, "
          f"{'quick' if cfg['quick'] else 'full'} run, "
          f"{cfg['seconds']:.1f} s.\n\n## Measured\n\n{measured}\n"
          f"## Theory (absmax clip): 10 log10(12 qmax^2) - 20 log10(crest)"
          f"\n\n{theory}\n## Number formats (absmax scales)\n\n"
          f"SQNR of each format with its own absmax scale per block (8 bits: "
          f"int8 / fp8_e4m3 / fp8_e5m2; 4 bits: int4 / nf4). Bits/weight "
          f"include the float32 scales. Theory: int, the crest formula "
          f"above; fp8, uniform rounding noise with step 2^(e - m) at each "
          f"element's exponent e (m = 3 for e4m3, 2 for e5m2); nf4 none."
          f"\n\n{formats_table(report)}")


def figures(report) -> dict:
  return {"sqnr_vs_bits.png": lambda path: plot(report, path),
          "formats.png": lambda path: plot_formats(report, path)}


def parser():
  return common.parser(__doc__, NAME,
                       quick="small tensors and short training (CI)")


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
