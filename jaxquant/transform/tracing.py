"""Tracing `apply_fn` once per abstract signature, and its matmul analysis.

  tracer = Tracer(model.apply)
  traced, dyn = tracer(params, args, kwargs)   # cached by shapes and dtypes
  traced.sites                                  # every matmul on a parameter
  traced.evaluate(handler, tag_inputs(traced, leaves, make_payload), dyn)

`params` may hold float arrays or `QArray`s: both are traced as float
`ShapeDtypeStruct`s of the logical shape, so the quantized model and the
float model share one jaxpr.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from jaxquant import compat, numerics
from jaxquant.rules import Recipe
from jaxquant.spec import QuantSpec
from jaxquant.transform import interpreter
from jaxquant.transform.site import Site
from jaxquant.transform.tagged import (FloatPayload, Tagged, identity_map,
                                       value)
from jaxquant.tree import is_float_array, is_qarray, path_str


def param_leaves(params) -> list:
  """The leaves of `params`, with `QArray`s as leaves."""
  return jax.tree_util.tree_leaves(params, is_leaf=is_qarray)


def _is_dynamic(x) -> bool:
  # jax.Array covers tracers too (a model called under an outer jit).
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _abstract(x):
  if is_qarray(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


@dataclasses.dataclass
class _SiteRecorder(interpreter.Handler):
  """Records every matmul with a parameter operand; computes float."""

  found: list = dataclasses.field(default_factory=list)

  def on_matmul(self, eqn, site, rule, invals):
    if site is not None:
      self.found.append(site)
    return interpreter.bind_plain(eqn, invals)


class Traced:
  """`apply_fn` as a jaxpr over (param leaves, dynamic arg leaves).

  The matmul analysis (`sites`) is run on first use only: `quantized_apply`
  never needs it, which keeps its tracing cost close to the float model's.
  """

  def __init__(self, jaxpr, out_tree, paths, param_abstract, dyn_abstract):
    self.jaxpr, self.out_tree, self.paths = jaxpr, out_tree, paths
    self._param_abstract, self._dyn_abstract = param_abstract, dyn_abstract

  def evaluate(self, handler: interpreter.Handler, param_inputs, dyn_args):
    """Runs the model with `handler` on (tagged) params and dynamic args."""
    outs = interpreter.evaluate(self.jaxpr.jaxpr, self.jaxpr.consts,
                                [*param_inputs, *dyn_args], handler)
    return jax.tree_util.tree_unflatten(self.out_tree, [value(o) for o in outs])

  @functools.cached_property
  def sites(self) -> tuple[Site, ...]:
    """Every matmul with a parameter operand, from an abstract evaluation."""
    recorder = _SiteRecorder()
    tagged = [Tagged(FloatPayload(a), path, identity_map(len(a.shape)))
              for a, path in zip(self._param_abstract, self.paths)]
    jax.eval_shape(lambda t, d: self.evaluate(recorder, t, d), tagged,
                   self._dyn_abstract)
    return tuple(recorder.found)

  def contracted(self) -> dict[str, frozenset]:
    """Parameter path -> union of its axes contracted by any matmul."""
    out: dict[str, frozenset] = {}
    for site in self.sites:
      out[site.path] = out.get(site.path, frozenset()) | site.param_contract
    return out

  def untagged_matmuls(self) -> list:
    """Every dot / conv equation (recursively) with no parameter operand."""
    seen = {site.eqn_id for site in self.sites}
    stack, found = [self.jaxpr.jaxpr], []
    while stack:
      for eqn in stack.pop().eqns:
        if eqn.primitive.name in (compat.DOT_GENERAL, compat.CONV) and (
            id(eqn) not in seen):
          found.append(eqn)
        stack.extend(compat.sub_jaxprs(eqn))
    return found


class Tracer:
  """Traces `apply_fn` and analyses its matmuls; caches per signature."""

  def __init__(self, apply_fn: Callable):
    self.apply_fn = apply_fn
    self._cache: dict = {}

  def __call__(self, params, args, kwargs) -> tuple[Traced, list]:
    """(traced model, dynamic argument leaves) for this call."""
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params,
                                                         is_leaf=is_qarray)
    _check_param_leaves(p_flat)
    a_leaves, a_def = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = tuple(_is_dynamic(l) for l in a_leaves)
    dyn = [l for l, d in zip(a_leaves, dynamic) if d]
    statics = tuple(l for l, d in zip(a_leaves, dynamic) if not d)
    p_abs = [_abstract(l) for _, l in p_flat]
    d_abs = [_abstract(l) for l in dyn]
    key = (p_def, tuple((a.shape, a.dtype) for a in p_abs), a_def, dynamic,
           tuple((a.shape, a.dtype) for a in d_abs), statics)
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
    except Exception as e:
      raise ValueError(f"tracing apply_fn failed ({type(e).__name__}: {e}); "
                       f"{_trace_hint(e)}") from e
    out_tree = jax.tree_util.tree_structure(out_shape)
    return Traced(jaxpr, out_tree, tuple(path_str(p) for p, _ in p_flat),
                  p_abs, d_abs)


def _check_param_leaves(p_flat) -> None:
  for keypath, leaf in p_flat:
    if not (is_qarray(leaf) or hasattr(leaf, "dtype")
            and hasattr(leaf, "shape")):
      raise ValueError(
          f"params leaf {path_str(keypath) or '<root>'} is a "
          f"{type(leaf).__name__}, not an array: params must be a pytree of "
          "arrays. Close over non-array parts in apply_fn (for Equinox: "
          "params, static = eqx.partition(model, eqx.is_array), and apply_fn "
          "combines them), or pass Python numbers as jnp arrays")


def _trace_hint(e: Exception) -> str:
  """What most likely went wrong, from the tracing error's type."""
  if isinstance(e, (jax.errors.ConcretizationTypeError,
                    jax.errors.TracerBoolConversionError,
                    jax.errors.TracerIntegerConversionError,
                    jax.errors.TracerArrayConversionError)):
    return ("apply_fn branches on, or converts to NumPy/Python, a value "
            "computed from params or array arguments; jaxquant traces it "
            "abstractly like jax.jit: use jax.lax.cond / jnp.where, or pass "
            "such an argument as a Python value (it is then static)")
  return ("if it comes from params or arguments that do not fit apply_fn, "
          "pass params with the paths and shapes the model was initialised "
          "with, and inputs of the shapes it expects; otherwise it is raised "
          "by apply_fn itself")


