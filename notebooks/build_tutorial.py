"""Builds `quantization_tutorial.ipynb` from the cells below (no outputs).

The notebook is written from this script so that it stays reviewable in
diffs; edit the cells here, never the .ipynb, and regenerate:

  python notebooks/build_tutorial.py            # writes the .ipynb
  python notebooks/build_tutorial.py --check    # exit 1 if it is stale

`tests/test_notebook.py` checks that the committed .ipynb equals what this
script generates, and executes it with JAXQUANT_QUICK=1.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("quantization_tutorial.ipynb")

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
  CELLS.append(("markdown", textwrap.dedent(text).strip("\n")))


def code(text: str) -> None:
  CELLS.append(("code", textwrap.dedent(text).strip("\n")))


# ---------------------------------------------------------------------------
# The tutorial

md(r"""
# Quantizing a Flax model with jaxquant

This notebook takes a small Flax CNN trained on scikit-learn's 8x8 digits
(shipped with scikit-learn, so nothing is downloaded) through the six steps
of model quantization:

1. **Dynamic range analysis**: calibrate, look at the ranges of weights and
   activations and at what quantization does to each layer.
2. **Choosing the bit width**: SQNR per bit, per-layer sensitivity, and an
   automatic mixed-precision recipe under a byte budget.
3. **Quantization**: turn the float parameters into integer `QArray`s,
   count the bytes, save and load them.
4. **Quantization-aware training (QAT)**: train with fake-quant in the
   forward pass and straight-through gradients.
5. **Post-training quantization (PTQ)**: static W8A8 with calibrated
   activation scales, executed with real int8 matmuls, and a look at the
   lowered StableHLO.
6. **Quantization-aware fine-tuning (QAFT)**: PTQ to 2-bit weights loses
   accuracy; a short fine-tune with fake-quant wins it back.

It runs top to bottom on a CPU in a minute or two, most of it spent by XLA
compiling. Setting the environment variable `JAXQUANT_QUICK=1` (CI does)
shortens training and calibration: the numbers get a little worse, the
story stays the same.

**Colab.** The first cell installs jaxquant when the notebook runs in
Google Colab, keeping the JAX the runtime already has (jaxquant supports
jax 0.10.2 to 0.12.x). On a TPU runtime (*Runtime → Change runtime type →
TPU*) JAX picks the TPU automatically; nothing in the notebook changes.
""")

code(r"""
# Colab only: install jaxquant (outside Colab this cell does nothing).
# EDIT OWNER below to the GitHub account or organisation hosting jaxquant.
import sys

JAXQUANT_SPEC = "jaxquant @ git+https://github.com/OWNER/jaxquant"

if "google.colab" in sys.modules:
  import importlib.util
  import subprocess
  # Keep the runtime's JAX (on a TPU runtime it matches libtpu): install
  # jaxquant without resolving its dependencies, then only missing ones.
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  subprocess.run([*pip, "--no-deps", JAXQUANT_SPEC], check=True)
  needed = {"jax": "jax", "msgpack": "msgpack", "tqdm": "tqdm",
            "matplotlib": "matplotlib", "flax": "flax", "optax": "optax",
            "sklearn": "scikit-learn"}
  missing = [p for m, p in needed.items() if importlib.util.find_spec(m) is None]
  if missing:
    subprocess.run([*pip, *missing], check=True)
  import jax
  print("jax", jax.__version__, jax.devices())  # TPU runtime: TpuDevice(...)
""")

code(r"""
%matplotlib inline
import os
import re
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Image, display
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxquant as jq

QUICK = os.environ.get("JAXQUANT_QUICK") == "1"   # set by CI: short run
FLOAT_EPOCHS = 8 if QUICK else 40
QAT_EPOCHS = 8 if QUICK else 40
QAFT_EPOCHS = 3 if QUICK else 10
CALIB_BATCHES = 2 if QUICK else 5
WORK = Path(tempfile.mkdtemp(prefix="jaxquant_tutorial_"))  # figures, files
T0 = time.perf_counter()


