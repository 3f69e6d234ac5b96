"""Public entry points of the transform engine.

  qparams = jq.quantize_params(model.apply, params, recipe, x)
  qapply  = jax.jit(jq.quantized_apply(model.apply, recipe))
  qat     = jq.fake_quant_apply(model.apply, recipe)  # same signature as apply
  print(jq.report(model.apply, qparams, recipe, x))

Every model-level function takes `(apply_fn, params, recipe, *example_args)`
and keyword-only options; keyword arguments of the model go through
`model_kwargs=`, never mixed with the options.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import engine, numerics, text
from jaxquant.gptq import gptq_leaf
from jaxquant.methods import HESSIAN, Gptq
from jaxquant.prescaled import prescaled_leaf, prescaled_range
from jaxquant.qarray import (ActQuant, QArray, fake_quant as fake_quant_array,
                             quantize, with_order)
from jaxquant.rules import Recipe
from jaxquant.transform import provenance
from jaxquant.transform import (FloatPayload, Tracer, param_leaves,
                                resolved_specs, tag_inputs)
from jaxquant.tree import is_qarray


# --------------------------------------------------------------------------
# Public API


def quantize_params(apply_fn: Callable, params, recipe: Recipe, *args,
                    stats=None, key: jax.Array | None = None,
                    model_kwargs: dict | None = None, progress: bool = True,
                    source: Callable[[str], Any] | None = None,
                    machine=None):
  """Quantizes every parameter that `apply_fn` multiplies in a matmul.

  `apply_fn(params, *args, **model_kwargs)` is traced once, abstractly, to
  read each weight's contracted axes from the `dot_general` / conv dimension
  numbers: per-channel scales are per non-contracted axis, groups run along
  the contraction axis.

  A weight whose rule has an `act` spec also stores a static (per-tensor)
  activation scale, and a zero point for asymmetric specs, when the range
  is known: from `stats` (`jq.calibrate`), or from the act spec's fixed
  `clip=(lo, hi)`, which wins. `quantized_apply` then clips with it instead
  of reducing over the activation at run time. For inputs that are never
  negative (after a ReLU) `act=jq.uint8()` uses all 256 levels on [min, max].

  Args:
    apply_fn: the model, `apply_fn(params, *args, **model_kwargs)`.
    params: float parameters (any pytree of arrays).
    recipe: which weight gets which spec.
    *args: example inputs; only their shapes and dtypes are used.
    stats: calibration `Stats` for static activation scales, and for rules
      with a `method` (`jq.gptq()`, `jq.awq()`, `jq.smoothquant()`), which
      need them. With AWQ / SmoothQuant the static activation range is that
      of `x / in_scale`, from the per-feature min / max.
    key: a PRNG key, needed by rules with `rounding="stochastic"`.
    model_kwargs: keyword arguments of `apply_fn`.
    progress: a progress bar over the weights a method quantizes.
    source: for a model too big for a float copy: `path -> array`, the
      float value of each leaf, fetched one leaf at a time. `params` are
      then abstract (`jax.eval_shape(model.init, ...)`, or
      `jax.ShapeDtypeStruct`s, with a `sharding` where the leaf is
      sharded). Each leaf is placed with its sharding, quantized and
      dropped before the next is fetched, so peak memory is the
      quantized tree plus about one float leaf
      (`jaxquant.sources` reads checkpoints leaf by leaf).
    machine: the machine the params will run on, as for `quantized_apply`
      (default: this one). Where its int8 kernels are faster on that layout
      (`lowering.Profile.contract_last`: CPUs), per-channel integer weights
      are stored with their contracted axes last (`QArray.order`); weights
      placed on more than one device keep the layout they were given.

  Returns:
    `params` with a `QArray` in place of every quantized weight.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8())])
    >>> qparams = jq.quantize_params(model.apply, params, recipe, x)
    >>> q = qparams["params"]["kernel"]
    >>> q.values.dtype, q.scale.shape   # one scale per output channel
    (dtype('int8'), (1, 8))
  """
  _check_recipe(recipe)
  engine.check_act_specs(recipe)
  traced, _ = Tracer(apply_fn)(params, args, dict(model_kwargs or {}))
  leaves = param_leaves(params)
  specs = resolved_specs(traced, recipe, leaves)
  if stats is not None:
    stats.check_model(traced.paths, [np.shape(l) for l in leaves])
  keys = _leaf_keys(specs, traced.paths, key)
  fetch = _fetcher(source, dict(zip(traced.paths, leaves)))

  engine.lowering.check_machine(machine)
  methods = _methods(recipe, specs, stats)
  contracted = traced.contracted()
  orders = _stored_orders(traced, specs, leaves, machine)
  from tqdm.auto import tqdm  # here: importing it warns in some notebooks
  bar = tqdm(total=len(methods), desc="methods", leave=False,
             disable=not (progress and methods))

  def quantized(path, leaf):
    leaf = fetch(path)
    if path in methods:
      bar.set_description(f"{methods[path].name} {path}")
      q = with_order(_by_method(leaf, specs[path], methods[path], stats,
                                contracted[path], path), orders.get(path))
      bar.update()
    else:  # stored in its order as it is quantized: no logical-order copy
      q = quantize(leaf, specs[path], key=keys.get(path), where=path,
                   order=orders.get(path))
    if source is not None:
      # Measured on XLA:CPU: a jit's outputs can keep the buffers of its
      # whole computation alive (an int4 g128 leaf of 4 MB kept about its
      # float size); a copy of each field owns only its own bytes.
      q = jax.tree_util.tree_map(jnp.copy, q)
    act = recipe.match(path).act
    if act is None:
      return q
    if isinstance(act.clip, tuple):
      return _with_static_act(q, act, jnp.float32(act.clip[0]),
                              jnp.float32(act.clip[1]))
    if stats is None:
      return q
    if path not in stats.states:
      raise ValueError(
          f"{path}: no calibration statistics for its activation (calibrated "
          "with another recipe, or the matmul sits inside a while loop or "
          "cond); calibrate with this recipe or drop act= for this rule")
    if q.in_scale is not None:
      return _with_static_act(q, act, *prescaled_range(
          q, stats.feature_stats(path)))
    return _with_static_act(q, act, *stats.act_range(path))

  out = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params, is_leaf=is_qarray),
      [quantized(path, leaf) if path in specs else fetch(path)
       for path, leaf in zip(traced.paths, leaves)])
  bar.close()
  return out


def _stored_orders(traced, specs: dict, leaves, machine) -> dict:
  """Path -> the axis order its codes are stored in (`lowering.stored_order`),
  for weights that live on one device."""
  sites: dict = {}
  for site in traced.sites:
    sites.setdefault(site.path, []).append(site)
  out = {}
  for path, leaf in zip(traced.paths, leaves):
    sharding = getattr(leaf, "sharding", None)
    if path not in specs or (isinstance(sharding, jax.sharding.Sharding)
                             and len(sharding.device_set) > 1):
      continue
    order = engine.lowering.stored_order(sites.get(path, []), specs[path],
                                         len(np.shape(leaf)), machine)
    if order is not None:
      out[path] = order
  return out


def _fetcher(source, abstract: dict) -> Callable[[str], Any]:
  """`path -> leaf`: the given leaf, or `source(path)` placed like the
  abstract leaf (ValueError naming the path on a mismatch)."""
  if source is None:
    for path, leaf in abstract.items():
      if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(f"{path}: params are abstract (ShapeDtypeStruct); "
                         "pass source=path -> array for their values")
    return abstract.__getitem__

  def fetch(path):
    like = abstract[path]
    value = source(path)
    if np.shape(value) != tuple(like.shape) or (
        jnp.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
        != jnp.dtype(like.dtype)):
      raise ValueError(
          f"{path}: source gave shape {np.shape(value)} and dtype "
          f"{getattr(value, 'dtype', type(value).__name__)}, the params say "
          f"{tuple(like.shape)} {jnp.dtype(like.dtype)}; fix the source or "
          "the abstract params")
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
      return jax.device_put(value, sharding)
    return jnp.asarray(value)

  return fetch


def _methods(recipe: Recipe, specs: dict, stats) -> dict:
  """Path -> method of every weight whose rule has one (stats required)."""
  out = {}
  for path in specs:
    method = recipe.match(path).method
    if method is None:
      continue
    if stats is None:
      raise ValueError(
          f"{path}: its rule has method={method.name}, which needs the "
          "inputs' statistics: stats = jq.calibrate(apply_fn, params, "
          "recipe, batches), then quantize_params(..., stats=stats)")
    out[path] = method
  return out


def _by_method(leaf, spec, method, stats, contracted, path: str) -> QArray:
  """`leaf` quantized by its rule's method from the calibration stats."""
  hessian = stats.hessian(path) if HESSIAN in method.needs else None
  stacked = dict(stats.hessian_layers).get(path, 0)
  if isinstance(method, Gptq):
    return gptq_leaf(leaf, spec, hessian, contracted, stacked, method, path)
  features = stats.feature_stats(path)
  return prescaled_leaf(leaf, spec, method, features, hessian, contracted,
                        stacked, dict(stats.feature_axes)[path], path)


