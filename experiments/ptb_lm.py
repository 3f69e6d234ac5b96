"""Post-training quantization and 4-bit QAT of a small Transformer LM on PTB.

  python -m experiments.ptb_lm [--quick] [--out DIR] [--steps N] [--seed S]

Model: a causal decoder-only Transformer in Flax Linen: token embedding
(10k-word PTB vocabulary from `experiments.data.load_ptb`), learned
positions, pre-LN blocks of causal `nn.MultiHeadDotProductAttention` and a
GELU MLP (4x), a final LayerNorm and an output projection tied to the token
embedding (`nn.Embed.attend`). Trained with optax AdamW (warmup + cosine
decay) on random windows of the PTB training split.

Variants, all evaluated on the same validation windows (the full 'valid'
split cut into non-overlapping windows of `context` tokens, every token
predicted from the tokens before it in its window; --quick uses a small
subset):

  float         the trained float32 model
  W8A8          int8 per-channel weights, int8 per-token activations:
                real int8 x int8 -> int32 matmuls (`jq.quantized_apply`)
  W8A16         int8 per-channel weights, float activations (weight-only)
  W4A16         int4 weights, one scale per group of 32 along the
                contraction axis, float activations (weight-only)
  W4A16 QAT     the float model fine-tuned for `qat_steps` more steps with
                `jq.fake_quant_apply(model.apply, W4A16 recipe)`, then quantized
                with `jq.quantize_params` and run with `jq.quantized_apply`
  control       the float model trained the same extra `qat_steps` steps
                without fake-quant (same optimizer and schedule), in float
                and W4A16 PTQ: separates the effect of QAT from that of the
                extra training

Every matmul weight is quantized, the tied embedding included (it is both
the input lookup and the output projection); LayerNorm scales, biases and
the position table stay float32. Parameter bytes are `jq.nbytes` of the
whole parameter tree (packed values + scales + float leaves).

Writes results.md, results.json and ptb_lm.png to results/ptb_lm/ (or --out).
"""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from experiments import common
from experiments.data import load_ptb

NAME = "ptb_lm"


# ------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class Config:
  d_model: int = 128
  heads: int = 4
  layers: int = 2
  context: int = 64
  batch: int = 32
  steps: int = 1300
  lr: float = 3e-3
  warmup: int = 100
  weight_decay: float = 0.1
  qat_steps: int = 150
  qat_lr: float = 3e-4
  eval_batch: int = 128
  eval_windows: int | None = None  # None: the whole valid split
  group_size: int = 32


FULL = Config()
QUICK = Config(d_model=64, heads=2, context=32, batch=8, steps=30, warmup=5,
               qat_steps=10, eval_batch=32, eval_windows=64)


def recipes(group_size: int) -> dict[str, jq.Recipe]:
  """Every matmul weight (kernels and the tied embedding) is quantized."""
  weights = r".*(kernel|embedding)"
  return {
      "W8A8": jq.Recipe([jq.Rule(weights, weight=jq.int8(), act=jq.int8())]),
      "W8A16": jq.Recipe([jq.Rule(weights, weight=jq.int8())]),
      "W4A16": jq.Recipe([jq.Rule(weights,
                                  weight=jq.int4(group_size=group_size))]),
  }


# ------------------------------------------------------------------- model


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                            name="attn")(h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * x.shape[-1], name="mlp_in")(h)
    return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h))


class TransformerLM(nn.Module):
  vocab: int
  d_model: int
  heads: int
  layers: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d_model, name="tok_embed",
                     embedding_init=nn.initializers.normal(0.02))
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (self.context, self.d_model))
    x = embed(tokens) + pos[:tokens.shape[1]]
    for i in range(self.layers):
      x = Block(self.heads, name=f"block_{i}")(x)
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


def model_for(cfg: Config, vocab: int) -> TransformerLM:
  return TransformerLM(vocab, cfg.d_model, cfg.heads, cfg.layers, cfg.context)


# -------------------------------------------------------------------- data


