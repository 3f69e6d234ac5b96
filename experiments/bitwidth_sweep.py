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

Writes results.md, results.json and sqnr_vs_bits.png to results/bitwidth_sweep/
(or --out). --quick (for CI) uses 128x128 random tensors and only the
128x128 hidden kernel of an MLP trained for 3 epochs: one tensor shape, so
few XLA compilations.
"""

from __future__ import annotations

import math

import numpy as np

import jaxquant as jq
from experiments import common, demo
from experiments.data import load_digits_split
from jaxquant import observers

NAME = "bitwidth_sweep"

BITS = (2, 3, 4, 5, 6, 7, 8)
GRANULARITIES = ("tensor", "channel", "group32", "group128")
CLIPS = ("absmax", "percentile", "mse")
PERCENT = 99.99


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
  config = dict(quick=quick, seed=seed, bits=list(BITS), shape=list(shape),
                mlp_epochs=epochs, mlp_test_accuracy=accuracy,
                percentile=PERCENT, mse_candidates=100,
                mlp_kernel_shapes=[list(w.shape) for w in kernels])
  return dict(config=config, results=rows, theory=theory)


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
          f"\n\n{theory}")


def figures(report) -> dict:
  return {"sqnr_vs_bits.png": lambda path: plot(report, path)}


def parser():
  return common.parser(__doc__, NAME,
                       quick="small tensors and short training (CI)")


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
