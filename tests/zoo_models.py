"""Models from other libraries for tests/test_other_libraries.py.

Small random configs, no downloads. Every constructor returns a `Case`:
the model's `apply(params, *args)`, its params, example args and the few
facts about it the checks need (see `Case`). Parameters come from a jitted
init (eager init compiles every op on its own), and the model functions are
only ever called jitted by the test.

Sizes keep grouped W4A8 on its int8 lowering: on this CPU a grouped weight
runs one int8 dot per group while groups x rows <= 2048 and a float dot of
the quantized activation beyond (README, "Lowering per machine and shape"),
so token inputs are 32 x 16 (512 rows, at most 4 groups of 16: MLPs of
width 64) and the CNN heads take a global average pool (16 features, one
group), not the flattened feature map.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The weight names of each library, for the rule's `re.fullmatch`.
KERNEL = r".*(kernel|embedding|w)"  # Flax Linen / NNX, Hugging Face, haiku
EQX_WEIGHT = r".*weight(_ih|_hh)?"  # eqx.nn.Linear / Conv / GRUCell
STAX_WEIGHT = r"\d+/0"              # stax.serial: [(W, b), (), (W, b)]
CONV = r".*conv.*/(w|weight|kernel)"  # the convolutions of the CNNs below


@dataclasses.dataclass
class Case:
  """One model and what the checks need to know about it.

  Attributes:
    apply: `apply(params, *args)`, the library's own forward pass.
    params: its parameter pytree (state leaves included where the model
      has them).
    args: example inputs.
    pattern: the regex of the weights the recipes quantize.
    min_matmuls: at least this many matmuls with a parameter operand.
    computed: matmuls whose weight is computed from parameters by
      arithmetic (weight normalisation): they run in float by design
      (README, "Everything else stays correct") and `jq.report` names them.
    w4_per_channel: the weights that contract several axes (convolutions:
      (kh, kw, in); NNX attention's output kernel: (heads, head_dim)).
      Grouped int4 needs the group axis to be a weight's only contracted
      axis to run int8 (README, "Per-group weights with an `act` spec"),
      and groups run along the last contracted axis that the group size
      divides: a first conv on 3 image channels (kernel 3 x 3) has none,
      and group_size=16 raises. W4A8 gives them int4 per channel (still
      int8 x int8); every other weight is grouped.
    classes_axis: the axis argmax agreement is taken over.
  """

  apply: Callable
  params: Any
  args: tuple
  pattern: str = KERNEL
  min_matmuls: int = 3
  computed: int = 0
  w4_per_channel: str | None = None
  classes_axis: int = -1
  model: Any = None  # the library's model object, where a test needs it


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape)


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (32, 16)))


# ---------------------------------------------------------------------------
# Hugging Face Flax (transformers<5, no torch)


def _hf_init(cls, cfg, input_shape):
  # _do_init=False: the init runs once, jitted (eager init is seconds).
  model = cls(cfg, seed=0, _do_init=False)
  params = jax.jit(functools.partial(model.init_weights,
                                     input_shape=input_shape))(model.key)
  return model, params


def hf_lm(name, **config):
  transformers = pytest.importorskip("transformers")
  small = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
               intermediate_size=64, vocab_size=64,
               max_position_embeddings=16)
  if name == "gpt2":
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4,
                                  n_inner=64, vocab_size=64, n_positions=16,
                                  **config)
    cls = transformers.FlaxGPT2LMHeadModel
  elif name == "bert":
    cfg = transformers.BertConfig(**small)
    cls = transformers.FlaxBertForMaskedLM
  else:
    cfg = transformers.LlamaConfig(num_key_value_heads=2, **small)
    cls = transformers.FlaxLlamaForCausalLM
  model, params = _hf_init(cls, cfg, (1, 1))
  apply = lambda params, ids: model(ids, params=params).logits
  return Case(apply, params, (IDS,), model=model)


def hf_vit():
  transformers = pytest.importorskip("transformers")
  cfg = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, image_size=8, patch_size=4, num_channels=3,
      num_labels=10)
  model, params = _hf_init(transformers.FlaxViTForImageClassification, cfg,
                           (1, 8, 8, 3))
  apply = lambda params, pixels: model(pixels, params=params).logits
  return Case(apply, params, (_normal(1, (96, 3, 8, 8)),),
              w4_per_channel=r".*patch_embeddings/projection/kernel")


class _ClipAMax:
  """`jax.numpy` with the `jnp.clip(a_min=, a_max=)` keywords that jax 0.12
  removed and transformers 4.x's Flax T5 still passes (in its relative
  position buckets, transformers' bug, not jaxquant's)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(x, a_min=None, a_max=None, **kwargs):
    return jnp.clip(x, kwargs.pop("min", a_min), kwargs.pop("max", a_max),
                    **kwargs)


