"""Handlers: what each mode computes for a matmul with a parameter operand.

`ObserveHandler` (calibration) emits activations, `FakeQuantHandler` (QAT)
fake-quantizes them, `QuantizedHandler` runs int8 kernels and records, per
matmul, how it ran and why (`OpRecord`, shown by `jq.report`).
"""

from __future__ import annotations

import dataclasses
import functools

from jaxquant import numerics
from jaxquant.engine import hessian, lowering, prescale
from jaxquant.engine.kernels import (PARTS_SPEC, accumulation_problem,
                                     activation_scale, contracted_last,
                                     fake_quant_matmul, fp8_matmul,
                                     grouped_int8_matmul, int8_matmul,
                                     max_terms, row_reduce_matmul, static_act,
                                     stored_usable)
from jaxquant.engine.lowering import Lowering
from jaxquant.engine.payloads import (GROUP_MOVED, DequantizedPayload,
                                      GroupPayload, QuantPayload)
from jaxquant.methods import FEATURES, HESSIAN
from jaxquant.spec import QuantSpec
from jaxquant.transform.interpreter import Handler, bind_plain
from jaxquant.transform.site import Site
from jaxquant.transform.tagged import value

INT8, FP8, WEIGHT_ONLY, FLOAT = "int8", "fp8", "weight-only", "float"

_GROUPED = ("per-group scales need the group axis to be the only "
            "contracted axis")
_GROUP_ZP = "asymmetric per-group weights"
_VARYING = "weight scale varies along a contracted axis"
_CONV_ZP = "asymmetric weights in a convolution"
_PRESCALE = ("its in_scale (AWQ / SmoothQuant) does not line up with this "
             "matmul's input features")


def act_spec_problem(act: QuantSpec) -> str | None:
  """The field of an activation spec the int8 engine cannot honour, if any.

  Honoured: bits, signed, symmetric, granularity "channel" (per row / token:
  reduced over the contracted axes) or "tensor", and a fixed clip=(lo, hi)
  (a static scale).
  """
  if act.format == "nf4":
    return "format='nf4' is a weight format; use int8 or fp8 activations"
  if act.granularity == "group" or act.group_size is not None:
    return (f"group_size={act.group_size}: activation scales are per row or "
            "per tensor; use granularity='channel' or 'tensor'")
  if act.channel_axes is not None:
    return (f"channel_axes={act.channel_axes}: activation scales are per row "
            "(the matmul's non-contracted axes); drop channel_axes")
  if act.clip == "mse":
    return ("clip='mse': for MSE-optimal activation ranges calibrate with "
            "jq.calibrate(..., observer='mse') and pass stats= to "
            "quantize_params; drop clip from act")
  if act.rounding == "stochastic":
    return ("rounding='stochastic': activations are rounded to nearest at "
            "run time; use rounding='nearest'")
  return None


def check_act_specs(recipe) -> None:
  """Raises ValueError naming the rule and field the engine cannot honour."""
  for i, rule in enumerate(recipe.rules):
    problem = rule.act is not None and act_spec_problem(rule.act)
    if problem:
      raise ValueError(f"rule {i} ({rule.pattern!r}): act {problem}")


def format_problem(weight: QuantSpec, act: QuantSpec) -> str | None:
  """Why these weight and activation formats have no quantized matmul."""
  if weight.format == "nf4":
    return "nf4 weights run weight-only"
  is_fp8 = lambda spec: spec.format.startswith("fp8")
  if (weight.format == "int" and act.format == "int") or (
      is_fp8(weight) and is_fp8(act)):
    return None
  return (f"{weight.format} weights with {act.format} activations have no "
          "quantized matmul")


def group_problem(site: Site, spec: QuantSpec, act_spec) -> str | None:
  """Why a per-group weight cannot run a grouped int8 matmul here."""
  if site.regrouped:
    return GROUP_MOVED
  if (site.primitive != "dot_general" or len(site.weight_contract) != 1
      or site.param_contract != {spec.group_axis}):
    return _GROUPED
  if not spec.symmetric:
    return _GROUP_ZP
  if spec.group_size > max_terms(spec, act_spec):
    return f"group_size={spec.group_size} can overflow the int32 accumulator"
  return None


