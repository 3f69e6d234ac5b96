"""jaxquant: quantize JAX/Flax models with pure functions."""

from jaxquant.checkpoint import load, save
from jaxquant.qarray import QArray, dequantize, fake_quant, quantize
from jaxquant.rules import Recipe, Rule
from jaxquant.spec import QuantSpec, int2, int4, int8, uint8
from jaxquant.tree import dequantize_tree, nbytes, quantize_tree

__version__ = "0.1.0"