def show(fig):
  # Displays a figure inline and closes it, whatever the backend
  # (LayerReport.plot switches matplotlib to Agg).
  fig.tight_layout()
  display(fig)
  plt.close(fig)


print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()}")
print(f"jaxquant {jq.__version__}; {'QUICK' if QUICK else 'full'} mode")
""")

md(r"""
## The data and the float model

1797 grey-scale 8x8 digits with values in [0, 1]. We keep 25% for the test
set and hold out 300 training images as a *validation* set: calibration,
sensitivity analysis and the automatic recipe only ever see those, so the
test accuracy stays an honest estimate.
""")

code(r"""
digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1)
labels = digits.target.astype(np.int32)
x_rest, x_test, y_rest, y_test = train_test_split(
    images, labels, test_size=0.25, random_state=0, stratify=labels)
x_train, x_val, y_train, y_val = train_test_split(
    x_rest, y_rest, test_size=300, random_state=0, stratify=y_rest)
print(f"train {x_train.shape}, validation {x_val.shape}, test {x_test.shape}")

fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for ax, img, label in zip(axes, x_train, y_train):
  ax.imshow(img[..., 0], cmap="gray_r")
  ax.set_title(str(label))
  ax.axis("off")
show(fig)
""")

md(r"""
A small CNN: two convolutions and two dense layers, about 38k parameters.
Nothing in it knows about quantization; jaxquant works on the unmodified
`model.apply`.
""")

code(r"""
class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))               # 8x8x16
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))    # 4x4x32
    x = x.reshape(x.shape[0], -1)                     # 512
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


model = CNN()
init_params = jax.jit(model.init)(jax.random.key(0), x_train[:1])
print(jax.tree_util.tree_map(jnp.shape, init_params))


def train(apply_fn, params, epochs, lr=3e-3, seed=0, eval_fn=None):
  # Adam on softmax cross-entropy. `apply_fn` may be a fake-quant apply
  # function: the loop is the same. Returns params and a per-epoch history.
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss_fn(p):
      logits = apply_fn(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  history = []
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(0, len(order) - 63, 64):
      idx = order[i:i + 64]
      params, state, loss = step(params, state, x_train[idx], y_train[idx])
    history.append(eval_fn(params) if eval_fn else float(loss))
  return params, history


def accuracy(apply_fn, params, x=x_test, y=y_test):
  return float((jnp.argmax(apply_fn(params, x), -1) == y).mean())


float_apply = jax.jit(model.apply)
t = time.perf_counter()
params, float_history = train(
    model.apply, init_params, FLOAT_EPOCHS,
    eval_fn=lambda p: accuracy(float_apply, p))
float_acc = accuracy(float_apply, params)
float_bytes = jq.nbytes(params)
print(f"float32: test accuracy {float_acc:.4f}, {float_bytes:,} parameter "
      f"bytes ({time.perf_counter() - t:.1f} s)")
""")

md(r"""
## Step 1: Dynamic range analysis

An integer grid with $b$ bits covers a range $[lo, hi]$ with a step
(scale) $s$. For a symmetric signed grid, $q_{max} = 2^{b-1} - 1$ and

$$s = \frac{\max(|lo|, |hi|)}{q_{max}}, \qquad
q = \mathrm{clip}\big(\mathrm{round}(x / s), -q_{max}, q_{max}\big), \qquad
\hat x = q\, s .$$

Values inside the range get a rounding error of at most $s/2$; values
outside are clipped. A single outlier stretches the range and coarsens the
step for every other value, so the first thing to know about a model is the
range of each tensor. Weights are known ahead of time. Activations are not:
**calibration** runs a few batches through the float model and records, for
every matmul that the recipe quantizes, the range of the activation that
enters it.

The recipe says what to quantize. `W8A8` below quantizes every kernel to
int8 (one scale per output channel) and the activation multiplied with it to
int8 too.
""")

code(r"""
W8A8 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])
calib = np.split(x_val[:60 * CALIB_BATCHES], CALIB_BATCHES)  # batches of 60

