"""Int8 inference speed against float, measured in one process.

Variants are interleaved in rounds; each round times every variant once
(median of a few calls) and the reported figure is the median over rounds
of the per-round ratio to the float baseline. Also reports a QAT step, the
raw s8 dot floor, tracing + compile time and, with `--peers`, Qwix and AQT
on the same model and inputs.

  python -m experiments.bench [--quick] [--out DIR] [--seed S] [--peers]
                              [--rounds N]

Writes results.md (the ratio table) and results.json (the rows, the device,
the rounds and, per model, `jq.int8_ops` of the jaxquant W8A8 function: its
int8 matmuls before and after XLA's optimisations) to results/bench/ (or
--out). --quick (CI): every size / 4, 3 rounds of 3 calls.
"""

from __future__ import annotations

import os
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from experiments import common, peers

NAME = "bench"
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


def compare(variants: dict, rounds: int, calls: int, seed: int = 0) -> dict:
  """Median over rounds of (variant time / 'float' time) in the same round
  (`common.time_rounds`)."""
  return common.median_ratios(common.time_rounds(variants, rounds, calls,
                                                 seed=seed))


def compile_seconds(fn, *args) -> float:
  wrapped = lambda *a: fn(*a)  # a new function object: no cache hit
  return common.seconds(lambda: jax.jit(wrapped).lower(*args).compile())


def compile_ratio(fn, args, base_fn, base_args, rounds: int) -> float:
  """Median over rounds of trace + compile time of `fn` / of `base_fn`."""
  return statistics.median(
      compile_seconds(fn, *args) / compile_seconds(base_fn, *base_args)
      for _ in range(rounds))


def bench_model(name, model, x, rounds, calls, with_peers=False, seed=0):
  """Inference: jaxquant W8A8 (and Qwix / AQT) time over float time.

  Returns (row, `jq.int8_ops` of the jaxquant function)."""
  params = model.init(jax.random.key(seed), x)
  qparams = jq.quantize_params(model.apply, params, W8A8, x)
  qapply = jq.quantized_apply(model.apply, W8A8)
  variants = {"float": (jax.jit(model.apply), (params, x)),
              "jaxquant": (jax.jit(qapply), (qparams, x))}
  if with_peers:
    variants.update(_peer_variants(model, params, x))
  ratios = compare(variants, rounds, calls, seed)
  row = {"model": name, "task": "W8A8 inference"}
  row.update({f"{k} / float": round(v, 3) for k, v in ratios.items()
              if k != "float"})
  row["compile jaxquant / float"] = round(compile_ratio(
      qapply, (qparams, x), model.apply, (params, x), max(1, rounds // 3)), 2)
  return row, jq.int8_ops(variants["jaxquant"][0], qparams, x)


def _peer_variants(model, params, x):
  found = peers.available()
  out = {}
  if found["qwix"]:
    fn, qp = peers.qwix_w8a8(model, params, x)
    out["qwix"] = (jax.jit(fn), (qp, x))
  if found["aqt"] and isinstance(model, MLP):
    fn, p = peers.aqt_w8a8(model.hidden, 2, params, x)
    out["aqt"] = (jax.jit(fn), (p, x))
  return out


def bench_qat(name, model, x, rounds, calls, with_peers=False, seed=0):
  """One SGD step with fake-quant (W8A8) over one float step."""
  params = model.init(jax.random.key(seed), x)

  def step_of(apply_fn):
    def loss(p):
      logits = apply_fn(p, x)
      labels = jnp.zeros(logits.shape[:-1], jnp.int32)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    return jax.jit(lambda p: jax.tree_util.tree_map(
        lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p)))

  variants = {"float": (step_of(model.apply), (params,)),
              "jaxquant": (step_of(jq.fake_quant_apply(model.apply, W8A8)),
                           (params,))}
  if with_peers and peers.available()["aqt"] and isinstance(model, MLP):
    fn, p = peers.aqt_w8a8(model.hidden, 2, params, x)
    variants["aqt"] = (step_of(fn), (p,))
  ratios = compare(variants, rounds, calls, seed)
  row = {"model": name, "task": "QAT step"}
  row.update({f"{k} / float": round(v, 3) for k, v in ratios.items()
              if k != "float"})
  return row


def raw_dot_floor(m, k, n, rounds, calls, seed=0):
  """An s8 x s8 -> s32 dot against the f32 dot of the same shape."""
  rng = np.random.default_rng(seed)
  xf = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  wf = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  xi, wi = xf.astype(jnp.int8), wf.astype(jnp.int8)
  dot = lambda a, b, t: jax.lax.dot(a, b, preferred_element_type=t)
  variants = {"float": (jax.jit(lambda a, b: dot(a, b, jnp.float32)), (xf, wf)),
              "s8": (jax.jit(lambda a, b: dot(a, b, jnp.int32)), (xi, wi))}
  return compare(variants, rounds, calls, seed)["s8"]


COLUMNS = ["model", "task", "jaxquant / float", "qwix / float",
           "aqt / float", "compile jaxquant / float"]


def run(args) -> dict:
  rounds, calls = (3, 3) if args.quick else (args.rounds, 5)
  shrink = 4 if args.quick else 1
  seed = args.seed
  mlp = MLP(1024 // shrink)
  mlp_x = jnp.ones((256 // shrink, 784))
  block = Block(512 // shrink, 8, 2048 // shrink)
  block_x = jax.random.normal(jax.random.key(seed), (8 // shrink,
                                                     128 // shrink,
                                                     512 // shrink))
  mlp_name = "MLP 784-1024-1024-10, batch 256"
  block_name = "Transformer block d512 ff2048 seq128 batch8"
  if args.quick:
    mlp_name, block_name = mlp_name + " (quick: /4)", block_name + " (quick: /4)"
  rows, int8_ops = [], {}
  for kind, name, model, x in common.progress([
      ("inference", mlp_name, mlp, mlp_x),
      ("inference", block_name, block, block_x),
      ("qat", mlp_name, mlp, mlp_x),
      ("qat", block_name, block, block_x)], "benchmarks"):
    if kind == "inference":
      row, int8_ops[name] = bench_model(name, model, x, rounds, calls,
                                        args.peers, seed)
    else:
      row = bench_qat(name, model, x, rounds, calls, args.peers, seed)
    rows.append(row)
  m, k, n = 256 // shrink, 1024 // shrink, 1024 // shrink
  rows.append({"model": f"raw dot {m}x{k}x{n}", "task": "s8 x s8 -> s32",
               "jaxquant / float": round(raw_dot_floor(m, k, n, rounds, calls,
                                                       seed), 3)})
  rows = [{c: row.get(c, "") for c in COLUMNS} for row in rows]
  return {"device": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "rounds": rounds, "rows": rows,
          "int8_ops": {name: ops._asdict() for name, ops in int8_ops.items()}}


def markdown(report) -> str:
  return common.format_table(report["rows"])


def parser():
  p = common.parser(__doc__, NAME, quick="every size / 4, 3 rounds (CI)")
  p.add_argument("--peers", action="store_true",
                 help="also time Qwix and AQT (pip install qwix aqtp)")
  p.add_argument("--rounds", type=int, default=15,
                 help="timing rounds (default 15; quick 3)")
  return p


def main(argv=None):
  return common.main(NAME, parser, run, markdown, None, argv)


if __name__ == "__main__":
  main()