def tag_inputs(traced: Traced, leaves, make_payload) -> list:
  """Param leaves as interpreter inputs: float and quantized leaves are
  `Tagged` with `make_payload(path, leaf)`, others pass through."""
  return [Tagged(make_payload(path, leaf), path, identity_map(
      np.ndim(leaf) if not is_qarray(leaf) else leaf.ndim))
          if (is_qarray(leaf) or is_float_array(leaf)) else leaf
          for path, leaf in zip(traced.paths, leaves)]


def float_payload(path, leaf) -> FloatPayload:
  return FloatPayload(leaf)


def resolve_spec(spec: QuantSpec, contracted: frozenset, shape,
                 path: str) -> QuantSpec:
  """Fills in the axes a spec left to the model: channels = non-contracted,
  groups along the last contracted axis that `group_size` divides (the last
  one if none does: its error names it). A Flax conv kernel (kh, kw, in,
  out) groups its input channels; so does a PyTorch-layout one (out, in,
  kh, kw), whose last contracted axis is the kernel width."""
  ndim = len(shape)
  if spec.granularity == "channel" and spec.channel_axes is None:
    spec = dataclasses.replace(spec, channel_axes=tuple(
        a for a in range(ndim) if a not in contracted))
  elif spec.granularity == "group" and spec.group_axis is None:
    if not contracted:
      raise ValueError(f"{path}: no contraction axis to group along; give "
                       "group_axis= in the spec")
    divisible = [a for a in contracted if shape[a] % spec.group_size == 0]
    spec = dataclasses.replace(spec, group_axis=max(divisible or contracted))
  return numerics.resolve_axes(spec, ndim, path)


def resolved_specs(traced: Traced, recipe: Recipe, leaves) -> dict:
  """Path -> weight spec with axes read from the model, for dot weights."""
  contracted = traced.contracted()
  if not contracted:
    raise ValueError("apply_fn has no dot_general or conv_general_dilated "
                     "with a parameter operand: nothing to quantize")
  recipe.check_used(sorted(contracted), list(traced.paths),
                    what="matmul parameter")
  by_path = dict(zip(traced.paths, leaves))
  specs = {}
  for path, axes in contracted.items():
    spec = recipe.weight_spec(path)
    if spec is not None and is_float_array(by_path[path]):
      specs[path] = resolve_spec(spec, axes, np.shape(by_path[path]), path)
  return specs