def train_batches(tokens: np.ndarray, cfg: Config, rng: np.random.Generator):
  """Random windows (inputs, targets), each `(batch, context)`."""
  while True:
    start = rng.integers(0, len(tokens) - cfg.context - 1, cfg.batch)
    idx = start[:, None] + np.arange(cfg.context + 1)
    window = tokens[idx]
    yield window[:, :-1], window[:, 1:]


def eval_windows(tokens: np.ndarray, cfg: Config):
  """Non-overlapping windows, padded to whole batches: (x, y, mask) lists."""
  n = (len(tokens) - 1) // cfg.context
  if cfg.eval_windows is not None:
    n = min(n, cfg.eval_windows)
  x = tokens[:n * cfg.context].reshape(n, cfg.context)
  y = tokens[1:n * cfg.context + 1].reshape(n, cfg.context)
  pad = -n % cfg.eval_batch
  mask = np.concatenate([np.ones((n, cfg.context), np.float32),
                         np.zeros((pad, cfg.context), np.float32)])
  x = np.concatenate([x, np.zeros((pad, cfg.context), x.dtype)])
  y = np.concatenate([y, np.zeros((pad, cfg.context), y.dtype)])
  split = lambda a: np.split(a, len(a) // cfg.eval_batch)
  return list(zip(split(x), split(y), split(mask))), n * cfg.context


# ---------------------------------------------------------------- training


def adamw(*, steps, lr, warmup, weight_decay):
  """AdamW (gradients clipped to norm 1) with linear warmup and cosine decay
  to lr/10 over `steps`, for `common.train`."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, warmup), max(steps, warmup + 1), lr / 10)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.98,
                                 weight_decay=weight_decay))


def nll_fn(apply_fn):
  """jit-compiled (sum of masked next-token NLL, token count) of a batch."""

  @jax.jit
  def nll(params, x, y, mask):
    logits = apply_fn(params, x).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (ce * mask).sum(), mask.sum()

  return nll


def perplexity(nll, params, windows, desc) -> float:
  """exp(mean next-token NLL) over the masked eval windows."""
  total, count = 0.0, 0.0
  for x, y, mask in common.progress(windows, desc):
    s, c = nll(params, x, y, mask)
    total, count = total + float(s), count + float(c)
  return math.exp(total / count)


# -------------------------------------------------------------------- main


def report_counts(rep: jq.Report) -> dict:
  return {"int8": rep.count("int8"), "weight_only": rep.count("weight-only"),
          "float": rep.count("float")}


def run(args) -> dict:
  cfg = QUICK if args.quick else FULL
  if args.steps is not None:
    cfg = dataclasses.replace(cfg, steps=args.steps,
                              warmup=min(cfg.warmup, max(1, args.steps // 10)))
  timer = common.Timer()
  with timer("total"):
    result = experiment(cfg, args.seed)
  result["config"].update(quick=args.quick, seconds=timer.wall["total"],
                          train_tokens=len(load_ptb()["train"]))
  return result


def experiment(cfg: Config, seed: int, log=common.log):
  timer = common.Timer()
  load_before = os.getloadavg()[0]
  with timer("load_data"):
    ptb = load_ptb()
    vocab = len(ptb["vocab"])
    windows, eval_tokens = eval_windows(ptb["valid"], cfg)

  model = model_for(cfg, vocab)
  example = jnp.zeros((cfg.eval_batch, cfg.context), jnp.int32)
  params = model.init(jax.random.key(seed), example[:1])
  n_params = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
  log(f"PTB: {len(ptb['train']):,} train / {len(ptb['valid']):,} valid "
      f"tokens, vocab {vocab:,}; model {n_params:,} parameters; eval on "
      f"{eval_tokens:,} valid tokens")

  rng = np.random.default_rng(seed)
  batches = train_batches(ptb["train"], cfg, rng)
  with timer("train_float"):
    params, losses = common.train(
        model.apply, params, batches, steps=cfg.steps, desc="train float",
        tx=adamw(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                 weight_decay=cfg.weight_decay))

  recs = recipes(cfg.group_size)
  fine_tune = adamw(steps=cfg.qat_steps, lr=cfg.qat_lr,
                    warmup=max(1, cfg.qat_steps // 10),
                    weight_decay=cfg.weight_decay)
  # The control and QAT runs see the same batches.
  qat_state = rng.bit_generator.state
  with timer("train_control"):
    control, control_losses = common.train(
        model.apply, params, batches, tx=fine_tune, steps=cfg.qat_steps,
        desc="train control")
  rng.bit_generator.state = qat_state
  with timer("train_qat"):
    qat_params, qat_losses = common.train(
        jq.fake_quant_apply(model.apply, recs["W4A16"]), params, batches,
        tx=fine_tune, steps=cfg.qat_steps, desc="train QAT W4A16")

  variants = [
      ("float", "float", params, None),
      ("W8A8", "PTQ", params, "W8A8"),
      ("W8A16", "PTQ", params, "W8A16"),
      ("W4A16", "PTQ", params, "W4A16"),
      ("float +ft", "control", control, None),
      ("W4A16 +ft", "control PTQ", control, "W4A16"),
      ("W4A16 QAT", "QAT", qat_params, "W4A16"),
  ]
  rows = []
  # One compiled evaluator per recipe (the QArray specs are static, so the
  # PTQ, control and QAT parameters of one recipe share it).
  nlls = {None: nll_fn(model.apply)}
  nlls.update({k: nll_fn(jq.quantized_apply(model.apply, r))
               for k, r in recs.items()})
  with timer("evaluate"):
    for name, method, p, recipe_name in common.progress(variants, "evaluate"):
      if recipe_name is None:
        qp = p
        counts = {"int8": 0, "weight_only": 0}
      else:
        recipe = recs[recipe_name]
        qp = jq.quantize_params(model.apply, p, recipe, example)
        rep = jq.report(model.apply, qp, recipe, example)
        counts = report_counts(rep)
        if name == "W8A8":
          w8a8_report = str(rep)
      ppl = perplexity(nlls[recipe_name], qp, windows, f"eval {name}")
      rows.append(dict(variant=name, method=method, recipe=recipe_name or "-",
                       perplexity=ppl, param_bytes=jq.nbytes(qp),
                       int8_matmuls=counts["int8"],
                       weight_only_matmuls=counts["weight_only"]))
      log(f"  {name:<12} perplexity {ppl:9.2f}  bytes {jq.nbytes(qp):>11,}")
  total = sum(report_counts(jq.report(model.apply, params, recs["W8A8"],
                                      example)).values())
  for row in rows:  # float: no parameter operand (attention), or float model
    row["float_matmuls"] = total - row["int8_matmuls"] - row[
        "weight_only_matmuls"]
  config = dict(dataclasses.asdict(cfg), seed=seed, vocab=vocab,
                n_params=n_params, eval_tokens=eval_tokens,
                eval_split="valid" if cfg.eval_windows is None else
                f"valid, first {eval_tokens} tokens",
                train_tokens_seen=cfg.steps * cfg.batch * cfg.context,
                qat_recipe="W4A16: int4, groups of "
                f"{cfg.group_size} along the contraction axis, float acts",
                backend=jax.default_backend(), cpu_count=os.cpu_count(),
                load_average=[load_before, os.getloadavg()[0]])
  return dict(config=config, results=rows, timings=timer.wall,
              cpu_seconds=timer.cpu,
              train_loss=losses, control_loss=control_losses,
              qat_loss=qat_losses, w8a8_report=w8a8_report)


def plot(result, path):
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  markers = {"float": "o", "PTQ": "s", "control": "o", "control PTQ": "s",
             "QAT": "*"}
  for i, row in enumerate(result["results"]):
    left.scatter(row["param_bytes"] / 1e6, row["perplexity"], color=f"C{i}",
                 marker="^" if row["recipe"] == "W8A8" else markers.get(
                     row["method"], "o"), s=60,
                 zorder=4 if row["recipe"] == "W8A8" else 3,
                 label=f"{row['variant']}: {row['perplexity']:.2f}")
  left.set_xlim(0, max(r["param_bytes"] for r in result["results"]) * 1.35e-6)
  left.set_xlabel("parameter bytes (MB)")
  left.set_ylabel("validation perplexity")
  left.set_title("perplexity vs size")
  left.grid(alpha=0.3)
  left.legend(fontsize=8, title="validation perplexity", title_fontsize=8)

  def smooth(v, k):
    v = np.asarray(v)
    if len(v) < k:
      return np.arange(len(v)), v
    return np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, "valid")

  loss = result["train_loss"]
  k = max(1, len(loss) // 50)
  right.plot(np.arange(len(loss)), loss, color="C0", alpha=0.25, lw=0.7)
  right.plot(*smooth(loss, k), color="C0", label="float")
  for key, color, style, label in (
      ("control_loss", "C4", "-", "float +ft (control)"),
      ("qat_loss", "C6", "--", "QAT W4A16 (fake-quant), same batches")):
    steps, values = smooth(result[key], max(1, k // 2))
    right.plot(steps + len(loss), values, style, color=color, label=label)
  right.set_xlabel("step")
  right.set_ylabel(f"train loss (nats/token, mean of {k})")
  right.set_title("training loss")
  right.set_ylim(top=min(max(loss), 10.0))
  right.grid(alpha=0.3)
  right.legend(fontsize=8)
  common.save_figure(fig, path)


def markdown(result) -> str:
  cfg, t, cpu = result["config"], result["timings"], result["cpu_seconds"]
  float_bytes = result["results"][0]["param_bytes"]
  rows = [dict(variant=r["variant"], method=r["method"],
               perplexity=r["perplexity"],
               **{"param bytes": f"{r['param_bytes']:,}",
                  "vs float": f"{r['param_bytes'] / float_bytes:.3f}",
                  "int8 / weight-only / float matmuls":
                      f"{r['int8_matmuls']} / {r['weight_only_matmuls']} / "
                      f"{r['float_matmuls']}"})
          for r in result["results"]]
  table = common.format_table(rows)
  times = ", ".join(f"{k} {v:.1f} s ({cpu[k]:.0f} CPU s)" for k, v in t.items())
  return (
      f"# PTB language model: quantization\n\n"
      f"{'QUICK run (numbers meaningless). ' if cfg['quick'] else ''}"
      f"Causal Transformer, {cfg['layers']} pre-LN blocks, d_model "
      f"{cfg['d_model']}, {cfg['heads']} heads, context {cfg['context']}, "
      f"tied embedding, {cfg['n_params']:,} parameters; AdamW "
      f"(lr {cfg['lr']}, wd {cfg['weight_decay']}) for {cfg['steps']} "
      f"steps of {cfg['batch']}x{cfg['context']} tokens "
      f"({cfg['train_tokens_seen']:,} tokens, "
      f"{cfg['train_tokens_seen'] / cfg['train_tokens']:.2f} epochs). "
      f"Perplexity on {cfg['eval_split']} ({cfg['eval_tokens']:,} tokens, "
      f"non-overlapping {cfg['context']}-token windows). "
      f"QAT and control: {cfg['qat_steps']} more steps (lr "
      f"{cfg['qat_lr']}); QAT recipe {cfg['qat_recipe']}. All matmul "
      f"weights quantized, the tied embedding included; W8 per output "
      f"channel, A8 per token. Seed {cfg['seed']}, {cfg['backend']}.\n\n"
      f"{table}\n"
      f"Matmul counts from `jq.report`; the float ones are the attention "
      f"score / value products (no parameter operand).\n\n"
      f"Timings (wall, and CPU seconds of all threads): {times}; total "
      f"{cfg['seconds']:.1f} s on {cfg['cpu_count']} cores, load average "
      f"{cfg['load_average'][0]:.1f} at start / {cfg['load_average'][1]:.1f} "
      f"at end.\n\n"
      f"## jq.report, W8A8\n\n```\n{result['w8a8_report']}\n```\n")


def figures(result) -> dict:
  return {"ptb_lm.png": lambda path: plot(result, path)}


def parser():
  p = common.parser(__doc__, NAME,
                    quick="tiny model, few steps, small eval subset (CI)")
  p.add_argument("--steps", type=int, default=None,
                 help="float training steps (default: 1300, quick 30)")
  return p


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
