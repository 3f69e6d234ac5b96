"""Calibration: observe the activations entering every quantized matmul.

As a loop over batches:

  stats = jq.calibrate(model.apply, params, recipe, batches, observer="mse")
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)

or as a pure `init` / `update` pair, optax-style, for your own data loop:

  cal = jq.calibration(model.apply, recipe, observer="minmax")
  stats = cal.init(params, x)                  # empty observer states
  update = jax.jit(cal.update)
  for batch in batches:
    stats = update(stats, params, batch)

Each weight path gets one per-tensor activation range; a weight stacked by
`nn.scan` gets one range per layer (the observed activation is stacked along
the scan axis, which the observer keeps). `Stats` is a pytree:
`jq.save(path, stats)` and `jq.load(path, like=cal.init(params, x))`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import engine, observers, text
from jaxquant.engine import hessian
from jaxquant.engine.prescale import FeatureKey, FeatureStats
from jaxquant.rules import Recipe
from jaxquant.transform import Tracer, float_payload, param_leaves, tag_inputs
from jaxquant.tree import leaves_with_paths


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stats:
  """Observer states of the activations, keyed by weight path; a pytree.

  Attributes:
    states: path -> observer state of the activation entering its matmul.
    num_batches: batches observed (an int32 scalar array).
    observers: (path, `Observer`) pairs, the owner of each state (static).
    depth: (path, number of enclosing `scan`s) pairs (static).
    param_shapes: (path, shape) of every parameter leaf of the model
      (static), to check that quantized params belong to this model.

  Built by `jq.calibrate` or `jq.calibration(...).init`; passed to
  `jq.quantize_params(..., stats=stats)` for static activation scales and
  for rules with a `method` (their `hessians`, path -> `sum x^T x`).
  `jq.save(path, stats)` writes it; `jq.load(path, like=cal.init(params,
  x))` reads it back.

  Example:
    >>> def mlp(p, x):
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
    >>> x = jnp.array([[1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    >>> recipe = jq.Recipe([jq.Rule(".*", weight=jq.int8(), act=jq.int8())])
    >>> stats = jq.calibrate(mlp, params, recipe, [x, 2 * x], progress=False)
    >>> int(stats.num_batches), sorted(stats.states)
    (2, ['w1', 'w2'])
    >>> [float(v) for v in stats.act_range("w2")]   # relu(x @ w1): 0 .. 6
    [0.0, 6.0]
  """

  states: dict[str, Any]
  num_batches: jax.Array
  observers: tuple = dataclasses.field(metadata=dict(static=True))
  depth: tuple = dataclasses.field(metadata=dict(static=True))
  param_shapes: tuple = dataclasses.field(metadata=dict(static=True))
  hessians: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  # (path, leading axes of its Hessian / features that are stacked layers).
  hessian_layers: tuple = dataclasses.field(default=(),
                                            metadata=dict(static=True))
  # path -> FeatureStats of its input features (AWQ, SmoothQuant).
  features: dict[str, FeatureStats] = dataclasses.field(default_factory=dict)
  # (path, parameter axes its input features run along) pairs.
  feature_axes: tuple = dataclasses.field(default=(),
                                          metadata=dict(static=True))
  # (path, path whose Hessian it shares) for weights whose matmuls read the
  # same inputs as another's (q, k and v): one accumulator for them all.
  hessian_owners: tuple = dataclasses.field(default=(),
                                            metadata=dict(static=True))

  def hessian(self, path: str) -> jax.Array:
    """`sum x^T x` over the inputs of `path`'s matmuls (for methods such as
    `jq.gptq`): shape (K, K), K the weight's contracted features in its
    row-major order, or (layers, K, K) for a weight stacked by `nn.scan`.
    A weight used by several matmuls gets the sum of their Hessians;
    weights whose matmuls all read the same inputs (q, k and v) share one
    array."""
    path = dict(self.hessian_owners).get(path, path)
    if path not in self.hessians:
      raise ValueError(
          f"{path}: no Hessian was collected for it; calibrate with the "
          "recipe whose rule gives it a method that needs one (e.g. "
          "method=jq.gptq())")
    return self.hessians[path]

  def feature_stats(self, path: str) -> FeatureStats:
    """Per input feature of `path`'s matmuls (for `jq.awq` and
    `jq.smoothquant`): `sum |x|`, `min x`, `max x` of shape (K,) or
    (layers, K) for a weight stacked by `nn.scan`, and the rows seen; K the
    contracted features in the weight's row-major order (a convolution's
    input channels)."""
    if path not in self.features:
      raise ValueError(
          f"{path}: no per-feature statistics were collected for it; "
          "calibrate with the recipe whose rule gives it a method that needs "
          "them (e.g. method=jq.awq())")
    return self.features[path]

  def act_range(self, path: str):
    """(lo, hi) for the activation of `path`: shape () or (layers,).

    The observer's finalized range; a weight stacked by `nn.scan` gets one
    range per layer."""
    lo, hi = dict(self.observers)[path].finalize(self.states[path])
    keep = lo.shape[:dict(self.depth)[path]]
    return lo.reshape(keep), hi.reshape(keep)

  def table(self) -> "RangeTable":
    """Per layer: the calibrated activation range (per layer of a scan)."""
    rows = []
    for path in self.states:
      lo, hi = (np.asarray(a) for a in self.act_range(path))
      rows.append((path, float(lo.min()), float(hi.max()), lo.size))
    return RangeTable(tuple(rows), int(self.num_batches))

  def check_model(self, paths, shapes) -> None:
    """Raises ValueError when `params` are not those of the stats' model."""
    given = dict(zip(paths, shapes))
    for path, shape in self.param_shapes:
      if given.get(path) != shape:
        raise ValueError(
            f"stats come from another model: {path} has shape "
            f"{given.get(path, 'missing')} here, {shape} when calibrated; "
            "calibrate again with these params")


