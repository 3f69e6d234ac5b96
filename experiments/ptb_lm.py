"""Post-training quantization and 4-bit QAT of a small Transformer LM on PTB.

  python -m experiments.ptb_lm [--quick] [--out DIR] [--steps N] [--seed S]
                               [--peers]

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
                contraction axis, float activations (weight-only),
                round-to-nearest (RTN)
  W4A16 (g32) GPTQ, W4A16 (g32) AWQ   the same int4 g32 weights, every one
                (the tied embedding included) rounded by a calibrated
                method (`METHODS`): GPTQ (`jq.gptq()` defaults: block 128,
                damp 0.01, act_order) or AWQ (`jq.awq()`: the exponent
                alpha of the per-input-feature pre-scale searched on a grid
                of 20 per layer); their statistics (Hessians, per-feature
                mean |x|) from `jq.calibrate` on `calib_windows` random
                windows of the PTB *training* split
  W4A16 (g32) GPTQ, embedding E  (and AWQ, embedding E)   the kernels by
                the method, the tied embedding by its own rule E, chosen on
                held-out training tokens (below; not in --quick)
  W3A16 (g32), W3A16 (g32) GPTQ, ...   the same at int3 g32 (not in
                --quick)
  W4A16 QAT     the float model fine-tuned for `qat_steps` more steps with
                `jq.fake_quant_apply(model.apply, W4A16 recipe)`, then quantized
                with `jq.quantize_params` and run with `jq.quantized_apply`
  control       the float model trained the same extra `qat_steps` steps
                without fake-quant (same optimizer and schedule), in float
                and W4A16 PTQ: separates the effect of QAT from that of the
                extra training

Every matmul weight is quantized, the tied embedding included; LayerNorm
scales, biases and the position table stay float32. Parameter bytes are
`jq.nbytes` of the whole parameter tree (packed values + scales + AWQ's
per-feature in_scale + float leaves). Quantization wall time:
`jq.calibrate` (GPTQ / AWQ rows) plus `jq.quantize_params`, compilation
included (what a row compiles first; a later row of the same shapes and
format reuses it; the --peers jaxquant rows start from cleared caches, as
each Qwix call compiles its own steps).

The tied embedding is both the input lookup (a gather: no matmul, so
outside any Hessian) and the output projection. GPTQ's error compensation
and AWQ's alpha search see only the projection's inputs, and the lookup
uses the same rounded table (AWQ's Q(E s)/s). The "embedding E" rows give
the embedding its own rule, ahead of the kernels' rule, with E one of
(`EMBEDDING_OPTIONS`):

  RTN           round to nearest (method=None)
  GPTQ damp=d   `jq.gptq(damp=d)` for d in 0.1, 0.3, 1, 3, 10: damp adds
                d * mean(diag H) * I to the projection's Hessian H, so each
                entry's own error counts as it would for an identity-Hessian
                lookup, d times the projection's mean input energy
                (d -> infinity is RTN)

or the kernels' own method (the plain row: GPTQ damp=0.01, or AWQ). For
each bit width and kernel method, E is the candidate with the lowest
perplexity on the held-out tail of the *training* split: its last
`holdout_tokens` tokens, in non-overlapping windows, which no training or
calibration window touches. The reported valid split plays no part in the
choice. The candidates share one calibration pass; the chosen rule then
gets its own row (its own calibration and timing) on the valid split.
When the kernels' own method wins, no extra row is added.

--peers adds a side-by-side with Qwix (`experiments.peers.qwix_calibrated`,
skipped when qwix is missing) on the same float model, calibration batches,
bits and group size: Qwix RTN, GPTQ (`qwix.contrib.gptq`) and AWQ
(`qwix.contrib.awq`), int4 and int3, g32. Qwix covers fewer weights: its
PTQ cannot run `nn.Embed` once the embedding is quantized (the lookup gets
the quantized wrapper), and its GPTQ / AWQ calibration skips the attention
output kernels (two contracted axes; they fall back to Qwix RTN) and
cannot enter the attention module itself (its einsum interceptor rejects
the `_dot_general=` flax passes). So the Qwix rows keep the embedding
float and quantize the 12 block kernels, and jaxquant RTN, GPTQ and AWQ
rows with that same coverage (embedding float) sit next to them. Qwix's
GPTQ does not take int3 (a synthetic qtype); the attempt is recorded.

Writes results.md, results.json and ptb_lm.png to results/ptb_lm/ (or --out).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from experiments import common, peers
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
  calib_windows: int = 64  # GPTQ / AWQ calibration: training-split windows
  calib_batch: int = 16
  # The training split's last tokens: never trained or calibrated on; the
  # data the tied embedding's rule is selected on.
  holdout_tokens: int = 32768
  int3_rows: bool = True  # W3A16 (g32) RTN and methods (quick: W4 only)
  embedding_rows: bool = True  # select the embedding's rule, add its rows


FULL = Config()
# --quick: one block (every kind of layer once; fewer equations to trace and
# compile, which is most of CI's time here), a few steps, 2k eval tokens.
QUICK = Config(d_model=64, heads=2, layers=1, context=32, batch=8, steps=30,
               warmup=5, qat_steps=10, eval_batch=32, eval_windows=64,
               calib_windows=16, calib_batch=8, int3_rows=False,
               embedding_rows=False)


# The calibrated methods of the rows, beside round-to-nearest ("RTN").
METHODS = {"GPTQ": jq.gptq(), "AWQ": jq.awq()}
# The tied embedding's candidate rules beside its kernels' method (None:
# round to nearest).
EMBEDDING_OPTIONS = {"RTN": None,
                     **{f"GPTQ damp={d:g}": jq.gptq(damp=d)
                        for d in (0.1, 0.3, 1.0, 3.0, 10.0)}}
WEIGHT_SPECS = {4: jq.int4, 3: jq.int3}
SAME, FLOAT = "same", "float"  # the embedding as its kernels / kept float


def method_label(method) -> str:
  """'RTN', 'AWQ' or 'GPTQ damp=0.01' (GPTQ with its damp)."""
  if method is None:
    return "RTN"
  if method.name == "gptq":
    return f"GPTQ damp={method.damp:g}"
  return method.name.upper()


def recipe_name(bits: int, method: str = "RTN", embedding: str = SAME
                ) -> str:
  """'W4A16', 'W4A16 GPTQ', 'W3A16 AWQ kernels' (embedding float),
  'W4A16 GPTQ, embedding RTN' (the embedding's own rule)."""
  name = f"W{bits}A16" + ("" if method == "RTN" else f" {method}")
  if embedding == FLOAT:
    return name + " kernels"
  return name if embedding == SAME else f"{name}, embedding {embedding}"


def weight_only(bits: int, group_size: int, method=None, embedding=SAME
                ) -> jq.Recipe:
  """int`bits` weights in groups of `group_size`, float activations.

  The kernels are rounded by `method` (None: to nearest); the tied
  embedding by the same rule (`SAME`), by its own rule ahead of it (a
  method, or None for RTN), or left float (`FLOAT`, the coverage Qwix
  reaches, for --peers)."""
  weight = WEIGHT_SPECS[bits](group_size=group_size)
  if embedding == SAME:
    return jq.Recipe([jq.Rule(r".*(kernel|embedding)", weight=weight,
                              method=method)])
  rules = [] if embedding == FLOAT else [
      jq.Rule(r".*embedding", weight=weight, method=embedding)]
  return jq.Recipe(rules + [jq.Rule(r".*kernel", weight=weight,
                                    method=method)])


def recipes(group_size: int) -> dict[str, jq.Recipe]:
  """Every matmul weight (kernels and the tied embedding) is quantized,
  W8 per channel, W4 / W3 by RTN and each of `METHODS`; the "... kernels"
  recipes leave the embedding float (for --peers)."""
  everything = r".*(kernel|embedding)"
  out = {
      "W8A8": jq.Recipe([jq.Rule(everything, weight=jq.int8(),
                                 act=jq.int8())]),
      "W8A16": jq.Recipe([jq.Rule(everything, weight=jq.int8())]),
  }
  for bits in WEIGHT_SPECS:
    for name, method in {"RTN": None, **METHODS}.items():
      for embedding in (SAME, FLOAT):
        out[recipe_name(bits, name, embedding)] = weight_only(
            bits, group_size, method, embedding)
  return out


def uses_method(recipe: jq.Recipe) -> bool:
  return any(rule.method is not None for rule in recipe.rules)


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


def calibration_batches(tokens: np.ndarray, cfg: Config, seed: int):
  """`calib_windows` random `context`-token windows of `tokens` (the
  training split), in batches of `calib_batch`; their own generator, so the
  training batches do not change."""
  rng = np.random.default_rng([seed, 1])
  start = rng.integers(0, len(tokens) - cfg.context, cfg.calib_windows)
  x = tokens[start[:, None] + np.arange(cfg.context)]
  return [jnp.asarray(b) for b in np.split(
      x, range(cfg.calib_batch, cfg.calib_windows, cfg.calib_batch))]


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
  """jit-compiled (sum of masked next-token NLL, token count) of a batch;
  given `ref` logits (the float model's), also (sum of squared logit error,
  sum of squared `ref`) over the masked tokens."""

  @jax.jit
  def nll(params, x, y, mask, ref=None):
    logits = apply_fn(params, x).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if ref is None:
      return (ce * mask).sum(), mask.sum()
    m = mask[..., None]
    return ((ce * mask).sum(), mask.sum(),
            (jnp.square(logits - ref) * m).sum(), (jnp.square(ref) * m).sum())

  return nll


def perplexity(nll, params, windows, desc, ref=None):
  """exp(mean next-token NLL) over the masked eval windows; with `ref`
  (`ref(x)`: the float model's logits), also the logit SQNR in dB,
  10 log10(sum ref^2 / sum (logits - ref)^2) over the same tokens."""
  total, count, err, sig = 0.0, 0.0, 0.0, 0.0
  for x, y, mask in common.progress(windows, desc):
    if ref is None:
      s, c = nll(params, x, y, mask)
    else:
      s, c, e, g = nll(params, x, y, mask, ref(x))
      err, sig = err + float(e), sig + float(g)
    total, count = total + float(s), count + float(c)
  ppl = math.exp(total / count)
  if ref is None:
    return ppl
  return ppl, 10 * math.log10(sig / max(err, 1e-30))


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
    result = experiment(cfg, args.seed, with_peers=args.peers)
  result["config"].update(quick=args.quick, peers=args.peers,
                          seconds=timer.wall["total"])
  return result


def split_train(tokens: np.ndarray, cfg: Config):
  """(trained-on tokens, held-out tail of `holdout_tokens`) of the training
  split."""
  return tokens[:-cfg.holdout_tokens], tokens[-cfg.holdout_tokens:]


def row_name(bits: int, method: str, group_size: int, embedding=SAME) -> str:
  """'W4A16' (RTN, int4: the QAT recipe's row), 'W3A16 (g32)',
  'W4A16 (g32) GPTQ', 'W4A16 (g32) AWQ, embedding RTN'."""
  if method == "RTN":
    return "W4A16" if bits == 4 else f"W{bits}A16 (g{group_size})"
  name = f"W{bits}A16 (g{group_size}) {method}"
  return name if embedding == SAME else f"{name}, embedding {embedding}"


def experiment(cfg: Config, seed: int, log=common.log, with_peers=False):
  timer = common.Timer()
  load_before = os.getloadavg()[0]
  with timer("load_data"):
    ptb = load_ptb()
    vocab = len(ptb["vocab"])
    train, holdout = split_train(ptb["train"], cfg)
    windows, eval_tokens = eval_windows(ptb["valid"], cfg)

  model = model_for(cfg, vocab)
  example = jnp.zeros((cfg.eval_batch, cfg.context), jnp.int32)
  params = model.init(jax.random.key(seed), example[:1])
  n_params = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
  log(f"PTB: {len(train):,} train (+{len(holdout):,} held out) / "
      f"{len(ptb['valid']):,} valid tokens, vocab {vocab:,}; model "
      f"{n_params:,} parameters; eval on {eval_tokens:,} valid tokens")

  rng = np.random.default_rng(seed)
  batches = train_batches(train, cfg, rng)
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

  calib = calibration_batches(train, cfg, seed)
  # One compiled evaluator per weight format: the engine reads a method's
  # in_scale from the parameters, so RTN, GPTQ and AWQ trees (and the
  # PTQ, control and QAT parameters) of one format share it.
  nlls = {None: nll_fn(model.apply)}
  nlls.update({k: nll_fn(jq.quantized_apply(model.apply, recs[k]))
               for k in ("W8A8", "W8A16", *map(recipe_name, WEIGHT_SPECS))})
  bit_widths = (4, 3) if cfg.int3_rows else (4,)
  selection, chosen = None, {}
  if cfg.embedding_rows:
    with timer("select_embedding"):
      selection, chosen = select_embedding(
          model.apply, params, calib, holdout, example, nlls, cfg,
          bit_widths, log=log)
    for (bits, method), option in chosen.items():
      if option != SAME:
        recs[recipe_name(bits, method, option)] = weight_only(
            bits, cfg.group_size, METHODS[method],
            EMBEDDING_OPTIONS[option])
    # The rows below time their own compilation, as without the selection.
    jax.clear_caches()

  def quantized_rows(bits):
    rows = [dict(variant=row_name(bits, "RTN", cfg.group_size), method="PTQ",
                 recipe=recipe_name(bits))]
    for method in METHODS:
      rows.append(dict(variant=row_name(bits, method, cfg.group_size),
                       method=method, recipe=recipe_name(bits, method)))
    for method in METHODS:
      option = chosen.get((bits, method), SAME)
      if option != SAME:
        rows.append(dict(
            variant=row_name(bits, method, cfg.group_size, option),
            method=method, recipe=recipe_name(bits, method, option),
            embedding=option))
    return [dict(row, bits=bits, params=params) for row in rows]

  variants = [
      dict(variant="float", method="float", params=params, recipe=None),
      dict(variant="W8A8", method="PTQ", params=params, recipe="W8A8"),
      dict(variant="W8A16", method="PTQ", params=params, recipe="W8A16"),
      *[row for bits in bit_widths for row in quantized_rows(bits)],
      dict(variant="float +ft", method="control", params=control,
           recipe=None),
      dict(variant="W4A16 +ft", method="control PTQ", params=control,
           recipe="W4A16"),
      dict(variant="W4A16 QAT", method="QAT", params=qat_params,
           recipe="W4A16"),
  ]
  rows = []
  float_logits = jax.jit(model.apply)
  with timer("evaluate"):
    for v in common.progress(variants, "evaluate"):
      name, p, recipe_key = v["variant"], v.pop("params"), v["recipe"]
      if recipe_key is None:
        qp, seconds, sqnr = p, None, None
        counts = {"int8": 0, "weight_only": 0}
        ppl = perplexity(nlls[None], qp, windows, f"eval {name}")
      else:
        recipe = recs[recipe_key]
        qp, seconds = quantize(model.apply, p, recipe, example, calib)
        rep = jq.report(model.apply, qp, recipe, example)
        counts = report_counts(rep)
        if name == "W8A8":
          w8a8_report = str(rep)
        # Logit SQNR against the float parameters it was quantized from;
        # the evaluator of the recipe's format (its name's first word).
        ppl, sqnr = perplexity(nlls[recipe_key.split()[0]], qp, windows,
                               f"eval {name}",
                               ref=lambda x, p=p: float_logits(p, x))
      rows.append(dict(v, recipe=recipe_key or "-",
                       perplexity=ppl, param_bytes=jq.nbytes(qp),
                       in_scale_range=in_scale_range(qp),
                       int8_matmuls=counts["int8"],
                       weight_only_matmuls=counts["weight_only"],
                       logit_sqnr_db=sqnr, quantize_seconds=seconds))
      log(f"  {name:<34} perplexity {ppl:9.2f}  bytes {jq.nbytes(qp):>11,}"
          + (f"  logit SQNR {sqnr:5.1f} dB  quantized in {seconds:.1f} s"
             if seconds else ""))
  total = sum(report_counts(jq.report(model.apply, params, recs["W8A8"],
                                      example)).values())
  float_ppl = rows[0]["perplexity"]
  for row in rows:  # float: no parameter operand (attention), or float model
    row["float_matmuls"] = total - row["int8_matmuls"] - row[
        "weight_only_matmuls"]
    row["gap_pct"] = 100 * (row["perplexity"] / float_ppl - 1)
  peer_rows, peer_notes = [], []
  if with_peers:
    with timer("peers"):
      peer_rows, peer_notes = peer_comparison(
          model, params, recs, calib, windows, example, float_ppl,
          group_size=cfg.group_size, log=log)
  config = dict(dataclasses.asdict(cfg), seed=seed, vocab=vocab,
                n_params=n_params, eval_tokens=eval_tokens,
                eval_split="valid" if cfg.eval_windows is None else
                f"valid, first {eval_tokens} tokens",
                train_tokens=len(train),
                train_tokens_seen=cfg.steps * cfg.batch * cfg.context,
                calib_tokens=cfg.calib_windows * cfg.context,
                qat_recipe="W4A16: int4, groups of "
                f"{cfg.group_size} along the contraction axis, float acts",
                methods={k: repr(m) for k, m in METHODS.items()},
                backend=jax.default_backend(), cpu_count=os.cpu_count(),
                load_average=[load_before, os.getloadavg()[0]])
  return dict(config=config, results=rows, embedding_selection=selection,
              peers=peer_rows, peer_notes=peer_notes, timings=timer.wall,
              cpu_seconds=timer.cpu,
              train_loss=losses, control_loss=control_losses,
              qat_loss=qat_losses, w8a8_report=w8a8_report)


def in_scale_range(qparams):
  """[min, max] over the `in_scale` of every pre-scaled weight (AWQ's s),
  or None when no weight has one."""
  scales = [np.asarray(leaf.in_scale) for leaf in jax.tree_util.tree_leaves(
      qparams, is_leaf=lambda l: isinstance(l, jq.QArray))
            if isinstance(leaf, jq.QArray) and leaf.in_scale is not None]
  if not scales:
    return None
  return [min(float(s.min()) for s in scales),
          max(float(s.max()) for s in scales)]


def select_embedding(apply_fn, params, calib, holdout, example, nlls,
                     cfg: Config, bit_widths, log=common.log):
  """The tied embedding's rule per (bits, kernel method), chosen on the
  held-out training tokens `holdout` (never the reported split).

  Candidates: the kernels' own method (`SAME`) and each of
  `EMBEDDING_OPTIONS`, all from one calibration pass on `calib` (AWQ's
  recipe, whose statistics, Hessians and per-feature mean |x|, serve every
  candidate). Returns (the table: the held-out token count, float and RTN
  perplexities, and one dict per candidate with its held-out perplexity
  and whether it was chosen; {(bits, method): the option name or
  `SAME`}).
  """
  windows, tokens = eval_windows(holdout, dataclasses.replace(
      cfg, eval_windows=None))
  stats = jq.calibrate(apply_fn, params, weight_only(
      4, cfg.group_size, METHODS["AWQ"]), calib, progress=False)
  float_ppl = perplexity(nlls[None], params, windows, "held-out float")
  log(f"  embedding rule, chosen on {tokens:,} held-out training tokens "
      f"(float perplexity {float_ppl:.2f}):")
  table = dict(tokens=tokens, float_perplexity=float_ppl, rtn_perplexity={},
               rows=[])
  chosen = {}
  for bits in bit_widths:
    rtn = jq.quantize_params(apply_fn, params, weight_only(
        bits, cfg.group_size), example, progress=False)
    table["rtn_perplexity"][bits] = perplexity(
        nlls[recipe_name(bits)], rtn, windows, f"held-out W{bits} RTN")
    for method, kernels in METHODS.items():
      options = {SAME: kernels, **EMBEDDING_OPTIONS}
      scores = {}
      for option, embedding in options.items():
        qp = jq.quantize_params(
            apply_fn, params, weight_only(bits, cfg.group_size, kernels,
                                          embedding),
            example, stats=stats, progress=False)
        scores[option] = perplexity(nlls[recipe_name(bits)], qp, windows,
                                    f"held-out W{bits} {method} {option}")
      best = min(scores, key=scores.get)
      chosen[bits, method] = best
      for option, ppl in scores.items():
        table["rows"].append(dict(bits=bits, kernels=method,
                          embedding=method_label(options[option]),
                          own_method=option == SAME,
                          holdout_perplexity=ppl,
                          holdout_gap_pct=100 * (ppl / float_ppl - 1),
                          chosen=option == best))
      log(f"    W{bits} {method} (RTN {table['rtn_perplexity'][bits]:.2f}): "
          + ", ".join(
              f"{method_label(options[o])} {v:.2f}"
              for o, v in scores.items())
          + f" -> {method_label(options[best])}")
  return table, chosen


def quantize(apply_fn, params, recipe, example, calib, *, cold=False):
  """`jq.quantize_params` (after `jq.calibrate` on `calib` when a rule has
  a method): the quantized tree and the wall seconds of both. `cold`
  clears JAX's compilation caches first, so the time includes all the
  compilation a fresh process would do."""
  if cold:
    jax.clear_caches()
  start = time.perf_counter()
  stats = None
  if uses_method(recipe):
    stats = jq.calibrate(apply_fn, params, recipe, calib, progress=False)
  qp = jq.quantize_params(apply_fn, params, recipe, example, stats=stats,
                          progress=False)
  qp = jax.block_until_ready(qp)
  return qp, time.perf_counter() - start


# Qwix's rule for the side-by-side: every module but the attention module
# itself (whose score einsum Qwix's calibration cannot intercept) and the
# tied embedding (Qwix's PTQ cannot run the lookup of a quantized nn.Embed).
QWIX_MODULES = r"(?!.*attn$)(?!tok_embed$).*"


def peer_comparison(model, params, recs, calib, windows, example, float_ppl,
                    *, group_size: int, bits=(4, 3),
                    methods=("RTN", *METHODS),
                    qwix_methods=("rtn", "gptq", "awq"), log=common.log):
  """Rows for --peers: jaxquant's `methods` ("RTN" and keys of `METHODS`)
  with the embedding float (Qwix's coverage) and Qwix's `qwix_methods` on
  the same calibration batches, at each of `bits` (int4, int3) with groups
  of `group_size`; and notes (what Qwix quantized, and what it could
  not)."""
  rows, notes = [], []
  n_weights = len([1 for path, _ in jax.tree_util.tree_flatten_with_path(
      params)[0] if jax.tree_util.keystr(path).endswith(("kernel']",
                                                        "embedding']"))])

  float_logits = jax.jit(model.apply)
  ref = lambda x: float_logits(params, x)

  def add(library, bits, variant, method, bytes_, ppl_sqnr, seconds,
          by_method, rtn):
    ppl, sqnr = ppl_sqnr
    rows.append(dict(library=library, variant=variant, method=method,
                     bits=bits, perplexity=ppl,
                     gap_pct=100 * (ppl / float_ppl - 1),
                     logit_sqnr_db=sqnr,
                     param_bytes=bytes_, quantize_seconds=seconds,
                     method_weights=by_method, rtn_weights=rtn,
                     float_weights=n_weights - by_method - rtn))
    log(f"  {library:<8} {variant:<20} perplexity {ppl:9.2f}  "
        f"bytes {bytes_:>11,}  logit SQNR {sqnr:5.1f} dB  quantized in "
        f"{seconds:.1f} s")

  for b in bits:
    # One evaluator per format (see `experiment`).
    nll = nll_fn(jq.quantized_apply(model.apply,
                                    recs[recipe_name(b, "RTN", FLOAT)]))
    for method in methods:
      key = recipe_name(b, method, FLOAT)
      recipe = recs[key]
      # Cold, as Qwix's calls are (each builds and compiles its own steps).
      qp, seconds = quantize(model.apply, params, recipe, example, calib,
                             cold=True)
      n = report_counts(jq.report(model.apply, qp, recipe, example))[
          "weight_only"]
      ppl = perplexity(nll, qp, windows, f"eval jaxquant {key}", ref=ref)
      by_method = 0 if method == "RTN" else n
      add("jaxquant", b, f"W{b}A16 (g{group_size}) {method}", method,
          jq.nbytes(qp), ppl, seconds, by_method, n - by_method)
  if not peers.available()["qwix"]:
    notes.append("qwix is not installed: no Qwix rows.")
    log("  qwix not installed: skipped")
    return rows, notes
  for b in bits:
    qtype = jnp.int4 if b == 4 else f"int{b}"
    for method in qwix_methods:
      label = f"W{b}A16 (g{group_size}) {method.upper()}"
      try:
        fn, qp, info = peers.qwix_calibrated(
            model, params, calib, example, method=method, qtype=qtype,
            tile_size=group_size, module_path=QWIX_MODULES)
      except Exception as e:  # noqa: BLE001  (a peer's limitation: recorded)
        notes.append(f"Qwix {label}: failed: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}")
        log(f"  Qwix {label}: failed ({type(e).__name__}: {e})")
        continue
      ppl = perplexity(nll_fn(fn), qp, windows, f"eval Qwix {label}",
                       ref=ref)
      n_method = len(info["method"])
      add("Qwix", b, label, method.upper(), peers.qwix_nbytes(qp), ppl,
          info["calibrate_s"] + info["quantize_s"], n_method,
          len(info["rtn"]))
      if method != "rtn" and info["rtn"]:
        notes.append(f"Qwix {label}: {n_method} weights by "
                     f"{method.upper()}, {len(info['rtn'])} fell back to "
                     f"RTN ({', '.join(info['rtn'])}), float: "
                     f"{', '.join(info['float']) or 'none'}.")
  return rows, notes


def plot(result, path):
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
  # Marker by method; rows whose embedding has its own rule are hollow.
  markers = {"float": "o", "PTQ": "s", "control": "o", "control PTQ": "s",
             "QAT": "*", "GPTQ": "D", "AWQ": "P"}
  colors = plt.get_cmap("tab20").colors
  for i, row in enumerate(result["results"]):
    color = colors[i % len(colors)]
    left.scatter(row["param_bytes"] / 1e6, row["perplexity"],
                 color="none" if row.get("embedding") else color,
                 edgecolors=color, linewidths=1.5,
                 marker="^" if row["recipe"] == "W8A8" else markers.get(
                     row["method"], "o"), s=60,
                 zorder=4 if row["recipe"] == "W8A8" else 3,
                 label=f"{row['variant']}: {row['perplexity']:.2f}")
  left.set_xlim(0, max(r["param_bytes"] for r in result["results"]) * 1.35e-6)
  left.set_xlabel("parameter bytes (MB)")
  left.set_ylabel("validation perplexity")
  left.set_title("perplexity vs size")
  left.grid(alpha=0.3)
  left.legend(fontsize=7, title="validation perplexity", title_fontsize=7)

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


def _seconds(value) -> str:
  return "-" if value is None else f"{value:.1f}"


def _target(met: bool) -> str:
  return "met" if met else "NOT met"


def method_summary(result) -> str:
  """The issue's targets for each calibrated-method row, stated with the
  measured numbers: at W4A16 g32 a perplexity gap to float at most half of
  RTN's; at W3A16 g32 within 5% of float."""
  cfg = result["config"]
  rtn = {r["bits"]: r["gap_pct"] for r in result["results"]
         if r["method"] == "PTQ" and "bits" in r}
  lines = []
  for r in result["results"]:
    if r["method"] not in METHODS or "bits" not in r:
      continue
    gap, bits = r["gap_pct"], r["bits"]
    if bits == 4:
      ratio = gap / rtn[4] if rtn[4] > 0 else float("nan")
      target = (f"{ratio:.2f}x RTN's {rtn[4]:+.2f}% (target <= 0.5x: "
                f"{_target(ratio <= 0.5)})")
    else:
      target = (f"RTN {rtn[bits]:+.2f}% (target within 5% of float: "
                f"{_target(gap <= 5)})")
    lines.append(f"- {r['variant']}: perplexity gap to float {gap:+.2f}%, "
                 f"{target}; quantized in {r['quantize_seconds']:.1f} s\n")
  methods = "; ".join(f"{k} `{v}`" for k, v in cfg["methods"].items())
  return (
      f"Calibrated methods against RTN, same bits and groups:\n\n"
      f"{''.join(lines)}\n"
      f"Calibration: {cfg['calib_windows']} windows of {cfg['context']} "
      f"tokens from the training split ({cfg['calib_tokens']:,} tokens, "
      f"batches of {cfg['calib_batch']}); {methods}.\n\n")


def selection_markdown(result) -> str:
  """The embedding-rule selection table (held-out training tokens)."""
  sel = result.get("embedding_selection")
  if not sel:
    return ""
  rtn = ", ".join(
      f"W{b} RTN {v:.2f} ({100 * (v / sel['float_perplexity'] - 1):+.2f}%)"
      for b, v in sel["rtn_perplexity"].items())
  rows = [dict(bits=f"W{r['bits']}", kernels=r["kernels"],
               embedding=r["embedding"] + (" (kernels' own)"
                                           if r["own_method"] else ""),
               **{"held-out perplexity": r["holdout_perplexity"],
                  "gap vs float": f"{r['holdout_gap_pct']:+.2f}%",
                  "chosen": "yes" if r["chosen"] else ""})
          for r in sel["rows"]]
  return (
      "## The tied embedding's rule, chosen on held-out training tokens\n\n"
      f"Perplexity on the training split's last "
      f"{result['config']['holdout_tokens']:,} tokens ({sel['tokens']:,} "
      f"predicted tokens in non-overlapping windows; no training or "
      f"calibration window touches them), never the valid split. Float "
      f"{sel['float_perplexity']:.2f}; {rtn}. Per bit width and kernel "
      f"method, the embedding's candidate rules (all from one calibration "
      f"pass); the lowest perplexity is chosen, and gets its own row "
      f"above when it is not the kernels' own method.\n\n"
      f"{common.format_table(rows)}\n")


def peer_summary(result) -> str:
  """jaxquant against Qwix per bit width and method (embedding float)."""
  by = {(r["library"], r["bits"], r["method"]): r for r in result["peers"]}
  lines = []
  for (library, bits, method), qwix in by.items():
    ours = by.get(("jaxquant", bits, method))
    if library != "Qwix" or ours is None:
      continue
    lines.append(
        f"- W{bits} {method}: jaxquant {ours['gap_pct']:+.2f}% in "
        f"{ours['quantize_seconds']:.1f} s, Qwix {qwix['gap_pct']:+.2f}% in "
        f"{qwix['quantize_seconds']:.1f} s (jaxquant better or equal: "
        f"{'yes' if ours['perplexity'] <= qwix['perplexity'] else 'NO'})\n")
  return "".join(lines)


def peers_markdown(result) -> str:
  if not result.get("peers") and not result.get("peer_notes"):
    return ""
  float_bytes = result["results"][0]["param_bytes"]
  rows = [dict(library=r["library"], variant=r["variant"],
               perplexity=r["perplexity"],
               **{"gap vs float": f"{r['gap_pct']:+.2f}%",
                  "param bytes": f"{r['param_bytes']:,}",
                  "vs float": f"{r['param_bytes'] / float_bytes:.3f}",
                  "logit SQNR dB": f"{r['logit_sqnr_db']:.1f}",
                  "weights: method / RTN / float":
                      f"{r['method_weights']} / {r['rtn_weights']} / "
                      f"{r['float_weights']}",
                  "quantize s": _seconds(r["quantize_seconds"])})
          for r in result["peers"]]
  notes = "".join(f"- {n}\n" for n in result.get("peer_notes", []))
  return (
      "## Side by side with Qwix (embedding float)\n\n"
      "Same float model, calibration batches, bits and group size "
      f"({result['config']['group_size']} along the contraction axis), "
      "weight-only. Qwix cannot quantize the "
      "tied `nn.Embed` here (its PTQ provider hands the quantized wrapper "
      "to the lookup, which fails), and its GPTQ / AWQ calibration only "
      "sees dot_generals with one contracted axis, so the attention output "
      "kernels `(heads, dh, d)` fall back to Qwix RTN; the jaxquant rows "
      "here leave the embedding float too (GPTQ / AWQ on all 12 block "
      "kernels). "
      "Grids differ: jaxquant int4 / int3 use +-7 / +-3 with scale "
      "absmax/7 (/3); Qwix uses scale absmax/7.5 (/3.5), int3 codes clipped "
      "to [-4, 3] and stored in int4. Qwix's GPTQ has no act_order and runs "
      "column by column eagerly (as shipped). Both AWQs search the exponent "
      "of s = mean|x|^alpha on a grid of 20 per weight; Qwix scores it by "
      "the weight error weighted by mean|x| per input feature, jaxquant by "
      "the output error on the calibration Hessian, tr(D H D^T). Both "
      "libraries' times include all their compilation (jaxquant's rows "
      "start from cleared caches). Weights: of the 13 matmul weights (12 "
      "kernels + embedding), quantized by the named method / by RTN / left "
      "float.\n\n"
      f"{common.format_table(rows) if rows else ''}\n{notes}\n"
      "jaxquant against Qwix, same method and bits (perplexity gap to "
      "float, quantization wall time):\n\n"
      f"{peer_summary(result)}\n")


def markdown(result) -> str:
  cfg, t, cpu = result["config"], result["timings"], result["cpu_seconds"]
  float_bytes = result["results"][0]["param_bytes"]
  rows = [dict(variant=r["variant"], method=r["method"],
               perplexity=r["perplexity"],
               **{"gap vs float": f"{r['gap_pct']:+.2f}%",
                  "param bytes": f"{r['param_bytes']:,}",
                  "vs float": f"{r['param_bytes'] / float_bytes:.3f}",
                  "int8 / weight-only / float matmuls":
                      f"{r['int8_matmuls']} / {r['weight_only_matmuls']} / "
                      f"{r['float_matmuls']}",
                  "logit SQNR dB": "-" if r.get("logit_sqnr_db") is None
                  else f"{r['logit_sqnr_db']:.1f}",
                  "quantize s": _seconds(r.get("quantize_seconds"))})
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
      f"{cfg['train_tokens_seen'] / cfg['train_tokens']:.2f} epochs of the "
      f"training split less its last {cfg['holdout_tokens']:,} tokens, held "
      f"out). "
      f"Perplexity on {cfg['eval_split']} ({cfg['eval_tokens']:,} tokens, "
      f"non-overlapping {cfg['context']}-token windows). "
      f"QAT and control: {cfg['qat_steps']} more steps (lr "
      f"{cfg['qat_lr']}); QAT recipe {cfg['qat_recipe']}. All matmul "
      f"weights quantized, the tied embedding included; W8 per output "
      f"channel, A8 per token; W4 / W3 in groups of {cfg['group_size']} "
      f"along the contraction axis. Seed {cfg['seed']}, "
      f"{cfg['backend']}.\n\n"
      f"{table}\n"
      f"Matmul counts from `jq.report`; the float ones are the attention "
      f"score / value products (no parameter operand). logit SQNR: the "
      f"quantized model's logits against those of the float parameters it "
      f"was quantized from, over all eval tokens. quantize s: wall "
      f"seconds of `jq.calibrate` (GPTQ / AWQ rows) + "
      f"`jq.quantize_params`, compilation included (a later row of the "
      f"same shapes and format reuses what an earlier one compiled).\n\n"
      f"{method_summary(result)}"
      f"{selection_markdown(result)}"
      f"Timings (wall, and CPU seconds of all threads): {times}; total "
      f"{cfg['seconds']:.1f} s on {cfg['cpu_count']} cores, load average "
      f"{cfg['load_average'][0]:.1f} at start / {cfg['load_average'][1]:.1f} "
      f"at end.\n\n"
      f"{peers_markdown(result)}"
      f"## jq.report, W8A8\n\n```\n{result['w8a8_report']}\n```\n")


def figures(result) -> dict:
  return {"ptb_lm.png": lambda path: plot(result, path)}


def parser():
  p = common.parser(__doc__, NAME,
                    quick="tiny model, few steps, small eval subset (CI)")
  p.add_argument("--steps", type=int, default=None,
                 help="float training steps (default: 1300, quick 30)")
  p.add_argument("--peers", action="store_true",
                 help="also quantize with Qwix RTN / GPTQ / AWQ (peers extra)")
  return p


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
