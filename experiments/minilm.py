"""all-MiniLM-L6-v2 sentence embeddings: float against W8A8, W4A16, W8A16,
fp8 W8A8 and nf4 W4A16.

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
    weight-only / float.

Writes results.md, results.json and minilm.png to results/minilm/ (or
--out) and prints the table. The full run uses all 353 + 999 pairs, 512
sentences, 7 timing rounds and 8 noise-floor repeats (about 11 min on 2
shared cores); --quick (CI, about 1 min there) 60 pairs per word set, 32
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


def build_variants(module, variables):
  """name -> (jitted apply, params, report or None)."""
  example = (jnp.ones((1, 16), jnp.int32),) * 2 + (jnp.zeros((1, 16),
                                                             jnp.int32),)
  variants = {}
  for name, recipe in RECIPES.items():
    if recipe is None:
      variants[name] = (jax.jit(module.apply), variables, None)
      continue
    qparams = jq.quantize_params(module.apply, variables, recipe, *example)
    rep = jq.report(module.apply, qparams, recipe, *example)
    variants[name] = (jax.jit(jq.quantized_apply(module.apply, recipe)),
                      qparams, rep)
  return variants


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
  sentences = lee_sentences(32 if quick else 512)
  words = sorted({w for ps in pairs.values() for w1, w2, _ in ps
                  for w in (w1, w2)})
  word_batches = tokenize(tokenizer, words, 256)
  sentence_batches = tokenize(tokenizer, sentences, 32)
  speed_batch = sentence_batches[0]

  variants = build_variants(module, variables)
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
    }
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
    })
  return rows


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
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  x = np.arange(len(names))
  for i, s in enumerate(WORD_SETS):
    axes[0].bar(x + (i - 0.5) * 0.4, [results[n]["spearman"][s] for n in names],
                0.4, label=s)
  axes[0].set_xticks(x, names, rotation=30, ha="right")
  axes[0].set_ylabel("Spearman rho (cosine vs human)")
  axes[0].set_title("Word similarity")
  axes[0].set_ylim(0, 1)  # room for the legend above the bars
  axes[0].legend(loc="upper right")
  bins = np.linspace(min(results[n]["cosine_min"] for n in names[1:]), 1.0, 40)
  for n in names[1:]:
    axes[1].hist(results[n]["cosine_to_float"], bins=bins, histtype="step",
                 lw=1.5, label=n)
  axes[1].set_xlabel("cosine to float embedding (per sentence)")
  axes[1].set_ylabel("sentences")
  axes[1].set_title("Lee corpus sentences")
  axes[1].legend()
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