def int_path_problem(site: Site, payload, act_spec, params) -> str | None:
  """Why this site cannot run int8 x int8 (None when it can).

  `params` are the matmul equation's parameters; `act_spec` the activation
  spec the kernel will use (a static one when the payload carries it).
  """
  if isinstance(payload, DequantizedPayload):
    return payload.reason
  if static_act(payload):
    act_spec = payload.act.spec
  if problem := format_problem(payload.spec, act_spec):
    return problem
  if payload.spec.format != "int":  # fp8: float accumulation, any layout
    return _VARYING if any(payload.scale.shape[d] != 1
                           for d in site.weight_contract) else None
  if isinstance(payload, GroupPayload):
    return group_problem(site, payload.spec, act_spec)
  if site.primitive == "conv_general_dilated" and (
      payload.zero_point is not None):
    return _CONV_ZP
  if site.batch_groups != 1:
    return "batch_group_count > 1"
  if any(payload.scale.shape[d] != 1 for d in site.weight_contract):
    return _VARYING
  return accumulation_problem(site, params, payload.spec, act_spec)


def spec_problem(site: Site, spec: QuantSpec, act_spec, params) -> str | None:
  """`int_path_problem` decided from the resolved weight spec alone."""
  if problem := format_problem(spec, act_spec):
    return problem
  if spec.format != "int":
    return _VARYING if spec.granularity == "group" or (
        spec.granularity == "channel"
        and site.param_contract & set(spec.channel_axes)) else None
  if spec.granularity == "group":
    return group_problem(site, spec, act_spec)
  if spec.granularity == "channel" and site.param_contract & set(
      spec.channel_axes):
    return _VARYING
  if site.primitive == "conv_general_dilated" and not spec.symmetric:
    return _CONV_ZP
  return accumulation_problem(site, params, spec, act_spec)


def _same_format(a: QuantSpec, b: QuantSpec) -> bool:
  """Whether params quantized with `a` are what a recipe saying `b` wants."""
  key = lambda s: (s.bits, s.signed, s.symmetric, s.granularity, s.group_size)
  return key(a) == key(b)


def params_recipe_mismatch(path, payload, rule) -> str | None:
  """Why params and recipe disagree on the weight at `path`, if they do."""
  weight = None if rule is None else rule.weight
  if isinstance(payload, QuantPayload):  # GroupPayload included
    if weight is None:
      return (f"{path}: params hold {payload.spec.short()} but the recipe "
              "keeps this weight float; quantize with this recipe")
    if not _same_format(payload.spec, weight):
      return (f"{path}: params hold {payload.spec.short()}, the recipe says "
              f"{weight.short()}; quantize_params with this recipe")
  elif not isinstance(payload, DequantizedPayload) and weight is not None:
    return (f"{path}: params are float but the recipe quantizes this weight "
            f"({weight.short()}); pass the output of jq.quantize_params")
  return None


def prescaled(x, payload, site: Site, params):
  """`(x / s, payload without s)` for a weight with an `in_scale` `s`, so
  that `(x / s) @ Q(W * s)` runs on every kernel as for any weight; where
  `s` does not line up with `x`, `(x, the weight dequantized)`."""
  if not isinstance(payload, QuantPayload) or payload.in_scale is None:
    return x, payload
  divided = prescale.divide(x, site, payload.in_scale, params)
  if divided is None:
    return x, DequantizedPayload(payload.materialize(), _PRESCALE)
  return divided, dataclasses.replace(payload, in_scale=None)


def _prescaled(eqn, site: Site, invals) -> list:
  """`invals` after `prescaled`."""
  invals = list(invals)
  w = invals[site.weight_index]
  x, payload = prescaled(value(invals[site.act_index]), w.payload, site,
                         eqn.params)
  invals[site.act_index] = x
  invals[site.weight_index] = dataclasses.replace(w, payload=payload)
  return invals


def _int8_kernel(payload, how: Lowering):
  if how.kernel == lowering.ROW_REDUCE:
    return row_reduce_matmul
  return (grouped_int8_matmul if isinstance(payload, GroupPayload)
          else int8_matmul)


