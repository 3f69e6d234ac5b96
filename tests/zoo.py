"""Small models of every kind the engine must handle, with example inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TransformerBlock(nn.Module):
  d_model: int = 64
  heads: int = 4
  d_ff: int = 128

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.DenseGeneral((self.heads, self.d_ff // self.heads))(h)
    h = nn.gelu(h)
    h = nn.Einsum((self.heads, self.d_ff // self.heads, self.d_model),
                  "bthf,hfd->btd")(h)
    return x + h


class Classifier(nn.Module):
  """TransformerBlock + mean-pool + logits, so argmax agreement is defined."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64)(x)
    x = TransformerBlock()(x)
    return nn.Dense(10)(x.mean(axis=1))


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(x.shape[-1])(nn.tanh(nn.Dense(64)(x))), None


class ScannedStack(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32)(x)
    Stack = nn.scan(nn.remat(ScanBody), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=self.layers)
    x, _ = Stack()(x, None)
    return nn.Dense(10)(x)


class TiedLM(nn.Module):
  vocab: int = 50
  dim: int = 32

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.dim)
    x = embed(ids)
    x = nn.relu(nn.Dense(self.dim)(x))
    return embed.attend(x)  # x @ embedding.T


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.linear1 = nnx.Linear(20, 64, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.linear1(x)))


def plain_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (20, 64)) / 4.5,
          "b1": jnp.zeros(64),
          "w2": jax.random.normal(k2, (64, 10)) / 8.0}


def plain_apply(params, x):
  h = jnp.maximum(x @ params["w1"] + params["b1"], 0.0)
  return jnp.dot(h, params["w2"])


def rnn_apply(params, xs):
  """A plain-JAX RNN: xs (time, batch, features); one `w` (features, 8)
  and one `u` (8, 8) for every step of a `lax.scan`."""
  def step(h, x):
    h = jnp.tanh(x @ params["w"] + h @ params["u"])
    return h, h
  return jax.lax.scan(step, jnp.zeros((xs.shape[1], 8)), xs)[1]


def param_tree():
  """A Linen-style variables dict (no model): an embedding, two Dense
  layers and an integer step counter, for tree and checkpoint tests."""
  k = jax.random.split(jax.random.key(0), 3)
  return {"params": {
      "embed": {"embedding": jax.random.normal(k[0], (50, 16))},
      "Dense_0": {"kernel": jax.random.normal(k[1], (16, 32)),
                  "bias": jnp.zeros(32)},
      "Dense_1": {"kernel": jax.random.normal(k[2], (32, 10)),
                  "bias": jnp.zeros(10)},
  }, "step": jnp.array(3, jnp.int32)}


# Mixed precision for `param_tree`: float embedding, int4 g8, int8.
TREE_RECIPE = jq.Recipe([
    jq.Rule(r".*embedding", weight=None),
    jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=8)),
    jq.Rule(r".*kernel", weight=jq.int8()),
])
