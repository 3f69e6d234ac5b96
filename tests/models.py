"""Models the tests train on digits (tests/data.py), and their training loop.

`zoo.py` holds untrained models of every kind the engine must handle; this
module holds the small classifiers whose accuracy tests compare, plus
`train` (Adam on softmax cross-entropy) and `accuracy`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  """64-128-128-10 on flattened 8x8 images."""

  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


class DigitsCNN(nn.Module):
  """Conv16 - Conv32 - avg pool 2 - Dense64 - Dense10 (ReLU), on (N, 8, 8, 1)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def train(model, x, y, *, epochs, batch=64, seed=0, apply_fn=None):
  """Params of `model` initialised from `seed`, trained with Adam (3e-3) on
  softmax cross-entropy, reshuffling every epoch (the last partial batch
  dropped). `apply_fn` (default `model.apply`) may be a fake-quant apply."""
  apply_fn = apply_fn or model.apply
  params = model.init(jax.random.key(seed), x[:1])
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          apply_fn(p, xb), yb).mean()
    updates, state = opt.update(jax.grad(loss)(params), state, params)
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