def _leaf_keys(specs: dict, paths, key) -> dict:
  """Path -> PRNG key for each stochastically rounded weight."""
  stochastic = [p for p in paths if p in specs
                and specs[p].rounding == "stochastic"]
  if stochastic and key is None:
    raise ValueError(f"{stochastic[0]}: its rule rounds stochastically; pass "
                     "key=jax.random.key(...) to quantize_params")
  return {p: jax.random.fold_in(key, i) for i, p in enumerate(paths)
          if p in stochastic}


def _with_static_act(q: QArray, act, lo, hi) -> QArray:
  """`q` with a per-tensor activation scale for the range [lo, hi]."""
  act = dataclasses.replace(act, granularity="tensor", channel_axes=None,
                            group_size=None, group_axis=None, clip=None)
  scale, zero_point = numerics.scale_from_range(lo, hi, act)
  return dataclasses.replace(q, act=ActQuant(scale, zero_point, act))


def _check_recipe(recipe) -> None:
  if not isinstance(recipe, Recipe):
    raise ValueError(f"recipe must be a jq.Recipe, got {type(recipe).__name__};"
                     " model-level functions take (apply_fn, params, recipe, "
                     "*example_args)")


def quantized_apply(apply_fn: Callable, recipe: Recipe, *,
                    machine=None) -> Callable:
  """`apply_fn` with int8 matmuls; takes the params from `quantize_params`.

  Weights stay int8 (packed int4 / int2 unpacked on the fly); activations
  are quantized per row / token (per example for convolutions; per tensor
  if the act spec says granularity="tensor"); the matmul is
  `int8 x int8 -> int32` and the rescale follows it. Rules without `act`
  run weight-only: float activations times the quantized weight, computed
  as a float dot of the dequantized weight, or where that is slower (CPUs
  with fast int8 dots) as one int8 dot on the activation's int8 parts,
  exact to float32 rounding (`jaxquant.engine.lowering`). `jq.report` names
  the lowering each matmul gets.

  For a weight W ~ (q_w - z_w) s_w (s_w per output channel) and an
  activation x ~ (q_x - z_x) s_x (s_x per row, or the static `QArray.act`
  scale), with K the contraction size:

    x . W ~ s_x s_w (q_x . q_w - z_x sum_k q_w - z_w sum_k q_x + K z_x z_w)

  where q_x . q_w is one `int8 x int8 -> int32` dot (split along K where
  the int32 sum could overflow) and the corrections vanish for symmetric
  specs (z = 0). fp8 weights with fp8 activations run as a float32 dot of
  fp8-rounded operands. Matmuls the engine cannot run quantized are
  computed correctly in float; `jq.report` lists which, and why.

  Args:
    apply_fn: the model, `apply_fn(params, *args, **kwargs)`.
    recipe: the `Recipe` the params were quantized with.
    machine: a key of `jaxquant.engine.lowering.PROFILES` ('cpu/x86-vnni',
      'cpu/other', 'gpu', 'tpu') whose lowering choices to use, or a
      `lowering.Profile` of your own; default: this machine's
      (`lowering.machine()`). The numbers agree within float32 rounding
      either way; only the speed differs.

  Returns:
    A function with the signature of `apply_fn` that takes the output of
    `quantize_params` as its params; wrap it in `jax.jit`. The model is
    traced once per abstract signature.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(1), (4, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8())])
    >>> qparams = jq.quantize_params(model.apply, params, recipe, x)
    >>> qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
    >>> y = qapply(qparams, x)
    >>> y.shape, bool(jq.sqnr_db(model.apply(params, x), y) > 30)   # dB
    ((4, 8), True)
  """
  _check_recipe(recipe)
  engine.check_act_specs(recipe)
  tracer = Tracer(apply_fn)

  def run(qparams, *args, **kwargs):
    traced, dyn = tracer(qparams, args, kwargs)
    return _run_quantized(traced, recipe, qparams, dyn, machine=machine)[0]

  return run