stats = jq.calibrate(model.apply, params, W8A8, calib, observer="minmax",
                     progress=False)
print(stats.table())
""")

md(r"""
The first convolution sees pixels in $[0, 1]$; every later layer sees ReLU
outputs, so all activation ranges start at 0. The observer decides what
range to keep: `minmax` keeps the extremes seen over all batches,
`percentile` keeps the `percent`-th percentile of $|x|$ (99.9 here) and
clips the rest, `mse` picks the clip that minimises the expected squared
error of the quantized values (clipping error against rounding error), and
`ema` averages each batch's min and max with an exponential moving
average.
""")

code(r"""
observers = {"minmax": {}, "percentile": {"percent": 99.9}, "mse": {},
             "ema": {"decay": 0.9}}
all_stats = {"minmax": stats}
for name, kwargs in observers.items():
  if name not in all_stats:
    all_stats[name] = jq.calibrate(model.apply, params, W8A8, calib,
                                   observer=name, observer_options=kwargs,
                                   progress=False)
tables = {name: s.table().rows for name, s in all_stats.items()}
print(f"{'layer':<24}" + "".join(f"{name:>12}" for name in observers))
for i, row in enumerate(tables["minmax"]):
  print(f"{row[0]:<24}" + "".join(f"{tables[name][i][2]:>12.3f}"
                                  for name in observers))
print("(upper end of the activation range each observer keeps)")
""")

md(r"""
`jq.layer_report` quantizes each layer **alone** (all others stay float) and
measures, per layer, the weight SQNR and the SQNR of the layer's output
against the float output, on the same input:

$$\mathrm{SQNR} = 10 \log_{10} \frac{\sum y^2}{\sum (y - \hat y)^2}\ \mathrm{dB}.$$

With `stats`, the activations use the static calibrated scales. `plot()`
writes three figures: weight histograms with the clip of the widest
channel, activation histograms with the calibrated clip, and the SQNR bars.
""")

code(r"""
rep = jq.layer_report(model.apply, params, W8A8, x_val, stats=stats)
print(rep)
for png in rep.plot(WORK / "figures"):
  display(Image(filename=str(png)))
""")

md(r"""
## Step 2: Choosing the bit width

Every bit removed halves the number of levels, doubles the step and
quadruples the rounding noise: for values spread over the range, the SQNR
falls by $20 \log_{10} 2 \approx 6.02$ dB per bit. Below 4 bits the grid
gets so coarse that this rule of thumb breaks down (int2 symmetric is
ternary: $\{-s, 0, s\}$). Here is one weight, `Dense_0/kernel` (the largest
layer), at 8, 4, 3 and 2 bits, and the test accuracy when *every* kernel
uses that width (weights only, activations stay float).
""")

code(r"""
def sqnr_db(ref, approx):
  return float(10 * jnp.log10(jnp.sum(ref**2) / jnp.sum((ref - approx)**2)))


w = params["params"]["Dense_0"]["kernel"]
widths = {8: jq.int8(), 4: jq.int4(), 3: jq.int3(), 2: jq.int2()}
sqnr, acc_bits, size_bits = {}, {}, {}
for bits, spec in widths.items():
  q = jq.quantize(w, spec)                      # per output channel
  sqnr[bits] = sqnr_db(w, q.dequantize())
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])  # weight-only
  qp = jq.quantize_params(model.apply, params, recipe, x_test)
  acc_bits[bits] = accuracy(jax.jit(jq.quantized_apply(model.apply, recipe)),
                            qp)
  size_bits[bits] = jq.nbytes(qp)
  print(f"int{bits}: Dense_0 SQNR {sqnr[bits]:5.1f} dB;  all kernels "
        f"int{bits}: {size_bits[bits]:>7,} bytes, accuracy "
        f"{acc_bits[bits]:.4f}")