def hf_t5():
  transformers = pytest.importorskip("transformers")
  from transformers.models.t5 import modeling_flax_t5
  try:
    jnp.clip(jnp.zeros(1), a_max=1)
  except TypeError:
    modeling_flax_t5.jnp = _ClipAMax()
  cfg = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
      num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
      relative_attention_max_distance=16)
  model, params = _hf_init(transformers.FlaxT5ForConditionalGeneration, cfg,
                           (1, 1))
  apply = lambda params, ids, dec: model(
      ids, decoder_input_ids=dec, params=params).logits
  return Case(apply, params, (IDS, jnp.roll(IDS, 1, axis=1)))


def hf_clip():
  transformers = pytest.importorskip("transformers")
  cfg = transformers.CLIPTextConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
      projection_dim=32)
  model, params = _hf_init(transformers.FlaxCLIPTextModel, cfg, (1, 1))
  # The text tower alone has no logits: argmax agreement is taken over the
  # 32 features of each token's last hidden state (measured 0.996).
  apply = lambda params, ids: model(ids, params=params).last_hidden_state
  return Case(apply, params, (IDS,))


def hf_whisper():
  transformers = pytest.importorskip("transformers")
  cfg = transformers.WhisperConfig(
      vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
      d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
      encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
      max_target_positions=16, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[],
      begin_suppress_tokens=[])
  model, params = _hf_init(transformers.FlaxWhisperForConditionalGeneration,
                           cfg, (1, 8, 16))
  apply = lambda params, feats, dec: model(
      feats, decoder_input_ids=dec, params=params).logits
  return Case(apply, params, (_normal(1, (32, 8, 16)), IDS),
              w4_per_channel=r".*conv\d/kernel")


def hf_wav2vec2():
  transformers = pytest.importorskip("transformers")
  cfg = transformers.Wav2Vec2Config(
      vocab_size=32, hidden_size=32, num_hidden_layers=1,
      num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
      conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
      num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
      feat_extract_norm="layer")
  model, params = _hf_init(transformers.FlaxWav2Vec2ForCTC, cfg, (1, 400))
  apply = lambda params, audio: model(audio, params=params).logits
  # The positional conv is weight-normalised (kernel = g * v / |v|): that
  # one matmul runs in float, and `jq.report` names weight_g / weight_v.
  return Case(apply, params, (_normal(1, (12, 400)),), computed=1,
              w4_per_channel=r".*conv/kernel")


# ---------------------------------------------------------------------------
# dm-haiku


def haiku_mlp():
  hk = pytest.importorskip("haiku")
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([32, 32, 10])(x)))
  x = _normal(1, (1024, 32))
  return Case(net.apply, jax.jit(net.init)(jax.random.key(0), x), (x,))


