"""Checking that an int8 path really is int8, in the lowered and compiled HLO.

  jq.int8_ops(jax.jit(qapply), qparams, x)
  # Int8Ops(stablehlo=3, compiled=3, compiled_matmuls=3)

`stablehlo` counts `dot_general` / `convolution` ops whose two operands are
i8 in the lowered StableHLO (what jaxquant asked for); `compiled` counts
`dot` / `convolution` instructions whose two operands are s8 after XLA's
optimisations (what the backend runs), out of `compiled_matmuls` integer
matmuls. They can differ: XLA:CPU, for one, computes some small int8
convolutions (few channels) as s32 convolutions of converted operands.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax

_SHLO = re.compile(r"stablehlo\.(?:dot_general|convolution)[^\n]*"
                   r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)")
_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[[^=]*?\s([\w-]+)\((.*)$")


class Int8Ops(NamedTuple):
  stablehlo: int
  compiled: int
  compiled_matmuls: int


def int8_ops(fn, *args, **kwargs) -> Int8Ops:
  """Counts int8 matmuls of `fn(*args, **kwargs)` before and after XLA."""
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
      if opcode in ("dot", "convolution") and dtype == "s32":
        matmuls += 1
        operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])[:2]
        compiled += all(types.get(o) in ("s8", "u8") for o in operands)
  return Int8Ops(stablehlo, compiled, matmuls)
