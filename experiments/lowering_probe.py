"""Re-measure the lowering table (`jaxquant.engine.lowering.PROFILES`) here.

For each mode and row count M, one `nn.Dense` (K x N) runs through
`jq.quantized_apply` under every lowering profile, forced with `machine=`:
'gpu' (the plain kernels: no row padding, weight-only as a float dot of the
dequantized weight) and 'cpu/x86-vnni' (rows padded to 4, weight-only as an
int8 dot on the activation's int8 parts). All variants are timed
interleaved in rounds (`common.time_rounds`); cells are time / float time,
medians of per-round ratios. The last section says which choice won per
cell and the `Profile` row this machine's measurements support: compare it
with `lowering.PROFILES[lowering.machine()]`.

  python -m experiments.lowering_probe [--quick] [--out DIR] [--rows 1 8]
      [--shape 4096x4096] [--rounds R]
"""

from __future__ import annotations

import platform

import flax.linen as nn
import jax

import jaxquant as jq
from experiments import common
from jaxquant.engine import lowering

NAME = "lowering_probe"
ROWS = (1, 2, 4, 8, 16, 64, 256)
PLAIN, FAST = "gpu", "cpu/x86-vnni"
MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 g128": dict(weight=jq.int4(group_size=128)),
}


def parser():
  p = common.parser(__doc__, NAME, quick="rows 1/4/16 of a 1024 x 1024 "
                    "matmul, 3 rounds")
  p.add_argument("--rows", type=int, nargs="+", default=None)
  p.add_argument("--shape", default=None, help="K x N, e.g. 4096x4096")
  p.add_argument("--rounds", type=int, default=None)
  return p


def _variants(k: int, n: int, m: int, seed: int):
  model = nn.Dense(n, use_bias=False)
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k))
  params = model.init(kw, x)
  variants = {"float": (jax.jit(model.apply), (params, x))}
  for mode, rule in MODES.items():
    recipe = jq.Recipe([jq.Rule(".*kernel", **rule)])
    qparams = jq.quantize_params(model.apply, params, recipe, x)
    for machine in (PLAIN, FAST):
      fn = jq.quantized_apply(model.apply, recipe, machine=machine)
      variants[f"{mode} | {machine}"] = (jax.jit(fn), (qparams, x))
  return variants


def run(args) -> dict:
  rows = args.rows or ((1, 4, 16) if args.quick else ROWS)
  k, n = ((int(d) for d in args.shape.split("x")) if args.shape
          else ((1024, 1024) if args.quick else (4096, 4096)))
  rounds = args.rounds or (3 if args.quick else 9)
  cells = []
  for m in rows:
    times = common.time_rounds(_variants(k, n, m, args.seed), rounds,
                               calls=5, seed=args.seed, desc=f"M={m}")
    ratios = common.median_ratios(times)
    cells.append({"M": m, "float ms": 1e3 * min(times["float"]),
                  **{v: r for v, r in ratios.items() if v != "float"}})
    common.log(f"M={m}: " + ", ".join(f"{v} {r:.2f}x"
                                      for v, r in ratios.items()))
  return {"machine": lowering.machine(), "cpu": platform.processor() or
          platform.machine(), "backend": jax.default_backend(),
          "jax": jax.__version__, "shape": f"{k}x{n}", "rounds": rounds,
          "cells": cells, "suggested": suggest(cells)}


def _wins(cell, mode) -> bool:
  return cell[f"{mode} | {FAST}"] < cell[f"{mode} | {PLAIN}"]


def suggest(cells) -> dict:
  """The `Profile` fields these measurements support."""
  one_row = [c for c in cells if c["M"] < 4]
  grouped_rows = 0  # stacked rows (3 float32 parts per row) while parts win
  for c in sorted(cells, key=lambda c: c["M"]):
    if not _wins(c, "W4A16 g128"):
      break
    grouped_rows = 3 * c["M"]
  return {
      "min_rows": 4 if one_row and all(_wins(c, "W8A8") for c in one_row)
      else 1,
      "split_weight_only": all(_wins(c, "W8A16") for c in cells),
      "split_grouped_rows": grouped_rows,
  }


def markdown(report) -> str:
  head = (f"Lowering probe, {report['shape']} on {report['cpu']} "
          f"({report['backend']}, jax {report['jax']}; this machine's "
          f"profile: `{report['machine']}`): time / float time, median of "
          f"{report['rounds']} interleaved rounds. `{PLAIN}` = plain "
          f"kernels, `{FAST}` = padded rows and weight-only int8 parts.")
  table = common.format_table(report["cells"])
  suggested = ", ".join(f"{k}={v}" for k, v in report["suggested"].items())
  return f"{head}\n\n{table}\n\nSupported by these numbers: {suggested}\n"


def figures(report) -> dict:
  return {}


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