def in_usable_order(payload, site: Site):
  """`payload`, with its values in the logical layout where the kernels
  cannot address their stored order (`kernels.stored_usable`)."""
  if not isinstance(payload, QuantPayload) or stored_usable(site, payload):
    return payload
  return payload.in_logical_order()


def _in_usable_order(site: Site, invals) -> list:
  """`invals` with the weight's payload `in_usable_order`."""
  w = invals[site.weight_index]
  invals = list(invals)
  invals[site.weight_index] = dataclasses.replace(
      w, payload=in_usable_order(w.payload, site))
  return invals


def _stored_last(site: Site, payload) -> bool:
  return isinstance(payload, QuantPayload) and contracted_last(
      site, payload.order)


def _groups(site: Site, payload) -> int:
  """Weight groups along the contraction (0: per-channel scales)."""
  if not isinstance(payload, GroupPayload):
    return 0
  return site.weight_shape[site.weight_contract[0]] // payload.spec.group_size


@dataclasses.dataclass(frozen=True)
class OpRecord:
  """How one matmul ran: `mode` is 'int8', 'weight-only' or 'float'."""

  path: str
  primitive: str
  mode: str
  reason: str
  weight_shape: tuple[int, ...]
  act_shape: tuple[int, ...]
  weight_spec: str
  act_spec: str
  lowering: str = ""  # how it is computed (`engine.lowering.Lowering`)


# --------------------------------------------------------------------------
# Handlers


@dataclasses.dataclass(kw_only=True)
class ObserveHandler(Handler):
  """Emits the activation operand of every matmul a rule quantizes and,
  for rules whose method needs them, the activation's `x^T x` under a
  `HessianKey` and its per-feature statistics under a `FeatureKey`."""

  # id(activation) -> (activation, its number): the sources of Hessians.
  inputs: dict = dataclasses.field(default_factory=dict)

  def _number(self, x) -> int:
    # The activation is kept alive here, so its id is not reused.
    return self.inputs.setdefault(id(x), (x, len(self.inputs)))[1]

  def on_matmul(self, eqn, site, rule, invals):
    if rule is not None and rule.weight is not None:
      x = value(invals[site.act_index])
      self.emit(site.path, x)
      needs = () if rule.method is None else rule.method.needs
      axes = invals[site.weight_index].axes
      covered = frozenset().union(*axes)
      if HESSIAN in needs:
        contracted = tuple(sorted(frozenset().union(
            *(axes[d] for d in site.weight_contract))))
        key = hessian.HessianKey(site.path, covered, hessian.source(
            self._number(x), site, axes), contracted)
        self.emit(key, hessian.gram(x, site, axes, eqn.params))
      if FEATURES in needs:
        key = prescale.FeatureKey(site.path, covered, prescale.feature_axes(
            site, axes, eqn.params))
        self.emit(key, prescale.feature_stats(x, site, axes, eqn.params))
    return bind_plain(eqn, invals)


@dataclasses.dataclass(kw_only=True)
class FakeQuantHandler(Handler):
  """Fake-quantizes the activation of every matmul that would run int8."""

  specs: dict  # path -> resolved weight spec

  def on_matmul(self, eqn, site, rule, invals):
    if rule is None or rule.act is None or site.path not in self.specs or (
        spec_problem(site, self.specs[site.path], rule.act, eqn.params)):
      return bind_plain(eqn, invals)
    a = site.act_index
    x = value(invals[a])
    scale, zp = activation_scale(x, site, rule.act)
    invals = list(invals)
    invals[a] = numerics.fake_quant_with_scale(x, scale, zp, rule.act)
    return bind_plain(eqn, invals)


