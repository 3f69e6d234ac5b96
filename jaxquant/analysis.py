"""Per-layer analysis: ranges and SQNR, sensitivity, automatic mixed precision.

  rep = jq.layer_report(model.apply, params, recipe, x, stats=stats)
  print(rep); rep.plot("figures/")            # text table and PNG figures
  sens = jq.sensitivity(model.apply, params, recipe, x, metric=accuracy)
  recipe = jq.auto_recipe(model.apply, params, x, budget_bytes=20_000)

SQNR (dB) = 10 log10(sum y^2 / sum (y - y_q)^2). The output SQNR of a layer
compares its matmul output computed with quantized weights and activations
against the float matmul, on the same float input (every other layer stays
float), so layers are measured in isolation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import engine, text
from jaxquant.api import quantize_params, quantized_apply
from jaxquant.transform import (FloatPayload, Handler, Tracer, bind_plain,
                                param_leaves, resolved_specs, tag_inputs,
                                value)
from jaxquant.rules import Recipe, Rule
from jaxquant.spec import QuantSpec, int2, int3, int4, int8
from jaxquant.tree import is_qarray, nbytes


def sqnr_db(reference, approx) -> float:
  """Signal-to-quantization-noise ratio in dB, over all elements.

  SQNR = 10 log10(sum(reference^2) / sum((reference - approx)^2)), in
  float64; inf when `approx` equals `reference`. Both may be arrays or
  pytrees of arrays with the same structure (summed over every leaf).

  Args:
    reference: the exact values (array, list or pytree of arrays).
    approx: the approximation, with the same structure and sizes.

  Returns:
    The SQNR in dB, a Python float (inf when the noise is 0).

  Example:
    >>> import jaxquant as jq
    >>> round(jq.sqnr_db([1.0, -1.0], [1.1, -0.9]), 6)
    20.0
  """
  leaves = lambda t: [np.asarray(l, np.float64).ravel()
                      for l in jax.tree_util.tree_leaves(t)]
  ref, app = np.concatenate(leaves(reference)), np.concatenate(leaves(approx))
  noise = np.sum((ref - app) ** 2)
  if noise == 0:
    return math.inf
  return float(10 * np.log10(np.sum(ref**2) / noise))


# --------------------------------------------------------------------------
# Per-layer report


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PairPayload:
  """The float weight and its quantized form, moved through layout ops."""

  float: FloatPayload
  quant: object

  def materialize(self):
    return self.float.materialize()

  def apply(self, eqn, others, rule):
    f, q = (self.float.apply(eqn, others, rule),
            self.quant.apply(eqn, others, rule))
    return None if q is None else _PairPayload(f, q)

  def stackable(self, length):
    return _PairPayload(self.float, self.quant.stackable(length))


@dataclasses.dataclass(kw_only=True)
class _CompareHandler(Handler):
  """Emits (path, output SQNR, activation) per matmul; continues in float.

  The quantized side is planned and run as `quantized_apply` runs it
  (`engine.plan`), on the float model's input to the matmul."""

  machine: object = None  # as for quantized_apply

  def on_matmul(self, eqn, site, rule, invals):
    exact = bind_plain(eqn, invals)
    if site is None or not isinstance(invals[site.weight_index].payload,
                                      _PairPayload):
      return exact
    w = invals[site.weight_index]
    quantized = list(invals)
    quantized[site.weight_index] = dataclasses.replace(
        w, payload=w.payload.quant)
    quantized = engine.plan.prepared(eqn, site, quantized)
    how = engine.plan.plan(site, quantized[site.weight_index].payload, rule,
                           eqn.params, value(quantized[site.act_index]).dtype,
                           self.machine)
    approx = engine.plan.run(how, eqn, site, quantized, rule.act)[0]
    y = exact[0].astype(jnp.float32)
    noise = jnp.sum((y - approx.astype(jnp.float32)) ** 2)
    self.emit(site.path, jnp.stack([jnp.sum(y**2), noise]))
    self.emit(site.path + "#act", value(invals[site.act_index]))
    return exact


