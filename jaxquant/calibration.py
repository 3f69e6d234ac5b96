"""Calibration: observe the activations entering every quantized matmul.

  stats = jq.calibrate(model.apply, params, batches, recipe, observer="mse")
  qparams = jq.quantize_params(model.apply, params, recipe, x, stats=stats)

`calibrate` traces the model once and runs one jitted step per batch: the
forward pass plus the observers' `update`. Each weight path gets one
per-tensor activation range; a weight stacked by `nn.scan` gets one range
per layer (the observed activation is stacked along the scan axis, which the
observer keeps).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import engine, observers, text
from jaxquant.transform import Tracer, float_payload, param_leaves, tag_inputs
from jaxquant.rules import Recipe
from jaxquant.tree import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class Stats:
  """Observer states of the activations, keyed by weight path.

  Attributes:
    states: path -> observer state of the activation entering its matmul.
    observers: path -> the `Observer` that owns that state.
    depth: path -> number of enclosing `scan`s (leading per-layer axes).
    param_shapes: path -> shape of every parameter leaf of the model.
    num_batches: batches observed.
  """

  states: dict[str, Any]
  observers: dict[str, observers.Observer]
  depth: dict[str, int]
  param_shapes: dict[str, tuple[int, ...]]
  num_batches: int

  def act_range(self, path: str):
    """(lo, hi) for the activation of `path`: shape () or (layers,)."""
    lo, hi = self.observers[path].range(self.states[path])
    keep = lo.shape[:self.depth[path]]
    return lo.reshape(keep), hi.reshape(keep)

  def table(self) -> "RangeTable":
    """Per layer: the calibrated activation range (per layer of a scan)."""
    rows = []
    for path in self.states:
      lo, hi = (np.asarray(a) for a in self.act_range(path))
      rows.append((path, float(lo.min()), float(hi.max()), lo.size))
    return RangeTable(tuple(rows), self.num_batches)

  def check_model(self, paths, shapes) -> None:
    """Raises ValueError when `params` are not those of the stats' model."""
    given = dict(zip(paths, shapes))
    for path, shape in self.param_shapes.items():
      if given.get(path) != shape:
        raise ValueError(
            f"stats come from another model: {path} has shape "
            f"{given.get(path, 'missing')} here, {shape} when calibrated; "
            "calibrate again with these params")


@dataclasses.dataclass(frozen=True)
class RangeTable:
  """`jq.report(stats)`: (path, lo, hi, ranges kept) rows, printable."""

  rows: tuple[tuple[str, float, float, int], ...]
  num_batches: int

  def __str__(self):
    rows = [(p, f"{lo:.4g}", f"{hi:.4g}", n) for p, lo, hi, n in self.rows]
    return (text.table(("layer", "act min", "act max", "ranges"), rows)
            + f"\n({self.num_batches} batches observed)")


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _shapes(args):
  return [np.shape(a) for a in jax.tree_util.tree_leaves(args)]


def _check_batch(i, args, first):
  shapes, expected = _shapes(args), _shapes(first)
  if len(shapes) != len(expected) or any(
      s[1:] != e[1:] or len(s) != len(e) for s, e in zip(shapes, expected)):
    raise ValueError(f"batch {i} has shapes {shapes}, batch 0 had {expected}; "
                     "batches may differ in the leading (batch) axis only")


def calibrate(apply_fn: Callable, params, batches: Iterable, recipe: Recipe, *,
              observer: str | observers.Observer = "minmax",
              progress: bool = True, **observer_kwargs) -> Stats:
  """Observes the activation input of every matmul the recipe quantizes.

  Args:
    apply_fn: the model's apply function, `apply_fn(params, *batch)`.
    params: its float parameters.
    batches: an iterable of batches; a batch is one array or a tuple of
      positional arguments.
    recipe: the `Recipe`; matmuls whose weight it quantizes are observed.
    observer: "minmax", "ema", "percentile", "mse" (MSE-optimal for each
      rule's `act` spec), or an `Observer` (for models without `nn.scan`).
    progress: show a progress bar.
    **observer_kwargs: passed to the observer, e.g. `percent=99.99`.

  Returns:
    `Stats`, for `quantize_params(..., stats=...)` and `report(stats, ...)`.
  """
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError("calibrate got no batches; pass an iterable with at "
                     "least one batch")
  first = _as_args(first)

  tracer = Tracer(apply_fn)

  def observe(params, args):
    # Traced per batch shape (cached): jaxprs fix every intermediate shape.
    traced, dyn = tracer(params, args, {})
    handler = engine.ObserveHandler(recipe=recipe)
    inputs = tag_inputs(traced, param_leaves(params), float_payload)
    traced.evaluate(handler, inputs, dyn)
    return handler.sides

  keys = []  # (path, depth) of each emitted activation, in order

  def abstract(p, a):
    sides = observe(p, a)
    keys.extend((k, d) for k, d, _ in sides)
    return [x for _, _, x in sides]

  emitted = jax.eval_shape(abstract, params, first)
  depth = dict(keys)
  for path, d in keys:
    if depth[path] != d:
      raise ValueError(f"{path} is multiplied both inside and outside a scan; "
                       "calibrate it with a separate rule")
  owners = {path: _observer_for(observer, recipe, path, d, observer_kwargs)
            for path, d in depth.items()}
  states = {}
  for (path, _), example in zip(keys, emitted):
    states.setdefault(path, owners[path].init(example))

  @jax.jit
  def step(states, params, args):
    states = dict(states)
    finite = []
    for key, _, x in observe(params, args):
      x = x.astype(jnp.float32)
      finite.append(jnp.all(jnp.isfinite(x)))
      states[key] = owners[key].update(states[key], x)
    return states, finite

  from tqdm.auto import tqdm  # here: importing it warns in some notebooks
  count = 0
  bar = tqdm(desc="calibrating", disable=not progress, leave=False)
  for i, batch in enumerate(itertools.chain([first], batches)):
    args = _as_args(batch)
    if i:
      _check_batch(i, args, first)
    new_states, finite = step(states, params, args)
    bad = [k for (k, _), ok in zip(keys, jax.device_get(finite)) if not ok]
    if bad:
      raise ValueError(f"batch {i}: NaN/inf in the activation entering "
                       f"{bad[0]} (the first quantized matmul where it "
                       "appears); check the model and the batch")
    states, count = new_states, count + 1
    bar.update()
  bar.close()
  shapes = {path: tuple(np.shape(leaf))
            for path, leaf in leaves_with_paths(params)}
  return Stats(states, owners, depth, shapes, count)


def _observer_for(observer, recipe, path, depth, kwargs):
  if isinstance(observer, observers.Observer):
    if depth:
      raise ValueError(f"{path} sits inside an nn.scan: give the observer by "
                       "name (e.g. observer='minmax') so it keeps one range "
                       "per layer")
    return observer
  axes = tuple(range(depth)) or None
  if observer == "mse":
    kwargs = dict(kwargs, spec=kwargs.get("spec", recipe.match(path).act or
                                          recipe.match(path).weight))
  return observers.from_name(observer, axes=axes, **kwargs)
