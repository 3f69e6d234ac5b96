"""all-MiniLM-L6-v2 sentence embeddings: float against W8A8, W4A16, W8A16,
fp8 W8A8, nf4 W4A16; round-to-nearest against GPTQ and AWQ at 4 and 3 bits,
and against SmoothQuant for W8A8 with static activation scales.

  python -m experiments.minilm [--quick] [--out DIR] [--seed S] [--rounds N]
                               [--repeats N]

Variants (every `nn.Dense` kernel; embeddings, LayerNorms and biases stay
float; the two attention einsums per layer have no parameter operand and
always run in float):

  float   the float32 model
  W8A8    int8 weights, one scale per output channel; int8 activations,
          one dynamic scale per token: int8 x int8 -> int32 matmuls
  W4A16   int4 weights, one scale per group of 32 inputs (32 divides both
          contraction sizes, 384 and 1536); dequantized, float matmul
  W8A16   int8 per-channel weights; dequantized, float matmul
  fp8 W8A8
          fp8_e4m3 weights (one scale per output channel, absmax -> 448) and
          fp8_e4m3 activations (one dynamic scale per token): the engine's
          "fp8" mode, fp8-rounded operands in an exact float32 dot
  nf4 W4A16 g32, nf4 W4A16 g64
          nf4 codebook weights (QLoRA's normal-float 4-bit), one absmax
          scale per group of 32 (as W4A16) or 64 (QLoRA's default) inputs;
          dequantized, float matmul
  W4A16 (g32) GPTQ / AWQ, W4A16 (g128) [GPTQ / AWQ], W3A16 (g32)
  [GPTQ / AWQ]
          int4 / int3 weights in groups of 32 or 128 inputs (128 divides 384
          and 1536 too), rounded to nearest (RTN; "W4A16" is the g32 RTN
          twin), by GPTQ (`jq.gptq()` defaults: block 128, damp 0.01,
          act_order) or by AWQ (`jq.awq()` defaults: 20 alphas searched per
          layer on the calibration Hessian); float activations
  W8A8 static [SmoothQuant 0.5 / 0.8]
          int8 per-channel weights, int8 activations with one static scale
          per tensor from calibration, rounded to nearest or smoothed first
          by `jq.smoothquant(alpha)` (alpha 0.5, the paper's default, and
          0.8); int8 x int8 -> int32 matmuls

  Method settings are fixed before any evaluation. Every calibrated
  variant (`calibrated`) calibrates on CALIBRATION_SENTENCES held-out Lee
  sentences (`calibration_sentences`: none of them is evaluated), each cut
  to its first CALIBRATION_LENGTH tokens so that no padding enters the
  statistics; its `jq.calibrate` + `jq.quantize_params` are timed (first
  call, wall and CPU seconds). --quick runs W4A16 (g32) GPTQ and AWQ (their
  twin W4A16 always runs), W8A8 static and its SmoothQuant 0.8 of these
  (QUICK_KEEP).

Metrics:
  - Spearman rank correlation between the cosine similarity of the two
    words' embeddings and the human score, on WordSim353 and SimLex-999
    (gensim's test data), and its difference to float; plus its spread
    over --repeats re-runs with 1e-5 relative noise on the word embeddings,
    which leaves float unchanged but re-draws the activation rounding of
    the variants that quantize activations (see `spearman_noise_floor`):
    the noise floor of that difference;
  - cosine similarity of each sentence's embedding to the float embedding,
    over sentences of gensim's Lee news corpus (mean and min);
  - embeddings per second on this machine's CPU: one fixed batch of Lee
    sentences, variants interleaved in rounds (`common.time_rounds`: a
    fresh random order per round), each timed as the median of a few
    calls; the speed-up is the median over rounds of float time / variant
    time in the same round. CPU speed and XLA's int8 kernels vary between
    machines: compare ratios, not absolutes;
  - parameter bytes (`jq.nbytes`, all parameters, and the Dense kernels
    alone) and `jq.report`'s count of matmuls that ran int8 / fp8 /
    weight-only / float;
  - quantization wall seconds (`jq.calibrate` + `jq.quantize_params`, first
    call, compilation included) and, in the full run, each method's
    per-matmul output SQNR gain over RTN (`jq.layer_report(...)
    .gain_over_rtn`, on 32 evaluated sentences cut to CALIBRATION_LENGTH
    tokens: no padding).

Writes results.md, results.json and minilm.png to results/minilm/ (or
--out) and prints the table. The full run uses all 353 + 999 pairs, 512
sentences, 7 timing rounds of 5 calls and 8 noise-floor repeats (36 min
on 2 cores shared with other jobs, load average about 8); --quick (CI,
about 1.2 min there) 60 pairs per word set (their words in one batch
padded to a multiple of 8 tokens, not 16), 32 sentences cut to their
first 32 tokens (QUICK_MAX_LENGTH), one timing round of one call (no
warm-up call) and no repeats. --seed (default 0) seeds the
noise-floor perturbations and the timing order.
"""

