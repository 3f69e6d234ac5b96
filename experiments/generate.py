"""Greedy generation with a KV cache: quantized decoders vs float.

A Llama-style decoder (`experiments.decoder_model.SMALL`, 168.3M random
parameters) generates greedily from a random prompt: prefill is one call on
the whole prompt; decode is `--new` steps of one token each, the whole loop
one jitted `lax.fori_loop`. Variants, on the same model and params:

  float         float32
  W8A8          jaxquant: int8 weights, int8 activations (dynamic per token)
  W8A16         jaxquant: int8 weights, float activations (weight-only)
  W4A16 g128    jaxquant: int4 weights in groups of 128, weight-only
  Qwix W8A8 / W8A16   with `--peers` (needs the `peers` extra)

Each quantizes every `nn.Dense` kernel (q, k, v, o, gate, up, down, LM
head); the embedding and the attention products stay float. Per variant
and batch: prefill and decode tokens/s (medians over rounds in which the
variants run interleaved, `common.time_rounds`), decode time / float (the
median of per-round ratios), param bytes (`jq.nbytes`), and agreement with
float: the leading greedy tokens equal to float's (the minimum over the
batch), the share of prompt positions whose next-token argmax equals
float's (teacher-forced: it does not stop at the first difference) and the
relative error of the prefill logits, ||l_q - l_f|| / ||l_f||.

The params are random (no checkpoint ships here), so agreement measures
how far quantization moves this model's outputs, not a trained model's
quality. A random model's next-token logits have no clear winner (the gap
between the top two of 32000 is a fraction of their spread), so greedy
continuations part at the first near-tie: expect a few leading tokens, not
64, even for int8 weights; the top-1 share is the steadier measure.

  python -m experiments.generate [--quick] [--out DIR] [--seed S] [--peers]
      [--batch 1 8] [--prompt 64] [--new 64] [--rounds R]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxquant as jq
from experiments import common, peers
from experiments import decoder_model as dm

NAME = "generate"
MODES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 g128": dict(weight=jq.int4(group_size=128)),
}
# Qwix's rule names the Dense modules, so that the attention products (an
# einsum of two activations in the Attention module) stay float, as in
# jaxquant; a ".*" rule would quantize them too.
QWIX_MODULES = r".*/(q|k|v|o|gate|up|down)|lm_head"
REPRESENTATIVE = "params/layer_0/mlp/up/kernel"  # its lowering is reported


def parser():
  p = common.parser(__doc__, NAME,
                    quick="TINY decoder, prompt 8, 8 new tokens, batch 1/2, "
                    "2 rounds")
  p.add_argument("--peers", action="store_true",
                 help="also run Qwix W8A8 / W8A16 (peers extra)")
  p.add_argument("--batch", type=int, nargs="+", default=None,
                 help="batch sizes (default 1 8)")
  p.add_argument("--prompt", type=int, default=None,
                 help="prompt tokens (default 64)")
  p.add_argument("--new", type=int, default=None,
                 help="new tokens, one decode step each (default 64)")
  p.add_argument("--rounds", type=int, default=None)
  return p


# ---------------------------------------------------------------- variants


def qwix_decoder(model, params, example, *, act: bool):
  """Qwix PTQ of the decoder's Dense layers: int8 weights, and int8
  activations if `act`. Returns `(apply(params, tokens, cache, pos),
  qparams)`, set up as `peers.qwix_quantized` does for one-input models."""
  import qwix
  rules = [qwix.QuantizationRule(module_path=QWIX_MODULES,
                                 weight_qtype=jnp.int8,
                                 act_qtype=jnp.int8 if act else None)]
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), *example)["params"]
  qparams = qwix.quantize_params(params["params"], abstract)
  return (lambda p, *args: ptq.apply({"params": p}, *args)), qparams


def variants(model, params, example, with_peers: bool) -> dict:
  """name -> (apply(params, tokens, cache, pos), params) for every variant;
  `example` = (tokens, cache, pos) fixes the shapes quantization reads."""
  out = {"float": (model.apply, params)}
  for name, rule in MODES.items():
    recipe = jq.Recipe([jq.Rule(r".*kernel", **rule)])
    out[name] = (jq.quantized_apply(model.apply, recipe),
                 jq.quantize_params(model.apply, params, recipe, *example))
  if with_peers and peers.available()["qwix"]:
    for name, act in (("Qwix W8A8", True), ("Qwix W8A16", False)):
      out[name] = qwix_decoder(model, params, example, act=act)
  return out


def lowering_notes(model, params, step) -> dict:
  """Per jaxquant mode: how the representative matmul (layer 0's MLP up
  projection) runs in a decode step of `step`'s shapes (tokens, cache,
  pos), and the count of each mode over all matmuls."""
  notes = {}
  for name, rule in MODES.items():
    recipe = jq.Recipe([jq.Rule(r".*kernel", **rule)])
    rep = jq.report(model.apply, params, recipe, *step)
    op = next(op for op in rep.ops if op.path == REPRESENTATIVE)
    note = op.mode + (f": {op.reason}" if op.reason else "")
    lowering = getattr(op, "lowering", None)  # OpRecord.lowering, if present
    if lowering:
      note += f"; lowering: {lowering}"
    counts = ", ".join(f"{rep.count(m)} {m}"
                       for m in ("int8", "weight-only", "float"))
    notes[name] = f"{note} (all matmuls: {counts})"
  return notes


# -------------------------------------------------------------- generation


def generation_fns(apply, prompt_len: int, new: int):
  """Jitted `prefill(params, prompt, cache) -> (logits, cache)` and
  `decode(params, token, cache) -> tokens (B, new)`.

  `decode` feeds `token` at position `prompt_len`, then each greedy pick at
  the next position, `new` steps in one `lax.fori_loop`; it returns the
  `new` picks."""

  def prefill(params, prompt, cache):
    return apply(params, prompt, cache, jnp.int32(0))

  def decode(params, token, cache):
    def step(i, carry):
      token, cache, out = carry
      logits, cache = apply(params, token[:, None], cache, prompt_len + i)
      token = greedy_pick(logits)
      return token, cache, out.at[:, i].set(token)

    out = jnp.zeros((token.shape[0], new), jnp.int32)
    return lax.fori_loop(0, new, step, (token, cache, out))[2]

  return jax.jit(prefill), jax.jit(decode)


def greedy_pick(logits):
  """The greedy next token after the last position: (B,) int32."""
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)


def leading_matches(tokens, reference) -> int:
  """Leading positions where `tokens` equals `reference` (B, N), min over
  the batch."""
  same = np.cumprod(np.asarray(tokens) == np.asarray(reference), axis=1)
  return int(same.sum(axis=1).min())


def top1_agreement(logits, reference) -> float:
  """Percent of positions (all rows) where the argmax of `logits` equals
  that of `reference`: next-token agreement with the same context, which,
  unlike greedy generation, does not end at the first difference."""
  same = np.argmax(logits, axis=-1) == np.argmax(reference, axis=-1)
  return 100.0 * float(np.mean(same))


def relative_error(x, reference) -> float:
  """||x - reference|| / ||reference|| (Frobenius), as a float."""
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def _batch_rows(config, all_variants, batch, args, calls):
  """Runs and times every variant at one batch size: table rows."""
  rng = np.random.default_rng(args.seed + batch)
  prompt = jnp.asarray(rng.integers(0, config.vocab, (batch, args.prompt)),
                       jnp.int32)
  cache = dm.init_cache(config, batch, args.prompt + args.new)
  prefills, decodes, outputs = {}, {}, {}
  for name, (apply, params) in common.progress(all_variants.items(),
                                               desc=f"compile B={batch}"):
    prefill, decode = generation_fns(apply, args.prompt, args.new)
    logits, filled = prefill(params, prompt, cache)
    first = greedy_pick(logits)
    picks = decode(params, first, filled)
    outputs[name] = (logits, jnp.concatenate([first[:, None], picks], 1))
    prefills[name] = (prefill, (params, prompt, cache))
    decodes[name] = (decode, (params, first, filled))
  prefill_times = common.time_rounds(prefills, args.rounds, calls,
                                     seed=args.seed, desc=f"prefill B={batch}")
  decode_times = common.time_rounds(decodes, args.rounds, calls,
                                    seed=args.seed, desc=f"decode B={batch}")
  ratios = common.median_ratios(decode_times)
  ref_logits, ref_tokens = outputs["float"]
  rows = []
  for name, (_, params) in all_variants.items():
    logits, tokens = outputs[name]
    rows.append({
        "variant": name, "batch": batch,
        "prefill tok/s": batch * args.prompt / _median(prefill_times[name]),
        "decode tok/s": batch * args.new / _median(decode_times[name]),
        "decode time / float": ratios[name],
        "param MB": jq.nbytes(params) / 1e6,
        "greedy tokens = float": leading_matches(tokens[:, :args.new],
                                                 ref_tokens[:, :args.new]),
        "prompt top-1 = float %": top1_agreement(logits, ref_logits),
        "logits rel. err": relative_error(logits, ref_logits)})
    common.log(f"B={batch} {name}: " + ", ".join(
        f"{k} {_cell(v)}" for k, v in rows[-1].items()
        if k not in ("variant", "batch")))
  return rows


def _median(values) -> float:
  return float(np.median(values))


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


# ------------------------------------------------------------------- script


def _decode_step(config, batch: int, length: int, pos: int):
  """Example arguments of one decode step: (tokens (batch, 1), cache, pos)."""
  return (jnp.zeros((batch, 1), jnp.int32),
          dm.init_cache(config, batch, length), jnp.int32(pos))


def _defaults(args):
  """Fills the options left unset: the full run, or the quick one."""
  quick = args.quick
  args.batch = args.batch or ([1, 2] if quick else [1, 8])
  args.prompt = args.prompt or (8 if quick else 64)
  args.new = args.new or (8 if quick else 64)
  args.rounds = args.rounds or (2 if quick else 5)
  return args


def run(args) -> dict:
  args = _defaults(args)
  config = dm.TINY if args.quick else dm.SMALL
  model = dm.Decoder(config)
  timer = common.Timer()
  with timer("init and quantize"):
    params = dm.init_params(model, args.seed)
    example = (jnp.zeros((1, args.prompt), jnp.int32),
               dm.init_cache(config, 1, args.prompt + args.new),
               jnp.int32(0))
    all_variants = variants(model, params, example, args.peers)
    notes = {batch: lowering_notes(model, params, _decode_step(
        config, batch, args.prompt + args.new, args.prompt))
             for batch in args.batch}
  rows = []
  calls = 3 if args.quick else 1
  for batch in args.batch:
    with timer(f"batch {batch}"):
      rows += _batch_rows(config, all_variants, batch, args, calls)
  return {"backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "jax": jax.__version__,
          "model": "TINY" if args.quick else "SMALL",
          "config": dataclasses.asdict(config),
          "params": dm.param_count(params),
          "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
          "rows": rows, "lowering": notes,
          "wall s": timer.wall, "cpu s": timer.cpu}


def markdown(report) -> str:
  cfg = report["config"]
  head = (
      f"Greedy generation with a KV cache on {report['device']} "
      f"({report['backend']}, jax {report['jax']}): the {report['model']} "
      f"decoder, {report['params'] / 1e6:.1f}M random parameters "
      f"(d {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} "
      f"heads, d_ff {cfg['d_ff']}, vocab {cfg['vocab']}"
      f"{', tied' if cfg['tied'] else ''}); prompt {report['prompt']} "
      f"tokens (prefill, one call), {report['new']} new tokens (decode, one "
      f"step each in one jitted loop). Medians over {report['rounds']} "
      "interleaved rounds; decode time / float is the median of per-round "
      "ratios; greedy tokens = float counts the leading tokens identical to "
      "float's (the minimum over the batch), out of "
      f"{report['new']}; prompt top-1 = float is the share of prompt "
      "positions whose next-token argmax (prefill logits) equals float's; "
      "logits rel. err is ||l - l_float|| / ||l_float|| of the prefill "
      "logits.")
  rows = [{**row,
           "prefill tok/s": f"{row['prefill tok/s']:.1f}",
           "decode tok/s": f"{row['decode tok/s']:.1f}",
           "greedy tokens = float":
               f"{row['greedy tokens = float']}/{report['new']}",
           "prompt top-1 = float %": f"{row['prompt top-1 = float %']:.1f}",
           "logits rel. err": f"{row['logits rel. err']:.2g}"}
          for row in report["rows"]]
  lowering = "\n".join(f"- {name}, batch {batch}: {note}"
                       for batch, notes in report["lowering"].items()
                       for name, note in notes.items())
  return (f"{head}\n\n{common.format_table(rows)}\n"
          f"How `{REPRESENTATIVE}` runs in a decode step (`jq.report`):\n"
          f"{lowering}\n")


def figures(report) -> dict:
  def draw(path):
    import matplotlib.pyplot as plt
    batches = list(dict.fromkeys(r["batch"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(batches), squeeze=False,
                             figsize=(5 * len(batches), 4))
    for ax, batch in zip(axes[0], batches):
      rows = [r for r in report["rows"] if r["batch"] == batch]
      ax.bar(range(len(rows)), [r["decode tok/s"] for r in rows],
             color=[f"C{i}" for i in range(len(rows))])
      ax.set_xticks(range(len(rows)), [r["variant"] for r in rows],
                    rotation=30, ha="right")
      ax.set(ylabel="decode tokens/s", title=f"batch {batch}")
    fig.suptitle(f"{report['model']} decoder, {report['device']}")
    common.save_figure(fig, path)
  return {"decode.png": draw}


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