@dataclasses.dataclass(frozen=True)
class LayerRow:
  path: str
  weight_spec: str
  act_spec: str
  weight_range: tuple[float, float]
  weight_clip: float          # largest |value| representable by any scale
  act_range: tuple[float, float] | None   # calibrated, when stats given
  act_clip: tuple[float, float] | None    # static clip range, when stats given
  weight_sqnr: float
  output_sqnr: float
  param_share: float
  byte_share: float
  method: str = "rtn"         # how the weight was rounded (its rule's)
  # output SQNR over that of round-to-nearest with the same spec (dB);
  # None for round-to-nearest layers.
  gain_over_rtn: float | None = None


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """Per-layer ranges, clips, bits and SQNR; `plot(folder)` draws figures.

  Returned by `jq.layer_report`; `print` it for a table with one row per
  quantized layer.

  Attributes:
    rows: one row per quantized layer, with `path`, `weight_spec`,
      `act_spec` (labels such as 'int8/ch'), `weight_range` (min, max),
      `weight_clip` (largest |value| any of its scales represents),
      `act_range` (calibrated (min, max), with `stats`) and `act_clip` (the
      static activation clip range, with `stats` and an act spec) or None,
      `weight_sqnr` and `output_sqnr` (dB), `param_share` and `byte_share`
      (of the whole tree's parameter count and quantized bytes), `method`
      ('rtn', or the rule's method, e.g. 'gptq') and `gain_over_rtn` (the
      output SQNR minus round-to-nearest's with the same spec, in dB; None
      for 'rtn' layers).
    weights: path -> float weight (NumPy), for the histograms.
    quantized: path -> its `QArray`.
    activations: path -> one batch of the activation entering its matmul
      (NumPy).

  Example:
    >>> def mlp(p, x):
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
    >>> x = jnp.array([[1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    >>> recipe = jq.Recipe([jq.Rule(".*", weight=jq.int8(), act=jq.int8())])
    >>> stats = jq.calibrate(mlp, params, recipe, [x], progress=False)
    >>> rep = jq.layer_report(mlp, params, recipe, x, stats=stats)
    >>> [(r.path, r.act_range) for r in rep.rows]
    [('w1', (-1.0, 2.0)), ('w2', (0.0, 3.0))]
    >>> rep.rows[0].weight_sqnr             # ones are exact on the int8 grid
    inf
    >>> sorted(rep.quantized), rep.activations["w1"].shape
    (['w1', 'w2'], (2, 4))
  """

  rows: tuple[LayerRow, ...]
  weights: dict      # path -> float weight (numpy), for the histograms
  quantized: dict    # path -> QArray
  activations: dict  # path -> one batch of the activation (numpy)

  def __str__(self):
    methods = any(r.method != "rtn" for r in self.rows)
    head = ("layer", "weight", "act", "w range", "w clip", "act range",
            "act clip", "w SQNR", "out SQNR", "params", "bytes") + (
                ("method", "vs RTN") if methods else ())
    fmt_range = lambda r: "-" if r is None else f"[{r[0]:.3g}, {r[1]:.3g}]"
    gain = lambda g: "-" if g is None else f"{g:+.1f} dB"
    rows = [(r.path, r.weight_spec, r.act_spec, fmt_range(r.weight_range),
             f"{r.weight_clip:.3g}", fmt_range(r.act_range),
             fmt_range(r.act_clip), f"{r.weight_sqnr:.1f} dB",
             f"{r.output_sqnr:.1f} dB", f"{100 * r.param_share:.1f}%",
             f"{100 * r.byte_share:.1f}%") + (
                 (r.method, gain(r.gain_over_rtn)) if methods else ())
            for r in self.rows]
    return text.table(head, rows)

  def plot(self, folder) -> list:
    """Saves `weights.png`, `activations.png` and `sqnr.png` in `folder`
    (created if missing; needs matplotlib); returns their paths."""
    from jaxquant import plots
    return plots.layer_figures(self, folder)


