"""The cost of the transform itself on big and deep models.

  python -m experiments.deep [--quick] [--out DIR] [--seed S]

1. A pre-LN transformer written as a Python loop (not `nn.scan`): `layers`
   blocks of width d (8-head `nn.MultiHeadDotProductAttention`, GELU MLP
   4d), W8A8 on every kernel. Timed in one process: `jq.quantize_params`
   (its trace included) once, and the float model's `jit` compile against
   `jq.quantized_apply`'s (trace, lower, compile) in alternating rounds,
   reported as the median of the per-round ratios. Memory: peak resident
   growth of `quantize_params` over the float params already in memory,
   measured in a subprocess, against the float params' bytes.
2. Equations: a plain-JAX chain of `n` small matmuls (`x = tanh(x @ w_i)
   / 2 + x`, four equations each), `jq.quantize_params` timed at two sizes
   to show its time grows linearly with the number of equations.

Full run: 48 blocks of d = 1024 (605 M parameters), chains of 2.5 k and
25 k matmuls (1e4 and 1e5 equations), 5 compile rounds. --quick (CI):
4 blocks of d = 256, chains of 250 and 1000, one round.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from experiments import common
from jaxquant.tree import is_qarray, leaves_with_paths

NAME = "deep"
SIZES = {True: dict(layers=4, d=256, chains=(250, 1000), rounds=1),
         False: dict(layers=48, d=1024, chains=(2500, 25000), rounds=5)}
RECIPE = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])


class Block(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=8)(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(h)))


class Transformer(nn.Module):
  layers: int
  d: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = Block(self.d)(x)
    return x


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def transformer_costs(layers: int, d: int, rounds: int) -> dict:
  model = Transformer(layers, d)
  x = jnp.ones((1, 16, d))
  params = model.init(jax.random.key(0), x)
  eqns = len(jax.make_jaxpr(model.apply)(params, x).eqns)
  qparams, quantize = _timed(lambda: jq.quantize_params(
      model.apply, params, RECIPE, x, progress=False))
  # A fresh jax.jit each time: trace, lower and compile, no cache hit. The
  # two compiles alternate, `rounds` times, for per-round ratios on a
  # shared machine.
  compiles = common.time_rounds({
      "float": (lambda: jax.jit(model.apply).lower(params, x).compile(), ()),
      "quantized": (lambda: jax.jit(jq.quantized_apply(
          model.apply, RECIPE)).lower(qparams, x).compile(), ()),
  }, rounds, calls=1, warmup=False, desc="compiles")
  ratios = [q / f for q, f in zip(compiles["quantized"], compiles["float"])]
  return {"params": sum(int(np.size(a)) for a in jax.tree.leaves(params)),
          "equations": eqns, "kernels": sum(
              path.endswith("kernel") for path, _ in leaves_with_paths(params)),
          "quantized": _quantized(qparams),
          "float_compile_s": float(np.median(compiles["float"])),
          "quantize_s": quantize,
          "quantized_compile_s": float(np.median(compiles["quantized"])),
          "compile_ratio": float(np.median(ratios)),
          "compile_ratios": ratios}


def memory_child(layers: int, d: int) -> dict:
  """Peak resident growth of quantize_params, in this fresh process."""
  model = Transformer(layers, d)
  x = jnp.ones((1, 16, d))
  small = Transformer(1, d)
  jq.quantize_params(small.apply, small.init(jax.random.key(0), x), RECIPE,
                     x, progress=False)  # compile the quantizer first
  params = jax.block_until_ready(model.init(jax.random.key(0), x))
  base = common.rss_mb()
  qparams = jax.block_until_ready(jq.quantize_params(
      model.apply, params, RECIPE, x, progress=False))
  peak = common.peak_rss_mb()
  float_mb = sum(a.nbytes for a in jax.tree.leaves(params)) / 2**20
  return {"float_mb": float_mb, "quantized_mb": jq.nbytes(qparams) / 2**20,
          "growth_mb": peak - base, "growth_over_float": (peak - base)
          / float_mb}


def chain_seconds(n: int) -> dict:
  def apply(p, x):
    for w in p["w"]:
      x = jnp.tanh(x @ w) * 0.5 + x
    return x

  params = {"w": [jnp.full((16, 16), 0.01 * (i % 7 + 1)) for i in range(n)]}
  x = jnp.ones((2, 16))
  eqns = len(jax.make_jaxpr(apply)(params, x).eqns)
  recipe = jq.Recipe([jq.Rule(r"w/.*", weight=jq.int8(), act=jq.int8())])
  qparams, seconds = _timed(lambda: jq.quantize_params(
      apply, params, recipe, x, progress=False))
  return {"matmuls": n, "equations": eqns, "quantized": _quantized(qparams),
          "quantize_s": seconds}


def _quantized(qparams) -> int:
  """How many leaves of `qparams` were quantized."""
  return sum(is_qarray(leaf) for _, leaf in leaves_with_paths(qparams))


def run(args) -> dict:
  size = SIZES[args.quick]
  common.log("transformer: compile and quantize times")
  costs = transformer_costs(size["layers"], size["d"], size["rounds"])
  common.log("transformer: memory (subprocess)")
  memory = common.in_child("experiments.deep", layers=size["layers"],
                           d=size["d"])
  chains = [chain_seconds(n) for n in common.progress(size["chains"],
                                                      desc="chains")]
  return {"config": dict(size, quick=args.quick), "transformer": costs,
          "memory": memory, "chains": chains}


def markdown(report) -> str:
  c, t, m = report["config"], report["transformer"], report["memory"]
  first, last = report["chains"][0], report["chains"][-1]
  growth = (last["quantize_s"] / first["quantize_s"]) / (
      last["equations"] / first["equations"])
  rows = [
      {"measure": "parameters", "value": f"{t['params'] / 1e6:.0f} M"},
      {"measure": "jaxpr equations", "value": f"{t['equations']}"},
      {"measure": "float jit compile", "value": f"{t['float_compile_s']:.1f} s"},
      {"measure": "quantize_params (trace included)",
       "value": f"{t['quantize_s']:.1f} s"},
      {"measure": "quantized_apply jit compile",
       "value": f"{t['quantized_compile_s']:.1f} s "
                f"({t['compile_ratio']:.2f}x float, median of "
                f"{', '.join(f'{r:.2f}' for r in t['compile_ratios'])})"},
      {"measure": "quantize_params peak memory growth",
       "value": f"{m['growth_mb']:.0f} MB ({m['growth_over_float']:.2f}x "
                f"the {m['float_mb']:.0f} MB float params)"},
  ] + [{"measure": f"quantize_params, {ch['equations']} equations",
        "value": f"{ch['quantize_s']:.1f} s"} for ch in report["chains"]] + [
      {"measure": "time growth per equation growth",
       "value": f"{growth:.2f} (1.0: linear)"}]
  return (f"# Transform cost: {c['layers']} blocks of d = {c['d']}, W8A8\n\n"
          + common.format_table(rows) + "\n")


def parser():
  p = common.parser(__doc__, NAME, quick="4 blocks of d = 256")
  p.add_argument(common.CHILD, default=None, help="internal: one measurement")
  return p


def main(argv=None):
  return common.main_or_child(NAME, parser, run, markdown,
                              lambda report: {}, memory_child, argv)


if __name__ == "__main__":
  main()
