"""How one quantized matmul runs, and why: the engine's one planning function.

`plan(site, payload, rule, params, act_dtype, machine)` decides, from static
facts alone (the matmul's dimension numbers and shapes, the weight's stored
spec and layout, the rule's activation spec, the activation dtype, the
machine's lowering profile), a `Plan`:

- `mode`: the numbers the matmul computes. 'int8' (integer activations and
  weights, exact int32 sums), 'fp8' (fp8-rounded operands), 'weight-only'
  (the float activation times the quantized weight) or 'float';
- `lowering`: how those numbers are computed (`lowering.Lowering`: which
  kernel, row padding, activation parts), chosen by the machine's profile;
- `reason`: why, where it is not the plain path.

`run(plan, eqn, site, x, payload, act_spec)` computes it with the kernel
registered for the lowering (`KERNELS`). `jq.quantized_apply`, `jq.report`
and `jq.layer_report` all plan and run through here, so what the report says
is what runs and what the analysis measures. Fake-quant (QAT) has no stored
payload: `fake_quantizes` decides from the weight's spec by the same rules.

Before planning, `prepared` divides an AWQ / SmoothQuant pre-scale into the
activation and brings the weight's codes into a layout its kernels address.
"""

from __future__ import annotations

import dataclasses

from jaxquant.engine import lowering, prescale
from jaxquant.engine.kernels import (PARTS_SPEC, accumulation_problem,
                                     contracted_last, contraction,
                                     fake_quant_matmul, fp8_matmul,
                                     grouped_int8_matmul, int8_matmul,
                                     max_terms, native_layout,
                                     row_reduce_matmul, static_act,
                                     stored_usable)
from jaxquant.engine.lowering import Lowering
from jaxquant.engine.payloads import (GROUP_MOVED, DequantizedPayload,
                                      GroupPayload, QuantPayload)
from jaxquant.spec import QuantSpec
from jaxquant.transform.interpreter import bind_plain
from jaxquant.transform.site import Site
from jaxquant.transform.tagged import value

INT8, FP8, WEIGHT_ONLY, FLOAT = "int8", "fp8", "weight-only", "float"

# --------------------------------------------------------------------------
# What cannot run quantized, and why

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



# --------------------------------------------------------------------------
# Preparing the operands


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


def in_usable_order(payload, site: Site):
  """`payload`, with its values in the logical layout where the kernels
  cannot address their stored order (`kernels.stored_usable`)."""
  if not isinstance(payload, QuantPayload) or stored_usable(site, payload):
    return payload
  return payload.in_logical_order()


def prepared(eqn, site: Site, invals) -> list:
  """`invals` with the activation divided by the weight's pre-scale, if it
  has one (`prescaled`), and the weight's payload `in_usable_order`."""
  invals = list(invals)
  w = invals[site.weight_index]
  payload = w.payload
  if isinstance(payload, QuantPayload) and payload.in_scale is not None:
    invals[site.act_index], payload = prescaled(
        value(invals[site.act_index]), payload, site, eqn.params)
  invals[site.weight_index] = dataclasses.replace(
      w, payload=in_usable_order(payload, site))
  return invals