from __future__ import annotations

import os
import platform
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from experiments import common, data
from experiments.minilm_model import load_minilm

NAME = "minilm"
GROUP_SIZE = 32  # divides 384 (hidden) and 1536 (intermediate)
NF4_GROUP_SIZE = 64  # QLoRA's default; also divides both
RECIPES = {
    "float": None,
    "W8A8": jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())]),
    "W4A16": jq.Recipe([jq.Rule(r".*kernel",
                                weight=jq.int4(group_size=GROUP_SIZE))]),
    "W8A16": jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8())]),
    "fp8 W8A8": jq.Recipe([jq.Rule(r".*kernel", weight=jq.fp8_e4m3(),
                                   act=jq.fp8_e4m3())]),
    f"nf4 W4A16 g{GROUP_SIZE}": jq.Recipe([jq.Rule(
        r".*kernel", weight=jq.nf4(group_size=GROUP_SIZE))]),
    f"nf4 W4A16 g{NF4_GROUP_SIZE}": jq.Recipe([jq.Rule(
        r".*kernel", weight=jq.nf4(group_size=NF4_GROUP_SIZE))]),
}
WIDE_GROUP_SIZE = 128  # the GPTQ and AWQ papers' group size; divides both
# Calibrated weight rounding against round-to-nearest (RTN), weight-only:
# (RTN twin, label, spec); each method's variant is f"{label} {method}".
LOW_BIT = (("W4A16", f"W4A16 (g{GROUP_SIZE})", jq.int4(group_size=GROUP_SIZE)),
           (f"W4A16 (g{WIDE_GROUP_SIZE})", f"W4A16 (g{WIDE_GROUP_SIZE})",
            jq.int4(group_size=WIDE_GROUP_SIZE)),
           (f"W3A16 (g{GROUP_SIZE})", f"W3A16 (g{GROUP_SIZE})",
            jq.int3(group_size=GROUP_SIZE)))
# Default settings of each, fixed before looking at any evaluation number:
# GPTQ block 128, damp 0.01, act_order; AWQ 20 alphas searched per layer on
# the calibration Hessian.
WEIGHT_METHODS = {"GPTQ": jq.gptq(), "AWQ": jq.awq()}
# W8A8 with one static activation scale per tensor (calibrated: what
# SmoothQuant is for), rounded to nearest or smoothed first. Both alphas
# fixed before any evaluation: 0.5 (the paper's default) and 0.8 (the paper
# suggests a larger alpha, such as 0.75, where activation outliers are
# stronger).
STATIC_W8A8 = "W8A8 static"
SMOOTHQUANT = {"SmoothQuant 0.5": jq.smoothquant(0.5),
               "SmoothQuant 0.8": jq.smoothquant(0.8)}
# Method variant -> its RTN twin (same spec, same execution; GPTQ's bytes
# too, AWQ and SmoothQuant add a float32 pre-scale per input feature), and
# -> its method.
METHOD_TWINS, METHODS = {}, {}
for _rtn, _label, _spec in LOW_BIT:
  if _rtn not in RECIPES:
    RECIPES[_rtn] = jq.Recipe([jq.Rule(r".*kernel", weight=_spec)])
  for _method, _how in WEIGHT_METHODS.items():
    _name = f"{_label} {_method}"
    RECIPES[_name] = jq.Recipe([jq.Rule(r".*kernel", weight=_spec,
                                        method=_how)])
    METHOD_TWINS[_name], METHODS[_name] = _rtn, _how
RECIPES[STATIC_W8A8] = jq.Recipe([jq.Rule(
    r".*kernel", weight=jq.int8(), act=jq.int8(granularity="tensor"))])
for _method, _how in SMOOTHQUANT.items():
  _name = f"{STATIC_W8A8} {_method}"
  RECIPES[_name] = jq.Recipe([jq.Rule(
      r".*kernel", weight=jq.int8(), act=jq.int8(granularity="tensor"),
      method=_how)])
  METHOD_TWINS[_name], METHODS[_name] = STATIC_W8A8, _how
# --quick runs one variant of each method beside its RTN twin (SmoothQuant
# 0.8: on MiniLM 0.5 loses to RTN, see results/minilm).
# AWQ is left out of --quick for CI's time (tests/test_awq.py and MNIST's
# quick run cover it).
QUICK_KEEP = ("W4A16", f"W4A16 (g{GROUP_SIZE}) GPTQ", STATIC_W8A8,
              f"{STATIC_W8A8} SmoothQuant 0.8")
QUICK_SKIP = tuple(n for n in RECIPES if n not in QUICK_KEEP and (
    n in METHOD_TWINS or n in METHOD_TWINS.values()))
