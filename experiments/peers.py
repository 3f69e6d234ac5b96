"""The same model through Qwix and AQT, for side-by-side benchmarks.

Optional: needs the `peers` extra (`pip install qwix aqtp`). Each builder
returns `(apply_fn, params)` for W8A8 inference of a Flax Linen MLP with
`nn.Dense` layers, set up as each library documents it:

- Qwix: `qwix.quantize_model` with a `PtqProvider` rule (int8 weights and
  activations) intercepts the Dense layers; `qwix.quantize_params` converts
  the float params.
- AQT: the model itself is edited to pass `dot_general=AqtDotGeneral(...)`
  with `config.fully_quantized(8, 8)` to every `nn.Dense` (AQT's way); the
  forward pass quantizes both operands on the fly.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def available() -> dict[str, bool]:
  import importlib.util
  return {"qwix": importlib.util.find_spec("qwix") is not None,
          "aqt": importlib.util.find_spec("aqt") is not None}


def qwix_w8a8(model: nn.Module, params, x) -> tuple[Callable, object]:
  return qwix_quantized(model, params, x, act=True)


def qwix_quantized(model: nn.Module, params, x, *, act: bool
                   ) -> tuple[Callable, object]:
  """Qwix PTQ with int8 weights, and int8 activations if `act` (W8A8), else
  float activations (W8A16)."""
  import qwix
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8,
                                 act_qtype=jnp.int8 if act else None)]
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
  qparams = qwix.quantize_params(params["params"], abstract)
  return (lambda p, x: ptq.apply({"params": p}, x)), qparams


class AqtMLP(nn.Module):
  """An MLP whose Dense layers take AQT's int8 dot_general (model edited)."""

  hidden: int
  depth: int = 2
  out: int = 10

  @nn.compact
  def __call__(self, x):
    from aqt.jax.v2 import config
    from aqt.jax.v2.flax import aqt_flax
    dg = lambda: aqt_flax.AqtDotGeneral(config.fully_quantized(
        fwd_bits=8, bwd_bits=8))
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.hidden, dot_general=dg())(x))
    return nn.Dense(self.out, dot_general=dg())(x)


def aqt_w8a8(hidden: int, depth: int, params, x) -> tuple[Callable, object]:
  """AQT on the same weights (the float MLP's params fit `AqtMLP`)."""
  model = AqtMLP(hidden, depth)
  return (lambda p, x: model.apply(p, x, rngs={"params": jax.random.key(0)})
          ), params
