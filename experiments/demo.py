"""`make demo`: train a small Flax classifier on scikit-learn's digits, quantize
it, and compare float and quantized accuracy and parameter bytes.

  python -m experiments.demo [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxquant as jq


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def digits(seed: int = 0):
  """(x_train, y_train, x_test, y_test): 8x8 digits in [0, 1], 75/25 split."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(0.75 * len(x))
  train, test = order[:cut], order[cut:]
  return x[train], y[train], x[test], y[test]


def train(model, x, y, *, epochs=30, batch=64, seed=0, apply_fn=None):
  """Adam on softmax cross-entropy; `apply_fn` may be a fake-quant apply."""
  apply_fn = apply_fn or model.apply
  params = model.init(jax.random.key(seed), x[:1])
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = apply_fn(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i:i + batch]
      params, state = step(params, state, x[idx], y[idx])
  return params


def accuracy(apply_fn, params, x, y) -> float:
  return float((jnp.argmax(apply_fn(params, x), -1) == y).mean())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  x_train, y_train, x_test, y_test = digits(args.seed)
  model = MLP()
  params = train(model, x_train, y_train, epochs=args.epochs, seed=args.seed)
  float_acc = accuracy(model.apply, params, x_test, y_test)
  print(f"digits: {len(x_train)} train / {len(x_test)} test images")
  print(f"{'model':<28}{'accuracy':>10}{'param bytes':>14}")
  print(f"{'float32':<28}{float_acc:>10.4f}{jq.nbytes(params):>14,}")
  for name, spec in [("int8 per-channel", jq.int8()),
                     ("int4 per-group (32)", jq.int4(group_size=32)),
                     ("int2 per-channel", jq.int2())]:
    recipe = jq.Recipe([jq.Rule(r".*kernel", weight=spec)])
    qparams = jq.quantize_tree(params, recipe)
    acc = accuracy(model.apply, jq.dequantize_tree(qparams), x_test, y_test)
    print(f"{'weights ' + name:<28}{acc:>10.4f}{jq.nbytes(qparams):>14,}")

  # Real int8 execution: int8 weights, activations with calibrated scales.
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.uint8())])
  stats = jq.calibrate(model.apply, params, recipe,
                       [x_train[i:i + 128] for i in range(0, 512, 128)])
  qparams = jq.quantize_params(model.apply, params, recipe, x_test,
                               stats=stats)
  qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
  acc = accuracy(qapply, qparams, x_test, y_test)
  print(f"{'W8A8 int8 matmuls (static)':<28}{acc:>10.4f}"
        f"{jq.nbytes(qparams):>14,}")
  print()
  print(jq.report(model.apply, qparams, recipe, x_test))


if __name__ == "__main__":
  main()