CALIBRATION_SENTENCES = 128  # calibration: held-out Lee sentences
CALIBRATION_LENGTH = 32  # tokens each (the first 32: no padding in H)
CALIBRATION_BATCH = 32
EVAL_SENTENCES = {True: 32, False: 512}  # --quick, full
MATMUL_MODES = ("int8", "fp8", "weight-only", "float")
WORD_SETS = ("wordsim353", "simlex999")
MAX_LENGTH = 128  # tokens per text, as `minilm_model.encode`
QUICK_MAX_LENGTH = 32  # --quick: sentences cut to their first 32 tokens
JITTER_EPS = 1e-5  # relative noise on the word embeddings (noise floor)
SPEED_NOTE = ("Embeddings/s are CPU-dependent (measured on {cpu}, {cores} "
              "cores, batch {batch} x {length} tokens, 1-min load average "
              "{load:.1f}): compare the speed-up column, not the absolute "
              "numbers, across machines.")


# ------------------------------------------------------------------ data


def split_sentences(document: str) -> list[str]:
  """Sentences of a news document: split after . ! ? followed by space."""
  parts = re.split(r"(?<=[.!?])\s+", document.strip())
  return [p for p in parts if len(p.split()) >= 3]


def lee_sentences(count: int) -> list[str]:
  """`count` sentences spread evenly over the Lee corpus (all if fewer)."""
  sentences = [s for doc in data.load_lee_corpus()
               for s in split_sentences(doc)]
  if count >= len(sentences):
    return sentences
  return [sentences[i] for i in np.linspace(0, len(sentences) - 1, count,
                                            dtype=int)]


def token_counts(tokenizer, texts) -> list[int]:
  """Untruncated token count of each text ([CLS] and [SEP] included)."""
  tokenizer.no_truncation()
  return [len(e.ids) for e in tokenizer.encode_batch(list(texts))]


def calibration_sentences(tokenizer, count: int = CALIBRATION_SENTENCES,
                          length: int = CALIBRATION_LENGTH) -> list[str]:
  """`count` Lee sentences for calibration, none of them evaluated.

  The pool: the corpus's distinct sentences that are not among the
  sentences either run size evaluates (`lee_sentences` of EVAL_SENTENCES;
  the word-similarity pairs are single words) and that have at least
  `length` tokens, so that `calibration_batches` can cut every one to
  exactly `length` tokens without padding. `count` of them, spread evenly
  over the pool: the same set for --quick and the full run.
  """
  evaluated = {s for n in EVAL_SENTENCES.values() for s in lee_sentences(n)}
  held_out = list(dict.fromkeys(
      s for doc in data.load_lee_corpus() for s in split_sentences(doc)
      if s not in evaluated))
  pool = [s for s, n in zip(held_out, token_counts(tokenizer, held_out))
          if n >= length]
  if len(pool) < count:
    raise ValueError(f"only {len(pool)} held-out sentences of >= {length} "
                     f"tokens, {count} wanted")
  return [pool[i] for i in np.linspace(0, len(pool) - 1, count, dtype=int)]


def calibration_batches(tokenizer, texts, length: int = CALIBRATION_LENGTH,
                        batch_size: int = CALIBRATION_BATCH):
  """(input_ids, attention_mask, token_type_ids) batches of `texts` cut to
  their first `length` tokens ([CLS] ... [SEP]): every row is full, so the
  statistics `jq.calibrate` gathers (activation ranges, per-feature |x|,
  Hessians) hold no padding positions (and all batches have the one shape
  `jq.calibrate` requires)."""
  tokenizer.enable_truncation(max_length=length)
  encodings = tokenizer.encode_batch(list(texts))
  if any(len(e.ids) != length for e in encodings):
    raise ValueError(f"a calibration sentence has fewer than {length} tokens")
  arrays = np.array([(e.ids, e.attention_mask, e.type_ids)
                     for e in encodings], np.int32)  # (n, 3, length)
  return [tuple(arrays[i:i + batch_size].transpose(1, 0, 2))
          for i in range(0, len(arrays), batch_size)]


def word_pairs(count: int | None) -> dict[str, list]:
  """Each word set, or `count` of its pairs spread evenly over it."""
  sets = data.load_word_similarity()
  out = {}
  for name in WORD_SETS:
    pairs = sets[name]
    if count is not None and count < len(pairs):
      pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, count,
                                             dtype=int)]
    out[name] = pairs
  return out