def _run_quantized(traced, recipe, qparams, dyn, strict=True, machine=None):
  engine.lowering.check_machine(machine)
  handler = engine.QuantizedHandler(recipe=recipe, strict=strict,
                                    machine=machine)

  def payload(path, leaf):
    return engine.QuantPayload.of(leaf) if is_qarray(leaf) else FloatPayload(
        leaf)

  inputs = tag_inputs(traced, param_leaves(qparams), payload)
  return traced.evaluate(handler, inputs, dyn), handler.records


def fake_quant_apply(apply_fn: Callable, recipe: Recipe) -> Callable:
  """`apply_fn` with straight-through fake-quant, for QAT under `jax.jit`.

  Takes float params. Weights the recipe quantizes are fake-quantized with
  the same (model-read) specs as `quantize_params`; activations entering
  an int8 matmul are fake-quantized as `quantized_apply` quantizes them.
  Gradients follow the straight-through estimator (`jq.fake_quant`).

  Forward, each quantized weight W becomes dequantize(quantize(W)), so the
  outputs match `quantized_apply` up to float rounding; backward,
  d fake_quant(W) / dW = 1 inside the clip range and 0 outside.

  Args:
    apply_fn: the model, `apply_fn(params, *args, **kwargs)`.
    recipe: which weights (and activations) are fake-quantized.

  Returns:
    A function with the signature of `apply_fn`, taking float params;
    differentiable and jittable.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(1), (4, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8())])
    >>> qat_apply = jq.fake_quant_apply(model.apply, recipe)
    >>> grads = jax.jit(jax.grad(lambda p: jnp.sum(qat_apply(p, x) ** 2)))(
    ...     params)
    >>> grads["params"]["kernel"].shape
    (64, 8)
    >>> qparams = jq.quantize_params(model.apply, params, recipe, x)
    >>> y_int8 = jax.jit(jq.quantized_apply(model.apply, recipe))(qparams, x)
    >>> bool(jnp.allclose(jax.jit(qat_apply)(params, x), y_int8, atol=1e-5))
    True
  """
  _check_recipe(recipe)
  engine.check_act_specs(recipe)
  tracer = Tracer(apply_fn)

  def run(params, *args, **kwargs):
    traced, dyn = tracer(params, args, kwargs)
    leaves = param_leaves(params)
    specs = resolved_specs(traced, recipe, leaves)
    handler = engine.FakeQuantHandler(recipe=recipe, specs=specs)

    def payload(path, leaf):
      return FloatPayload(fake_quant_array(leaf, specs[path], where=path)
                          if path in specs else leaf)

    return traced.evaluate(handler, tag_inputs(traced, leaves, payload), dyn)

  return run


