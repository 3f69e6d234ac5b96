"""Handlers: what each mode computes for a matmul with a parameter operand.

`ObserveHandler` (calibration) emits activations, `FakeQuantHandler` (QAT)
fake-quantizes them, `QuantizedHandler` runs int8 kernels and records, per
matmul, how it ran and why (`OpRecord`, shown by `jq.report`).
"""

from __future__ import annotations

import dataclasses

from jaxquant import numerics
from jaxquant.engine import hessian, plan, prescale
from jaxquant.engine.kernels import activation_scale
from jaxquant.engine.payloads import DequantizedPayload, QuantPayload
from jaxquant.methods import FEATURES, HESSIAN
from jaxquant.spec import QuantSpec
from jaxquant.transform.interpreter import Handler, bind_plain
from jaxquant.transform.tagged import value


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
    if site.path not in self.specs or not plan.fake_quantizes(
        site, self.specs[site.path], rule, eqn.params):
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
      self._record(eqn, invals, None, plan.NO_PARAMETER)
      return bind_plain(eqn, invals)
    mismatch = params_recipe_mismatch(
        site.path, invals[site.weight_index].payload, rule)
    if mismatch and self.strict:
      raise ValueError(mismatch)
    invals = plan.prepared(eqn, site, invals)
    how = plan.plan(site, invals[site.weight_index].payload, rule,
                    eqn.params, value(invals[site.act_index]).dtype,
                    self.machine)
    self._record(eqn, invals, site, how, mismatch=mismatch,
                 method=rule.method.name if rule and rule.method else "")
    return plan.run(how, eqn, site, invals, rule and rule.act)

  def _record(self, eqn, invals, site, how: plan.Plan, *, mismatch=None,
              method=""):
    payload = None if site is None else invals[site.weight_index].payload
    wspec = payload.spec.short() if isinstance(payload, QuantPayload) else (
        "dequantized" if isinstance(payload, DequantizedPayload) else "float")
    if method and wspec != "float":  # how the stored codes were rounded
      wspec += f" {method}"
    shapes = [tuple(v.aval.shape) for v in eqn.invars[:2]]
    reason = how.reason
    if mismatch:
      reason = "; ".join(filter(None, [reason, mismatch.split(": ", 1)[1]]))
    self.records.append(OpRecord(
        site.path if site else "-", eqn.primitive.name, how.mode, reason,
        site.weight_shape if site else shapes[1],
        site.act_shape if site else shapes[0], wspec,
        how.act.short() if how.act else "float", how.lowering.describe()))
