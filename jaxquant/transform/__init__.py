"""The jaxpr transform: trace `apply_fn`, follow parameters, rewrite matmuls.

Modules: `tagged` (values carried for parameters), `site` (a matmul's
parameter operand), `interpreter` (the evaluator and its rule table),
`layout` (layout primitives, registered into that table), `tracing` (one
trace per abstract signature). JAX internals go through `jaxquant.compat`.
"""

from jaxquant.transform import layout  # registers the layout primitives
from jaxquant.transform.interpreter import (RULES, Handler, LayoutRule,
                                            bind_plain, def_inline,
                                            def_layout, def_matmul, def_rule,
                                            evaluate)
from jaxquant.transform.site import Site, find_site
from jaxquant.transform.tagged import (AxisMap, FloatPayload, Tagged,
                                       identity_map, value)
from jaxquant.transform.tracing import (Traced, Tracer, float_payload,
                                        param_leaves, resolve_spec,
                                        resolved_specs, tag_inputs)