@dataclasses.dataclass(frozen=True)
class RangeTable:
  """`stats.table()`: (path, lo, hi, ranges kept) rows, printable.

  Attributes:
    rows: (path, lo, hi, number of ranges) per observed weight; lo / hi are
      the min / max over the layers of a scanned weight.
    num_batches: batches observed.

  Example:
    >>> def mlp(p, x):
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
    >>> x = jnp.array([[1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    >>> recipe = jq.Recipe([jq.Rule(".*", weight=jq.int8(), act=jq.int8())])
    >>> stats = jq.calibrate(mlp, params, recipe, [x, 2 * x], progress=False)
    >>> print(stats.table())
    layer  act min  act max  ranges
    w1     -2       4        1
    w2     0        6        1
    (2 batches observed)
  """

  rows: tuple[tuple[str, float, float, int], ...]
  num_batches: int

  def __str__(self):
    rows = [(p, f"{lo:.4g}", f"{hi:.4g}", n) for p, lo, hi, n in self.rows]
    return (text.table(("layer", "act min", "act max", "ranges"), rows)
            + f"\n({self.num_batches} batches observed)")


class Calibration(NamedTuple):
  """A pure calibration pair (see `calibration`).

  Attributes:
    init: `(params, *batch) -> Stats` with empty observer states; the batch
      gives shapes only.
    update: `(stats, params, *batch) -> Stats`, pure and jittable.

  Example:
    >>> def mlp(p, x):
    ...   return jnp.maximum(x @ p["w1"], 0.0) @ p["w2"]
    >>> params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
    >>> x = jnp.array([[1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    >>> recipe = jq.Recipe([jq.Rule(".*", weight=jq.int8(), act=jq.int8())])
    >>> init, update = jq.calibration(mlp, recipe)     # a NamedTuple pair
    >>> stats = init(params, x)                        # x: shapes only
    >>> step = jax.jit(update)
    >>> for batch in (x, -x):
    ...   stats = step(stats, params, batch)
    >>> [float(v) for v in stats.act_range("w1")]
    [-2.0, 2.0]
  """

  init: Callable[..., Stats]
  update: Callable[..., Stats]


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def calibration(apply_fn: Callable, recipe: Recipe, *,
                observer: str | observers.Observer = "minmax",
                observer_options: dict | None = None,
                model_kwargs: dict | None = None) -> Calibration:
  """Observation of every activation the recipe quantizes, as init / update.

  Args:
    apply_fn: the model's apply function, `apply_fn(params, *batch,
      **model_kwargs)`.
    recipe: matmuls whose weight it quantizes are observed.
    observer: "minmax", "ema", "percentile", "mse" (MSE-optimal for each
      rule's `act` spec), or an `Observer` (for models without `nn.scan`).
    observer_options: keyword arguments of the observer, e.g.
      `{"percent": 99.99}`.
    model_kwargs: keyword arguments passed to `apply_fn` on every batch.

  Returns:
    A `Calibration` pair `(init, update)`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((8, 16))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8())])
    >>> cal = jq.calibration(model.apply, recipe)
    >>> stats = cal.init(params, x)
    >>> stats = jax.jit(cal.update)(stats, params, 2 * x)
    >>> [float(v) for v in stats.act_range("params/kernel")]  # min, max
    [2.0, 2.0]
  """
  return _calibration(apply_fn, recipe, observer, observer_options,
                      model_kwargs)[0]