@dataclasses.dataclass(frozen=True)
class Report:
  """How each matmul of a model runs under `quantized_apply`: `mode` is
  'int8', 'fp8', 'weight-only' or 'float', with the reason.

  Returned by `jq.report`; `print` it for a table (path, op, mode, weight
  and act specs, shapes, note) with a summary line of the counts.

  Attributes:
    ops: one record per matmul, in evaluation order, with `path`,
      `primitive`, `mode`, `reason`, `weight_shape`, `act_shape`,
      `weight_spec`, `act_spec` and `lowering` (how it is computed on this
      machine: `jaxquant.engine.lowering`). Matmuls with no parameter operand
      (attention scores) have path '-' and mode 'float'.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((4, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel",
    ...                             weight=jq.int4(group_size=16))])
    >>> rep = jq.report(model.apply, params, recipe, x)
    >>> [(op.path, op.mode, op.weight_spec) for op in rep.ops]
    [('params/kernel', 'weight-only', 'int4/g16')]
    >>> rep.count("weight-only"), str(rep).splitlines()[-1]
    (1, '0 int8, 1 weight-only, 0 float')
  """

  ops: tuple[engine.OpRecord, ...]

  def count(self, mode: str) -> int:
    """The number of matmuls that run in `mode` ('int8', 'fp8', ...)."""
    return sum(op.mode == mode for op in self.ops)

  def __str__(self):
    head = ("path", "op", "mode", "weight", "act", "weight shape",
            "act shape", "lowering", "note")
    rows = [(o.path, o.primitive.replace("conv_general_dilated", "conv"),
             o.mode, o.weight_spec, o.act_spec, str(o.weight_shape),
             str(o.act_shape), o.lowering, o.reason) for o in self.ops]
    fp8 = f"{self.count(engine.FP8)} fp8, " if self.count(engine.FP8) else ""
    summary = (f"{self.count(engine.INT8)} int8, {fp8}"
               f"{self.count(engine.WEIGHT_ONLY)} weight-only, "
               f"{self.count(engine.FLOAT)} float")
    return text.table(head, rows) + "\n" + summary


