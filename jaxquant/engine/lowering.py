"""Which lowering a quantized matmul gets on the backend at hand.

One place for backend- and shape-dependent choices, each with the reason
`jq.report` shows.
"""

from __future__ import annotations

import jax

# fp8 x fp8 -> f32 dots: NVIDIA GPUs from compute capability 8.9 (Ada,
# Hopper) have fp8 tensor cores and XLA:GPU emits cuBLASLt fp8 GEMMs there.
# Elsewhere (CPU, older GPUs, TPU until measured) the same numbers are
# computed with fp8-rounded operands upcast to float32.
_FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def fp8_native(backend: str | None = None) -> bool:
  """Whether this backend runs fp8 x fp8 dots natively."""
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return False
  capability = getattr(jax.devices("gpu")[0], "compute_capability", "0.0")
  major, minor = (int(p) for p in str(capability).split(".")[:2])
  return (major, minor) >= _FP8_MIN_COMPUTE_CAPABILITY


def fp8_reason(native: bool) -> str:
  if native:
    return "fp8 x fp8 dot, float32 accumulation"
  return (f"fp8 emulated on {jax.default_backend()}: fp8-rounded operands, "
          "float32 dot")