def haiku_cnn_batchnorm():
  hk = pytest.importorskip("haiku")

  def forward(x, is_training):
    x = hk.Conv2D(8, 3)(x)
    x = hk.BatchNorm(True, True, 0.9)(x, is_training)
    x = jax.nn.relu(x)
    x = jax.nn.relu(hk.Conv2D(16, 3, stride=2)(x))
    return hk.Linear(10)(jnp.mean(x, axis=(1, 2)))  # global average pool

  net = hk.without_apply_rng(hk.transform_with_state(forward))
  x = _normal(1, (256, 8, 8, 4))
  # haiku's init in training mode sets the BatchNorm averages to the
  # example batch's statistics (not 0 / 1).
  params, state = jax.jit(net.init, static_argnums=2)(
      jax.random.key(0), x, True)
  # The state (moving averages and an int32 counter) travels in the params
  # tree, as a user who quantizes a checkpoint of both would pass it.
  apply = lambda p, x: net.apply(p["params"], p["state"], x, False)[0]
  return Case(apply, {"params": params, "state": state}, (x,),
              w4_per_channel=CONV)


def haiku_lstm():
  hk = pytest.importorskip("haiku")

  def forward(xs):  # xs: (time, batch, features)
    core = hk.LSTM(32)
    hs, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]))
    return hk.Linear(10)(hs)

  net = hk.without_apply_rng(hk.transform(forward))
  x = _normal(1, (8, 64, 16))
  return Case(net.apply, jax.jit(net.init)(jax.random.key(0), x), (x,),
              min_matmuls=2)


def haiku_transformer():
  hk = pytest.importorskip("haiku")

  def forward(x):
    h = hk.LayerNorm(-1, True, True)(x)
    h = hk.MultiHeadAttention(
        num_heads=4, key_size=8, model_size=32,
        w_init=hk.initializers.VarianceScaling(1.0))(h, h, h)
    x = x + h
    h = hk.LayerNorm(-1, True, True)(x)
    x = x + hk.nets.MLP([64, 32])(h)
    return hk.Linear(10)(x)

  net = hk.without_apply_rng(hk.transform(forward))
  x = _normal(1, (32, 8, 32))
  return Case(net.apply, jax.jit(net.init)(jax.random.key(0), x), (x,))


# ---------------------------------------------------------------------------
# Equinox: params = eqx.partition(model, eqx.is_array)


def _eqx(make, x):
  eqx = pytest.importorskip("equinox")
  model = eqx.filter_jit(make)(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  # Equinox layers take one example: vmap over the batch.
  apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  return params, apply


def eqx_mlp():
  eqx = pytest.importorskip("equinox")
  x = _normal(1, (1024, 32))
  params, apply = _eqx(
      lambda key: eqx.nn.MLP(32, 10, 32, depth=2, key=key), x)
  return Case(apply, params, (x,), pattern=EQX_WEIGHT)


def eqx_cnn():
  eqx = pytest.importorskip("equinox")

  class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 3)
      self.conv1 = eqx.nn.Conv2d(4, 8, 3, padding=1, key=k[0])
      self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, key=k[1])
      self.head = eqx.nn.Linear(16, 10, key=k[2])

    def __call__(self, x):  # x: (channels, height, width)
      x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
      return self.head(x.mean(axis=(1, 2)))  # global average pool

  x = _normal(1, (256, 4, 8, 8))
  params, apply = _eqx(CNN, x)
  return Case(apply, params, (x,), pattern=EQX_WEIGHT,
              w4_per_channel=CONV)


def eqx_gru():
  eqx = pytest.importorskip("equinox")

  class GRU(eqx.Module):
    cell: eqx.nn.GRUCell
    head: eqx.nn.WeightNorm

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.cell = eqx.nn.GRUCell(16, 32, key=k1)
      # Weight normalisation: the head's weight is computed, g * v / |v|.
      self.head = eqx.nn.WeightNorm(eqx.nn.Linear(32, 10, key=k2))

    def __call__(self, xs):  # xs: (time, features)
      def step(h, x):
        h = self.cell(x, h)
        return h, self.head(h)
      return jax.lax.scan(step, jnp.zeros(32), xs)[1]

  x = _normal(1, (64, 8, 16))
  params, apply = _eqx(GRU, x)
  return Case(apply, params, (x,), pattern=EQX_WEIGHT, min_matmuls=3,
              computed=1)


