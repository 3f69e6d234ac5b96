"""jaxquant: quantize JAX/Flax models with pure functions.

Layers, each a module: `spec` / `numerics` / `packing` / `qarray` (the
numbers), `rules` (which parameter gets what), `observers` (calibration
statistics), `interpreter` / `layout` / `engine` (the jaxpr transform),
`api` / `calibration` / `analysis` / `checkpoint` (the workflow).
"""

from jaxquant import observers
from jaxquant import qarray as _qarray
from jaxquant.analysis import (LayerReport, auto_recipe, layer_report,
                               sensitivity)
from jaxquant.api import (Report, fake_quant_apply, quantize_params,
                          quantized_apply, report)
from jaxquant.calibration import Stats, calibrate
from jaxquant.checkpoint import load, save
from jaxquant.hlo import Int8Ops, int8_ops
from jaxquant.qarray import QArray, dequantize, quantize
from jaxquant.rules import Recipe, Rule
from jaxquant.spec import QuantSpec, int2, int3, int4, int8, uint8
from jaxquant.tree import dequantize_tree, nbytes, quantize_tree

__version__ = "0.1.0"

__all__ = [
    "Int8Ops", "LayerReport", "QArray", "QuantSpec", "Recipe", "Report", "Rule", "Stats",
    "auto_recipe", "calibrate", "dequantize", "dequantize_tree", "fake_quant",
    "fake_quant_apply", "int2", "int3", "int4", "int8", "int8_ops",
    "layer_report", "load",
    "nbytes", "observers", "quantize", "quantize_params", "quantize_tree",
    "quantized_apply", "report", "save", "sensitivity", "uint8",
]


def fake_quant(x_or_apply_fn, spec_or_recipe, **kwargs):
  """Straight-through fake-quant of an array, or of a whole apply function.

  `fake_quant(x, spec)` returns `dequantize(quantize(x, spec))` with the
  straight-through gradient; `fake_quant(apply_fn, recipe)` returns an
  apply function for quantization-aware training (`fake_quant_apply`).
  """
  if callable(x_or_apply_fn) and isinstance(spec_or_recipe, Recipe):
    return fake_quant_apply(x_or_apply_fn, spec_or_recipe, **kwargs)
  return _qarray.fake_quant(x_or_apply_fn, spec_or_recipe, **kwargs)
