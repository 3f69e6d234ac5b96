"""Checking that an int8 path really is int8, in the lowered and compiled HLO.

  jq.int8_ops(jax.jit(qapply), qparams, x)
  # Int8Ops(stablehlo=3, compiled=3, compiled_matmuls=3)

`stablehlo` counts `dot_general` / `convolution` ops whose two operands are
i8 in the lowered StableHLO (what jaxquant asked for), and calls of
jaxquant's own C++ int8 dot (`jaxquant.native`); `compiled` counts
`dot` / `convolution` instructions (XLA:GPU's Triton GEMM fusions hold
`dot`s too; its cuBLAS GEMM calls count as well) whose two operands are s8
after XLA's optimisations (what the backend runs), out of
`compiled_matmuls` integer matmuls. They can differ: XLA:CPU, for one,
computes some small int8 convolutions (few channels) as s32 convolutions of
converted operands.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax

_SHLO = re.compile(r"stablehlo\.(?:dot_general|convolution|custom_call "
                   r"@jaxquant_int8_dot)[^\n]*"
                   r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)")
# name = dtype[shape] opcode(operands...; a tuple result "(s32[..], s8[..])"
# (XLA:GPU's cuBLAS GEMM custom calls return a workspace too) is read by its
# first element.
_INSTR = re.compile(
    r"^\s*(?:ROOT )?(%[\w.\-]+) = \(?(\w+)\[[^=]*?\s([\w-]+)\((.*)$")
# Library GEMMs that XLA:GPU rewrites a `dot` into, and jaxquant's own
# int8 dot (`jaxquant.native`).
_GEMM_CALL = re.compile(r'custom_call_target="(?:__cublas\$(?:lt\$matmul|gemm)'
                        r'|jaxquant_int8_dot")')


class Int8Ops(NamedTuple):
  """Counts of int8 matmuls, from `int8_ops`.

  Attributes:
    stablehlo: `dot_general` / `convolution` ops with two i8 operands in the
      lowered StableHLO.
    compiled: `dot` / `convolution` instructions with two s8 (or u8)
      operands and an s32 result in the compiled HLO.
    compiled_matmuls: all `dot` / `convolution` instructions with an s32
      result in the compiled HLO.

  Example:
    >>> ops = jq.Int8Ops(stablehlo=2, compiled=1, compiled_matmuls=2)
    >>> ops.compiled == ops.compiled_matmuls   # one runs on converted values
    False
  """

  stablehlo: int
  compiled: int
  compiled_matmuls: int


def int8_ops(fn, *args, **kwargs) -> Int8Ops:
  """Counts int8 matmuls of `fn(*args, **kwargs)` before and after XLA.

  Lowers and compiles `fn` (jitting it first unless it has `.lower`) for
  the given arguments; nothing runs. See the module docstring for when
  `stablehlo` and `compiled` differ.

  Args:
    fn: a function or a `jax.jit`-wrapped one, e.g.
      `jax.jit(jq.quantized_apply(model.apply, recipe))`.
    *args: its arguments (arrays, or `jax.ShapeDtypeStruct`s).
    **kwargs: its keyword arguments.

  Returns:
    `Int8Ops(stablehlo, compiled, compiled_matmuls)`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jaxquant as jq
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((4, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8(),
    ...                             act=jq.int8())])
    >>> qparams = jq.quantize_params(model.apply, params, recipe, x)
    >>> qapply = jax.jit(jq.quantized_apply(model.apply, recipe))
    >>> jq.int8_ops(qapply, qparams, x).stablehlo
    1
    >>> jq.int8_ops(model.apply, params, x)        # the float model
    Int8Ops(stablehlo=0, compiled=0, compiled_matmuls=0)
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  lowered = jitted.lower(*args, **kwargs)
  stablehlo = len(_SHLO.findall(lowered.as_text()))
  compiled = matmuls = 0
  for body in lowered.compile().as_text().split("\n\n"):
    types = {}
    for line in body.splitlines():
      match = _INSTR.match(line)
      if not match:
        continue
      name, dtype, opcode, rest = match.groups()
      types[name] = dtype
      matmul = opcode in ("dot", "convolution") or (
          opcode == "custom-call" and _GEMM_CALL.search(rest))
      if matmul and dtype == "s32":
        matmuls += 1
        operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])[:2]
        compiled += all(types.get(o) in ("s8", "u8") for o in operands)
  return Int8Ops(stablehlo, compiled, matmuls)