def tokenize(tokenizer, texts, batch_size: int, multiple: int = 16,
             max_length: int = MAX_LENGTH):
  """Batches of (input_ids, attention_mask, token_type_ids) int32 arrays.

  Like `minilm_model.encode`: truncated to `max_length` (MAX_LENGTH) tokens
  and padded to a multiple of `multiple` (16, as `encode`). The last batch
  is padded with empty rows (mask 0) to `batch_size`, so each variant
  compiles once per padded length. Tokenized once and shared by all
  variants.
  """
  tokenizer.enable_truncation(max_length=max_length)
  batches = []
  for start in range(0, len(texts), batch_size):
    encodings = tokenizer.encode_batch(list(texts[start:start + batch_size]))
    longest = max(len(e.ids) for e in encodings)
    length = min(-(-longest // multiple) * multiple, max_length)
    arrays = np.zeros((3, batch_size, length), np.int32)
    for row, e in enumerate(encodings):
      arrays[:, row, :len(e.ids)] = (e.ids, e.attention_mask, e.type_ids)
    batches.append(tuple(arrays))
  return batches


def embed(fn, params, batches, count: int) -> np.ndarray:
  """The first `count` embeddings (dropping the padding rows)."""
  out = np.concatenate([np.asarray(fn(params, *b)) for b in batches])
  return out[:count].astype(np.float32)


# -------------------------------------------------------------- variants


EXAMPLE = (jnp.ones((1, 16), jnp.int32),) * 2 + (jnp.zeros((1, 16),
                                                           jnp.int32),)


def method_name(recipe) -> str | None:
  """"gptq" / "awq" / "smoothquant", "rtn" (rounded to nearest), None for
  the float model."""
  if recipe is None:
    return None
  methods = {r.method.name for r in recipe.rules if r.method is not None}
  return methods.pop() if methods else "rtn"


def calibrated(recipe) -> bool:
  """Whether the variant needs `jq.calibrate`: a method (its statistics) or
  per-tensor activation scales (static here: calibrated ranges)."""
  return recipe is not None and any(
      r.method is not None
      or (r.act is not None and r.act.granularity == "tensor")
      for r in recipe.rules)


def build_variants(module, variables, names, calibration=None):
  """(name -> (jitted apply, params, report or None), name -> seconds,
  name -> calibration stats).

  seconds: {"calibrate", "quantize", "total"} wall seconds and
  "total_cpu" process CPU seconds of `jq.calibrate` (`calibrated` variants,
  on the `calibration` batches; 0 for the others) and
  `jq.quantize_params`, each variant on its own from float params, first
  call (tracing and compilation included): what a user waits.
  """
  variants, seconds, stats = {}, {}, {}
  for name in common.progress(names, desc="quantizing"):
    recipe = RECIPES[name]
    if recipe is None:
      variants[name] = (jax.jit(module.apply), variables, None)
      continue
    timer = common.Timer()
    with timer("total"):
      if calibrated(recipe):
        with timer("calibrate"):
          stats[name] = jax.block_until_ready(jq.calibrate(
              module.apply, variables, recipe, calibration, progress=False))
      with timer("quantize"):
        qparams = jax.block_until_ready(jq.quantize_params(
            module.apply, variables, recipe, *EXAMPLE, stats=stats.get(name),
            progress=False))
    seconds[name] = {"calibrate": timer.wall.get("calibrate", 0.0),
                     "quantize": timer.wall["quantize"],
                     "total": timer.wall["total"],
                     "total_cpu": timer.cpu["total"]}
    rep = jq.report(module.apply, qparams, recipe, *EXAMPLE)
    variants[name] = (jax.jit(jq.quantized_apply(module.apply, recipe)),
                      qparams, rep)
  return variants, seconds, stats


def method_layer_gains(module, variables, names, stats, batch) -> dict:
  """Method variant -> per-matmul output SQNR gain over its RTN twin (dB,
  path -> gain), from `jq.layer_report` on `batch` with the variant's
  calibration `stats` (re-runs the method; full run only)."""
  gains = {}
  for name in common.progress(names, desc="layer reports"):
    rep = jq.layer_report(module.apply, variables, RECIPES[name], *batch,
                          stats=stats[name])
    gains[name] = {r.path: r.gain_over_rtn for r in rep.rows}
  return gains


def kernel_bytes(params) -> int:
  layers = params["params"]
  return jq.nbytes({k: {d: v["kernel"] for d, v in layer.items()
                        if "kernel" in v}
                    for k, layer in layers.items() if k.startswith("layer_")})


def matmul_counts(rep, total: int) -> dict:
  if rep is None:  # the float model: every matmul is float
    return {mode: total if mode == "float" else 0 for mode in MATMUL_MODES}
  return {mode: rep.count(mode) for mode in MATMUL_MODES}


# --------------------------------------------------------------- metrics


def spearman(a, b) -> float:
  from scipy.stats import spearmanr
  return float(spearmanr(a, b).statistic)


def word_spearman(emb: dict, pairs) -> float:
  cosine = [float(emb[w1] @ emb[w2]) for w1, w2, _ in pairs]
  return spearman(cosine, [score for *_, score in pairs])


def timing(variants, batch, rounds: int, calls: int, seed: int = 0,
           warmup: bool = True):
  """Seconds per batch per round (`common.time_rounds`: every variant once
  per round, in a fresh random order)."""
  return common.time_rounds(
      {name: (fn, (params, *batch)) for name, (fn, params, _) in
       variants.items()}, rounds, calls, seed=seed, desc="timing rounds",
      warmup=warmup)


def with_perturbed_embeddings(params, eps: float, seed: int):
  """`params` with the word-embedding table scaled by (1 + eps N(0, 1))."""
  inner = params["params"]
  table = inner["word_embeddings"]["embedding"]
  noise = jax.random.normal(jax.random.key(seed), table.shape, table.dtype)
  return {"params": {**inner, "word_embeddings": {
      "embedding": table * (1 + eps * noise)}}}


def noise_floor_variants(names) -> list[str]:
  """float and the variants that quantize activations: their Spearman moves
  when the inputs move by 1e-5 (see `spearman_noise_floor`)."""
  return [n for n in names if RECIPES[n] is None
          or any(r.act is not None for r in RECIPES[n].rules)]


def spearman_noise_floor(variants, names, words, word_batches, pairs,
                         repeats: int, eps: float = JITTER_EPS,
                         seed: int = 0) -> dict:
  """Spearman rho per word set after `repeats` tiny input perturbations.

  Activation quantization is chaotic: a 1e-7 relative change of one
  activation (e.g. XLA summing a row differently in another batch shape)
  can move a value across a rounding boundary, and that one step changes
  later rounding decisions (with dynamic scales, every value sharing the
  scale may move). The float model does not move (embedding cosine >
  0.9999999), W8A8 word embeddings move by up to 1 - cos ~ 0.01. The
  spread of rho over perturbations is the noise floor of the 'd vs float'
  columns.
  """
  out = {name: {s: [] for s in WORD_SETS} for name in names}
  for key in common.progress(range(seed, seed + repeats),
                             desc="noise floor"):
    for name in names:
      fn, params, _ = variants[name]
      emb = dict(zip(words, embed(fn, with_perturbed_embeddings(
          params, eps, key), word_batches, len(words))))
      for s in WORD_SETS:
        out[name][s].append(word_spearman(emb, pairs[s]))
  return out


# ------------------------------------------------------------------ main


def run(args) -> dict:
  """{"setup", "note", "results": variant -> metrics}: results.json."""
  rounds = args.rounds or (1 if args.quick else 7)
  repeats = args.repeats if args.repeats is not None else (
      0 if args.quick else 8)
  calls = 1 if args.quick else 5  # quick: a smoke test of the timing
  timer = common.Timer()
  with timer("run"):
    results, setup = evaluate(args.quick, rounds, calls, repeats, args.seed)
  setup["wall_seconds"] = timer.wall["run"]
  note = SPEED_NOTE.format(cpu=setup["cpu"], cores=setup["cpu_count"],
                           batch=setup["speed_batch_shape"][0],
                           length=setup["speed_batch_shape"][1],
                           load=setup["load_average_1min"])
  return {"setup": setup, "note": note, "results": results}


def evaluate(quick: bool, rounds: int, calls: int, repeats: int,
             seed: int = 0):
  module, variables, tokenizer = load_minilm()
  pairs = word_pairs(60 if quick else None)
  sentences = lee_sentences(EVAL_SENTENCES[quick])
  words = sorted({w for ps in pairs.values() for w1, w2, _ in ps
                  for w in (w1, w2)})
  calib_sentences = calibration_sentences(tokenizer)
  assert not set(calib_sentences) & (set(sentences) | set(words))
  calibration = calibration_batches(tokenizer, calib_sentences)
  if quick:
    # One batch of the words (219 here: 224 rows), padded to a multiple of
    # 8 tokens (the words are 3 to 6 tokens with [CLS] and [SEP]): 0.44x the
    # tokens of the full run's 256 x 16 batches, whose compute (variants x
    # tokens) dominates the quick run's forward passes. The attention mask
    # and the mean pooling skip padding either way.
    word_batches = tokenize(tokenizer, words, -(-len(words) // 32) * 32, 8)
  else:
    word_batches = tokenize(tokenizer, words, 256)
  # (--quick: cut to 32 tokens, half the padded 32 x 64 batch the full
  # sentences need; this batch is also the timing batch)
  max_length = QUICK_MAX_LENGTH if quick else MAX_LENGTH
  sentence_batches = tokenize(tokenizer, sentences, 32,
                              max_length=max_length)
  speed_batch = sentence_batches[0]

  names = [n for n in RECIPES if not (quick and n in QUICK_SKIP)]
  variants, quant_seconds, stats = build_variants(module, variables, names,
                                                  calibration)
  gains, layer_batch = {}, None
  if not quick:
    # Per-layer SQNR on evaluated sentences, but unpadded: the pad
    # positions' activations (half of a padded batch) enter no embedding
    # and no Hessian, yet would dominate a padded batch's per-layer error
    # (median gain over RTN -3 dB on the padded first batch, +4 dB here).
    layer_batch = calibration_batches(tokenizer, [
        s for s, n in zip(sentences, token_counts(tokenizer, sentences))
        if n >= CALIBRATION_LENGTH][:CALIBRATION_BATCH])[0]
    gains = method_layer_gains(module, variables,
                               [n for n in names if n in METHOD_TWINS],
                               stats, layer_batch)
  total_matmuls = len(variants["W8A8"][2].ops)
  word_emb, sent_emb = {}, {}
  for name in common.progress(variants, desc="variants"):
    fn, params, _ = variants[name]
    word_emb[name] = dict(zip(words, embed(fn, params, word_batches,
                                           len(words))))
    sent_emb[name] = embed(fn, params, sentence_batches, len(sentences))

  # (--quick: no warm-up call, the sentence embeddings above ran each
  # variant on this batch already)
  seconds = timing(variants, speed_batch, rounds, calls, seed,
                   warmup=not quick)
  load = os.getloadavg()[0]
  floor = spearman_noise_floor(variants, noise_floor_variants(names), words,
                               word_batches, pairs, repeats, seed=seed)
  n_batch = speed_batch[0].shape[0]

  ref = sent_emb["float"]
  results = {}
  for name, (_, params, rep) in variants.items():
    cosine = np.sum(sent_emb[name] * ref, axis=1)
    rho = {s: word_spearman(word_emb[name], pairs[s]) for s in WORD_SETS}
    ratios = [f / v for f, v in zip(seconds["float"], seconds[name])]
    results[name] = {
        "spearman": rho,
        "cosine_to_float": cosine,
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "seconds_per_batch": seconds[name],
        "embeddings_per_s": n_batch / statistics.median(seconds[name]),
        "speedup_vs_float": statistics.median(ratios),
        "speedup_per_round": ratios,
        "param_bytes": jq.nbytes(params),
        "kernel_bytes": kernel_bytes(params),
        "matmuls": matmul_counts(rep, total_matmuls),
        "report": None if rep is None else str(rep),
        "quantize_seconds": quant_seconds.get(name),
        "method": method_name(RECIPES[name]),
        "rtn_twin": METHOD_TWINS.get(name),
    }
    if name in gains:
      g = list(gains[name].values())
      results[name]["layer_gain_over_rtn_db"] = gains[name]
      results[name]["layer_gain_summary_db"] = {
          "median": float(np.median(g)), "min": float(np.min(g)),
          "max": float(np.max(g))}
  for name, rhos in floor.items():
    results[name]["spearman_perturbed"] = rhos
  for name in results:
    results[name]["spearman_diff"] = {
        s: results[name]["spearman"][s] - results["float"]["spearman"][s]
        for s in WORD_SETS}
  setup = {
      "quick": quick, "seed": seed, "rounds": rounds, "calls_per_round": calls,
      "word_pairs": {s: len(p) for s, p in pairs.items()},
      "unique_words": len(words), "sentences": len(sentences),
      "sentence_max_tokens": max_length,
      "speed_batch_shape": list(speed_batch[0].shape),
      "w4_group_size": GROUP_SIZE, "nf4_group_sizes": [GROUP_SIZE,
                                                         NF4_GROUP_SIZE],
      "methods": {name: repr(METHODS[name]) for name in names
                  if name in METHODS},
      "rtn_twins": {n: t for n, t in METHOD_TWINS.items() if n in names},
      "calibration": {"sentences": len(calib_sentences),
                      "tokens_each": CALIBRATION_LENGTH,
                      "batches": len(calibration),
                      "source": "gensim Lee background corpus, sentences "
                      f"not evaluated, >= {CALIBRATION_LENGTH} tokens, cut "
                      f"to {CALIBRATION_LENGTH}"},
      "layer_gain_batch": (
          f"the first {layer_batch[0].shape[0]} evaluated sentences of >= "
          f"{CALIBRATION_LENGTH} tokens, cut to {CALIBRATION_LENGTH} (no "
          "padding)" if gains else None),
      "noise_floor_repeats": repeats, "noise_floor_eps": JITTER_EPS,
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "backend": jax.default_backend(),
      "load_average_1min": load,  # right after the timing rounds
  }
  return results, setup


def table_rows(results) -> list[dict]:
  rows = []
  for name, r in results.items():
    m = r["matmuls"]
    rows.append({
        "variant": name,
        "WordSim353 rho": f"{r['spearman']['wordsim353']:.4f}",
        "WS353 d": f"{r['spearman_diff']['wordsim353']:+.4f}",
        "SimLex-999 rho": f"{r['spearman']['simlex999']:.4f}",
        "SL999 d": f"{r['spearman_diff']['simlex999']:+.4f}",
        "cos mean": f"{r['cosine_mean']:.4f}",
        "cos min": f"{r['cosine_min']:.4f}",
        "emb/s": f"{r['embeddings_per_s']:.0f}",
        "speed-up": f"{r['speedup_vs_float']:.2f}x",
        "param MB": f"{r['param_bytes'] / 1e6:.1f}",
        "Dense kernel MB": f"{r['kernel_bytes'] / 1e6:.2f}",
        "matmuls int8/fp8/w-only/float":
            f"{m['int8']}/{m['fp8']}/{m['weight-only']}/{m['float']}",
        "quantize s": ("-" if r.get("quantize_seconds") is None
                       else f"{r['quantize_seconds']['total']:.1f}"),
    })
  return rows


def method_groups(results) -> dict[str, list[str]]:
  """RTN twin -> its method variants that ran, in table order."""
  groups = {}
  for name, twin in METHOD_TWINS.items():
    if name in results:
      groups.setdefault(twin, []).append(name)
  return groups


def method_rows(results) -> list[dict]:
  """One row per RTN twin and per method variant beside it."""
  rows = []
  for twin, names in method_groups(results).items():
    base = 1 - results[twin]["cosine_mean"]
    for name in (twin, *names):
      r, err = results[name], 1 - results[name]["cosine_mean"]
      s, gain = r["quantize_seconds"], r.get("layer_gain_summary_db")
      rows.append({
          "variant": name, "method": r["method"],
          "1 - mean cos": f"{err:.4f}", "x RTN": f"{err / base:.2f}x",
          "WordSim353 rho": f"{r['spearman']['wordsim353']:.4f}",
          "SimLex-999 rho": f"{r['spearman']['simlex999']:.4f}",
          "calibrate s": f"{s['calibrate']:.1f}",
          "quantize_params s": f"{s['quantize']:.1f}",
          "total s (CPU s)": f"{s['total']:.1f} ({s['total_cpu']:.0f})",
          "layer gain over RTN dB, median (min, max)": (
              "-" if gain is None else f"{gain['median']:+.1f} "
              f"({gain['min']:+.1f}, {gain['max']:+.1f})")})
  return rows


def methods_text(results, setup) -> str:
  """RTN vs GPTQ vs AWQ, RTN vs SmoothQuant: settings, calibration, table."""
  if not method_groups(results):
    return ""
  info = setup["calibration"]
  methods = ", ".join(f"`{how}`"
                      for how in dict.fromkeys(setup["methods"].values()))
  return (
      "\nCalibrated methods against round-to-nearest (RTN) of the same spec "
      "and execution: " + methods + " (settings fixed before any "
      "evaluation; AWQ and SmoothQuant store one float32 pre-scale per "
      "input feature more, which the engine divides the activation by). "
      "'W8A8 static': int8 "
      "per-channel weights, int8 activations with one static scale per "
      "tensor (calibrated min/max; SmoothQuant's range is that of x / s). "
      f"All calibrate on {info['sentences']} held-out Lee corpus sentences "
      "(none of the evaluated sentences; at least "
      f"{info['tokens_each']} tokens each, cut to their first "
      f"{info['tokens_each']} so no padding enters the statistics; "
      f"{info['batches']} batches). Seconds: wall time of `jq.calibrate` + "
      "`jq.quantize_params` for the variant, first call, compilation "
      "included, on a shared machine (weight-only RTN rows: "
      "`jq.quantize_params` alone). Layer gain: per-matmul output SQNR gain "
      "over RTN (`jq.layer_report(...).gain_over_rtn`)"
      + (f" on {setup['layer_gain_batch']}" if setup["layer_gain_batch"]
         else ", full run only")
      + ".\n\n" + common.format_table(method_rows(results)))


def speed_spread(results) -> str:
  parts = [f"{name} {min(r['speedup_per_round']):.2f}-"
           f"{max(r['speedup_per_round']):.2f}x"
           for name, r in results.items() if name != "float"]
  return "Speed-up range over rounds: " + ", ".join(parts) + ".\n"


def noise_floor_text(results, repeats: int) -> str:
  """One line per variant: rho min..max over perturbed re-runs."""
  if not repeats:
    return ""
  lines = [f"\nSpearman noise floor: {repeats} re-runs with the word "
           f"embeddings scaled by (1 + {JITTER_EPS:g} N(0, 1)) (float "
           "embeddings move by 1 - cos < 1e-6; the activation roundings of "
           "the variants that quantize activations flip and cascade). rho "
           "min..max (std):"]
  for name, r in results.items():
    rhos = r.get("spearman_perturbed")
    if rhos:
      lines.append(f"- {name}: " + "; ".join(
          f"{s} {min(v):.4f}..{max(v):.4f} ({np.std(v):.4f})"
          for s, v in rhos.items()))
  return "\n".join(lines) + "\n"


def plot(results, path) -> None:
  import matplotlib.pyplot as plt

  names = list(results)
  fig, axes = plt.subplots(1, 3, figsize=(20, 5.5))
  x = np.arange(len(names))
  for i, s in enumerate(WORD_SETS):
    axes[0].bar(x + (i - 0.5) * 0.4, [results[n]["spearman"][s] for n in names],
                0.4, label=s)
  axes[0].set_xticks(x, names, rotation=50, ha="right", fontsize=8)
  axes[0].set_ylabel("Spearman rho (cosine vs human)")
  axes[0].set_title("Word similarity")
  axes[0].set_ylim(0, 1)  # room for the legend above the bars
  axes[0].legend(loc="upper right")
  # 1 - cos on a log axis: the 8-bit variants (~1e-3) and the 3-bit ones
  # (~1e-1) both stay readable. Methods in their RTN twin's colour, dashed
  # (the first method beside it: GPTQ, SmoothQuant 0.5) or dotted.
  err = {n: np.maximum(1 - np.asarray(results[n]["cosine_to_float"]), 1e-6)
         for n in names[1:]}
  bins = np.logspace(np.log10(min(e.min() for e in err.values())),
                     np.log10(max(e.max() for e in err.values())), 50)
  colour, top = {}, 0
  styles = {n: ("--", ":", "-.")[i] for group in method_groups(results).values()
            for i, n in enumerate(group)}
  for n in names[1:]:
    twin = METHOD_TWINS.get(n)
    kw = ({"color": colour[twin], "ls": styles[n]} if twin in colour else {})
    counts, _, patches = axes[1].hist(err[n], bins=bins, histtype="step",
                                      lw=1.5, label=n, **kw)
    colour[n], top = patches[0].get_edgecolor(), max(top, counts.max())
  axes[1].set_ylim(0, 1.6 * top)  # room for the legend above the bars
  axes[1].set_xscale("log")
  axes[1].set_xlabel("1 - cosine to float embedding (per sentence)")
  axes[1].set_ylabel("sentences")
  axes[1].set_title("Lee corpus sentences")
  axes[1].legend(fontsize=6, ncol=3)
  axes[2].bar(x, [results[n]["speedup_vs_float"] for n in names])
  axes[2].axhline(1.0, color="gray", lw=0.8)
  axes[2].set_xticks(x, names, rotation=50, ha="right", fontsize=8)
  axes[2].set_ylabel("speed-up vs float (this CPU)")
  axes[2].set_title("Embeddings / s")
  common.save_figure(fig, path)


def markdown(report) -> str:
  results, setup = report["results"], report["setup"]
  pairs = setup["word_pairs"]
  title = (f"all-MiniLM-L6-v2: float vs W8A8 / W4A16 (g{GROUP_SIZE}) / W8A16"
           f" / fp8 W8A8 / nf4 W4A16 (g{GROUP_SIZE}, g{NF4_GROUP_SIZE})"
           " / RTN vs GPTQ vs AWQ / W8A8 static: RTN vs SmoothQuant"
           f"{' (quick)' if setup['quick'] else ''}")
  details = (
      f"\nWord pairs: WordSim353 {pairs['wordsim353']}, SimLex-999 "
      f"{pairs['simlex999']}; {setup['sentences']} Lee corpus sentences"
      + (f" (their first {setup['sentence_max_tokens']} tokens)"
         if setup.get("sentence_max_tokens", MAX_LENGTH) < MAX_LENGTH
         else "") + "; "
      f"{setup['rounds']} timing round(s) of {setup['calls_per_round']} "
      f"calls.\n{report['note']}\n"
      "Param MB counts all parameters (the float word embeddings are 46.9 "
      "MB of them); Dense kernel MB counts the 36 quantized matmul weights "
      "with their scales. The 12 float matmuls of the quantized variants are "
      "the attention einsums (no parameter operand).\n"
      + speed_spread(results)
      + methods_text(results, setup)
      + noise_floor_text(results, setup["noise_floor_repeats"]))
  return f"# {title}\n\n{common.format_table(table_rows(results))}{details}"


def figures(report) -> dict:
  return {"minilm.png": lambda path: plot(report["results"], path)}


def parser():
  p = common.parser(__doc__, NAME, quick="CI size: 60 pairs per set, 32 "
                    "sentences cut to 32 tokens, 1 timing round of 1 call, "
                    "no noise-floor repeats")
  p.add_argument("--rounds", type=int, default=None,
                 help="timing rounds (default 1 quick, 7 full)")
  p.add_argument("--repeats", type=int, default=None,
                 help="perturbed re-runs for the Spearman noise floor "
                 "(default 0 quick, 8 full)")
  return p


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
