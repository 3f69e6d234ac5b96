"""all-MiniLM-L6-v2 sentence embeddings: float against W8A8, W4A16, W8A16,
fp8 W8A8, nf4 W4A16, and round-to-nearest against GPTQ at 4 and 3 bits.

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
  W4A16 (g32) GPTQ, W4A16 (g128), W4A16 (g128) GPTQ, W3A16 (g32),
  W3A16 (g32) GPTQ
          int4 / int3 weights in groups of 32 or 128 inputs (128 divides 384
          and 1536 too), rounded to nearest (RTN; "W4A16" is the g32 RTN
          twin of "W4A16 (g32) GPTQ") or by GPTQ (`jq.gptq()` defaults:
          block 128, damp 0.01, act_order; fixed before any evaluation).
          GPTQ calibrates on CALIBRATION_SENTENCES held-out Lee sentences
          (`calibration_sentences`: none of them is evaluated), each cut to
          its first CALIBRATION_LENGTH tokens so that no padding enters the
          Hessians; `jq.calibrate` + `jq.quantize_params` are timed (first
          call, wall and CPU seconds). --quick runs only W4A16 (g32) GPTQ of
          these five (its RTN twin W4A16 always runs).

Metrics:
  - Spearman rank correlation between the cosine similarity of the two
    words' embeddings and the human score, on WordSim353 and SimLex-999
    (gensim's test data), and its difference to float; plus its spread
    over --repeats re-runs with 1e-5 relative noise on the word embeddings,
    which leaves float unchanged but re-draws the activation rounding of
    W8A8 and fp8 W8A8 (see `spearman_noise_floor`): the noise floor of
    that difference;
  - cosine similarity of each sentence's embedding to the float embedding,
    over sentences of gensim's Lee news corpus (mean and min);
  - embeddings per second on this machine's CPU: one fixed batch of Lee
    sentences, variants interleaved in rounds (`common.time_rounds`: a
    fresh random order per round), each timed as the median of a few
    calls; the speed-up is the median over rounds of float time / variant time in the same round. CPU speed and
    XLA's int8 kernels vary between machines: compare ratios, not absolutes;
  - parameter bytes (`jq.nbytes`, all parameters, and the Dense kernels
    alone) and `jq.report`'s count of matmuls that ran int8 / fp8 /
    weight-only / float;
  - quantization wall seconds (`jq.calibrate` + `jq.quantize_params`, first
    call, compilation included) and, in the full run, GPTQ's per-matmul
    output SQNR gain over RTN (`jq.layer_report(...).gain_over_rtn`, on 32
    evaluated sentences cut to CALIBRATION_LENGTH tokens: no padding).

Writes results.md, results.json and minilm.png to results/minilm/ (or
--out) and prints the table. The full run uses all 353 + 999 pairs, 512
sentences, 7 timing rounds and 8 noise-floor repeats (about 14 min on 2
shared cores); --quick (CI, about 1.5 min there) 60 pairs per word set, 32
sentences, one timing round and no repeats. --seed (default 0) seeds the
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
GPTQ_GROUP_SIZE = 128  # the GPTQ paper's group size; divides 384 and 1536
# RTN vs GPTQ: GPTQ variant -> its RTN twin (same spec, same bytes).
GPTQ_TWINS = {
    f"W4A16 (g{GROUP_SIZE}) GPTQ": "W4A16",
    f"W4A16 (g{GPTQ_GROUP_SIZE}) GPTQ": f"W4A16 (g{GPTQ_GROUP_SIZE})",
    f"W3A16 (g{GROUP_SIZE}) GPTQ": f"W3A16 (g{GROUP_SIZE})",
}
for _name, _spec in ((f"W4A16 (g{GROUP_SIZE}) GPTQ",
                      jq.int4(group_size=GROUP_SIZE)),
                     (f"W4A16 (g{GPTQ_GROUP_SIZE})",
                      jq.int4(group_size=GPTQ_GROUP_SIZE)),
                     (f"W4A16 (g{GPTQ_GROUP_SIZE}) GPTQ",
                      jq.int4(group_size=GPTQ_GROUP_SIZE)),
                     (f"W3A16 (g{GROUP_SIZE})", jq.int3(group_size=GROUP_SIZE)),
                     (f"W3A16 (g{GROUP_SIZE}) GPTQ",
                      jq.int3(group_size=GROUP_SIZE))):
  # Default GPTQ settings (block 128, damp 0.01, act_order), chosen before
  # looking at any evaluation number.
  RECIPES[_name] = jq.Recipe([jq.Rule(
      r".*kernel", weight=_spec,
      method=jq.gptq() if _name in GPTQ_TWINS else None)])
# --quick runs one GPTQ variant (its RTN twin, W4A16, is an original one).
QUICK_SKIP = tuple(n for n in list(RECIPES)[-5:]
                   if n != f"W4A16 (g{GROUP_SIZE}) GPTQ")
CALIBRATION_SENTENCES = 128  # GPTQ calibration: held-out Lee sentences
CALIBRATION_LENGTH = 32  # tokens each (the first 32: no padding in H)
CALIBRATION_BATCH = 32
EVAL_SENTENCES = {True: 32, False: 512}  # --quick, full
# Variants with dynamic activation quantization: their Spearman moves when
# the inputs move by 1e-5 (see `spearman_noise_floor`).
NOISE_FLOOR_VARIANTS = ("float", "W8A8", "fp8 W8A8")
MATMUL_MODES = ("int8", "fp8", "weight-only", "float")
WORD_SETS = ("wordsim353", "simlex999")
MAX_LENGTH = 128
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
  """`count` Lee sentences for GPTQ's calibration, none of them evaluated.

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
  Hessians `jq.calibrate` sums hold no padding positions (and all batches
  have the one shape `jq.calibrate` requires)."""
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


def tokenize(tokenizer, texts, batch_size: int):
  """Batches of (input_ids, attention_mask, token_type_ids) int32 arrays.

  Like `minilm_model.encode`: truncated to MAX_LENGTH tokens and padded to
  a multiple of 16. The last batch is padded with empty rows (mask 0) to
  `batch_size`, so each variant compiles once per padded length. Tokenized
  once and shared by all variants.
  """
  tokenizer.enable_truncation(max_length=MAX_LENGTH)
  batches = []
  for start in range(0, len(texts), batch_size):
    encodings = tokenizer.encode_batch(list(texts[start:start + batch_size]))
    longest = max(len(e.ids) for e in encodings)
    length = min(-(-longest // 16) * 16, MAX_LENGTH)
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


def uses_method(recipe) -> bool:
  return recipe is not None and any(r.method is not None
                                    for r in recipe.rules)


def build_variants(module, variables, names, calibration=None):
  """(name -> (jitted apply, params, report or None), name -> seconds).

  seconds: {"calibrate", "quantize", "total"} wall seconds and
  "total_cpu" process CPU seconds of `jq.calibrate` (variants whose rule
  has a method, on the `calibration` batches; 0 for the others) and
  `jq.quantize_params`, each variant on its own from float params, first
  call (tracing and compilation included): what a user waits.
  """
  variants, seconds = {}, {}
  for name in common.progress(names, desc="quantizing"):
    recipe = RECIPES[name]
    if recipe is None:
      variants[name] = (jax.jit(module.apply), variables, None)
      continue
    timer, stats = common.Timer(), None
    with timer("total"):
      if uses_method(recipe):
        with timer("calibrate"):
          stats = jq.calibrate(module.apply, variables, recipe, calibration,
                               progress=False)
          jax.block_until_ready(stats)
      with timer("quantize"):
        qparams = jax.block_until_ready(jq.quantize_params(
            module.apply, variables, recipe, *EXAMPLE, stats=stats,
            progress=False))
    seconds[name] = {"calibrate": timer.wall.get("calibrate", 0.0),
                     "quantize": timer.wall["quantize"],
                     "total": timer.wall["total"],
                     "total_cpu": timer.cpu["total"]}
    rep = jq.report(module.apply, qparams, recipe, *EXAMPLE)
    variants[name] = (jax.jit(jq.quantized_apply(module.apply, recipe)),
                      qparams, rep)
  return variants, seconds


def gptq_layer_gains(module, variables, names, calibration, batch) -> dict:
  """GPTQ variant -> per-matmul output SQNR gain over RTN (dB, path ->
  gain), from `jq.layer_report` on `batch` (re-runs calibration and GPTQ;
  full run only)."""
  gains = {}
  for name in common.progress(names, desc="layer reports"):
    recipe = RECIPES[name]
    stats = jq.calibrate(module.apply, variables, recipe, calibration,
                         progress=False)
    rep = jq.layer_report(module.apply, variables, recipe, *batch,
                          stats=stats)
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


def timing(variants, batch, rounds: int, calls: int, seed: int = 0):
  """Seconds per batch per round (`common.time_rounds`: every variant once
  per round, in a fresh random order)."""
  return common.time_rounds(
      {name: (fn, (params, *batch)) for name, (fn, params, _) in
       variants.items()}, rounds, calls, seed=seed, desc="timing rounds")


def with_perturbed_embeddings(params, eps: float, seed: int):
  """`params` with the word-embedding table scaled by (1 + eps N(0, 1))."""
  inner = params["params"]
  table = inner["word_embeddings"]["embedding"]
  noise = jax.random.normal(jax.random.key(seed), table.shape, table.dtype)
  return {"params": {**inner, "word_embeddings": {
      "embedding": table * (1 + eps * noise)}}}


def spearman_noise_floor(variants, names, words, word_batches, pairs,
                         repeats: int, eps: float = JITTER_EPS,
                         seed: int = 0) -> dict:
  """Spearman rho per word set after `repeats` tiny input perturbations.

  Dynamic activation quantization is chaotic: a 1e-7 relative change of
  one activation (e.g. XLA summing a row differently in another batch
  shape) can move a value across a rounding boundary, and that one step
  changes every later rounding decision. The float model does not move
  (embedding cosine > 0.9999999), W8A8 word embeddings move by up to
  1 - cos ~ 0.01. The spread of rho over perturbations is the noise floor
  of the 'd vs float' columns.
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
  calls = 2 if args.quick else 5
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
  word_batches = tokenize(tokenizer, words, 256)
  sentence_batches = tokenize(tokenizer, sentences, 32)
  speed_batch = sentence_batches[0]

  names = [n for n in RECIPES if not (quick and n in QUICK_SKIP)]
  variants, quant_seconds = build_variants(module, variables, names,
                                           calibration)
  gptq_names = [n for n in names if uses_method(RECIPES[n])]
  gains, layer_batch = {}, None
  if not quick:
    # Per-layer SQNR on evaluated sentences, but unpadded: the pad
    # positions' activations (half of a padded batch) enter no embedding
    # and no Hessian, yet would dominate a padded batch's per-layer error
    # (median gain over RTN -3 dB on the padded first batch, +4 dB here).
    layer_batch = calibration_batches(tokenizer, [
        s for s, n in zip(sentences, token_counts(tokenizer, sentences))
        if n >= CALIBRATION_LENGTH][:CALIBRATION_BATCH])[0]
    gains = gptq_layer_gains(module, variables, gptq_names, calibration,
                             layer_batch)
  total_matmuls = len(variants["W8A8"][2].ops)
  word_emb, sent_emb = {}, {}
  for name in common.progress(variants, desc="variants"):
    fn, params, _ = variants[name]
    word_emb[name] = dict(zip(words, embed(fn, params, word_batches,
                                           len(words))))
    sent_emb[name] = embed(fn, params, sentence_batches, len(sentences))

  seconds = timing(variants, speed_batch, rounds, calls, seed)
  load = os.getloadavg()[0]
  floor = spearman_noise_floor(variants, NOISE_FLOOR_VARIANTS, words,
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
        "method": "gptq" if uses_method(RECIPES[name]) else (
            None if rep is None else "rtn"),
        "rtn_twin": GPTQ_TWINS.get(name),
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
      "speed_batch_shape": list(speed_batch[0].shape),
      "w4_group_size": GROUP_SIZE, "nf4_group_sizes": [GROUP_SIZE,
                                                         NF4_GROUP_SIZE],
      "gptq": {"method": repr(jq.gptq()), "twins": GPTQ_TWINS,
               "calibration_sentences": len(calib_sentences),
               "calibration_tokens_each": CALIBRATION_LENGTH,
               "calibration_batches": len(calibration),
               "calibration_source": "gensim Lee background corpus, "
               "sentences not evaluated, >= "
               f"{CALIBRATION_LENGTH} tokens, cut to {CALIBRATION_LENGTH}",
               "layer_gain_batch": (
                   f"the first {layer_batch[0].shape[0]} evaluated "
                   f"sentences of >= {CALIBRATION_LENGTH} tokens, cut to "
                   f"{CALIBRATION_LENGTH} (no padding)" if gains else None)},
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


def gptq_text(results, setup) -> str:
  """RTN vs GPTQ: calibration, 1 - mean cos per spec, wall time."""
  pairs = [(g, t) for g, t in GPTQ_TWINS.items() if g in results]
  if not pairs:
    return ""
  info = setup["gptq"]
  lines = [
      f"\nRTN vs GPTQ (`{info['method']}`, the defaults, fixed before any "
      f"evaluation): GPTQ calibrates on {info['calibration_sentences']} "
      "held-out Lee corpus sentences (none of the evaluated sentences; "
      f"at least {info['calibration_tokens_each']} tokens each, cut to their "
      f"first {info['calibration_tokens_each']} so no padding enters the "
      f"Hessians; {info['calibration_batches']} batches). quantize s: wall "
      "seconds of `jq.calibrate` + `jq.quantize_params` for the variant, "
      "first call, compilation included, on a shared machine (RTN rows: "
      "`jq.quantize_params` alone). 1 - mean cos to float:"]
  for g, t in pairs:
    rg, rt = results[g], results[t]
    eg, et = 1 - rg["cosine_mean"], 1 - rt["cosine_mean"]
    s = rg["quantize_seconds"]
    gain = rg.get("layer_gain_summary_db")
    lines.append(
        f"- {t} RTN {et:.4f} -> {g} {eg:.4f} ({eg / et:.2f}x RTN's); GPTQ "
        f"took {s['total']:.1f} s wall ({s['calibrate']:.1f} s calibrate + "
        f"{s['quantize']:.1f} s quantize_params; {s['total_cpu']:.0f} CPU-s)"
        + ("" if gain is None else
           f"; per-matmul output SQNR gain over RTN median "
           f"{gain['median']:+.1f} dB (min {gain['min']:+.1f}, max "
           f"{gain['max']:+.1f}) on {info['layer_gain_batch']}")
        + ".")
  return "\n".join(lines) + "\n"


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
           "W8A8 and fp8 W8A8 flip and cascade). rho min..max (std):"]
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
  fig, axes = plt.subplots(1, 3, figsize=(18, 5))
  x = np.arange(len(names))
  for i, s in enumerate(WORD_SETS):
    axes[0].bar(x + (i - 0.5) * 0.4, [results[n]["spearman"][s] for n in names],
                0.4, label=s)
  axes[0].set_xticks(x, names, rotation=30, ha="right")
  axes[0].set_ylabel("Spearman rho (cosine vs human)")
  axes[0].set_title("Word similarity")
  axes[0].set_ylim(0, 1)  # room for the legend above the bars
  axes[0].legend(loc="upper right")
  # 1 - cos on a log axis: the 8-bit variants (~1e-3) and the 3-bit ones
  # (~1e-1) both stay readable. GPTQ dashed, in its RTN twin's colour.
  err = {n: np.maximum(1 - np.asarray(results[n]["cosine_to_float"]), 1e-6)
         for n in names[1:]}
  bins = np.logspace(np.log10(min(e.min() for e in err.values())),
                     np.log10(max(e.max() for e in err.values())), 50)
  colour, top = {}, 0
  for n in names[1:]:
    twin = GPTQ_TWINS.get(n)
    kw = ({"color": colour[twin], "ls": "--"} if twin in colour else {})
    counts, _, patches = axes[1].hist(err[n], bins=bins, histtype="step",
                                      lw=1.5, label=n, **kw)
    colour[n], top = patches[0].get_edgecolor(), max(top, counts.max())
  axes[1].set_ylim(0, 1.6 * top)  # room for the legend above the bars
  axes[1].set_xscale("log")
  axes[1].set_xlabel("1 - cosine to float embedding (per sentence)")
  axes[1].set_ylabel("sentences")
  axes[1].set_title("Lee corpus sentences")
  axes[1].legend(fontsize=7, ncol=2)
  axes[2].bar(x, [results[n]["speedup_vs_float"] for n in names])
  axes[2].axhline(1.0, color="gray", lw=0.8)
  axes[2].set_xticks(x, names, rotation=30, ha="right")
  axes[2].set_ylabel("speed-up vs float (this CPU)")
  axes[2].set_title("Embeddings / s")
  common.save_figure(fig, path)