print(f"float32: {float_bytes:,} bytes, accuracy {float_acc:.4f}")

bits = np.array(list(widths))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(bits, list(sqnr.values()), "o-", label="measured")
ax1.plot(bits, sqnr[8] - 6.02 * (8 - bits), "--", label="6.02 dB / bit")
ax1.set(xlabel="bits", ylabel="SQNR (dB)", title="Dense_0/kernel")
ax1.legend()
ax2.plot(bits, list(acc_bits.values()), "o-")
ax2.axhline(float_acc, color="gray", ls=":", label="float32")
ax2.set(xlabel="bits", ylabel="test accuracy",
        title="all kernels, weight-only")
ax2.legend()
show(fig)
""")

md(r"""
Layers are not equally sensitive. `jq.sensitivity` quantizes one layer at a
time with the given recipe and reports the **drop** of a metric
($\mathrm{metric(float)} - \mathrm{metric(quantized)}$, higher is worse).
The metric is the validation accuracy here; without a metric it is the
relative output noise power $10^{-\mathrm{SQNR}/10}$.
""")

code(r"""
def val_accuracy(logits):
  return float((jnp.argmax(logits, -1) == y_val).mean())


W2 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int2())])
sens = jq.sensitivity(model.apply, params, W2, x_val, metric=val_accuracy)
for path, drop in sens.items():
  print(f"{path:<26} int2 alone: accuracy drop {drop:+.4f}")

fig, ax = plt.subplots(figsize=(6, 2.8))
ax.bar([p.split("/")[1] for p in sens], list(sens.values()), color="#cc6677")
ax.set(ylabel="validation accuracy drop",
       title="sensitivity: one layer at int2, the rest float")
show(fig)
""")

md(r"""
`jq.auto_recipe` turns this into a mixed-precision recipe: it measures the
drop and the bytes of every layer at every candidate width (`None` keeps a
layer float) and solves the multiple-choice knapsack

$$\min \sum_\ell \mathrm{drop}_\ell(b_\ell) \quad \text{s.t.} \quad
\sum_\ell \mathrm{bytes}_\ell(b_\ell) \le \mathrm{budget}$$

exactly by dynamic programming; the result never loses to a uniform width
that fits the same budget. Accuracy on 300 validation images moves in steps
of 1/300 and ties often, so the metric here is the (negative) validation
cross-entropy, which ranks the choices more finely. The budget lies
halfway between the sizes of uniform int3 and uniform int4 (from the loop
above), so the search has to decide where the extra bits pay off most. The
result is an ordinary `Recipe`: print it, edit it, use it.
""")

code(r"""
def neg_val_loss(logits):
  return -float(optax.softmax_cross_entropy_with_integer_labels(
      logits, y_val).mean())


budget = (size_bits[3] + size_bits[4]) // 2
candidates = ((jq.int8(), jq.int4(), jq.int3(), jq.int2()) if QUICK else
              (jq.int8(), jq.QuantSpec(bits=6), jq.int4(), jq.int3(),
               jq.int2(), None))
t = time.perf_counter()
auto = jq.auto_recipe(model.apply, params, x_val, budget_bytes=budget,
                      metric=neg_val_loss, candidates=candidates)
print(f"budget {budget:,} bytes ({time.perf_counter() - t:.1f} s)")
print(auto)
""")

md(r"""
## Step 3: Quantization

`jq.quantize_params` traces `model.apply` once (abstractly) to find every
parameter that enters a matmul and reads each weight's contracted axes from
the `dot_general` / convolution dimension numbers, so per-channel scales
are per output channel for both `Dense` and `Conv` kernels. It returns the
same tree with `QArray` leaves: integer values (bit-packed below 8 bits),
float scales, and the spec. Biases stay float.
""")

code(r"""
qparams = jq.quantize_params(model.apply, params, auto, x_test)
flat = jax.tree_util.tree_flatten_with_path(
    qparams, is_leaf=lambda a: isinstance(a, jq.QArray))[0]
