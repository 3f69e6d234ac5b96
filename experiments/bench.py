"""Int8 inference speed against float, measured in one process.

Variants are interleaved in rounds; each round times every variant once
(median of a few calls) and the reported figure is the median over rounds
of the per-round ratio to the float baseline. Also reports the raw s8 dot
floor and tracing + compile time.

  python -m experiments.bench [--quick] [--rounds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from experiments import common

W8A8 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])


class MLP(nn.Module):
  hidden: int = 1024

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


class Block(nn.Module):
  d_model: int = 512
  heads: int = 8
  d_ff: int = 2048

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.d_model)(nn.gelu(nn.Dense(self.d_ff)(h)))


def _time(fn, args, calls):
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compare(variants: dict, rounds: int, calls: int) -> dict:
  """Median over rounds of (variant time / 'float' time) in the same round."""
  for fn, args in variants.values():
    jax.block_until_ready(fn(*args))  # compile
  ratios = {name: [] for name in variants}
  for _ in range(rounds):
    base = _time(*variants["float"], calls)
    for name, (fn, args) in variants.items():
      ratios[name].append(_time(fn, args, calls) / base)
  return {name: statistics.median(r) for name, r in ratios.items()}


def compile_seconds(fn, *args) -> float:
  wrapped = lambda *a: fn(*a)  # a new function object: no cache hit
  start = time.perf_counter()
  jax.jit(wrapped).lower(*args).compile()
  return time.perf_counter() - start


def compile_ratio(fn, args, base_fn, base_args, rounds: int) -> float:
  """Median over rounds of trace + compile time of `fn` / of `base_fn`."""
  return statistics.median(
      compile_seconds(fn, *args) / compile_seconds(base_fn, *base_args)
      for _ in range(rounds))


def bench_model(name, model, x, rounds, calls):
  params = model.init(jax.random.key(0), x)
  qparams = jq.quantize_params(model.apply, params, W8A8, x)
  qapply = jq.quantized_apply(model.apply, W8A8)
  variants = {"float": (jax.jit(model.apply), (params, x)),
              "w8a8": (jax.jit(qapply), (qparams, x))}
  ratios = compare(variants, rounds, calls)
  trace_ratio = compile_ratio(qapply, (qparams, x), model.apply, (params, x),
                              rounds)
  return {"model": name, "w8a8 / float time": round(ratios["w8a8"], 3),
          "compile w8a8 / float": round(trace_ratio, 2)}


def raw_dot_floor(m, k, n, rounds, calls):
  """An s8 x s8 -> s32 dot against the f32 dot of the same shape."""
  rng = np.random.default_rng(0)
  xf = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  wf = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  xi, wi = xf.astype(jnp.int8), wf.astype(jnp.int8)
  dot = lambda a, b, t: jax.lax.dot(a, b, preferred_element_type=t)
  variants = {"float": (jax.jit(lambda a, b: dot(a, b, jnp.float32)), (xf, wf)),
              "s8": (jax.jit(lambda a, b: dot(a, b, jnp.int32)), (xi, wi))}
  return compare(variants, rounds, calls)["s8"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rounds, calls = (3, 3) if args.quick else (args.rounds, 5)
  scale = 4 if args.quick else 1
  rows = [
      bench_model("MLP 784-1024-1024-10, batch 256", MLP(1024 // scale),
                  jnp.ones((256 // scale, 784)), rounds, calls),
      bench_model("Transformer block d512 ff2048 seq128 batch8",
                  Block(512 // scale, 8, 2048 // scale),
                  jax.random.normal(jax.random.key(0), (8 // min(scale, 8),
                                                        128 // scale,
                                                        512 // scale)),
                  rounds, calls),
  ]
  floor = raw_dot_floor(256 // scale, 1024 // scale, 1024 // scale, rounds,
                        calls)
  rows.append({"model": "raw s8 dot 256x1024x1024", "w8a8 / float time":
               round(floor, 3), "compile w8a8 / float": ""})
  out = common.results_dir("bench", args.out)
  common.write_table(rows, out / "results.md")
  common.write_json({"device": jax.devices()[0].device_kind, "rows": rows},
                    out / "results.json")
  print(open(out / "results.md").read())
  return rows


if __name__ == "__main__":
  main()
