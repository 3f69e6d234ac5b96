"""`make demo`: a small Flax MLP on scikit-learn's digits, float vs quantized.

  python -m experiments.demo [--quick] [--out DIR] [--seed S] [--epochs N]

Data: `experiments.data.load_digits_split(seed)` (1347 train / 450 test
images). Model: an MLP 64-128-128-10 (ReLU), trained with Adam (3e-3,
batch 64) for `--epochs` epochs (default 30; --quick 5) by `common.train`.
Then: weights quantized at int8 per channel, int4 per group of 32 and int2
per channel (dequantized, float matmuls), and W8A8 with activation scales
calibrated on 4 training batches of 128, run with real int8 matmuls
(`jq.quantized_apply`). Reports test accuracy and parameter bytes
(`jq.nbytes`), and `jq.report` of the W8A8 model. Writes results.md and
results.json to results/demo/ (or --out) and prints them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxquant as jq
from experiments import common
from experiments.data import load_digits_split

NAME = "demo"
EPOCHS, QUICK_EPOCHS = 30, 5


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def fit(model, x, y, *, epochs=EPOCHS, batch=64, seed=0, apply_fn=None):
  """`model` initialised from `seed` and trained with Adam (3e-3) on
  softmax cross-entropy; `apply_fn` may be a fake-quant apply (QAT)."""
  params = model.init(jax.random.key(seed), x[:1])
  params, _ = common.train(
      apply_fn or model.apply, params,
      common.shuffled_batches(x, y, batch, seed), tx=optax.adam(3e-3),
      steps=epochs * (len(x) // batch), desc="train")
  return params


def accuracy(apply_fn, params, x, y) -> float:
  return float((jnp.argmax(apply_fn(params, x), -1) == y).mean())


def parser():
  p = common.parser(__doc__, NAME, quick=f"{QUICK_EPOCHS} epochs")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"training epochs (default {EPOCHS}, quick "
                 f"{QUICK_EPOCHS})")
  return p


def run(args) -> dict:
  epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
  x_train, y_train, x_test, y_test = load_digits_split(args.seed)
  model = MLP()
  params = fit(model, x_train, y_train, epochs=epochs, seed=args.seed)
  rows = [{"model": "float32",
           "accuracy": accuracy(model.apply, params, x_test, y_test),
           "param_bytes": jq.nbytes(params)}]
  for name, spec in [("int8 per-channel", jq.int8()),
                     ("int4 per-group (32)", jq.int4(group_size=32)),
                     ("int2 per-channel", jq.int2())]:
    recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
    qparams = jq.quantize_tree(params, recipe)
    rows.append({"model": "weights " + name,
                 "accuracy": accuracy(model.apply,
                                      jq.dequantize_tree(qparams), x_test,
                                      y_test),
                 "param_bytes": jq.nbytes(qparams)})

  # Real int8 execution: int8 weights, activations with calibrated scales.
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.uint8())])
  stats = jq.calibrate(model.apply, params, recipe,
                       [x_train[i:i + 128] for i in range(0, 512, 128)],
                       progress=common.tty())
  qparams = jq.quantize_params(model.apply, params, recipe, x_test,
                               stats=stats)
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
  rows.append({"model": "W8A8 int8 matmuls (static)",
               "accuracy": accuracy(qapply, qparams, x_test, y_test),
               "param_bytes": jq.nbytes(qparams)})
  ops = jq.int8_ops(qapply, qparams, x_test)
  return {"config": {"quick": args.quick, "seed": args.seed,
                     "epochs": epochs, "train_images": len(x_train),
                     "test_images": len(x_test)},
          "rows": rows, "int8_ops": ops._asdict(),
          "report": str(jq.report(model.apply, qparams, recipe, x_test))}


def markdown(report) -> str:
  cfg = report["config"]
  lines = [f"{'model':<28}{'accuracy':>10}{'param bytes':>14}"]
  lines += [f"{r['model']:<28}{r['accuracy']:>10.4f}{r['param_bytes']:>14,}"
            for r in report["rows"]]
  table = "\n".join(lines)
  return (f"# Digits MLP: float vs quantized\n\n"
          f"digits: {cfg['train_images']} train / {cfg['test_images']} test "
          f"images, MLP 64-128-128-10 trained {cfg['epochs']} epochs, seed "
          f"{cfg['seed']}\n\n```\n{table}\n```\n\n"
          f"`jq.report` of the W8A8 model:\n\n```\n{report['report']}\n```\n")


def main(argv=None):
  return common.main(NAME, parser, run, markdown, None, argv)


if __name__ == "__main__":
  main()