for path, leaf in flat:
  name = "/".join(str(k.key) for k in path)
  if isinstance(leaf, jq.QArray):
    print(f"{name:<26} {leaf.spec.short():<10} values {leaf.values.dtype}"
          f"{list(leaf.values.shape)}, {leaf.nbytes:>6,} bytes")
  else:
    print(f"{name:<26} {'float':<10} {leaf.dtype}{list(leaf.shape)}, "
          f"{leaf.nbytes:>6,} bytes")
print(f"total: {jq.nbytes(qparams):,} bytes vs {float_bytes:,} float "
      f"({jq.nbytes(qparams) / float_bytes:.1%}; budget {budget:,})")

auto_apply = jax.jit(jq.quantized_apply(model.apply, auto))
auto_acc = accuracy(auto_apply, qparams)
print(f"mixed precision: test accuracy {auto_acc:.4f} (float {float_acc:.4f})")
""")

md(r"""
`jq.save` writes a checksummed msgpack file (no pickle); `jq.load` restores
the `QArray`s exactly. With `like=`, a file that does not match the
expected tree (paths, shapes, specs) is refused.
""")

code(r"""
path = WORK / "digits_cnn.jq"
jq.save(path, qparams)
restored = jq.load(path, like=qparams)
same = jax.tree_util.tree_all(jax.tree_util.tree_map(
    lambda a, b: bool(jnp.array_equal(a, b)), qparams, restored))
print(f"{path.name}: {path.stat().st_size:,} bytes on disk; identical after "
      f"load: {same}; accuracy {accuracy(auto_apply, restored):.4f}")
""")

md(r"""
## Step 4: Quantization-aware training

Rounding has zero gradient almost everywhere, so we cannot train through
it directly. **Fake quantization** computes $\hat x = s \cdot
\mathrm{round}(x / s)$ in the forward pass (the network sees exactly the
quantized values) and uses the **straight-through estimator** in the
backward pass:

$$\frac{\partial \hat x}{\partial x} \approx \begin{cases} 1 & x \text{ inside the
representable range} \\ 0 & \text{clipped.} \end{cases}$$

`jq.fake_quant_apply(model.apply, recipe)` returns an apply function with the
same signature as `model.apply` that does this for every weight and every
activation the recipe quantizes; it drops into an ordinary optax loop. We
train from scratch with **W2A8**: ternary weights (int2 symmetric, one scale
per output channel) and int8 activations, and compare with quantizing the
float model after training.
""")

code(r"""
W2A8 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int2(), act=jq.int8())])
w2a8_apply = jax.jit(jq.quantized_apply(model.apply, W2A8))


def w2a8_accuracy(float_params):
  # Real int execution: quantize the float params, run the int8 model.
  qp = jq.quantize_params(model.apply, float_params, W2A8, x_test)
  return accuracy(w2a8_apply, qp)


qat_apply = jq.fake_quant_apply(model.apply, W2A8)
qat_eval = jax.jit(qat_apply)
t = time.perf_counter()
qat_params, qat_history = train(qat_apply, init_params, QAT_EPOCHS,
                                eval_fn=lambda p: accuracy(qat_eval, p))
qat_acc = w2a8_accuracy(qat_params)
ptq_w2_acc = w2a8_accuracy(params)
print(f"QAT W2A8 from scratch, int execution: accuracy {qat_acc:.4f} "
      f"({time.perf_counter() - t:.1f} s)")
print(f"float model quantized to W2A8 after training: accuracy "
      f"{ptq_w2_acc:.4f}  (float {float_acc:.4f})")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(1, len(float_history) + 1), float_history, label="float")
