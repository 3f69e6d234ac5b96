"""Public entry points of the transform engine.

  qparams = jq.quantize_params(model.apply, params, recipe, x)
  qapply  = jax.jit(jq.quantized_apply(model.apply, recipe))
  qat     = jq.fake_quant(model.apply, recipe)      # same signature as apply
  print(jq.report(model.apply, qparams, recipe, x))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from jaxquant import engine, interpreter, layout, numerics, text
from jaxquant.interpreter import FloatPayload, Tagged, value
from jaxquant.qarray import QArray, fake_quant as fake_quant_array, quantize
from jaxquant.rules import Recipe
from jaxquant.tree import is_float_array, is_qarray, path_str


# --------------------------------------------------------------------------
# Tracing once per abstract signature


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      isinstance(x, jax.core.Tracer))


def _abstract(x):
  if is_qarray(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


class Traced:
  """`apply_fn` as a jaxpr over (param leaves, dynamic arg leaves).

  The matmul analysis (`sites`) is run on first use only: `quantized_apply`
  never needs it, which keeps its tracing cost close to the float model's.
  """

  def __init__(self, jaxpr, out_tree, paths, param_abstract, dyn_abstract):
    self.jaxpr, self.out_tree, self.paths = jaxpr, out_tree, paths
    self._param_abstract, self._dyn_abstract = param_abstract, dyn_abstract

  def evaluate(self, handler, param_inputs, dyn_args):
    outs = interpreter.evaluate(self.jaxpr.jaxpr, self.jaxpr.consts,
                                [*param_inputs, *dyn_args], handler)
    return jax.tree_util.tree_unflatten(self.out_tree, [value(o) for o in outs])

  @functools.cached_property
  def sites(self) -> tuple[engine.Site, ...]:
    """Every matmul with a parameter operand, from an abstract evaluation."""
    analysis = engine.AnalyzeHandler()
    tagged = [Tagged(FloatPayload(a), path, layout.identity_map(len(a.shape)))
              for a, path in zip(self._param_abstract, self.paths)]
    jax.eval_shape(lambda t, d: self.evaluate(analysis, t, d), tagged,
                   self._dyn_abstract)
    return tuple(analysis.sites)

  def contracted(self) -> dict[str, frozenset]:
    """Parameter path -> union of its axes contracted by any matmul."""
    out: dict[str, frozenset] = {}
    for site in self.sites:
      out[site.path] = out.get(site.path, frozenset()) | site.param_contract
    return out


def _split_args(args, kwargs):
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = tuple(_is_dynamic(l) for l in leaves)
  return leaves, treedef, dynamic


class _Tracer:
  """Traces `apply_fn` and analyses its matmuls; caches per signature."""

  def __init__(self, apply_fn: Callable):
    self.apply_fn = apply_fn
    self._cache: dict = {}

  def __call__(self, params, args, kwargs) -> tuple[Traced, list]:
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params,
                                                         is_leaf=is_qarray)
    p_leaves = [l for _, l in p_flat]
    a_leaves, a_def, dynamic = _split_args(args, kwargs)
    dyn = [l for l, d in zip(a_leaves, dynamic) if d]
    statics = tuple(l for l, d in zip(a_leaves, dynamic) if not d)
    p_abs = [_abstract(l) for l in p_leaves]
    d_abs = [_abstract(l) for l in dyn]
    key = (p_def, tuple((a.shape, a.dtype) for a in p_abs), a_def, dynamic,
           tuple((a.shape, a.dtype) for a in d_abs))
    key = (key, statics)
    try:
      hash(key)
    except TypeError:  # unhashable static arguments: trace every call
      key = None
    if key is not None and key in self._cache:
      return self._cache[key], dyn
    traced = self._trace(p_def, p_flat, p_abs, d_abs, a_leaves, a_def,
                         dynamic)
    if key is not None:
      self._cache[key] = traced
    return traced, dyn

  def _trace(self, p_def, p_flat, p_abs, d_abs, a_leaves, a_def, dynamic):
    def flat_fn(p_leaves, dyn_leaves):
      it = iter(dyn_leaves)
      full = [next(it) if d else l for l, d in zip(a_leaves, dynamic)]
      args, kwargs = jax.tree_util.tree_unflatten(a_def, full)
      return self.apply_fn(jax.tree_util.tree_unflatten(p_def, p_leaves),
                           *args, **kwargs)

    try:
      jaxpr, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
          p_abs, d_abs)
    except Exception as e:  # most often: params or inputs of another model
      raise ValueError(
          f"tracing apply_fn failed ({type(e).__name__}: {e}); the params "
          "or arguments do not fit apply_fn: pass params with the paths and "
          "shapes the model was initialised with, and inputs of the shapes "
          "it expects") from e
    out_tree = jax.tree_util.tree_structure(out_shape)
    return Traced(jaxpr, out_tree, tuple(path_str(p) for p, _ in p_flat),
                  p_abs, d_abs)


def _tag_inputs(traced: Traced, leaves, make_payload):
  return [Tagged(make_payload(path, leaf), path, layout.identity_map(
      np.ndim(leaf) if not is_qarray(leaf) else leaf.ndim))
          if (is_qarray(leaf) or is_float_array(leaf)) else leaf
          for path, leaf in zip(traced.paths, leaves)]


def _param_leaves(params):
  return jax.tree_util.tree_leaves(params, is_leaf=is_qarray)


# --------------------------------------------------------------------------
# Public API


def _resolved_specs(traced: Traced, recipe: Recipe, leaves) -> dict:
  """Path -> weight spec with axes read from the model, for dot weights."""
  contracted = traced.contracted()
  if not contracted:
    raise ValueError("apply_fn has no dot_general or conv_general_dilated "
                     "with a parameter operand: nothing to quantize")
  all_paths = list(traced.paths)
  recipe.check_used(sorted(contracted), all_paths, what="matmul parameter")
  by_path = dict(zip(traced.paths, leaves))
  specs = {}
  for path, axes in contracted.items():
    spec = recipe.weight_spec(path)
    if spec is not None and is_float_array(by_path[path]):
      specs[path] = engine.resolve_spec(spec, axes, np.ndim(by_path[path]),
                                        path)
  return specs


def quantize_params(apply_fn: Callable, params, recipe: Recipe, *args,
                    stats=None, **kwargs):
  """Quantizes every parameter that `apply_fn` multiplies in a matmul.

  `apply_fn(params, *args, **kwargs)` is traced once, abstractly, to read
  each weight's contracted axes from the `dot_general` / conv dimension
  numbers: per-channel scales are per non-contracted axis, groups run along
  the contraction axis. Returns `params` with `QArray` leaves.

  With `stats` from `jq.calibrate`, each weight whose rule has an `act` spec
  also stores a static (per-tensor) activation scale, and a zero point for
  asymmetric specs: `quantized_apply` then clips with it instead of reducing
  over the activation at run time. For inputs that are never negative
  (after a ReLU) `act=jq.uint8()` uses all 256 levels on [min, max].
  """
  traced, _ = _Tracer(apply_fn)(params, args, kwargs)
  leaves = _param_leaves(params)
  specs = _resolved_specs(traced, recipe, leaves)
  if stats is not None:
    stats.check_model(traced.paths, [np.shape(l) for l in leaves])

  def quantized(path, leaf):
    q = quantize(leaf, specs[path], where=path)
    act = recipe.match(path).act
    if stats is None or act is None:
      return q
    return _with_static_act(q, path, act, stats)

  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params, is_leaf=is_qarray),
      [quantized(path, leaf) if path in specs else leaf
       for path, leaf in zip(traced.paths, leaves)])


def _with_static_act(q: QArray, path, act, stats) -> QArray:
  if path not in stats.states:
    raise ValueError(
        f"{path}: no calibration statistics for its activation (calibrated "
        "with another recipe, or the matmul sits inside a while loop or "
        "cond); calibrate with this recipe or drop act= for this rule")
  lo, hi = stats.act_range(path)
  act = dataclasses.replace(act, granularity="tensor", channel_axes=None,
                            group_size=None, group_axis=None, clip=None)
  scale, zero_point = numerics.scale_from_range(lo, hi, act)
  return dataclasses.replace(q, act_scale=scale, act_zero_point=zero_point,
                             act_spec=act)


def quantized_apply(apply_fn: Callable, recipe: Recipe) -> Callable:
  """`apply_fn` with int8 matmuls; takes the params from `quantize_params`.

  Weights stay int8 (packed int4 / int2 unpacked on the fly); activations
  are quantized per row / token (per example for convolutions; per tensor
  if the act spec says granularity="tensor"); the matmul is
  `int8 x int8 -> int32` and the rescale follows it. Rules without `act`
  run weight-only: the weight is dequantized and the float matmul runs.
  """
  tracer = _Tracer(apply_fn)

  def run(qparams, *args, **kwargs):
    traced, dyn = tracer(qparams, args, kwargs)
    return _run_quantized(traced, recipe, qparams, dyn)[0]

  return run


def _run_quantized(traced, recipe, qparams, dyn):
  handler = engine.QuantizedHandler(recipe)

  def payload(path, leaf):
    return engine.QuantPayload.of(leaf) if is_qarray(leaf) else FloatPayload(
        leaf)

  inputs = _tag_inputs(traced, _param_leaves(qparams), payload)
  return traced.evaluate(handler, inputs, dyn), handler.records


def fake_quant_apply(apply_fn: Callable, recipe: Recipe) -> Callable:
  """`apply_fn` with straight-through fake-quant, for QAT under `jax.jit`.

  Takes float params. Weights the recipe quantizes are fake-quantized with
  the same (model-read) specs as `quantize_params`; activations entering
  an int8 matmul are fake-quantized as `quantized_apply` quantizes them.
  Gradients follow the straight-through estimator (`jq.fake_quant`).
  """
  tracer = _Tracer(apply_fn)

  def run(params, *args, **kwargs):
    traced, dyn = tracer(params, args, kwargs)
    leaves = _param_leaves(params)
    specs = _resolved_specs(traced, recipe, leaves)
    handler = engine.FakeQuantHandler(recipe, specs)

    def payload(path, leaf):
      return FloatPayload(fake_quant_array(leaf, specs[path])
                          if path in specs else leaf)

    return traced.evaluate(handler, _tag_inputs(traced, leaves, payload), dyn)

  return run


@dataclasses.dataclass(frozen=True)
class Report:
  """How each matmul of a model runs under `quantized_apply`."""

  ops: tuple[engine.OpRecord, ...]

  def count(self, mode: str) -> int:
    return sum(op.mode == mode for op in self.ops)

  def __str__(self):
    head = ("path", "op", "mode", "weight", "act", "weight shape",
            "act shape", "note")
    rows = [(o.path, o.primitive.replace("conv_general_dilated", "conv"),
             o.mode, o.weight_spec, o.act_spec, str(o.weight_shape),
             str(o.act_shape), o.reason) for o in self.ops]
    summary = (f"{self.count(engine.INT8)} int8, "
               f"{self.count(engine.WEIGHT_ONLY)} weight-only, "
               f"{self.count(engine.FLOAT)} float")
    return text.table(head, rows) + "\n" + summary


def report(apply_fn: Callable, params=None, recipe: Recipe | None = None,
           *args, **kwargs):
  """Which matmuls run int8, weight-only or float, and why.

  `params` may be float (they are quantized with `quantize_params` first)
  or already quantized. Nothing is computed: the model is traced abstractly.
  `report(stats)` instead tabulates calibrated activation ranges; for
  per-layer SQNR and figures see `jq.layer_report`.
  """
  if hasattr(apply_fn, "table") and params is None:  # calibration Stats
    return apply_fn.table()
  if not any(is_qarray(l) for l in _param_leaves(params)):
    params = quantize_params(apply_fn, params, recipe, *args, **kwargs)
  traced, dyn = _Tracer(apply_fn)(params, args, kwargs)
  records = []

  def run(qparams, dyn):
    out, recs = _run_quantized(traced, recipe, qparams, dyn)
    records.extend(recs)
    return out

  jax.eval_shape(run, params, dyn)
  # Matmuls between two activations (attention scores) never reach a handler.
  for eqn in _untagged_matmuls(traced.jaxpr.jaxpr, traced.sites):
    shapes = [tuple(v.aval.shape) for v in eqn.invars[:2]]
    records.append(engine.OpRecord("-", eqn.primitive.name, engine.FLOAT,
                                   "no parameter operand", shapes[1],
                                   shapes[0], "float", "float"))
  return Report(tuple(records))


def _untagged_matmuls(jaxpr, sites):
  """Every dot / conv in `jaxpr` (recursively) that no site was made for."""
  seen = {site.eqn_id for site in sites}
  stack, found = [jaxpr], []
  while stack:
    for eqn in stack.pop().eqns:
      if eqn.primitive.name in interpreter.DOT_PRIMITIVES and (
          id(eqn) not in seen):
        found.append(eqn)
      stack.extend(j.jaxpr if hasattr(j, "jaxpr") else j
                   for j in jax.extend.core.jaxprs_in_params(eqn.params))
  return found