# --------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one matmul runs (see the module docstring).

  Attributes:
    mode: 'int8', 'fp8', 'weight-only' or 'float'.
    lowering: the kernel and its shape choices.
    reason: why, where it is not the plain path ('' when it is).
    act: the activation spec the matmul quantizes with (a static one where
      the weight carries it); for weight-only, the spec the rule asked for
      (None: it asked for none).
  """

  mode: str
  lowering: Lowering
  reason: str = ""
  act: QuantSpec | None = None


NOT_QUANTIZED = Plan(FLOAT, Lowering(lowering.FLOAT_DOT),
                     "parameter not quantized")
NO_PARAMETER = Plan(FLOAT, Lowering(lowering.FLOAT_DOT),
                    "no parameter kernel operand")


def plan(site: Site, payload, rule, params, act_dtype, machine=None) -> Plan:
  """How the matmul at `site` runs.

  Args:
    site: the matmul (`transform.site.Site`).
    payload: its weight, `prepared` (a `QuantPayload`, `GroupPayload`,
      `DequantizedPayload`, or anything else for a float weight).
    rule: the recipe's rule for the weight's path (None: no rule).
    params: the matmul equation's parameters (dimension numbers).
    act_dtype: the activation operand's dtype.
    machine: a `lowering.PROFILES` key or a `lowering.Profile`; None: this
      machine's (`lowering.machine()`).
  """
  if not isinstance(payload, (QuantPayload, DequantizedPayload)):
    return NOT_QUANTIZED
  if rule is None or rule.act is None:
    return _weight_only(site, payload, params, act_dtype, machine,
                        "no activation spec")
  problem = int_path_problem(site, payload, rule.act, params)
  if problem:
    return _weight_only(site, payload, params, act_dtype, machine, problem,
                        rule.act)
  static = "static activation scale" if static_act(payload) else ""
  act = payload.act.spec if static else rule.act
  if payload.spec.format != "int":
    return Plan(FP8, Lowering(lowering.FP8_DOT),
                _joined(lowering.FP8_REASON, static), act)
  emulated = (site.primitive == "conv_general_dilated"
              and not lowering.int8_conv_native())
  how = lowering.choose_int8(site, _groups(site, payload), machine,
                             _stored_last(site, payload))
  how = _native(how, site, payload, act, 0, params, machine)
  return Plan(INT8, how, _joined(
      static, lowering.INT8_CONV_EMULATED if emulated else ""), act)


def _weight_only(site, payload, params, act_dtype, machine, reason,
                 act=None) -> Plan:
  """A float activation times a quantized weight: an int8 dot on the
  activation's int8 parts (or a row reduction) where the machine's profile
  says that is faster, else a float dot of the dequantized weight."""
  how = Lowering(lowering.DEQUANTIZED)
  if isinstance(payload, QuantPayload):
    plain = dataclasses.replace(payload, act=None)
    if not int_path_problem(site, plain, PARTS_SPEC, params):
      how = lowering.choose_weight_only(site, _groups(site, payload),
                                        act_dtype, machine,
                                        _stored_last(site, payload))
      parts = lowering.act_parts(act_dtype)
      if parts:
        how = _native(how, site, payload, PARTS_SPEC, parts, params, machine)
  return Plan(WEIGHT_ONLY, how, reason, act)


def _native(how: Lowering, site: Site, payload, act_spec, parts: int,
            params, machine) -> Lowering:
  """`how`, or the native int8 dot (`lowering.choose_native`) where the
  weight's codes lie as it reads them (`native_layout`: per channel,
  features then contraction) and its int32 sums cannot overflow; `how`
  with a note where the machine's profile takes the kernel but it cannot
  run here."""
  if not (type(payload) is QuantPayload and payload.spec.format == "int"
          and native_layout(site, payload)
          and contraction(site, params)[0] <= max_terms(payload.spec,
                                                       act_spec)):
    return how
  native = lowering.choose_native(site, parts, machine)
  if native is None:
    return how
  if isinstance(native, str):
    return dataclasses.replace(how, note=_joined(how.note, native))
  return native


def _joined(*reasons) -> str:
  return "; ".join(filter(None, reasons))


def _stored_last(site: Site, payload) -> bool:
  return isinstance(payload, QuantPayload) and contracted_last(
      site, payload.order)


def _groups(site: Site, payload) -> int:
  """Weight groups along the contraction (0: per-channel scales)."""
  if not isinstance(payload, GroupPayload):
    return 0
  return site.weight_shape[site.weight_contract[0]] // payload.spec.group_size


def fake_quantizes(site: Site, spec: QuantSpec, rule, params) -> bool:
  """Whether fake-quant (QAT) rounds this matmul's activation: where the
  quantized weight `spec` would run int8 (or fp8) under `rule`."""
  return (rule is not None and rule.act is not None
          and not spec_problem(site, spec, rule.act, params))


# --------------------------------------------------------------------------
# Running a plan


# Lowering.kernel -> fn(eqn, site, x, payload, act_spec, lowering) computing
# the matmul's output (act_spec None: weight-only).
KERNELS = {
    lowering.INT8_DOT: int8_matmul,
    lowering.NATIVE_DOT: int8_matmul,
    lowering.GROUPED_DOT: grouped_int8_matmul,
    lowering.PER_GROUP_DOTS: grouped_int8_matmul,
    lowering.ROW_REDUCE: row_reduce_matmul,
    lowering.FP8_DOT: lambda eqn, site, x, payload, act_spec, how:
        fp8_matmul(eqn, site, x, payload, act_spec),
    lowering.FAKE_QUANT_DOT: lambda eqn, site, x, payload, act_spec, how:
        fake_quant_matmul(eqn, site, x, payload, act_spec),
}


def run(the_plan: Plan, eqn, site: Site, invals, act_spec) -> list:
  """The outputs of `eqn` computed as `the_plan` says, on `prepared`
  `invals`; `act_spec` is the rule's activation spec."""
  kernel = KERNELS.get(the_plan.lowering.kernel)
  if kernel is None:  # a float dot, of the float or dequantized weight
    return bind_plain(eqn, invals)
  x = value(invals[site.act_index])
  payload = invals[site.weight_index].payload
  quantized = the_plan.mode in (INT8, FP8)
  return [kernel(eqn, site, x, payload, act_spec if quantized else None,
                 the_plan.lowering)]