def _calibration(apply_fn, recipe, observer, observer_options, model_kwargs):
  """The `Calibration` pair and the `observe` function it is built on: one
  tracer, so `calibrate`'s checked step reuses the traces of `init`."""
  options = dict(observer_options or {})
  observe = _observer_of(apply_fn, recipe, model_kwargs)

  def init(params, *batch) -> Stats:
    keys = []  # (key, depth) of each emitted side value, in order

    def abstract(p, a):
      sides = observe(p, a)
      keys.extend((k, d) for k, d, _ in sides)
      return [x for _, _, x in sides]

    emitted = jax.eval_shape(abstract, params, batch)
    ranges = [(k, d) for k, d in keys if isinstance(k, str)]
    depth = dict(ranges)
    for path, d in ranges:
      if depth[path] != d:
        raise ValueError(f"{path} is multiplied both inside and outside a "
                         "scan; calibrate it with a separate rule")
    owners = {path: _observer_for(observer, recipe, path, d, options)
              for path, d in depth.items()}
    states = {}
    for (path, _), example in zip(keys, emitted):
      if isinstance(path, str):
        states.setdefault(path, owners[path].init(example))
    shapes = tuple((path, tuple(np.shape(leaf)))
                   for path, leaf in leaves_with_paths(params))
    layers, hessians, features, feature_axes = _method_layout(
        keys, emitted, dict(shapes))
    shared = _shared_hessians(keys, hessians, dict(layers))
    hessians = {p: h for p, h in hessians.items() if p not in shared}
    return Stats(states, jnp.zeros((), jnp.int32), tuple(owners.items()),
                 tuple(depth.items()), shapes, hessians, layers, features,
                 feature_axes, tuple(shared.items()))

  def update(stats: Stats, params, *batch) -> Stats:
    return _observed(stats, observe(params, batch))[0]

  return Calibration(init, update), observe


def _observer_of(apply_fn, recipe, model_kwargs):
  """`(params, args) -> [(path, depth, activation)]`, in evaluation order."""
  tracer = Tracer(apply_fn)
  model_kwargs = dict(model_kwargs or {})

  def observe(params, args):
    # Traced per batch shape (cached): jaxprs fix every intermediate shape.
    traced, dyn = tracer(params, args, model_kwargs)
    handler = engine.ObserveHandler(recipe=recipe)
    traced.evaluate(handler, tag_inputs(traced, param_leaves(params),
                                        float_payload), dyn)
    return handler.sides

  return observe