def layer_report(apply_fn: Callable, params, recipe: Recipe, *args,
                 stats=None, model_kwargs: dict | None = None,
                 machine=None) -> LayerReport:
  """Per quantized layer: ranges, clips, bits, weight and output SQNR.

  `params` are float; they are quantized with `quantize_params` (with
  `stats`, activations use the static calibrated scales). Each layer is
  measured alone, on the float input it gets from the float model:

    weight SQNR = 10 log10(sum W^2 / sum (W - dequantize(W_q))^2)
    output SQNR = 10 log10(sum y^2 / sum (y - y_q)^2)

  with y its float matmul output and y_q the same matmul with the quantized
  weight (and quantized activation, when its rule has `act`), computed as
  `quantized_apply` computes it on `machine`.

  Args:
    apply_fn: the model, `apply_fn(params, *args, **model_kwargs)`.
    params: float params.
    recipe: the `Recipe`.
    *args: one batch of inputs; the model runs on it (jitted).
    stats: calibration `Stats`, for activation ranges and static clips.
    model_kwargs: keyword arguments of `apply_fn`.
    machine: whose lowerings compute y_q (see `quantized_apply`); the
      numbers agree within float32 rounding on every machine.

  Returns:
    A `LayerReport`: `print` it for the table, `.plot(folder)` for figures.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> def mlp(p, x):                        # any JAX function of params
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (16, 32)) / 4,
    ...           "w2": jax.random.normal(k2, (32, 4)) / 6}
    >>> x = jax.random.normal(k3, (8, 16))
    >>> recipe = jq.Recipe([jq.Rule(".*", weight=jq.int8(), act=jq.int8())])
    >>> rep = jq.layer_report(mlp, params, recipe, x)
    >>> [(r.path, r.weight_spec, r.output_sqnr > 30) for r in rep.rows]
    [('w1', 'int8/ch', True), ('w2', 'int8/ch', True)]
  """
  kwargs = dict(model_kwargs or {})
  qparams = quantize_params(apply_fn, params, recipe, *args, stats=stats,
                            model_kwargs=kwargs, progress=False,
                            machine=machine)
  traced, dyn = Tracer(apply_fn)(params, args, kwargs)
  leaves = param_leaves(params)
  qleaves = dict(zip(traced.paths, param_leaves(qparams)))
  compare = lambda q: _compared(traced, recipe, params, dyn, q, machine)
  power, acts = compare(qleaves)
  rtn_power = {}
  if any(rule.method is not None for rule in recipe.rules):
    rtn_params = quantize_params(apply_fn, params, recipe.without_methods(),
                                 *args, stats=stats, model_kwargs=kwargs,
                                 progress=False, machine=machine)
    rtn_power = compare(dict(zip(traced.paths, param_leaves(rtn_params))))[0]
  total_params = sum(int(np.size(l)) for l in leaves)
  total_bytes = nbytes(qparams)
  rows, weights, quantized = [], {}, {}
  for path, leaf in zip(traced.paths, leaves):
    q = qleaves[path]
    if not is_qarray(q) or path not in power:
      continue
    w = np.asarray(leaf, np.float32)
    act_range = act_clip = None
    if stats is not None and path in stats.states:
      lo, hi = (np.asarray(a) for a in stats.act_range(path))
      act_range = (float(lo.min()), float(hi.max()))
      if q.act is not None:
        s = np.asarray(q.act.scale)
        z = 0.0 if q.act.zero_point is None else np.asarray(q.act.zero_point)
        spec = q.act.spec
        act_clip = (float(np.min((spec.qmin - z) * s)),
                    float(np.max((spec.qmax - z) * s)))
    rows.append(LayerRow(
        path, q.spec.short(),
        "float" if recipe.match(path).act is None else (
            (q.act and q.act.spec) or recipe.match(path).act).short(),
        (float(w.min()), float(w.max())),
        _weight_clip(q), act_range, act_clip, sqnr_db(w, q.dequantize()),
        _output_sqnr(power[path]), w.size / total_params,
        q.nbytes / total_bytes, *_method_of(
            recipe.match(path).method, power[path], rtn_power.get(path))))
    weights[path], quantized[path] = w, q
  return LayerReport(tuple(rows), weights, quantized, acts)


def _weight_clip(q) -> float:
  """The largest |weight| any of `q`'s scales represents (divided by the
  pre-scale of its input feature when `q` has an `in_scale`)."""
  scale = np.asarray(q.scale)
  if q.in_scale is None:
    return float(np.max(scale) * q.spec.qmax)
  if q.spec.granularity == "group":
    scale = np.repeat(scale, q.spec.group_size, axis=q.spec.group_axis)
  return float(np.max(scale * q.spec.qmax / np.asarray(q.in_scale)))


def _compared(traced, recipe, params, dyn, qleaves, machine):
  """Per quantized path: (output signal, noise) power summed over its
  matmuls, and one batch of the activation entering it."""
  def payload(path, leaf):
    q = qleaves[path]
    if not is_qarray(q):
      return FloatPayload(leaf)
    return _PairPayload(FloatPayload(leaf), engine.QuantPayload.of(q))

  keys = []

  def run(params, dyn):
    handler = _CompareHandler(recipe=recipe, machine=machine)
    traced.evaluate(handler, tag_inputs(traced, param_leaves(params),
                                         payload), dyn)
    keys[:] = [key for key, _, _ in handler.sides]
    return [v for _, _, v in handler.sides]

  values = jax.jit(run)(params, dyn)
  power, acts = {}, {}
  for key, v in zip(keys, values):
    if key.endswith("#act"):
      acts.setdefault(key[:-4], np.asarray(v))
    else:
      power[key] = power.get(key, 0) + np.asarray(v)
  return power, acts