ax.plot(range(1, len(qat_history) + 1), qat_history, label="QAT W2A8")
ax.axhline(ptq_w2_acc, color="gray", ls=":", label="float -> W2A8 (PTQ)")
ax.set(xlabel="epoch", ylabel="test accuracy", title="training curves")
ax.legend()
show(fig)
""")

md(r"""
The fake-quant forward pass computes what the integer model computes, up
to float rounding (which can move a value sitting right at a rounding
boundary to the neighbouring level), so the accuracy measured during QAT is
what the int8 engine delivers.
""")

code(r"""
logits_fake = qat_eval(qat_params, x_test)
logits_int = w2a8_apply(jq.quantize_params(model.apply, qat_params, W2A8,
                                           x_test), x_test)
agree = float((jnp.argmax(logits_fake, -1) == jnp.argmax(logits_int, -1)).mean())
print(f"fake-quant vs int execution: logits SQNR "
      f"{sqnr_db(logits_int, logits_fake):.1f} dB, same prediction for "
      f"{agree:.1%} of test images")
""")

md(r"""
## Step 5: Post-training quantization: static W8A8, int8 execution

PTQ needs no training: quantize the trained float weights, and use the
calibrated ranges from step 1 as **static** activation scales $s_x$ (one per
tensor) instead of measuring each batch at run time. The matmul then runs on
integers,

$$y = x W \approx (q_x s_x)(q_W s_W) = s_x s_W \,\underbrace{q_x q_W}_{\text{int8}\times\text{int8} \to \text{int32}},$$

and a single float multiply per output channel rescales the int32
accumulator. Each observer's ranges from step 1 give one set of static
scales; the logits SQNR against the float model shows the (small)
differences that the accuracy hides. The activation figure of step 1 shows
that every activation here is non-negative, so half of a symmetric int8
grid is never used: `act=jq.uint8()` (asymmetric, with a zero point $z$,
$\hat x = (q - z)\, s$) puts all 256 levels on $[lo, hi]$.
""")

code(r"""
qapply = jax.jit(jq.quantized_apply(model.apply, W8A8))
float_logits = float_apply(params, x_test)
ptq = {}
for name, s in all_stats.items():
  qp = jq.quantize_params(model.apply, params, W8A8, x_test, stats=s)
  ptq[name] = (qp, accuracy(qapply, qp))
  print(f"static W8A8, {name + ' scales:':<18} accuracy {ptq[name][1]:.4f}, "
        f"logits SQNR {sqnr_db(float_logits, qapply(qp, x_test)):.1f} dB")
dynamic_qp = jq.quantize_params(model.apply, params, W8A8, x_test)
print(f"dynamic W8A8 (per-row scales at run time): accuracy "
      f"{accuracy(qapply, dynamic_qp):.4f}, logits SQNR "
      f"{sqnr_db(float_logits, qapply(dynamic_qp, x_test)):.1f} dB")
print(f"float32: accuracy {float_acc:.4f}")
w8a8_params = ptq["minmax"][0]

# Pixels and ReLU outputs are never negative: a symmetric int8 grid wastes
# its negative half. uint8 activations (with a zero point) use all 256 levels.
W8U8 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.uint8())])
u8_qp = jq.quantize_params(model.apply, params, W8U8, x_test,
                           stats=all_stats["minmax"])
u8_logits = jax.jit(jq.quantized_apply(model.apply, W8U8))(u8_qp, x_test)
print(f"static W8A8, uint8 activations: accuracy "
      f"{float((jnp.argmax(u8_logits, -1) == y_test).mean()):.4f}, "
      f"logits SQNR {sqnr_db(float_logits, u8_logits):.1f} dB")
print(f"int8 parameters: {jq.nbytes(w8a8_params):,} bytes "
      f"({jq.nbytes(w8a8_params) / float_bytes:.1%} of float)")
""")

md(r"""
`jq.report` says how every matmul runs: `int8` (int8 x int8 -> int32),
`weight-only` (dequantized weight, float matmul) or `float`, with the
reason.
""")

code(r"""
rep8 = jq.report(model.apply, w8a8_params, W8A8, x_test)
print(rep8)
""")

md(r"""
The proof is in the compiled program: lowering the jitted function to
StableHLO shows `dot_general` and `convolution` ops whose operands are both
`i8` tensors, accumulating in `i32`.
""")

code(r"""
hlo = qapply.lower(w8a8_params, x_test).as_text()
int8_ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*"
                      r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)[^\n]*", hlo)