def _method_layout(keys, emitted, shapes):
  """(path, stacked layer axes) pairs, zero Hessians, empty feature stats
  and (path, feature axes) pairs, from the abstract side values: one
  emitted inside `d` scans has `d` leading axes; the outer ones that slice
  the weight (stacked layers) are kept, the others (a weight reused at
  every step) are summed."""
  layers, hessians, features, feature_axes = {}, {}, {}, {}
  for (key, d), example in zip(keys, emitted):
    if isinstance(key, str):
      continue
    stacked = len(shapes[key.path]) - len(key.covered)
    if stacked > d:
      raise ValueError(f"{key.path}: a slice of it meets a matmul outside "
                       "the scan that stacks it; quantize it without method=")
    cut = lambda a: jax.ShapeDtypeStruct(a.shape[:stacked] + a.shape[d:],
                                         jnp.float32)
    axes = key.feature_axes if isinstance(key, FeatureKey) else key.axes
    count = jax.tree_util.tree_leaves(example)[0].shape[-1]
    if count != math.prod(shapes[key.path][a] for a in axes):
      raise ValueError(f"{key.path}: a slice of it meets a matmul, so its "
                       "input statistics do not cover the weight; quantize "
                       "it without method=")
    if isinstance(key, FeatureKey):
      empty = FeatureStats.empty(FeatureStats(*map(cut, example)))
      same = feature_axes.setdefault(key.path, key.feature_axes) == (
          key.feature_axes) and features.setdefault(
              key.path, empty).abs_sum.shape == empty.abs_sum.shape
    else:
      zero = jnp.zeros(cut(example).shape, jnp.float32)
      same = hessians.setdefault(key.path, zero).shape == zero.shape
    if layers.setdefault(key.path, stacked) != stacked or not same:
      raise ValueError(f"{key.path} is contracted differently by its "
                       "matmuls, so they share no statistics; give it a rule "
                       "without method=")
  return (tuple(layers.items()), hessians, features,
          tuple(feature_axes.items()))


def _shared_hessians(keys, hessians, layers) -> dict:
  """Path -> the earlier path whose Hessian equals its own: every matmul of
  both reads the same activations, in the same feature order, at the same
  scan depth (convolutions, whose source is (), never share)."""
  uses = {}
  for key, depth in keys:
    if isinstance(key, hessian.HessianKey):
      uses.setdefault(key.path, []).append((key.source, depth))
  first, shared = {}, {}
  for path, signature in uses.items():
    if any(source == () for source, _ in signature):
      continue
    kind = (tuple(signature), hessians[path].shape, layers[path])
    owner = first.setdefault(kind, path)
    if owner != path:
      shared[path] = owner
  return shared


def _observed(stats: Stats, sides):
  """Stats after one batch's side values, and per activation (the sides
  with a path key) whether it is finite."""
  owners, layers = dict(stats.observers), dict(stats.hessian_layers)
  states, hessians, finite = dict(stats.states), dict(stats.hessians), []
  shared = dict(stats.hessian_owners)
  features = dict(stats.features)
  for key, depth, x in sides:
    if isinstance(key, str):
      x = x.astype(jnp.float32)
      finite.append(jnp.all(jnp.isfinite(x)))
      states[key] = owners[key].update(states[key], x)
      continue
    steps = tuple(range(layers[key.path], depth))
    if isinstance(key, FeatureKey):
      features[key.path] = FeatureStats.combine(
          features[key.path], FeatureStats.reduce(x, steps))
    elif key.path not in shared:  # else its owner adds the same x^T x
      hessians[key.path] = hessians[key.path] + jnp.sum(x, axis=steps)
  return dataclasses.replace(stats, states=states, hessians=hessians,
                             features=features,
                             num_batches=stats.num_batches + 1), finite