def _output_sqnr(power) -> float:
  """dB of (signal, noise) power."""
  signal, noise = power
  return float(10 * np.log10(signal / max(noise, 1e-30)))


def _method_of(method, power, rtn_power) -> tuple:
  """(method name, output SQNR gain over round-to-nearest or None)."""
  if method is None or rtn_power is None:
    return "rtn", None
  return method.name, _output_sqnr(power) - _output_sqnr(rtn_power)


# --------------------------------------------------------------------------
# Sensitivity and automatic mixed precision


def _only(path: str, spec: QuantSpec | None, act) -> Recipe:
  rules = [Rule(re.escape(path), weight=spec, act=act if spec else None)]
  return Recipe(rules + [Rule(r".*", weight=None, optional=True)])


def _default_metric(reference):
  return lambda outputs: sqnr_db(reference, outputs)


def _outputs(apply_fn, params, recipe, args, kwargs):
  qparams = quantize_params(apply_fn, params, recipe, *args,
                            model_kwargs=kwargs, progress=False)
  out = jax.jit(quantized_apply(apply_fn, recipe))(qparams, *args, **kwargs)
  return out, qparams


def sensitivity(apply_fn: Callable, params, recipe: Recipe, *args,
                metric: Callable | None = None, all_but_one: bool = False,
                model_kwargs: dict | None = None) -> dict[str, float]:
  """How much quantizing each layer alone (or all but it) changes a metric.

  `metric(outputs) -> float`, higher is better (pass `-loss` for a loss;
  e.g. `lambda logits: (logits.argmax(-1) == y).mean()`). Returns, per
  quantized layer, `metric(float) - metric(quantized)`: the drop. Without a
  metric, the output SQNR against float is measured and the returned value
  is the quantization noise power relative to the output power
  (`10^(-SQNR/10)`), which adds up across layers.

  Args:
    apply_fn: the model, `apply_fn(params, *args, **model_kwargs)`.
    params: float params.
    recipe: the `Recipe`; each layer it quantizes is measured with its rule.
    *args: the inputs the model runs on (a batch the metric scores).
    metric: `outputs -> float`, higher is better; None for the relative
      noise power.
    all_but_one: quantize every layer but the one measured (its drop is then
      the cost of all the others).
    model_kwargs: keyword arguments of `apply_fn`.

  Returns:
    A dict, parameter path -> drop, for every layer the recipe quantizes.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> def mlp(p, x):                        # any JAX function of params
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (16, 32)) / 4,
    ...           "w2": jax.random.normal(k2, (32, 4)) / 6}
    >>> x = jax.random.normal(k3, (8, 16))
    >>> sens = jq.sensitivity(mlp, params,
    ...                       jq.Recipe([jq.Rule(".*", weight=jq.int2())]), x)
    >>> {path: round(drop, 2) for path, drop in sens.items()}
    {'w1': 0.29, 'w2': 0.23}
  """
  kwargs = dict(model_kwargs or {})
  reference = apply_fn(params, *args, **kwargs)
  traced, _ = Tracer(apply_fn)(params, args, kwargs)
  specs = resolved_specs(traced, recipe, param_leaves(params))
  drops = {}
  for path in specs:
    if all_but_one:
      # The user's rules may now take nothing (one named only this layer).
      rules = [Rule(re.escape(path), weight=None)] + [
          dataclasses.replace(r, optional=True) for r in recipe.rules]
      layer_recipe = Recipe(rules)
    else:
      rule = recipe.match(path)
      layer_recipe = _only(path, rule.weight, rule.act)
    out, _ = _outputs(apply_fn, params, layer_recipe, args, kwargs)
    drops[path] = _drop(metric, reference, out)
  return drops


def _drop(metric, reference, out) -> float:
  if metric is None:
    return 10 ** (-sqnr_db(reference, out) / 10)
  return float(metric(reference)) - float(metric(out))


DEFAULT_CANDIDATES = (int8(), QuantSpec(bits=6), QuantSpec(bits=5), int4(), int3(),
                      int2(), None)


