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


# ----------------------------------------- calibrated weight-only PTQ (Qwix)


def qwix_calibrated(model: nn.Module, params, batches, x, *, method: str,
                    qtype, tile_size: int | None, module_path: str = ".*"
                    ) -> tuple[Callable, object, dict]:
  """Weight-only Qwix PTQ of a Flax Linen model: "rtn", "gptq" or "awq".

  Set up as `qwix.contrib` documents it: calibration with
  `GptqCalibrationProvider` / `AwqCalibrationProvider` (one jitted
  `apply(..., mutable="quant_stats")` per batch of `batches`), then
  `qwix.contrib.{gptq,awq}.quantize_params` on the abstract tree of the
  inference model (`PtqProvider`, or `AwqInferenceProvider` for AWQ, which
  keeps AWQ's per-channel scales and divides them out at run time).
  "rtn" is plain `qwix.quantize_params` (Qwix's round-to-nearest PTQ).

  Args:
    model: the float Linen module.
    params: its variables, `{"params": ...}`.
    batches: calibration batches (arrays, the model's one input).
    x: an example input (for the abstract init).
    method: "rtn", "gptq" or "awq".
    qtype: the weight qtype (`jnp.int4`, or a Qwix string such as "int3").
    tile_size: Qwix's subchannel tile along the innermost contraction axis
      (the group size), or None for per-channel.
    module_path: Qwix's rule regex (re.fullmatch on the module path).

  Returns:
    `(apply_fn, qparams, info)`: `apply_fn(qparams, x)` runs the Qwix model,
    and `info` has "method" / "rtn" / "float": the parameter paths (a '/'
    string each) that the method quantized, that Qwix quantized by plain
    round-to-nearest (no calibration statistics reached them: `quantize_params`
    falls back to PTQ), and that stayed float among those named `kernel` or
    `embedding`; "calibrate_s" and "quantize_s": wall seconds of the two
    phases (compilation included).
  """
  import time

  import flax
  import qwix
  from qwix._src.providers import ptq as qwix_ptq
  from qwix.contrib import awq, gptq

  if method not in ("rtn", "gptq", "awq"):
    raise ValueError(f"method={method!r}: use 'rtn', 'gptq' or 'awq'")
  rule = dict(module_path=module_path, weight_qtype=qtype,
              tile_size=tile_size)
  start = time.perf_counter()
  stats = None
  if method != "rtn":
    rule_type, provider = {
        "gptq": (gptq.GptqRule, gptq.GptqCalibrationProvider),
        "awq": (awq.AwqRule, awq.AwqCalibrationProvider)}[method]
    calib = qwix.quantize_model(model, provider([rule_type(**rule)]))
    stats = calib.init(jax.random.key(0), x).get("quant_stats", {})

    @jax.jit
    def step(p, s, batch):
      _, new = calib.apply({"params": p, "quant_stats": s}, batch,
                           mutable="quant_stats")
      return new["quant_stats"]

    for batch in batches:
      stats = step(params["params"], stats, batch)
    stats = jax.block_until_ready(stats)
  calibrated = time.perf_counter()

  inference = (awq.AwqInferenceProvider if method == "awq"
               else qwix.PtqProvider)([qwix.QuantizationRule(**rule)])
  qmodel = qwix.quantize_model(model, inference)
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"]
  if method == "gptq":
    qparams = gptq.quantize_params(params["params"], abstract, stats)
  elif method == "awq":
    qparams = awq.quantize_params(params["params"], abstract, stats)
  else:
    qparams = qwix.quantize_params(params["params"], abstract)
  qparams = jax.block_until_ready(qparams)
  done = time.perf_counter()

  is_aux = lambda v: isinstance(v, qwix_ptq.WithAux)
  flat_q = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(qparams), is_leaf=lambda _, v: is_aux(v))
  flat_s = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats or {}))
  suffix = {"gptq": "_gptq", "awq": "_awq"}.get(method)
  info = {"method": [], "rtn": [], "float": []}
  for path, leaf in flat_q.items():
    name = "/".join(path)
    if not is_aux(leaf):
      if path[-1] in ("kernel", "embedding"):
        info["float"].append(name)
      continue
    calibrated_leaf = suffix is not None and any(
        k[:len(path) - 1] == path[:-1] and k[len(path) - 1] == path[-1] +
        suffix for k in flat_s)
    info["method" if calibrated_leaf else "rtn"].append(name)
  info.update(calibrate_s=calibrated - start, quantize_s=done - calibrated)
  return (lambda p, x: qmodel.apply({"params": p}, x)), qparams, info


def qwix_nbytes(tree) -> int:
  """Bytes of a Qwix parameter tree as stored: a QArray's codes at their
  storage type's bits (int4: 4 bits; Qwix keeps "int3" codes in int4),
  plus scales, zero points and AWQ's per-channel scales."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    dtype = jnp.dtype(leaf.dtype)
    bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
            else dtype.itemsize * 8)
    total += (int(leaf.size) * bits + 7) // 8
  return total
