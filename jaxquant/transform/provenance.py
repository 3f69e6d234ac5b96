"""Which parameters a value is computed from, through any op.

The interpreter follows parameters through layout ops only; a matmul whose
weight is *computed* from parameters (weight normalisation: `g * v / |v|`)
reaches no handler and runs in float. `matmul_sources` explains such
matmuls: for every dot / conv, the parameters (and whether a model input)
each operand depends on. Sub-jaxprs whose inputs map one to one to the
equation's (calls, remat, scan) or to all but the first (cond branches) are
followed exactly; others (while loops) conservatively see every input.
"""

from __future__ import annotations

from jaxquant import compat

INPUT = "<input>"  # the source marker of model inputs (not parameters)


def matmul_sources(jaxpr: compat.Jaxpr, param_paths) -> dict:
  """id(eqn) -> (sources of operand 0, sources of operand 1) for every dot /
  conv in `jaxpr`, whose first invars are the parameter leaves."""
  n_inputs = len(jaxpr.invars) - len(param_paths)
  sources = [frozenset({p}) for p in param_paths]
  sources += [frozenset({INPUT})] * n_inputs
  found: dict = {}
  _walk(jaxpr, sources, found)
  return found


def _walk(jaxpr, in_sources, found) -> None:
  env = dict(zip(jaxpr.invars, in_sources))

  def read(var):
    return frozenset() if isinstance(var, compat.Literal) else env.get(
        var, frozenset())

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    everything = frozenset().union(*ins)
    if eqn.primitive.name in (compat.DOT_GENERAL, compat.CONV):
      found[id(eqn)] = tuple(ins[:2])
    for sub in compat.sub_jaxprs(eqn):
      n = len(sub.invars)
      if n == len(ins):
        _walk(sub, ins, found)
      elif eqn.primitive.name == "cond" and n == len(ins) - 1:
        _walk(sub, ins[1:], found)
      else:
        _walk(sub, [everything] * n, found)
    for var in eqn.outvars:
      env[var] = everything


def computed_weight(sources) -> tuple[str, ...] | None:
  """The parameter paths of an operand computed from parameters alone."""
  if sources and INPUT not in sources:
    return tuple(sorted(sources))
  return None