def eqx_transformer():
  eqx = pytest.importorskip("equinox")

  class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 3)
      self.norm1 = eqx.nn.LayerNorm(32)
      self.attn = eqx.nn.MultiheadAttention(4, 32, key=k[0])
      self.norm2 = eqx.nn.LayerNorm(32)
      self.mlp = eqx.nn.MLP(32, 32, 64, depth=1, key=k[1])
      self.head = eqx.nn.Linear(32, 10, key=k[2])

    def __call__(self, x):  # x: (seq, features)
      h = jax.vmap(self.norm1)(x)
      x = x + self.attn(h, h, h)
      x = x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))
      return jax.vmap(self.head)(x)

  x = _normal(1, (32, 8, 32))
  params, apply = _eqx(Block, x)
  return Case(apply, params, (x,), pattern=EQX_WEIGHT)


# ---------------------------------------------------------------------------
# Flax NNX: (graphdef, state) = nnx.split(model)


def _nnx(make):
  from flax import nnx
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(make(nnx.Rngs(0)))[1])()
  apply = lambda state, x: nnx.merge(graphdef, state)(x)
  return state, apply


def nnx_cnn():
  from flax import nnx

  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
      self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
      self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.conv1(x)))
      x = nnx.relu(self.conv2(x))
      return self.head(x.mean(axis=(1, 2)))  # global average pool

  state, apply = _nnx(CNN)
  return Case(apply, state, (_normal(1, (256, 8, 8, 4)),),
              w4_per_channel=CONV)


def nnx_transformer():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm1 = nnx.LayerNorm(32, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(4, 32, decode=False, rngs=rngs)
      self.norm2 = nnx.LayerNorm(32, rngs=rngs)
      self.up = nnx.Linear(32, 64, rngs=rngs)
      self.down = nnx.Linear(64, 32, rngs=rngs)
      self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.norm1(x))
      x = x + self.down(nnx.gelu(self.up(self.norm2(x))))
      return self.head(x)

  state, apply = _nnx(Block)
  return Case(apply, state, (_normal(1, (32, 8, 32)),),
              w4_per_channel=r"attn/out/kernel")


def nnx_lstm():
  from flax import nnx

  class LSTM(nnx.Module):
    def __init__(self, rngs):
      # nnx.RNN runs the cell under nnx.scan.
      self.rnn = nnx.RNN(nnx.LSTMCell(16, 32, rngs=rngs))
      self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, xs):  # xs: (batch, time, features)
      return self.head(self.rnn(xs))

  state, apply = _nnx(LSTM)
  return Case(apply, state, (_normal(1, (64, 8, 16)),))


# ---------------------------------------------------------------------------
# jax.example_libraries.stax: params are a list of tuples


def stax_mlp():
  from jax.example_libraries import stax
  init, apply = stax.serial(stax.Dense(32), stax.Relu, stax.Dense(32),
                            stax.Relu, stax.Dense(10))
  x = _normal(1, (1024, 32))
  params = jax.jit(lambda key: init(key, x.shape)[1])(jax.random.key(0))
  return Case(apply, params, (x,), pattern=STAX_WEIGHT)


MODELS = {
    "gpt2": functools.partial(hf_lm, "gpt2"),
    "bert": functools.partial(hf_lm, "bert"),
    "llama": functools.partial(hf_lm, "llama"),
    "vit": hf_vit,
    "t5": hf_t5,
    "clip_text": hf_clip,
    "whisper": hf_whisper,
    "wav2vec2": hf_wav2vec2,
    "haiku_mlp": haiku_mlp,
    "haiku_cnn_batchnorm": haiku_cnn_batchnorm,
    "haiku_lstm": haiku_lstm,
    "haiku_transformer": haiku_transformer,
    "eqx_mlp": eqx_mlp,
    "eqx_cnn": eqx_cnn,
    "eqx_gru": eqx_gru,
    "eqx_transformer": eqx_transformer,
    "nnx_cnn": nnx_cnn,
    "nnx_transformer": nnx_transformer,
    "nnx_lstm": nnx_lstm,
    "stax_mlp": stax_mlp,
}
