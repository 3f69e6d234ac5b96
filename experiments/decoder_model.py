"""A Llama-style decoder in Flax Linen with a functional KV cache.

Token embedding; `n_layers` pre-norm blocks of RMSNorm -> causal multi-head
self-attention with rotary position embeddings (RoPE; separate q / k / v / o
projections) -> residual, RMSNorm -> SwiGLU MLP (gate / up / down) ->
residual; a final RMSNorm and the LM head: an untied `nn.Dense`, or with
`Config.tied` the embedding table itself (`nn.Embed.attend`). Every weight
matmul is an `nn.Dense` without bias (params named `kernel`), so the recipe
`jq.Rule(r".*kernel", ...)` quantizes all of them; the embedding stays
float unless tied, where the LM head is a matmul with the embedding table.

The KV cache is an argument and a result, never module state:

  cache = init_cache(config, batch)                 # zeros
  logits, cache = model.apply(params, tokens, cache, pos)

`tokens` (B, T) int32 start at position `pos` (an int32 scalar, traced or
not); the new keys / values are written at [pos, pos + T) with
`lax.dynamic_update_slice`, and each query attends to the cache positions
up to its own (causal). One function serves prefill (T = prompt length,
pos = 0) and decode (T = 1, pos = prompt length + step).

Parameters are random: there are no checkpoints here (and no network).
`init_params` draws them with `model.init` and scales the query and key
projections by `QK_GAIN` = 1.5. At Flax's default init (gain 1) attention
over random embeddings is nearly uniform, the next token depends mostly on
the current one, and greedy decoding of SMALL repeats itself: seed 0, a
64-token continuation had 40 distinct tokens, one of them 19 times. Sharper
attention makes the continuation depend on the context (gain 1.5: 63
distinct, 2: 64) but also amplifies small weight errors: the relative error
of the prefill logits under int8 weights (W8A16) was 0.025 at gain 1, 0.053
at 1.5 and 0.128 at 2 (for every gain 0.016 at position 0, which attends
only to itself). 1.5 is the compromise.

Sizes (`param_count`): `SMALL` 168.3M parameters (673 MB in float32),
`TINY` 492,160.

Example:
  >>> model = Decoder(TINY)
  >>> params = init_params(model, seed=0)
  >>> tokens = jnp.zeros((2, 5), jnp.int32)
  >>> logits, cache = model.apply(params, tokens, init_cache(TINY, 2), 0)
  >>> logits.shape, cache[0]["k"].shape
  ((2, 5, 256), (2, 64, 4, 32))
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

QK_GAIN = 1.5  # multiplies the q and k kernels drawn by model.init


@dataclasses.dataclass(frozen=True)
class Config:
  """Decoder hyper-parameters; `max_len` is the default KV cache length."""

  vocab: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_len: int
  tied: bool = False

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


# About Llama's proportions at 1/4 of its width: 168.3M parameters untied.
SMALL = Config(vocab=32000, d_model=1024, n_layers=8, n_heads=16, d_ff=2816,
               max_len=512)
TINY = Config(vocab=256, d_model=128, n_layers=2, n_heads=4, d_ff=384,
              max_len=64)


def rope(x, positions, base: float = 10000.0):
  """Rotary position embedding of `x` (B, T, heads, head_dim) at
  `positions` (T,): pairs (i, i + head_dim/2) rotate by pos * base^(-2i/d).
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, name=name)


class Attention(nn.Module):
  """Causal multi-head self-attention over the KV cache, with RoPE."""

  config: Config

  @nn.compact
  def __call__(self, x, cache, pos):
    cfg = self.config
    batch, length, _ = x.shape
    heads, dim = cfg.n_heads, cfg.head_dim
    split = lambda y: y.reshape(batch, length, heads, dim)
    positions = pos + jnp.arange(length, dtype=jnp.int32)
    q = rope(split(_dense(cfg.d_model, "q")(x)), positions)
    k = rope(split(_dense(cfg.d_model, "k")(x)), positions)
    v = split(_dense(cfg.d_model, "v")(x))
    start = (jnp.int32(0), pos, jnp.int32(0), jnp.int32(0))
    keys = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                    start)
    values = lax.dynamic_update_slice(cache["v"],
                                      v.astype(cache["v"].dtype), start)
    scores = jnp.einsum("bthd,bshd->bhts", q, keys) / jnp.sqrt(
        jnp.float32(dim))
    # Query t (at pos + t) sees cache slots 0 .. pos + t; later slots are
    # zeros or stale entries of a longer earlier sequence.
    visible = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, values)
    out = _dense(cfg.d_model, "o")(out.reshape(batch, length, cfg.d_model))
    return out, {"k": keys, "v": values}


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = nn.silu(_dense(cfg.d_ff, "gate")(x)) * _dense(cfg.d_ff, "up")(x)
    return _dense(cfg.d_model, "down")(h)


class Block(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: Config

  @nn.compact
  def __call__(self, x, cache, pos):
    attn, cache = Attention(self.config, name="attn")(
        nn.RMSNorm(name="attn_norm")(x), cache, pos)
    x = x + attn
    x = x + MLP(self.config, name="mlp")(nn.RMSNorm(name="mlp_norm")(x))
    return x, cache


class Decoder(nn.Module):
  """`(tokens (B, T), cache, pos) -> (logits (B, T, vocab), new cache)`."""

  config: Config

  @nn.compact
  def __call__(self, tokens, cache, pos):
    cfg = self.config
    pos = jnp.asarray(pos, jnp.int32)
    embed = nn.Embed(cfg.vocab, cfg.d_model, name="embed")
    x = embed(tokens)
    new_cache = []
    for i, layer_cache in enumerate(cache):
      x, layer_cache = Block(cfg, name=f"layer_{i}")(x, layer_cache, pos)
      new_cache.append(layer_cache)
    x = nn.RMSNorm(name="norm")(x)
    logits = embed.attend(x) if cfg.tied else _dense(cfg.vocab, "lm_head")(x)
    return logits, new_cache


def init_cache(config: Config, batch: int, length: int | None = None,
               dtype=jnp.float32) -> list[dict]:
  """Zeros: per layer {"k", "v"} of shape (batch, length, heads, head_dim).

  `length` defaults to `config.max_len`; a benchmark that generates
  prompt + new tokens allocates just that, since every decode step reads
  the whole cache (masked)."""
  shape = (batch, length or config.max_len, config.n_heads, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.n_layers)]


def init_params(model: Decoder, seed: int = 0):
  """Random `{"params": ...}` from `model.init`, q / k kernels x QK_GAIN."""
  cfg = model.config
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(seed), tokens,
                               init_cache(cfg, 1, 1), jnp.int32(0))

  def scale(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    query_or_key = "attn" in names and names[-2] in ("q", "k")
    return leaf * QK_GAIN if query_or_key else leaf

  return jax.tree_util.tree_map_with_path(scale, params)


def param_count(params) -> int:
  """The number of parameters (float leaves)."""
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