def auto_recipe(apply_fn: Callable, params, *args, budget_bytes: int,
                candidates: Sequence[QuantSpec | None] = DEFAULT_CANDIDATES,
                act: QuantSpec | None = None, metric: Callable | None = None,
                model_kwargs: dict | None = None) -> Recipe:
  """Chooses a weight spec per layer minimising the metric drop in a budget.

  Each layer is quantized alone with each candidate (None = keep float) to
  measure its drop (see `sensitivity`) and its bytes. The per-layer choices
  minimise the summed drop subject to total parameter bytes (the whole tree,
  non-matmul parameters included) <= `budget_bytes`: an exact
  multiple-choice knapsack by dynamic programming over bytes rounded up to
  1/1000 of the budget. The choice and every uniform recipe that fits the
  budget are then measured together, and the best is returned (so the
  result never loses to a uniform width of the same size). The result is an
  ordinary `Recipe`: print it, edit it.

    minimise  sum_l drop_l(spec_l)  subject to  sum_l bytes_l(spec_l) <= budget

  Args:
    apply_fn: the model, `apply_fn(params, *args, **model_kwargs)`.
    params: float params.
    *args: the inputs the model runs on.
    budget_bytes: the largest total size (`jq.nbytes`) of the quantized
      params; ValueError when even the smallest candidates do not fit.
    candidates: the weight specs to choose from per layer (None: float).
    act: an activation spec given to every quantized layer (None:
      weight-only).
    metric: as in `sensitivity` (None: relative output noise power).
    model_kwargs: keyword arguments of `apply_fn`.

  Returns:
    A `Recipe` with one rule per matmul weight and a final optional
    keep-float rule.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> def mlp(p, x):                        # any JAX function of params
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (16, 32)) / 4,
    ...           "w2": jax.random.normal(k2, (32, 4)) / 6}
    >>> x = jax.random.normal(k3, (8, 16))
    >>> jq.nbytes(params)
    2560
    >>> recipe = jq.auto_recipe(mlp, params, x, budget_bytes=600,
    ...                         candidates=(jq.int8(), jq.int4()))
    >>> print(recipe)
    Recipe([
      Rule('w1', weight=int4/ch, act=float),
      Rule('w2', weight=int8/ch, act=float),
      Rule('.*', weight=float, act=float)
    ])
    >>> jq.nbytes(jq.quantize_params(mlp, params, recipe, x)) <= 600
    True
  """
  kwargs = dict(model_kwargs or {})
  reference = apply_fn(params, *args, **kwargs)
  traced, _ = Tracer(apply_fn)(params, args, kwargs)
  leaves = dict(zip(traced.paths, param_leaves(params)))
  paths = sorted(traced.contracted())
  fixed = nbytes(params) - sum(_float_bytes(leaves[p]) for p in paths)
  options = {}
  for path in paths:
    options[path] = []
    for spec in candidates:
      recipe = _only(path, spec, act)
      out, qparams = _outputs(apply_fn, params, recipe, args, kwargs)
      size = nbytes(qparams) - nbytes(params) + _float_bytes(leaves[path])
      options[path].append((spec, size, _drop(metric, reference, out)))
  choice = _knapsack(options, budget_bytes - fixed)
  if choice is None:
    smallest = fixed + sum(min(o[1] for o in opts) for opts in options.values())
    raise ValueError(f"budget_bytes={budget_bytes} is below the smallest "
                     f"reachable size {smallest}; raise the budget or add "
                     "narrower candidates")
  proposals = [_recipe(choice, act)]
  for spec in candidates:
    if fixed + sum(_size_of(options[p], spec) for p in paths) <= budget_bytes:
      proposals.append(_recipe({p: spec for p in paths}, act))
  scored = []
  for recipe in proposals:
    out, _ = _outputs(apply_fn, params, recipe, args, kwargs)
    scored.append((_drop(metric, reference, out), len(scored), recipe))
  return min(scored)[2]


def _float_bytes(leaf) -> int:
  return int(np.size(leaf)) * jnp.dtype(leaf.dtype).itemsize


def _size_of(opts, spec):
  return next(size for s, size, _ in opts if s == spec)


def _knapsack(options: dict, budget: int):
  """Path -> spec minimising the summed drop with summed size <= budget."""
  if budget <= 0:
    return None
  unit = max(1, math.ceil(budget / 1000))
  cap = budget // unit
  best = {0: (0.0, {})}  # used units -> (drop, choice)
  for path, opts in options.items():
    nxt = {}
    for used, (drop, choice) in best.items():
      for spec, size, d in opts:
        u = used + math.ceil(size / unit)
        if u <= cap and (u not in nxt or drop + d < nxt[u][0]):
          nxt[u] = (drop + d, {**choice, path: spec})
    best = nxt
  if not best:
    return None
  return min(best.values(), key=lambda t: t[0])[1]


def _recipe(choice: dict, act) -> Recipe:
  return Recipe([Rule(re.escape(path), weight=spec,
                      act=act if spec is not None else None)
                 for path, spec in choice.items()]
                + [Rule(r".*", weight=None, optional=True)])