@dataclasses.dataclass(kw_only=True)
class QuantizedHandler(Handler):
  """Runs int8 x int8 -> int32 matmuls; records what ran how."""

  records: list = dataclasses.field(default_factory=list)
  # Raise on params that do not match the recipe (report() records them).
  strict: bool = True
  # A `lowering.PROFILES` key or a `lowering.Profile`; None: this machine.
  machine: str | lowering.Profile | None = None

  def on_matmul(self, eqn, site, rule, invals):
    if site is None:
      self._record(eqn, invals, None, FLOAT, "no parameter kernel operand")
      return bind_plain(eqn, invals)
    payload = invals[site.weight_index].payload
    mismatch = params_recipe_mismatch(site.path, payload, rule)
    if mismatch and self.strict:
      raise ValueError(mismatch)
    record = functools.partial(
        self._record, eqn, invals, site, mismatch=mismatch,
        method=rule.method.name if rule and rule.method else "")
    if not isinstance(payload, (QuantPayload, DequantizedPayload)):
      record(FLOAT, "parameter not quantized")
      return bind_plain(eqn, invals)
    if isinstance(payload, QuantPayload) and payload.in_scale is not None:
      invals = _prescaled(eqn, site, invals)
    invals = _in_usable_order(site, invals)
    payload = invals[site.weight_index].payload
    if rule is None or rule.act is None:
      return self._weight_only(eqn, site, invals, record,
                               "no activation spec")
    problem = int_path_problem(site, payload, rule.act, eqn.params)
    if problem:
      return self._weight_only(eqn, site, invals, record, problem, rule.act)
    act = payload.act.spec if static_act(payload) else rule.act
    static = "static activation scale" if static_act(payload) else ""
    x = value(invals[site.act_index])
    if payload.spec.format != "int":
      reason = "; ".join(filter(None, [lowering.FP8_REASON, static]))
      record(FP8, reason, act, Lowering(lowering.FP8_DOT))
      return [fp8_matmul(eqn, site, x, payload, rule.act)]
    conv = site.primitive == "conv_general_dilated"
    emulated = conv and not lowering.int8_conv_native()
    reason = "; ".join(filter(None, [
        static, lowering.INT8_CONV_EMULATED if emulated else ""]))
    how = lowering.choose_int8(site, _groups(site, payload), self.machine,
                               _stored_last(site, payload))
    record(INT8, reason, act, how)
    if how.kernel == lowering.FAKE_QUANT_DOT:
      return [fake_quant_matmul(eqn, site, x, payload, rule.act)]
    return [_int8_kernel(payload, how)(eqn, site, x, payload, rule.act, how)]

  def _weight_only(self, eqn, site, invals, record, reason, act_spec=None):
    """A float activation times a quantized weight: an int8 dot on the
    activation's int8 parts where `lowering` says that is faster, else a
    float dot of the dequantized weight."""
    payload = invals[site.weight_index].payload
    x = value(invals[site.act_index])
    how = Lowering(lowering.DEQUANTIZED)
    if isinstance(payload, QuantPayload):
      plain = dataclasses.replace(payload, act=None)
      if not int_path_problem(site, plain, PARTS_SPEC, eqn.params):
        how = lowering.choose_weight_only(site, _groups(site, payload),
                                          x.dtype, self.machine,
                                          _stored_last(site, payload))
    record(WEIGHT_ONLY, reason, act_spec, how)
    if not how.act_parts and how.kernel != lowering.ROW_REDUCE:
      return bind_plain(eqn, invals)
    return [_int8_kernel(payload, how)(eqn, site, x, payload, None, how)]

  def _record(self, eqn, invals, site, mode, reason, act_spec=None,
              how: Lowering | None = None, *, mismatch=None, method=""):
    payload = None if site is None else invals[site.weight_index].payload
    wspec = payload.spec.short() if isinstance(payload, QuantPayload) else (
        "dequantized" if isinstance(payload, DequantizedPayload) else "float")
    if method and wspec != "float":  # how the stored codes were rounded
      wspec += f" {method}"
    shapes = [tuple(v.aval.shape) for v in eqn.invars[:2]]
    if mismatch:
      reason = "; ".join(filter(None, [reason, mismatch.split(": ", 1)[1]]))
    self.records.append(OpRecord(
        site.path if site else "-", eqn.primitive.name, mode, reason,
        site.weight_shape if site else shapes[1],
        site.act_shape if site else shapes[0], wspec,
        act_spec.short() if act_spec else "float",
        how.describe() if how else lowering.FLOAT_DOT))
