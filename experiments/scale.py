"""Quantizing a model too big for a float copy: peak memory, leaf by leaf.

  python -m experiments.scale [--quick] [--out DIR] [--seed S]

Model: a stack of `layers` Flax MLP blocks (Dense d -> 4d, GELU, Dense
4d -> d), never materialised in float: the params are abstract
(`jax.eval_shape(model.init, ...)`) and a `source` generates each leaf on
the fly (seeded by its path, N(0, 0.02)), as a checkpoint reader would
read it (`jq.sources.checkpoint`, `jq.sources.safetensors`).
`jq.quantize_params(..., source=)` quantizes one leaf at a time.

Each variant runs in its own subprocess, so its peak resident memory
(VmHWM) is its own. The baseline is the resident memory after
imports, the abstract trace and one small warm-up quantization (JAX's
own footprint). Reported: the growth from it to the peak, against the
quantized tree's bytes plus the largest float leaf, which is the bound
the leaf-by-leaf path aims at. Full run: d = 2048, 45 blocks = 1.51 B
parameters (6.0 GB in float32), int8 per-channel weights and int4 g128.
--quick (CI): d = 1024, 6 blocks (50 M parameters).
"""

from __future__ import annotations

import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from experiments import common

NAME = "scale"
SIZES = {True: dict(d=1024, layers=6), False: dict(d=2048, layers=45)}
RECIPES = {"int8": jq.int8(), "int4 g128": jq.int4(group_size=128)}


class Stack(nn.Module):
  d: int
  layers: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      h = nn.gelu(nn.Dense(4 * self.d, name=f"up_{i}")(x))
      x = x + nn.Dense(self.d, name=f"down_{i}")(h)
    return x


def generated(abstract) -> callable:
  """`path -> array`: each leaf drawn from N(0, 0.02), seeded by its path."""
  shapes = {p: (tuple(a.shape), a.dtype)
            for p, a in jq.tree.leaves_with_paths(abstract)}

  def source(path):
    shape, dtype = shapes[path]
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    leaf = rng.standard_normal(shape, np.float32)
    leaf *= 0.02  # in place: one float copy of the leaf at a time
    return leaf.astype(dtype, copy=False)

  return source



def child(d: int, layers: int, recipe_name: str) -> dict:
  """One measurement, in this (fresh) process."""
  model = Stack(d, layers)
  x = jax.ShapeDtypeStruct((1, d), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=RECIPES[recipe_name])])
  source = generated(abstract)
  # Warm-up: compile the quantizer on one small model, so the baseline
  # holds JAX's own memory, not the big model's.
  small = Stack(d, 1)
  small_abstract = jax.eval_shape(small.init, jax.random.key(0), x)
  jq.quantize_params(small.apply, small_abstract, recipe, x,
                     source=generated(small_abstract), progress=False)
  base = common.rss_mb()
  start = time.perf_counter()
  qparams = jq.quantize_params(model.apply, abstract, recipe, x,
                               source=source, progress=False)
  jax.block_until_ready(qparams)
  seconds = time.perf_counter() - start
  peak = common.peak_rss_mb()
  leaves = [a for _, a in jq.tree.leaves_with_paths(abstract)]
  n_params = sum(int(np.prod(a.shape)) for a in leaves)
  largest = max(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)
  return {"params": n_params, "float_mb": 4 * n_params / 2**20,
          "quantized_mb": jq.nbytes(qparams) / 2**20,
          "largest_leaf_mb": largest / 2**20, "baseline_mb": base,
          "peak_mb": peak, "growth_mb": peak - base, "seconds": seconds}


def run(args) -> dict:
  size = SIZES[args.quick]
  rows = []
  for name in common.progress(RECIPES, desc="variants"):
    r = common.in_child("experiments.scale", **size, recipe_name=name)
    bound = r["quantized_mb"] + r["largest_leaf_mb"]
    rows.append({"weights": name, **r, "bound_mb": bound,
                 "growth_over_bound": r["growth_mb"] / bound})
    common.log(f"{name}: +{r['growth_mb']:.0f} MB peak growth, bound "
               f"{bound:.0f} MB, {r['seconds']:.1f} s")
  return {"config": dict(size, quick=args.quick), "rows": rows}


def markdown(report) -> str:
  c = report["config"]
  rows = [{"weights": r["weights"], "params": f"{r['params'] / 1e9:.2f} B",
           "float32": f"{r['float_mb']:.0f} MB",
           "quantized": f"{r['quantized_mb']:.0f} MB",
           "largest leaf": f"{r['largest_leaf_mb']:.0f} MB",
           "peak growth": f"{r['growth_mb']:.0f} MB",
           "growth / (quantized + leaf)": f"{r['growth_over_bound']:.2f}",
           "seconds": f"{r['seconds']:.1f}"} for r in report["rows"]]
  return (f"# Quantizing without a float copy (d = {c['d']}, {c['layers']} "
          "blocks)\n\n" + common.format_table(rows) + "\n")


def parser():
  p = common.parser(__doc__, NAME, quick="d = 1024, 6 blocks")
  p.add_argument(common.CHILD, default=None, help="internal: one measurement")
  return p


def main(argv=None):
  return common.main_or_child(NAME, parser, run, markdown,
                              lambda report: {}, child, argv)


if __name__ == "__main__":
  main()
