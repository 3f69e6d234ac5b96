"""MNIST CNN: float vs PTQ (W8A8 / W4A8 / W2A8) vs GPTQ vs AWQ vs QAT vs PTQ +
fine-tuning.

  python -m experiments.mnist [--quick] [--out DIR] [--epochs N] [--seed S]

Model: Conv(16, 3x3) - ReLU - maxpool 2 - Conv(32, 3x3) - ReLU - maxpool 2 -
Dense(128) - ReLU - Dense(10), 206,922 parameters (827,688 float bytes, 97 %
of them in Dense_0). Max pooling is written as reshape + max over the 2x2
window: the same function as `nn.max_pool`, but its gradient is an
elementwise mask, where XLA:CPU's select-and-scatter for `nn.max_pool`
doubled the training step time on the 2-core machine.

Data: `experiments.data.load_mnist()`, trained on the 50k training split and
evaluated on the 10k test split. Float training: Adam, batch 128, peak
learning rate 2e-3 with cosine decay to 0, `--epochs` epochs.

Variants, every one evaluated with real int8 execution (`jq.quantized_apply`:
s8 x s8 -> s32 matmuls and convolutions) except the float baseline:

  PTQ     weights int8 / int4 / int2, one scale per tensor ("t") or per output
          channel ("ch", the default), absmax weight scales; activations int8
          (symmetric), either with one static per-tensor scale calibrated on
          20 training batches of 128 (`jq.calibrate`, observer "minmax" or
          "mse") or dynamic (scale per example computed at run time).
  GPTQ, AWQ
          per-channel int3 / int2 weights rounded by `jq.gptq()` or
          `jq.awq()` (default settings) instead of to nearest, their
          statistics (Hessians; AWQ also per-input-channel mean |x|) from
          the same 20 calibration batches, static minmax int8 activations
          (AWQ: the range of x / s); shown beside the round-to-nearest row
          of the same spec, with the wall seconds of `jq.calibrate` +
          `jq.quantize_params` (--quick: int2 only).
  QAT     trained from scratch (same initialisation, schedule and epochs as
          float) with `jq.fake_quant_apply(model.apply, recipe)`: per-channel int8 /
          int4 / int2 weights, dynamic int8 activations (exactly what
          `quantized_apply` then runs); then `quantize_params` +
          `quantized_apply`.
  QAFT    the float model quantized (PTQ) and fine-tuned with fake-quant for
          `QAFT_EPOCHS` epoch(s) (peak learning rate 5e-4, cosine), per-channel
          int4 / int2 weights, dynamic int8 activations.

For each: test accuracy, parameter bytes (`jq.nbytes`, packed int4 / int2
storage plus scales plus the float biases) and latency relative to float
(`jit(model.apply)` vs `jit(quantized_apply)` on a batch of 256, timed in one
process with every variant interleaved in rounds; median over rounds of the
per-round ratio). Variants that run the same computation (same weight
spec, static or dynamic activations; e.g. PTQ minmax and mse, or GPTQ and
its PTQ twin; AWQ runs apart: it divides each activation by its
pre-scale) share one timing, and `jq.int8_ops` counts each one's int8
matmuls before and after XLA's optimisations (results.json, `int8_ops`).
Training is `common.train` (Adam as a learning-rate-free direction, the
cosine rate evaluated on the host), batches from `common.shuffled_batches`
with the epoch remainder carried over. Outputs in results/mnist/ (or
--out): results.md, results.json, pareto.png (accuracy vs bytes, log x)
and calibration.png (dynamic vs min/max vs MSE activation scales per weight
setting); the full run also writes a per-layer report (`jq.layer_report`)
of the 2- and 4-bit PTQ models to layers/.

--quick (CI, < 60 s on 2 cores): 5k training / 2k test images, 1 epoch at
batch 32 (39 steps of 128 leave the float model near 87 %), 8 calibration
batches (not 20), six PTQ variants, GPTQ and AWQ at 2 bits, QAT and QAFT
at 4 bits only, 2 timing rounds of one call.
"""