def report(apply_fn: Callable, params, recipe: Recipe, *args,
           model_kwargs: dict | None = None, machine=None) -> Report:
  """Which matmuls run int8, weight-only or float, and why.

  `params` may be float (they are quantized with `quantize_params` first)
  or already quantized. Nothing is computed: the model is traced abstractly.
  For calibrated activation ranges print `stats.table()`; for per-layer
  SQNR and figures see `jq.layer_report`.

  Args:
    apply_fn: the model, `apply_fn(params, *args, **model_kwargs)`.
    params: float params, or the output of `quantize_params`.
    recipe: the `Recipe`.
    *args: example inputs; only their shapes and dtypes are used.
    model_kwargs: keyword arguments of `apply_fn`.
    machine: whose lowering choices to report (see `quantized_apply`).

  Returns:
    A `Report`, one record per matmul; `print` it for a table.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> def mlp(p, x):                        # any JAX function of params
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> params = {"w1": jnp.ones((16, 32)), "w2": jnp.ones((32, 4))}
    >>> x = jnp.ones((4, 16))
    >>> recipe = jq.Recipe([
    ...     jq.Rule("w1", weight=jq.int4()),                 # weight-only
    ...     jq.Rule("w2", weight=jq.int8(), act=jq.int8()),  # W8A8
    ... ])
    >>> rep = jq.report(mlp, params, recipe, x)
    >>> [(op.path, op.mode) for op in rep.ops]
    [('w1', 'weight-only'), ('w2', 'int8')]
    >>> rep.count("int8"), rep.count("float")
    (1, 0)
  """
  _check_recipe(recipe)
  kwargs = dict(model_kwargs or {})
  if not any(is_qarray(l) for l in param_leaves(params)):
    # How the weights are rounded does not change how they run: a rule's
    # method (which needs calibration statistics) is not applied here.
    params = quantize_params(apply_fn, params, recipe.without_methods(), *args,
                             model_kwargs=kwargs, progress=False)
  traced, dyn = Tracer(apply_fn)(params, args, kwargs)
  records = []

  def run(qparams, dyn):
    out, recs = _run_quantized(traced, recipe, qparams, dyn, strict=False,
                               machine=machine)
    records.extend(recs)
    return out

  jax.eval_shape(run, params, dyn)
  # Matmuls between two activations (attention scores) never reach a handler.
  sources = provenance.matmul_sources(traced.jaxpr.jaxpr, traced.paths)
  for eqn in traced.untagged_matmuls():
    shapes = [tuple(v.aval.shape) for v in eqn.invars[:2]]
    computed = [provenance.computed_weight(s)
                for s in sources.get(id(eqn), ())]
    # The weight is the operand computed from params (either side: Equinox
    # writes `weight @ x`); with none, operand 1 as for `x @ w`.
    w = next((i for i, c in enumerate(computed) if c), None)
    reason = ("no parameter operand" if w is None else
              f"weight computed from {', '.join(computed[w])} by "
              "arithmetic, not layout ops alone: runs in float")
    w_shape, act_shape = (shapes[0], shapes[1]) if w == 0 else (
        shapes[1], shapes[0])
    records.append(engine.OpRecord(
        "-" if w is None else computed[w][0], eqn.primitive.name,
        engine.FLOAT, reason, w_shape, act_shape, "float", "float",
        "float dot"))
  return Report(tuple(records))
