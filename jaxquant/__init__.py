"""jaxquant: quantize JAX/Flax models with pure functions.

Layers, each a module: `spec` / `numerics` / `packing` / `qarray` (the
numbers), `rules` (which parameter gets what), `observers` (calibration
statistics), `transform` (the jaxpr interpreter, with JAX internals in
`compat`), `engine` (int8 execution), `api` / `calibration` / `analysis` /
`checkpoint` (the workflow).
"""

from jaxquant import native, observers, sources
from jaxquant.analysis import (LayerReport, auto_recipe, layer_report,
                               sensitivity, sqnr_db)
from jaxquant.api import (Report, fake_quant_apply, quantize_params,
                          quantized_apply, report)
from jaxquant.calibration import (Calibration, RangeTable, Stats, calibrate,
                                  calibration)
from jaxquant.checkpoint import load, save
from jaxquant.hlo import Int8Ops, int8_ops
from jaxquant.methods import awq, gptq, smoothquant
from jaxquant.qarray import (ActQuant, QArray, dequantize, fake_quant,
                             quantize)
from jaxquant.rules import Recipe, Rule
from jaxquant.spec import (QuantSpec, fp8_e4m3, fp8_e5m2, int2, int3, int4,
                           int8, nf4, uint8)
from jaxquant.tree import dequantize_tree, nbytes, quantize_tree

__version__ = "0.1.0"

__all__ = [
    "ActQuant", "Calibration", "Int8Ops", "LayerReport", "QArray", "QuantSpec",
    "RangeTable", "Recipe", "Report", "Rule", "Stats", "auto_recipe", "awq",
    "calibrate", "calibration", "dequantize", "dequantize_tree", "fake_quant",
    "fake_quant_apply", "fp8_e4m3", "fp8_e5m2", "gptq", "int2", "int3", "int4",
    "int8", "int8_ops",
    "layer_report", "load", "native", "nbytes", "nf4", "observers", "quantize",
    "quantize_params", "quantize_tree", "quantized_apply", "report", "save",
    "sensitivity", "smoothquant", "sources", "sqnr_db", "uint8",
]
