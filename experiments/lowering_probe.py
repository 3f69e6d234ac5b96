"""Re-measure the lowering table (`jaxquant.engine.lowering.PROFILES`) here.

For each mode and row count M, one `nn.Dense` (K x N) runs through
`jq.quantized_apply` once per formulation, each forced with a
`lowering.Profile` passed as `machine=` (to `quantize_params` too, which
stores the weight in that profile's layout): W8A8 unpadded or with rows
padded to 4, on a weight stored `(K, N)` or `(N, K)` (contracted axis
last), and at one row as a float reduction over the stored codes; W8A16 as
a float dot of the dequantized weight, an int8 dot on the activation's
int8 parts (either layout), or the row reduction; W4A8 g128 as one batched
int8 dot, one int8 dot per group, or a float dot. All variants are timed interleaved in rounds
(`common.time_rounds`); cells are time / float time, medians of per-round
ratios. The last line gives the `Profile` fields these measurements
support: compare with `lowering.PROFILES[lowering.machine()]`.

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
BIG = 10**9
# mode -> formulation -> the Profile that forces it at every row count.
STORED = dict(contract_last=True)  # the weight stored (N, K)
FORMULATIONS = {
    "W8A8": {"unpadded": lowering.Profile(),
             "rows padded to 4": lowering.Profile(min_rows=4),
             "(N, K) padded": lowering.Profile(min_rows=4, **STORED),
             "(N, K) row reduce": lowering.Profile(min_rows=4, row_reduce=True,
                                                   **STORED)},
    "W8A16": {"dequantized": lowering.Profile(),
              "int8 parts": lowering.Profile(min_rows=4,
                                             weight_only_parts=BIG),
              "(N, K) int8 parts": lowering.Profile(
                  min_rows=4, weight_only_parts=BIG, **STORED),
              "(N, K) row reduce": lowering.Profile(
                  min_rows=4, weight_only_parts=BIG, row_reduce=True,
                  **STORED)},
    "W4A8 g128": {
        "batched": lowering.Profile(min_rows=4, grouped_rows=(BIG, BIG)),
        "per group": lowering.Profile(min_rows=4, grouped_rows=(0, BIG)),
        "float": lowering.Profile(grouped_rows=(0, 0))},
    "W4A16 g128": {
        "batched parts": lowering.Profile(
            min_rows=4, weight_only_parts=BIG, grouped_rows=(BIG, BIG)),
        "per group parts": lowering.Profile(
            min_rows=4, weight_only_parts=BIG, grouped_rows=(0, BIG)),
        "dequantized": lowering.Profile(grouped_rows=(0, 0))},
}
RULES = {"W8A8": dict(weight=jq.int8(), act=jq.int8()),
         "W8A16": dict(weight=jq.int8()),
         "W4A8 g128": dict(weight=jq.int4(group_size=128), act=jq.int8()),
         "W4A16 g128": dict(weight=jq.int4(group_size=128))}


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
  for mode, forms in FORMULATIONS.items():
    recipe = jq.Recipe([jq.Rule(".*kernel", **RULES[mode])])
    for form, prof in forms.items():
      if m > 1 and "row reduce" in form:
        continue  # the same lowering as "(N, K) ..." beyond one row
      qparams = jq.quantize_params(model.apply, params, recipe, x,
                                   machine=prof, progress=False)
      fn = jq.quantized_apply(model.apply, recipe, machine=prof)
      variants[f"{mode}: {form}"] = (jax.jit(fn), (qparams, x))
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
          "cells": cells, "suggested": suggest(cells, n, k // 128)}


def _best(cell, mode, forms=None) -> str:
  forms = [f for f in forms or FORMULATIONS[mode] if f"{mode}: {f}" in cell]
  return min(forms, key=lambda form: cell[f"{mode}: {form}"])


def _last_row(cells, keep) -> int:
  """The largest M up to which `keep(cell)` held for every smaller M too."""
  last = 0
  for cell in sorted(cells, key=lambda c: c["M"]):
    if not keep(cell):
      break
    last = cell["M"]
  return last


def suggest(cells, n: int, groups: int) -> dict:
  """The `lowering.Profile` fields these measurements support, for an
  `n`-feature weight in `groups` groups (float32: 3 parts per row)."""
  few = [c for c in cells if c["M"] < 4]
  parts = ("dequantized", "int8 parts", "(N, K) int8 parts")
  parts_rows = 3 * _last_row(
      cells, lambda c: _best(c, "W8A16", parts) != "dequantized")
  padded = ("unpadded", "rows padded to 4")
  one = [c for c in cells if c["M"] == 1]
  return {
      "min_rows": 4 if few and all(_best(c, "W8A8", padded) ==
                                   "rows padded to 4" for c in few) else 1,
      "contract_last": all(
          c["W8A8: (N, K) padded"] <= c["W8A8: rows padded to 4"]
          for c in cells),
      "row_reduce": bool(one) and all(
          _best(c, mode) == "(N, K) row reduce"
          for c in one for mode in ("W8A8", "W8A16")),
      "weight_only_parts": round(parts_rows / n, 4),
      "grouped_rows": (
          _last_row(cells, lambda c: _best(c, "W4A8 g128") == "batched"),
          groups * _last_row(cells,
                             lambda c: _best(c, "W4A8 g128") != "float")),
  }


def markdown(report) -> str:
  head = (f"Lowering probe, {report['shape']} on {report['cpu']} "
          f"({report['backend']}, jax {report['jax']}; this machine's "
          f"profile: `{report['machine']}`): time / float time, median of "
          f"{report['rounds']} interleaved rounds, each formulation forced "
          "with a `lowering.Profile`. Per-group thresholds count stacked "
          "rows (weight-only float32 stacks 3 parts per row).")
  table = common.format_table(report["cells"])
  suggested = ", ".join(f"{k}={v}" for k, v in report["suggested"].items())
  return f"{head}\n\n{table}\n\nSupported by these numbers: {suggested}\n"


def figures(report) -> dict:
  return {}


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