from __future__ import annotations

import math
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from experiments import common
from experiments.data import load_mnist

NAME = "mnist"
BATCH = 128            # training batch (QUICK_BATCH with --quick)
QUICK_BATCH = 32
EVAL_BATCH = 256       # evaluation and timing batch (one compiled shape)
LR, QAFT_LR = 2e-3, 5e-4
QAFT_EPOCHS = 1.0
CALIB_BATCHES = {True: 8, False: 20}  # of BATCH images; --quick, full
# Calibrated rounding methods (default settings), each beside the
# round-to-nearest row of the same spec: method -> weight bits, per --quick.
METHODS = {"GPTQ": jq.gptq(), "AWQ": jq.awq()}
METHOD_BITS = {True: (2,), False: (3, 2)}
SPECS = {8: jq.int8, 4: jq.int4, 3: jq.int3, 2: jq.int2}
GRAN = {"channel": "ch", "tensor": "t"}


class CNN(nn.Module):
  """Conv16-Conv32 with 2x2 max pooling, Dense 128, Dense 10; ReLU."""

  @nn.compact
  def __call__(self, x):
    x = _max_pool(nn.relu(nn.Conv(16, (3, 3))(x)))
    x = _max_pool(nn.relu(nn.Conv(32, (3, 3))(x)))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def _max_pool(x):
  """2x2 / stride 2 max pooling (NHWC, even H and W) as reshape + max."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def recipe(bits: int, granularity: str = "channel",
           method=None) -> jq.Recipe:
  """Weights at `bits` (per tensor or channel), int8 activations; `method`
  (e.g. `jq.gptq()`) rounds the weights, round-to-nearest when None."""
  return jq.Recipe([jq.Rule(r".*kernel",
                            weight=SPECS[bits](granularity=granularity),
                            act=jq.int8(), method=method)])


# ------------------------------------------------------------------ training


# A learning-rate-free direction: the cosine schedule is evaluated on the host
# and passed to the compiled step, so a new schedule never recompiles it.
ADAM = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))


class Trainer:
  """`common.train` with Adam and a cosine learning rate, one compiled step
  per key (QAT and QAFT of one bit width share theirs)."""

  def __init__(self, batch: int = BATCH):
    self.batch = batch
    self._steps = {}

  def fit(self, key, apply_fn, params, x, y, *, epochs: float, lr: float,
          seed: int, desc: str):
    """`epochs` may be fractional. Returns (params, info)."""
    if key not in self._steps:
      self._steps[key] = common.train_step(apply_fn, ADAM, with_lr=True)
    per_epoch = len(x) // self.batch
    total = max(1, round(epochs * per_epoch))
    timer = common.Timer()
    with timer(desc):
      params, losses = common.train(
          apply_fn, params, common.shuffled_batches(
              x, y, self.batch, seed, carry_over=True),
          tx=ADAM, steps=total, step=self._steps[key], desc=desc,
          lr=lambda t: lr * 0.5 * (1 + math.cos(math.pi * t / total)))
      jax.block_until_ready(params)
    tail = losses[-max(1, per_epoch // 10):]
    return params, {"steps": total, "epochs": total / per_epoch,
                    "seconds": timer.wall[desc],
                    "final_loss": statistics.mean(tail)}


# ------------------------------------------------------------------ evaluation


def _batches(x):
  """Fixed-shape EVAL_BATCH slices of x (the last one zero-padded)."""
  for i in range(0, len(x), EVAL_BATCH):
    xb = x[i:i + EVAL_BATCH]
    if len(xb) < EVAL_BATCH:
      pad = np.zeros((EVAL_BATCH - len(xb),) + x.shape[1:], x.dtype)
      xb = np.concatenate([xb, pad])
    yield i, xb


def accuracy(fn, params, x, y) -> float:
  correct = 0
  for i, xb in _batches(x):
    pred = np.asarray(jnp.argmax(fn(params, xb), -1))[:len(y) - i]
    correct += int((pred == y[i:i + EVAL_BATCH]).sum())
  return correct / len(y)


def latency(variants: dict, rounds: int, calls: int, seed: int = 0):
  """Median over rounds of variant time / float time in the same round.

  `variants`: name -> (fn, args), including "float". Timed by
  `common.time_rounds` (every variant once per round, median of `calls`
  calls, in a fresh random order), float a second time ("float again"):
  its ratio to float measures the noise of the machine (ideally 1).
  Returns (ratios, float seconds per call, median over rounds).
  """
  variants = dict(variants, **{"float again": variants["float"]})
  times = common.time_rounds(variants, rounds, calls, seed=seed)
  return common.median_ratios(times), statistics.median(times["float"])


# ------------------------------------------------------------------ experiment


def ptq_grid(quick: bool):
  """(bits, granularity, calibration) of the PTQ variants."""
  if quick:
    return [(8, "channel", "minmax"), (8, "channel", "mse"),
            (8, "channel", "dynamic"), (8, "tensor", "minmax"),
            (4, "channel", "mse"), (2, "channel", "minmax")]
  return [(bits, gran, calib) for bits in (8, 4, 2)
          for gran in ("channel", "tensor")
          for calib in ("minmax", "mse", "dynamic")]


def run(args) -> dict:
  epochs = args.epochs if args.epochs is not None else (1 if args.quick
                                                          else 3)
  timer = common.Timer()
  with timer("total"):
    report = experiment(args.quick, epochs, args.seed, timer)
  report["seconds"] = timer.wall
  return report


def experiment(quick: bool, epochs: float, seed: int, timer) -> dict:
  data = load_mnist()
  x_train, y_train = data["train"]
  x_test, y_test = data["test"]
  if quick:
    pick = np.random.default_rng(seed).permutation(len(x_train))[:5000]
    x_train, y_train = x_train[np.sort(pick)], y_train[np.sort(pick)]
    x_test, y_test = x_test[:2000], y_test[:2000]
  common.log(f"MNIST: {len(x_train)} train / {len(x_test)} test images, "
             f"{epochs:g} epoch(s), seed {seed}")

  model = CNN()
  init = model.init(jax.random.key(seed), x_train[:1])
  trainer = Trainer(QUICK_BATCH if quick else BATCH)
  float_apply = jax.jit(model.apply)
  qapplies = {}  # recipe name -> jitted quantized_apply

  def qapply(bits, gran):
    key = (bits, gran)
    if key not in qapplies:
      qapplies[key] = jax.jit(jq.quantized_apply(model.apply,
                                                 recipe(bits, gran)))
    return qapplies[key]

  rows, timing_args = [], {}

  def add(name, method, bits, gran, calib, acc, params_tree, extra=None):
    exec_key = "float" if bits is None else (
        f"w{bits}{GRAN[gran]}-{'dyn' if calib == 'dynamic' else 'static'}")
    if method in METHODS and METHODS[method].prescales:
      exec_key += "-prescaled"  # divides each activation by AWQ's scale
    if exec_key not in timing_args:
      fn = float_apply if bits is None else qapply(bits, gran)
      timing_args[exec_key] = (fn, (params_tree, x_test[:EVAL_BATCH]))
    row = {"name": name, "method": method, "weight_bits": bits or 32,
           "granularity": gran or "-",
           "act": "float" if bits is None else "int8",
           "calibration": calib or "-", "accuracy": acc,
           "bytes": jq.nbytes(params_tree), "exec": exec_key}
    row.update(extra or {})
    rows.append(row)
    common.log(f"  {name:<28} accuracy {acc:.4f}  bytes {row['bytes']:>9,}")
    return row

  # -- float
  common.log("training float")
  with timer("train float"):
    params, info = trainer.fit("float", model.apply, init, x_train,
                                 y_train, epochs=epochs, lr=LR, seed=seed,
                                 desc="float")
  float_row = add("float32", "float", None, None, None,
                  accuracy(float_apply, params, x_test, y_test), params,
                  {"train": info})

  # -- PTQ: one calibration per observer, shared by every weight setting
  # (activations are observed on the float model; every recipe uses int8).
  calib_batches = CALIB_BATCHES[quick]
  calib_x = x_train[np.random.default_rng(seed + 1).permutation(
      len(x_train))[:calib_batches * BATCH]]
  batches = [calib_x[i * BATCH:(i + 1) * BATCH]
             for i in range(calib_batches)]
  grid = ptq_grid(quick)
  with timer("calibrate"):
    stats = {obs: jq.calibrate(model.apply, params, recipe(8), batches,
                               observer=obs, progress=common.tty())
             for obs in sorted({c for _, _, c in grid} - {"dynamic"})}
  example = x_test[:2]
  with timer("PTQ"):
    for bits, gran, calib in common.progress(grid, desc="PTQ"):
      qparams = jq.quantize_params(model.apply, params, recipe(bits, gran),
                                   example, stats=stats.get(calib))
      add(f"PTQ W{bits}A8 {GRAN[gran]} {calib}", "PTQ", bits, gran, calib,
          accuracy(qapply(bits, gran), qparams, x_test, y_test), qparams)

  # -- GPTQ and AWQ against round-to-nearest of the same weight spec: one
  # calibration per method collects the activation ranges and the method's
  # statistics.
  with timer("methods"):
    for bits in METHOD_BITS[quick]:
      name = f"W{bits}A8 ch minmax"
      if not any(r["name"] == f"PTQ {name}" for r in rows):
        qparams = jq.quantize_params(model.apply, params, recipe(bits),
                                     example, stats=stats["minmax"])
        add(f"PTQ {name}", "PTQ", bits, "channel", "minmax",
            accuracy(qapply(bits, "channel"), qparams, x_test, y_test),
            qparams)
      for method, how in METHODS.items():
        rec = recipe(bits, method=how)
        start = time.perf_counter()
        method_stats = jq.calibrate(model.apply, params, rec, batches,
                                    progress=common.tty())
        qparams = jax.block_until_ready(jq.quantize_params(
            model.apply, params, rec, example, stats=method_stats,
            progress=False))
        seconds = time.perf_counter() - start
        add(f"{method} {name}", method, bits, "channel", "minmax",
            accuracy(qapply(bits, "channel"), qparams, x_test, y_test),
            qparams, {"quantize_seconds": seconds})

  # -- QAT from scratch, and PTQ + quantization-aware fine-tuning
  def quantize_and_eval(name, method, bits, trained, info):
    qparams = jq.quantize_params(model.apply, trained, recipe(bits), example)
    extra = {"train": info}
    if not quick:  # the fake-quant forward, for comparison (one more compile)
      fake = jax.jit(jq.fake_quant_apply(model.apply, recipe(bits)))
      extra["fake_quant_accuracy"] = accuracy(fake, trained, x_test, y_test)
    return add(name, method, bits, "channel", "dynamic",
               accuracy(qapply(bits, "channel"), qparams, x_test, y_test),
               qparams, extra)

  qat_bits = (4,) if quick else (8, 4, 2)
  qaft_bits = (4,) if quick else (4, 2)
  with timer("QAT"):
    for bits in qat_bits:
      common.log(f"QAT {bits}-bit from scratch")
      trained, info = trainer.fit(f"fq{bits}", jq.fake_quant_apply(
          model.apply, recipe(bits)), init, x_train, y_train, epochs=epochs,
          lr=LR, seed=seed, desc=f"QAT W{bits}")
      quantize_and_eval(f"QAT W{bits}A8 ch", "QAT", bits, trained, info)
  qaft_epochs = min(QAFT_EPOCHS, epochs)
  with timer("QAFT"):
    for bits in qaft_bits:
      common.log(f"QAFT {bits}-bit from float, {qaft_epochs:g} epoch")
      trained, info = trainer.fit(f"fq{bits}", jq.fake_quant_apply(
          model.apply, recipe(bits)), params, x_train, y_train,
          epochs=qaft_epochs, lr=QAFT_LR, seed=seed + 2,
          desc=f"QAFT W{bits}")
      quantize_and_eval(f"QAFT W{bits}A8 ch", "QAFT", bits, trained, info)

  # -- latency: every distinct computation, interleaved in rounds
  rounds, calls = (2, 1) if quick else (7, 5)
  with timer("timing"):
    ratios, float_seconds = latency(timing_args, rounds, calls, seed)
  for row in rows:
    row["latency_ratio"] = ratios[row["exec"]]
  # -- which matmuls of each int8 computation run int8, before and after XLA
  with timer("int8 ops"):
    int8_ops = {key: jq.int8_ops(fn, *args)._asdict()
                for key, (fn, args) in timing_args.items() if key != "float"}

  # -- per-layer diagnosis of the low-bit PTQ models (full run only)
  layers = {}
  if not quick:
    with timer("layer report"):
      for bits in (4, 2):
        rep = jq.layer_report(model.apply, params, recipe(bits),
                              x_test[:256], stats=stats["minmax"])
        layers[f"W{bits}A8 ch minmax"] = rep

  float_acc = float_row["accuracy"]
  for row in rows:
    row["delta_points"] = 100 * (row["accuracy"] - float_acc)
  config = {"quick": quick, "seed": seed, "epochs": epochs,
            "qaft_epochs": qaft_epochs, "train_images": len(x_train),
            "test_images": len(x_test), "batch": trainer.batch,
            "calibration_batch": BATCH, "lr": LR,
            "qaft_lr": QAFT_LR, "calibration_batches": calib_batches,
            "timing_batch": EVAL_BATCH, "timing_rounds": rounds,
            "timing_calls_per_round": calls,
            "float_ms_per_batch": 1000 * float_seconds,
            "timing_noise_float_vs_float": ratios["float again"],
            "parameters": int(sum(np.size(l) for l in
                                  jax.tree_util.tree_leaves(params))),
            "backend": jax.default_backend(),
            "cpu_count": _cpu_count()}
  return {"config": config, "rows": rows, "seconds": {},
          "int8_ops": int8_ops, "targets": targets(rows, float_acc),
          "calibrated_ranges": {obs: str(st.table())
                                for obs, st in stats.items()},
          "layer_reports": {k: str(v) for k, v in layers.items()},
          "_layer_objects": layers}


def _cpu_count():
  import os
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
      else os.cpu_count()


def targets(rows, float_acc) -> dict:
  """Full-run goals: W8A8 PTQ within 0.3 points, 4-bit QAT within 0.5."""
  def gap(pred):
    sel = [r for r in rows if pred(r)]
    if not sel:
      return None
    worst = min(sel, key=lambda r: r["accuracy"])
    best = max(sel, key=lambda r: r["accuracy"])
    return {"worst": worst["name"],
            "worst_gap_points": 100 * (float_acc - worst["accuracy"]),
            "best": best["name"],
            "best_gap_points": 100 * (float_acc - best["accuracy"])}

  w8 = gap(lambda r: r["method"] == "PTQ" and r["weight_bits"] == 8)
  q4 = gap(lambda r: r["method"] == "QAT" and r["weight_bits"] == 4)
  out = {}
  if w8:
    out["W8A8 PTQ within 0.3 points"] = dict(
        w8, met=w8["worst_gap_points"] <= 0.3)
  if q4:
    out["4-bit QAT within 0.5 points"] = dict(
        q4, met=q4["worst_gap_points"] <= 0.5)
  return out


# ------------------------------------------------------------------ outputs


def table_rows(rows) -> list[dict]:
  return [{"variant": r["name"], "method": r["method"],
           "weights": ("float32" if r["weight_bits"] == 32 else
                       f"int{r['weight_bits']}/{GRAN[r['granularity']]}"),
           "acts": ("float32" if r["act"] == "float" else
                    "int8 " + ("dynamic" if r["calibration"] == "dynamic"
                               else f"static {r['calibration']}")),
           "accuracy %": f"{100 * r['accuracy']:.2f}",
           "Δ points": f"{r['delta_points']:+.2f}",
           "param bytes": f"{r['bytes']:,}",
           "bytes / float": f"{r['bytes'] / rows[0]['bytes']:.3f}",
           "latency × float": f"{r['latency_ratio']:.2f}"} for r in rows]


def markdown(report) -> str:
  cfg, rows = report["config"], report["rows"]
  table = common.format_table(table_rows(rows))
  lines = [
      "# MNIST CNN: float vs PTQ vs GPTQ / AWQ vs QAT vs QAFT", "",
      (f"{'Quick' if cfg['quick'] else 'Full'} run, seed {cfg['seed']}: "
       f"Conv16-Conv32 (3x3, ReLU, 2x2 max pool) - Dense128 - Dense10, "
       f"{cfg['parameters']:,} parameters; {cfg['train_images']:,} training "
       f"/ {cfg['test_images']:,} test images; Adam, batch {cfg['batch']}, "
       f"cosine learning rate from {cfg['lr']:g}, {cfg['epochs']:g} "
       f"epoch(s) for float and for QAT (trained from scratch from the same "
       f"initialisation); QAFT fine-tunes the float model for "
       f"{cfg['qaft_epochs']:g} epoch(s) from {cfg['qaft_lr']:g}. "
       f"Static activation scales: {cfg['calibration_batches']} training "
       f"batches of {cfg['calibration_batch']}. Every quantized row runs int8 "
       f"(`jq.quantized_apply`). Latency: {cfg['timing_rounds']} interleaved "
       f"rounds x {cfg['timing_calls_per_round']} call(s) on a batch of "
       f"{cfg['timing_batch']} ({cfg['backend']}, {cfg['cpu_count']} "
       f"core(s), float {cfg['float_ms_per_batch']:.1f} ms / batch; float "
       f"timed twice per round in random order gives a ratio of "
       f"{cfg['timing_noise_float_vs_float']:.2f}, the noise level); rows "
       f"running the same computation share one measurement."), "", table]
  if report["targets"]:
    lines += ["## Targets" + (" (set for the full run; quick run shown "
                              "for reference)" if cfg["quick"] else ""), ""]
    def vs_float(gap):
      return (f"{abs(gap):.2f} points {'below' if gap > 0 else 'above'} "
              "float" if round(gap, 2) else "same as float")

    for goal, t in report["targets"].items():
      lines.append(
          f"- {goal}: {'met' if t['met'] else 'MISSED'} (worst "
          f"{t['worst']}: {vs_float(t['worst_gap_points'])}; best "
          f"{t['best']}: {vs_float(t['best_gap_points'])})")
    lines.append("")
  lines += method_lines(rows)
  lines += ["## Wall-clock seconds", "",
            ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
            ""]
  for obs, text in report["calibrated_ranges"].items():
    lines += [(f"## Static activation ranges, observer {obs!r} "
               "(`jq.report(stats)`)"), "", "```", text, "```", ""]
  for name, text in report["layer_reports"].items():
    lines += [f"## Per-layer report, PTQ {name} (`jq.layer_report`)", "",
              "```", text, "```", ""]
  return "\n".join(lines)


def method_lines(rows) -> list[str]:
  """GPTQ / AWQ against their round-to-nearest twins, per weight spec."""
  out = []
  for r in rows:
    if r["method"] in METHODS:
      twin = r["name"].replace(r["method"], "PTQ", 1)
      (rtn,) = [t for t in rows if t["name"] == twin]
      out.append(f"- {r['name']}: {100 * r['accuracy']:.2f} % vs "
                 f"{100 * rtn['accuracy']:.2f} % rounded to nearest "
                 f"({100 * (r['accuracy'] - rtn['accuracy']):+.2f} points); "
                 f"`jq.calibrate` + `jq.quantize_params` "
                 f"{r['quantize_seconds']:.1f} s wall")
  if not out:
    return []
  return ["## Calibrated rounding vs round-to-nearest", "",
          "Default settings (`" + "`, `".join(map(repr, METHODS.values()))
          + "`), same weight spec as the PTQ twin and static minmax int8 "
          "activations (AWQ's range is that of x / s, its pre-scaled "
          "input); calibrated on the same batches; seconds: first call, "
          "compilation included, shared machine.", "",
          *out, ""]


def _clusters(rows, yfrac):
  """Groups points that would overlap: same weight bits, close in y."""
  groups = []
  for r in sorted(rows, key=lambda r: (r["weight_bits"], -r["accuracy"])):
    last = groups[-1] if groups else None
    if (last and last[-1]["weight_bits"] == r["weight_bits"]
        and yfrac(last[-1]["accuracy"]) - yfrac(r["accuracy"]) < 0.12):
      last.append(r)
    else:
      groups.append([r])
  return groups


def plot_pareto(rows, path):
  """Accuracy vs bytes (log x); labels in a column beside each cluster."""
  import matplotlib.pyplot as plt
  colors = {"float": "k", "PTQ": "#4477aa", "GPTQ": "#aa3377",
            "AWQ": "#ee7733", "QAT": "#cc3311", "QAFT": "#228833"}
  float_acc = rows[0]["accuracy"]
  low = min(r["accuracy"] for r in rows)
  panels = [(0.0, 1.02, "all variants")]
  zoom = [r["accuracy"] for r in rows if r["accuracy"] >= float_acc - 0.03]
  if len(zoom) < len(rows):
    panels.append((min(zoom) - 0.002, max(zoom) + 0.002,
                   "zoom: within 3 points of float"))
  else:
    panels = [(low - 0.002, float_acc + 0.002, "all variants")]
  frontier, best = [], -1.0
  for r in sorted(rows, key=lambda r: (r["bytes"], -r["accuracy"])):
    if r["accuracy"] > best:
      frontier.append(r)
      best = r["accuracy"]
  xs = [r["bytes"] for r in rows]
  fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels), 6.5),
                           squeeze=False)
  zoom_lo = panels[-1][0] if len(panels) > 1 else None
  for ax, (lo, hi, title) in zip(axes[0], panels):
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.25, max(xs) * 3.0)
    ax.set_ylim(100 * lo, 100 * hi)
    for method, color in colors.items():
      sel = [r for r in rows if r["method"] == method]
      if sel:
        ax.scatter([r["bytes"] for r in sel],
                   [100 * r["accuracy"] for r in sel], c=color, s=24,
                   label=method, zorder=3)
    ax.step([r["bytes"] for r in frontier] + [max(xs) * 3.0],
            [100 * r["accuracy"] for r in frontier] + [100 * best],
            where="post", color="0.6", lw=1, zorder=1, label="Pareto front")
    yfrac = lambda a, lo=lo, hi=hi: (a - lo) / (hi - lo)
    shown = [r for r in rows if lo <= r["accuracy"] <= hi]
    to_axes = ax.transAxes.inverted()
    for group in _clusters(shown, yfrac):
      if (ax is axes[0][0] and zoom_lo is not None and len(group) > 1
          and min(r["accuracy"] for r in group) >= zoom_lo):
        # Shown one by one in the zoom panel: one summary label here.
        accs = [100 * r["accuracy"] for r in group]
        r = max(group, key=lambda r: r["accuracy"])
        ax.annotate(f"W{r['weight_bits']}: {len(group)} variants\n"
                    f"{min(accs):.2f}-{max(accs):.2f}\n(see zoom)",
                    (r["bytes"], max(accs)), xytext=(5, -6),
                    textcoords="offset points", fontsize=6.5, va="top")
        continue
      n, step = len(group), 0.032
      center = sum(yfrac(r["accuracy"]) for r in group) / n
      top = min(0.98, max(0.02 + (n - 1) * step, center + (n - 1) * step / 2))
      for k, r in enumerate(group):
        px = to_axes.transform(ax.transData.transform(
            (r["bytes"], 100 * r["accuracy"])))[0]
        ax.annotate(f"{r['name'].removeprefix('PTQ ')}  "
                    f"{100 * r['accuracy']:.2f}",
                    (r["bytes"], 100 * r["accuracy"]),
                    xytext=(px + 0.035, top - k * step),
                    textcoords="axes fraction", fontsize=6.5, va="center",
                    color=colors[r["method"]],
                    arrowprops={"arrowstyle": "-", "lw": 0.4,
                                "color": "0.5"})
    ax.set_xlabel("parameter bytes (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  fig.suptitle("MNIST CNN: test accuracy vs parameter bytes")
  fig.tight_layout()
  common.save_figure(fig, path)


def plot_calibration(rows, path):
  """Accuracy per PTQ weight setting and activation-scale method; below,
  the static calibrations' difference to dynamic scales in points."""
  import matplotlib.pyplot as plt
  ptq = [r for r in rows if r["method"] == "PTQ"]
  settings = list(dict.fromkeys((r["weight_bits"], r["granularity"])
                                for r in ptq))
  calibs = [c for c in ("dynamic", "minmax", "mse")
            if any(r["calibration"] == c for r in ptq)]
  acc = {(r["weight_bits"], r["granularity"], r["calibration"]): r["accuracy"]
         for r in ptq}
  colors = {"dynamic": "#bbbbbb", "minmax": "#4477aa", "mse": "#ee7733"}
  fig, (top, bottom) = plt.subplots(
      2, 1, figsize=(max(7, 1.4 * len(settings) + 2), 7.5), sharex=True,
      gridspec_kw={"height_ratios": [3, 2]})
  width = 0.8 / len(calibs)
  offset = lambda j: [i + (j - (len(calibs) - 1) / 2) * width
                      for i in range(len(settings))]
  for j, calib in enumerate(calibs):
    ys = [100 * acc.get((b, g, calib), np.nan) for b, g in settings]
    bars = top.bar(offset(j), ys, width, label=calib, color=colors[calib])
    for bar, y in zip(bars, ys):
      if not np.isnan(y):
        top.text(bar.get_x() + bar.get_width() / 2, y + 1, f"{y:.2f}",
                 ha="center", va="bottom", fontsize=6, rotation=90)
    if calib != "dynamic":
      deltas = [100 * (acc[(b, g, calib)] - acc[(b, g, "dynamic")])
                if (b, g, calib) in acc and (b, g, "dynamic") in acc
                else np.nan for b, g in settings]
      bottom.bar(offset(j), deltas, width, color=colors[calib], label=calib)
  top.axhline(100 * rows[0]["accuracy"], color="k", ls="--", lw=1,
              label="float")
  top.set_ylim(0, 112)
  top.set_ylabel("test accuracy (%)")
  top.set_title("PTQ activation scales: dynamic (per example) vs static "
                "min/max vs static MSE")
  top.legend(fontsize=8, loc="lower left")
  bottom.axhline(0, color="k", lw=0.8)
  bottom.set_ylabel("static - dynamic (points)")
  bottom.legend(fontsize=8)
  bottom.set_xticks(range(len(settings)))
  bottom.set_xticklabels([f"W{b}A8 {GRAN[g]}" for b, g in settings])
  bottom.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, path)


def figures(report) -> dict:
  out = {"pareto.png": lambda path: plot_pareto(report["rows"], path),
         "calibration.png": lambda path: plot_calibration(report["rows"],
                                                          path)}
  for name, rep in report["_layer_objects"].items():
    out[f"layers/{name.split()[0].lower()}"] = rep.plot
  return out


def parser():
  p = common.parser(__doc__, NAME,
                    quick="5k / 2k images, 1 epoch, fewer variants (CI)")
  p.add_argument("--epochs", type=float, default=None,
                 help="float and QAT epochs (default 3, quick 1)")
  return p


def main(argv=None):
  return common.main(NAME, parser, run, markdown, figures, argv)


if __name__ == "__main__":
  main()