float_ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*"
                       r"\(tensor<[^>]*xf32>, tensor<[^>]*xf32>\)", hlo)
print(f"StableHLO: {len(int8_ops)} int8 matmuls/convolutions, "
      f"{len(float_ops)} float32 ones")
for op in int8_ops:
  name = re.search(r"stablehlo\.(\w+)", op).group(1)
  print(f"  {name:<12} {op.rsplit(' : ', 1)[1]}")
assert len(int8_ops) == rep8.count("int8")
""")

md(r"""
## Step 6: Quantization-aware fine-tuning

Quantizing the trained float model straight to 2-bit weights costs a lot
of accuracy (the W2A8 PTQ number of step 4). Training with fake-quant from scratch fixes that but
costs a full training run. **Fine-tuning** is cheaper: start from the float
weights, which are already good, and train for a few epochs with the
fake-quant forward pass and a smaller learning rate, so the weights settle
onto the ternary grid.
""")

code(r"""
t = time.perf_counter()
qaft_params, qaft_history = train(qat_apply, params, QAFT_EPOCHS, lr=1e-3,
                                  eval_fn=w2a8_accuracy)
qaft_acc = qaft_history[-1]
print(f"W2A8 PTQ:                          accuracy {ptq_w2_acc:.4f}")
print(f"W2A8 after {QAFT_EPOCHS} epochs of fine-tuning: accuracy "
      f"{qaft_acc:.4f} ({time.perf_counter() - t:.1f} s)")
print(f"float32:                           accuracy {float_acc:.4f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(0, QAFT_EPOCHS + 1), [ptq_w2_acc, *qaft_history], "o-",
        label="W2A8, int execution")
ax.axhline(float_acc, color="gray", ls=":", label="float32")
ax.set(xlabel="fine-tuning epoch", ylabel="test accuracy",
       title="quantization-aware fine-tuning")
ax.legend()
show(fig)
""")

md(r"""
## Summary
""")

code(r"""
qaft_q = jq.quantize_params(model.apply, qaft_params, W2A8, x_test)
rows = [("float32", float_acc, float_bytes),
        ("PTQ W8A8 static (int8 execution)", ptq["minmax"][1],
         jq.nbytes(w8a8_params)),
        ("mixed precision (auto_recipe)", auto_acc, jq.nbytes(qparams)),
        ("PTQ W2A8", ptq_w2_acc, jq.nbytes(qaft_q)),
        ("QAT W2A8 from scratch", qat_acc, jq.nbytes(qaft_q)),
        ("QAFT W2A8 (fine-tuned)", qaft_acc, jq.nbytes(qaft_q))]
print(f"{'model':<36}{'accuracy':>10}{'bytes':>10}")
for name, acc, size in rows:
  print(f"{name:<36}{acc:>10.4f}{size:>10,}")
print(f"\nnotebook ran in {time.perf_counter() - T0:.0f} s")
""")


# ---------------------------------------------------------------------------


def build() -> nbformat.NotebookNode:
  """The notebook, without outputs; cell ids are stable (cell-00, ...)."""
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3",
                     "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for i, (kind, source) in enumerate(CELLS):
    new = nbformat.v4.new_markdown_cell if kind == "markdown" else (
        nbformat.v4.new_code_cell)
    cell = new(source)
    cell.id = f"cell-{i:02d}"
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def render() -> str:
  return nbformat.writes(build()) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if the .ipynb differs from the cells")
  parser.add_argument("--out", type=Path, default=NOTEBOOK)
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    if current != text:
      print(f"{args.out} is stale; run python {Path(__file__).name}")
      return 1
    return 0
  args.out.write_text(text, encoding="utf-8")
  print(f"wrote {args.out} ({len(CELLS)} cells)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