def markdown(report) -> str:
  results, setup = report["results"], report["setup"]
  pairs = setup["word_pairs"]
  title = (f"all-MiniLM-L6-v2: float vs W8A8 / W4A16 (g{GROUP_SIZE}) / W8A16"
           f" / fp8 W8A8 / nf4 W4A16 (g{GROUP_SIZE}, g{NF4_GROUP_SIZE})"
           " / RTN vs GPTQ"
           f"{' (quick)' if setup['quick'] else ''}")
  details = (
      f"\nWord pairs: WordSim353 {pairs['wordsim353']}, SimLex-999 "
      f"{pairs['simlex999']}; {setup['sentences']} Lee corpus sentences; "
      f"{setup['rounds']} timing round(s) of {setup['calls_per_round']} "
      f"calls.\n{report['note']}\n"
      "Param MB counts all parameters (the float word embeddings are 46.9 "
      "MB of them); Dense kernel MB counts the 36 quantized matmul weights "
      "with their scales. The 12 float matmuls of the quantized variants are "
      "the attention einsums (no parameter operand).\n"
      + speed_spread(results)
      + gptq_text(results, setup)
      + noise_floor_text(results, setup["noise_floor_repeats"]))
  return f"# {title}\n\n{common.format_table(table_rows(results))}{details}"


def figures(report) -> dict:
  return {"minilm.png": lambda path: plot(report["results"], path)}


def parser():
  p = common.parser(__doc__, NAME, quick="CI size: 60 pairs per set, 32 "
                    "sentences, 1 timing round, no noise-floor repeats")
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
