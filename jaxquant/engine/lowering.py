"""Which lowering a quantized matmul gets on the backend at hand.

One place for backend- and shape-dependent choices, each with the reason
`jq.report` shows, and the measurement behind it.
"""

from __future__ import annotations

import jax


def int8_conv_native(backend: str | None = None) -> bool:
  """Whether `conv(s8, s8) -> s32` compiles here.

  XLA:GPU lowers integer convolutions to cuDNN, which rejects s32 outputs
  ("Can't lower one or more integer convolutions", H100, jax 0.11.2): there
  the int8 values are convolved in float32 (exact while partial sums stay
  below 2^24, within float32 rounding beyond).
  """
  return (backend or jax.default_backend()) != "gpu"


INT8_CONV_EMULATED = ("int8 values in a float32 conv (XLA:GPU has no "
                      "s8 x s8 -> s32 convolution)")

# fp8 x fp8 dots always get fp8-rounded operands upcast to float32. Binding
# dot_general on float8 operands directly (preferred float32) gave results
# off by up to 0.2 (outputs ~0.5) on an H100 with jax 0.11.2, where the
# upcast form matched the fake-quant reference: never the fast-but-wrong one.
FP8_REASON = "fp8-rounded operands, float32 dot"
