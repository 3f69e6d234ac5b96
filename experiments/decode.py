"""Decode-shaped matmuls: quantized modes vs float, by rows, in one process.

One `nn.Dense` (no bias) of an LLM's shapes, K x N = 4096 x 4096 and
4096 x 11008, run with M = 1 ... 256 rows (M = batch size at decode). For each
cell the variants are timed interleaved in rounds (`common.time_rounds`) and
reported as the median of per-round ratios to float:

  W8A8          int8 weights, int8 activations (dynamic per row)
  W8A16         int8 weights, float activations (weight-only)
  W4A16 g128    int4 weights, groups of 128, weight-only
  W4A8 g128     int4 weights in groups, int8 activations (grouped int8 dot)
  fp8           fp8_e4m3 weights and activations (native fp8 dot where the
                backend has one, else emulated: `jq.report` says which)
  s8 dot        a bare dot(s8, s8) -> s32 of the same shape: the floor
  W8A8 / W8A16 (XLA)  the same without jaxquant's C++ kernel
                (`jaxquant.native`): the XLA formulations, where this
                machine's profile runs the kernel for these rows
  Qwix W8A8 / W8A16   with `--peers` (needs the `peers` extra)

Bytes-moved limit: at decode a matmul streams its weight once, so int8
weights bound the ratio at ~0.25 of float32 and int4 at ~0.125. The report
also gives the machine's streaming bandwidth (a jitted sum over 256 MB of
float32, both cores) and each variant's weight bytes / time at its best
round, to read each cell against it.

  python -m experiments.decode [--quick] [--out DIR] [--seed S] [--peers]
      [--rows 1 8 256] [--shapes 4096x4096 4096x11008] [--rounds R]
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

import jaxquant as jq
from experiments import common, peers
from jaxquant.engine import lowering

NAME = "decode"
ROWS = (1, 2, 4, 8, 16, 64, 256)
SHAPES = ((4096, 4096), (4096, 11008))
MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 g128": dict(weight=jq.int4(group_size=128)),
    "W4A8 g128": dict(weight=jq.int4(group_size=128), act=jq.int8()),
    "fp8": dict(weight=jq.fp8_e4m3(), act=jq.fp8_e4m3()),
}


def parser():
  p = common.parser(__doc__, NAME,
                    quick="rows 1/8/64 of a 1024 x 1024 matmul, 3 rounds")
  p.add_argument("--rows", type=int, nargs="+", default=None)
  p.add_argument("--shapes", nargs="+", default=None,
                 help="K x N shapes, e.g. 4096x4096")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--peers", action="store_true",
                 help="also time Qwix W8A8 / W8A16 (peers extra)")
  return p


def _without_native():
  """This machine's profile with jaxquant's C++ kernel switched off."""
  return dataclasses.replace(lowering.profile(), native_rows=(0, 0))


def stream_gbps(mbytes: int = 256, rounds: int = 9) -> float:
  """GB/s of a jitted float32 sum over `mbytes` MB (best of `rounds`)."""
  a = jnp.ones(mbytes * 2**20 // 4, jnp.float32)
  f = jax.jit(jnp.sum)
  times = common.time_rounds({"sum": (f, (a,))}, rounds, calls=1)["sum"]
  return a.nbytes / min(times) / 1e9


def _variants(k: int, n: int, m: int, seed: int, with_peers: bool):
  """name -> (jitted fn, args), and name -> lowering notes from jq.report."""
  model = nn.Dense(n, use_bias=False)
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k))
  params = model.init(kw, x)
  variants = {"float": (jax.jit(model.apply), (params, x))}
  notes = {}
  bytes_ = {"float": sum(a.nbytes for a in jax.tree.leaves(params))}
  runs = {name: (rule, None) for name, rule in MODES.items()}
  runs.update({f"{name} (XLA)": (MODES[name], _without_native())
               for name in ("W8A8", "W8A16")})
  for name, (rule, machine) in runs.items():
    recipe = jq.Recipe([jq.Rule(".*kernel", **rule)])
    qparams = jq.quantize_params(model.apply, params, recipe, x,
                                 machine=machine)
    variants[name] = (jax.jit(jq.quantized_apply(model.apply, recipe,
                                                 machine=machine)),
                      (qparams, x))
    op = jq.report(model.apply, qparams, recipe, x, machine=machine).ops[0]
    notes[name] = f"{op.mode}, {op.lowering}"
    bytes_[name] = sum(a.nbytes for a in jax.tree.leaves(qparams))
    if name == "fp8":  # what reaches XLA: fp8 operands, or upcast ones
      text = variants[name][0].lower(qparams, x).as_text()
      notes[name] += (f" (StableHLO dots with f8E4M3FN operands: "
                      f"{text.count('xf8E4M3FN>, tensor<')})")
  s8 = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.int32)
  variants["s8 dot"] = (jax.jit(s8), (jnp.ones((m, k), jnp.int8),
                                     jnp.ones((k, n), jnp.int8)))
  if with_peers and peers.available()["qwix"]:
    for name, act in (("Qwix W8A8", True), ("Qwix W8A16", False)):
      fn, qp = peers.qwix_quantized(model, params, x, act=act)
      variants[name] = (jax.jit(fn), (qp, x))
  return variants, notes, bytes_


def run(args) -> dict:
  rows = args.rows or ((1, 8, 64) if args.quick else ROWS)
  shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes]
            if args.shapes else ([(1024, 1024)] if args.quick else SHAPES))
  rounds = args.rounds or (3 if args.quick else 9)
  cells, lowerings, limits, gbps = [], {}, {}, []
  for k, n in shapes:
    for m in rows:
      variants, notes, bytes_ = _variants(k, n, m, args.seed, args.peers)
      for name, note in notes.items():
        lowerings.setdefault(name, {}).setdefault(note, []).append(
            f"{k}x{n} M={m}")
      limits[f"{k}x{n}"] = {name: b / bytes_["float"]
                            for name, b in bytes_.items() if name != "float"}
      times = common.time_rounds(variants, rounds, calls=5, seed=args.seed,
                                 desc=f"{k}x{n} M={m}")
      ratios = common.median_ratios(times)
      cells.append({"shape": f"{k}x{n}", "M": m,
                    "float ms": 1e3 * min(times["float"]),
                    **{name: r for name, r in ratios.items()
                       if name != "float"}})
      gbps.append({"shape": f"{k}x{n}", "M": m, **{
          name: bytes_[name] / min(times[name]) / 1e9
          for name in bytes_ if name in times}})
      common.log(f"{k}x{n} M={m}: " + ", ".join(
          f"{name} {r:.2f}x" for name, r in ratios.items() if name != "float"))
  return {"backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "rounds": rounds,
          "machine": lowering.machine(), "jax": jax.__version__,
          "cells": cells, "lowering": lowerings, "bytes_limit": limits,
          "stream GB/s": stream_gbps(), "weight GB/s": gbps,
          "native": jq.native.status().reason, "cpu": common.cpu_name()}


def markdown(report) -> str:
  head = (f"Decode matmuls on {report['device']} ({report['backend']}): "
          "time / float time, median over "
          f"{report['rounds']} interleaved rounds (lower is faster).")
  table = common.format_table(report["cells"])
  lowering = "\n".join(
      f"- {name}: " + "; ".join(f"{note} ({_span(where)})"
                               for note, where in by_note.items())
      for name, by_note in report["lowering"].items())
  limits = common.format_table([{"shape": shape, **ratios} for shape, ratios
                                in report["bytes_limit"].items()])
  gbps = common.format_table(report["weight GB/s"])
  return (f"{head}\n\n{table}\n\nLowering per mode (`jq.report`, machine "
          f"profile `{report['machine']}`, jax {report['jax']}):\n"
          f"{lowering}\n\nBytes-moved limit (param bytes / float param "
          f"bytes: the ratio a weight-streaming decode step cannot beat):"
          f"\n\n{limits}\n\nWeight bytes streamed per second (GB/s, "
          f"best round) against the machine's streaming read of "
          f"{report['stream GB/s']:.1f} GB/s ({report['cpu']}; native "
          f"kernels: {report['native']}):\n\n{gbps}\n")


def _span(cells: list[str]) -> str:
  """'4096x4096 M=1, 4096x4096 M=2' -> '4096x4096 M=1,2'."""
  by_shape = {}
  for cell in cells:
    shape, m = cell.split(" M=")
    by_shape.setdefault(shape, []).append(m)
  return "; ".join(f"{s} M={','.join(ms)}" for s, ms in by_shape.items())


def figures(report) -> dict:
  def draw(path):
    import matplotlib.pyplot as plt
    shapes = sorted({c["shape"] for c in report["cells"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4),
                             squeeze=False)
    for ax, shape in zip(axes[0], shapes):
      cells = [c for c in report["cells"] if c["shape"] == shape]
      names = [k for k in cells[0] if k not in ("shape", "M", "float ms")]
      for name in names:
        ax.plot([c["M"] for c in cells], [c[name] for c in cells], "o-",
                label=name)
      ax.axhline(1.0, color="k", lw=0.8)
      ax.set(xscale="log", yscale="log", xlabel="rows M",
             ylabel="time / float", title=shape)
      ax.legend(fontsize=7)
    common.save_figure(fig, path)
  return {"ratios.png": draw}


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