def _shapes(args):
  return [np.shape(a) for a in jax.tree_util.tree_leaves(args)]


def _check_batch(i, args, first):
  shapes, expected = _shapes(args), _shapes(first)
  if len(shapes) != len(expected) or any(
      s[1:] != e[1:] or len(s) != len(e) for s, e in zip(shapes, expected)):
    raise ValueError(f"batch {i} has shapes {shapes}, batch 0 had {expected}; "
                     "batches may differ in the leading (batch) axis only")


def calibrate(apply_fn: Callable, params, recipe: Recipe, batches: Iterable,
              *, observer: str | observers.Observer = "minmax",
              observer_options: dict | None = None,
              model_kwargs: dict | None = None,
              progress: bool = True) -> Stats:
  """Observes the activation input of every matmul the recipe quantizes.

  The loop over `calibration(...)`'s `init` / `update`, one jitted step per
  batch, checking each batch for NaN/inf.

  Args:
    apply_fn: the model's apply function, `apply_fn(params, *batch)`.
    params: its float parameters.
    recipe: the `Recipe`; matmuls whose weight it quantizes are observed.
    batches: an iterable of batches; a batch is one array or a tuple of
      positional arguments.
    observer, observer_options, model_kwargs: as in `calibration`.
    progress: show a progress bar.

  Returns:
    `Stats`, for `quantize_params(..., stats=...)`; `stats.table()` prints
    the ranges.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((8, 16))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8())])
    >>> stats = jq.calibrate(model.apply, params, recipe, [x, -3 * x],
    ...                      progress=False)
    >>> int(stats.num_batches), [float(v) for v in stats.act_range(
    ...     "params/kernel")]
    (2, [-3.0, 1.0])
  """
  if isinstance(batches, Recipe) and not isinstance(recipe, Recipe):
    raise ValueError("calibrate takes (apply_fn, params, recipe, batches): "
                     "pass the recipe before the batches")
  if not isinstance(recipe, Recipe):
    raise ValueError(f"recipe must be a jq.Recipe, got {type(recipe).__name__}")
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError("calibrate got no batches; pass an iterable with at "
                     "least one batch")
  first = _as_args(first)
  cal, observe = _calibration(apply_fn, recipe, observer, observer_options,
                              model_kwargs)
  stats = cal.init(params, *first)
  keys = []  # the path of each finiteness flag, recorded while tracing

  @jax.jit
  def step(stats, params, args):
    sides = observe(params, args)
    keys[:] = [key for key, _, _ in sides if isinstance(key, str)]
    return _observed(stats, sides)

  from tqdm.auto import tqdm  # here: importing it warns in some notebooks
  bar = tqdm(desc="calibrating", disable=not progress, leave=False)
  for i, batch in enumerate(itertools.chain([first], batches)):
    args = _as_args(batch)
    if i:
      _check_batch(i, args, first)
    new_stats, finite = step(stats, params, args)
    bad = [k for k, ok in zip(keys, jax.device_get(finite)) if not ok]
    if bad:
      raise ValueError(f"batch {i}: NaN/inf in the activation entering "
                       f"{bad[0]} (the first quantized matmul where it "
                       "appears); check the model and the batch")
    stats = new_stats
    bar.update()
  bar.close()
  return stats


def _observer_for(observer, recipe, path, depth, options):
  if isinstance(observer, observers.Observer):
    if depth:
      raise ValueError(f"{path} sits inside an nn.scan: give the observer by "
                       "name (e.g. observer='minmax') so it keeps one range "
                       "per layer")
    if options:
      raise ValueError("observer_options apply to an observer given by "
                       "name; configure an Observer object when building it")
    return observer
  axes = tuple(range(depth)) or None
  if observer == "mse":
    rule = recipe.match(path)
    options = dict(options, spec=options.get("spec", rule.act or rule.weight))
  return observers.from_name(observer, axes=axes, **options)
