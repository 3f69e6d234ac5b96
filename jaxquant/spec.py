"""`QuantSpec`: how one tensor is quantized.

A spec is a frozen, hashable dataclass, so it can be static data under
`jax.jit` and a field of `QArray`'s pytree aux data.

Integer grid
  signed, symmetric:   q in [-(2^(b-1) - 1), 2^(b-1) - 1]   (narrow range, 0 exact)
  signed, asymmetric:  q in [-2^(b-1),       2^(b-1) - 1]
  unsigned:            q in [0, 2^b - 1]

Other formats (`format=`, see `jaxquant.formats`): "fp8_e4m3" and
"fp8_e5m2" (8-bit floats; `jq.fp8_e4m3()`, `jq.fp8_e5m2()`) and "nf4" (the
4-bit normal-float codebook, weight-only; `jq.nf4(group_size=64)`). They are
signed and symmetric; the scale maps a block's absmax to the format's largest
value (448, 57344, 1).

Clipping: `clip=None` takes each block's range from the data (absmax, or
min and max when asymmetric); `clip=(lo, hi)` fixes it (finite float32
bounds: scales are float32; values beyond saturate); `clip="mse"` shrinks
each block's data range by the factor in [0.2, 1] (64 candidates) that
minimises that block's squared quantization error, which pays off at 2-4
bits. (For activations, prefer `jq.calibrate(..., observer="mse")`: a
dynamic "mse" clip searches on every call.)

Granularity (which elements share one scale)
  "tensor":  one scale for the whole tensor;
  "channel": one scale per index of `channel_axes` (reduced over the others);
  "group":   one scale per run of `group_size` consecutive elements along
             `group_axis`, and per index of every other axis.

`channel_axes=None` / `group_axis=None` mean "infer": `jq.quantize_params`
reads them from the model's `dot_general` dimension numbers (the channel axes
of a weight are its non-contracting axes, groups run along the contraction
axis); plain `jq.quantize` / `jq.quantize_tree` fall back to the Flax kernel
layout `(..., in, out)`: channels on the last axis, groups along axis -2.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

from jaxquant import formats

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["nearest", "stochastic"]

MIN_BITS, MAX_BITS = 2, 8
FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor. See the module docstring for the math.

  With b = `bits`, an integer spec stores codes q on the grid
  [qmin, qmax] (signed symmetric: [-(2^(b-1) - 1), 2^(b-1) - 1]; signed
  asymmetric: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1]) and
  represents x as (q - z) * s, one scale s (and zero point z) per block.

  Fields are type-checked (a ValueError names the field): `signed` and
  `symmetric` are bools; `bits`, `group_size`, `group_axis` and each of
  `channel_axes` are ints (not bools; NumPy ints are converted). Invalid
  combinations (bits outside [2, 8], a group granularity without a group
  size, ...) raise ValueError too. The shorthands `jq.int8()`, `jq.uint8()`,
  `jq.int4()`, `jq.int3()`, `jq.int2()`, `jq.fp8_e4m3()`, `jq.fp8_e5m2()`
  and `jq.nf4()` build the common specs.

  Args:
    bits: bits per stored value, 2 to 8 (8 for fp8, 4 for nf4).
    signed: signed codes; False gives the unsigned grid [0, 2^b - 1].
    symmetric: zero maps to code 0 (no zero point); False stores a zero
      point per block and uses the full range [min, max] of the block.
    granularity: "tensor", "channel" or "group" (which elements share one
      scale).
    channel_axes: the axes that keep their own scale for "channel"; None
      infers them (from the model in `jq.quantize_params`, else the last
      axis).
    group_size: elements per group for "group" (must divide the axis).
    group_axis: the axis groups run along; None infers it (the contraction
      axis in `jq.quantize_params`, else axis -2).
    rounding: "nearest", or "stochastic" (needs a PRNG key).
    clip: None (each block's own range), a fixed range `(lo, hi)`, or "mse"
      (per block, the shrunk range with the least squared error).
    format: "int", "fp8_e4m3", "fp8_e5m2" or "nf4".

  Example:
    >>> import jaxquant as jq
    >>> spec = jq.QuantSpec(bits=4, granularity="group", group_size=32)
    >>> spec
    QuantSpec(bits=4, ..., group_size=32, ...)
    >>> spec.qmin, spec.qmax, spec.short()
    (-7, 7, 'int4/g32')
  """

  bits: int = 8
  signed: bool = True
  symmetric: bool = True
  granularity: Granularity = "channel"
  channel_axes: tuple[int, ...] | None = None
  group_size: int | None = None
  group_axis: int | None = None
  rounding: Rounding = "nearest"
  clip: tuple[float, float] | Literal["mse"] | None = None
  format: str = "int"

  def __post_init__(self):
    problem = _type_problem(self)
    if problem:
      raise ValueError(f"invalid QuantSpec: {problem}")
    # Canonical forms keep equal specs equal (and hashable) under jit.
    axes = self.channel_axes
    if axes is not None:
      axes = (axes,) if _is_int(axes) else axes
      object.__setattr__(self, "channel_axes", tuple(int(a) for a in axes))
    for name in ("bits", "group_size", "group_axis"):
      if _is_int(getattr(self, name)):
        object.__setattr__(self, name, int(getattr(self, name)))
    if isinstance(self.clip, (tuple, list)):
      object.__setattr__(self, "clip", tuple(float(c) for c in self.clip))
    problem = _problem(self)
    if problem:
      raise ValueError(f"invalid QuantSpec: {problem}")

  @property
  def qmin(self) -> int | float:
    """Smallest value on the grid: an integer code, or -grid max for the
    float formats (-448, -57344, -1)."""
    if self.format != "int":
      return -formats.grid_max(self.format)
    if not self.signed:
      return 0
    half = 2 ** (self.bits - 1)
    return -(half - 1) if self.symmetric else -half

  @property
  def qmax(self) -> int | float:
    """Largest value on the grid: an integer code, or the grid max for the
    float formats (448, 57344, 1)."""
    if self.format != "int":
      return formats.grid_max(self.format)
    return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

  @property
  def packed(self) -> bool:
    """Whether values are bit-packed (every width below 8 bits)."""
    return self.bits < 8

  @property
  def codes_signed(self) -> bool:
    """Whether stored (unpacked) codes are signed integers."""
    return self.signed and self.format == "int"

  def short(self) -> str:
    """A compact label such as 'int8/ch', 'int4/g128', 'uint8/t asym',
    'fp8_e4m3/t', 'nf4/g64'."""
    kind = {"tensor": "t", "channel": "ch", "group": f"g{self.group_size}"}
    label = (f"{'' if self.signed else 'u'}int{self.bits}"
             if self.format == "int" else self.format)
    name = f"{label}/{kind[self.granularity]}"
    return name + ("" if self.symmetric else " asym")


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _type_problem(spec: QuantSpec) -> str | None:
  """Wrong field types, caught before they turn into silent truthiness."""
  for name in ("signed", "symmetric"):
    value = getattr(spec, name)
    if not isinstance(value, bool):
      return f"{name}={value!r}; {name} must be True or False"
  for name in ("group_size", "group_axis"):
    value = getattr(spec, name)
    if value is not None and not _is_int(value):
      return f"{name}={value!r}; {name} must be an int or None"
  axes = spec.channel_axes
  if axes is not None and not _is_int(axes) and not (
      isinstance(axes, (tuple, list)) and all(_is_int(a) for a in axes)):
    return (f"channel_axes={axes!r}; give an int or a tuple of ints "
            "(e.g. channel_axes=(-1,)) or None")
  clip = spec.clip
  if clip is not None and not isinstance(clip, str) and not (
      isinstance(clip, (tuple, list)) and len(clip) == 2
      and all(_is_real(c) for c in clip)):
    return (f"clip={clip!r}; give a range (lo, hi) of two numbers, 'mse' or "
            "None (the data's absmax / min-max)")
  return None


def _format_problem(spec: QuantSpec) -> str | None:
  if spec.format not in formats.FORMATS:
    return (f"format={spec.format!r}; use one of {formats.FORMATS} (or "
            "jq.fp8_e4m3(), jq.fp8_e5m2(), jq.nf4())")
  if spec.format == "int":
    return None
  if spec.bits != formats.bits(spec.format):
    return (f"bits={spec.bits} with format={spec.format!r}, which has "
            f"{formats.bits(spec.format)} bits; drop bits=")
  if not (spec.signed and spec.symmetric):
    return (f"format={spec.format!r} is signed and symmetric; drop "
            "signed= / symmetric=")
  if spec.rounding != "nearest":
    return (f"format={spec.format!r} rounds to nearest; drop "
            "rounding='stochastic'")
  return None


def _problem(spec: QuantSpec) -> str | None:
  if problem := _format_problem(spec):
    return problem
  if not _is_int(spec.bits) or not MIN_BITS <= spec.bits <= MAX_BITS:
    return (f"bits={spec.bits!r}; bits must be an integer in "
            f"[{MIN_BITS}, {MAX_BITS}] (use jq.int8(), jq.int4() or jq.int2())")
  if spec.granularity not in ("tensor", "channel", "group"):
    return (f"granularity={spec.granularity!r}; use 'tensor', 'channel' "
            "or 'group'")
  if spec.granularity == "group":
    if spec.group_size is None or spec.group_size < 1:
      return (f"group_size={spec.group_size!r}; per-group quantization needs "
              "a positive integer group_size (e.g. jq.int4(group_size=128))")
  elif spec.group_size is not None:
    return (f"group_size={spec.group_size} with granularity="
            f"{spec.granularity!r}; set granularity='group' or drop group_size")
  if spec.rounding not in ("nearest", "stochastic"):
    return f"rounding={spec.rounding!r}; use 'nearest' or 'stochastic'"
  if isinstance(spec.clip, str):
    if spec.clip != "mse":
      return (f"clip={spec.clip!r}; give a range (lo, hi), 'mse' or None "
              "(the data's absmax / min-max)")
  elif spec.clip is not None:
    # Scales are float32: an infinite (or wider) bound gives inf/NaN scales.
    if not all(abs(c) <= FLOAT32_MAX for c in spec.clip):
      return (f"clip={spec.clip!r}; clip bounds must be finite float32 "
              f"values (|bound| <= {FLOAT32_MAX:.7g}); use clip=None for "
              "the data's own range")
    if not spec.clip[0] < spec.clip[1]:
      return f"clip={spec.clip!r}; give a range (lo, hi) with lo < hi"
    if not spec.signed and spec.symmetric and spec.clip[0] < 0:
      return (f"clip={spec.clip!r} on an unsigned symmetric spec, whose "
              "range starts at 0; use symmetric=False for a range below 0")
  return None


def _shorthand(bits: int, signed: bool, group_size: int | None, **kwargs):
  if group_size is not None:
    kwargs.setdefault("granularity", "group")
  return QuantSpec(bits=bits, signed=signed, group_size=group_size, **kwargs)


def int8(group_size: int | None = None, **kwargs) -> QuantSpec:
  """Signed symmetric 8-bit, per-channel unless told otherwise.

  Codes q in [-127, 127] (narrow range: 0 is exact and -q is on the grid),
  x ~ q * s with s = absmax / 127 per block.

  Args:
    group_size: if given, one scale per run of `group_size` elements along
      the group axis (granularity "group"); else per channel.
    **kwargs: any other `QuantSpec` field, e.g. `granularity="tensor"`,
      `clip=(-3.0, 3.0)`, `rounding="stochastic"`.

  Returns:
    The `QuantSpec`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> jq.int8().short(), jq.int8(group_size=64).short()
    ('int8/ch', 'int8/g64')
    >>> q = jq.quantize(jnp.array([[0.5, -1.0], [0.25, 2.0]]), jq.int8())
    >>> q.values.tolist()           # per column: absmax -> 127
    [[127, -64], [64, 127]]
  """
  return _shorthand(8, True, group_size, **kwargs)


def uint8(group_size: int | None = None, **kwargs) -> QuantSpec:
  """Unsigned asymmetric 8-bit (e.g. activations after ReLU).

  Codes q in [0, 255] on the block's range [lo, hi]:
  s = (hi - lo) / 255, x ~ (q - z) * s with zero point z = -lo / s.

  Args:
    group_size: if given, one scale per run of `group_size` elements along
      the group axis (granularity "group"); else per channel.
    **kwargs: any other `QuantSpec` field, e.g. `granularity="tensor"`,
      `clip=(0.0, 6.0)`, `rounding="stochastic"`.

  Returns:
    The `QuantSpec`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> spec = jq.uint8(granularity="tensor")
    >>> spec.qmin, spec.qmax, spec.symmetric
    (0, 255, False)
    >>> jq.quantize(jnp.array([0.0, 1.0, 2.0, 3.0]), spec).values.tolist()
    [0, 85, 170, 255]
  """
  kwargs.setdefault("symmetric", False)
  return _shorthand(8, False, group_size, **kwargs)


def int4(group_size: int | None = None, **kwargs) -> QuantSpec:
  """Signed symmetric 4-bit, stored two per byte.

  Codes q in [-7, 7], s = absmax / 7 per block; usually per group
  (`group_size=32` to `128`) for weight-only quantization.

  Args:
    group_size: if given, one scale per run of `group_size` elements along
      the group axis (granularity "group"); else per channel.
    **kwargs: any other `QuantSpec` field, e.g. `granularity="tensor"`,
      `clip=(-3.0, 3.0)`, `rounding="stochastic"`.

  Returns:
    The `QuantSpec`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)
    >>> q = jq.quantize(w, jq.int4(group_size=32))
    >>> q.values.shape, q.scale.shape   # packed 2 per byte; 2 groups of 32
    ((64, 4), (2, 8))
  """
  return _shorthand(4, True, group_size, **kwargs)


def int3(group_size: int | None = None, **kwargs) -> QuantSpec:
  """Signed symmetric 3-bit ({-3..3}), eight values in three bytes.

  Codes q in [-3, 3], s = absmax / 3 per block.

  Args:
    group_size: if given, one scale per run of `group_size` elements along
      the group axis (granularity "group"); else per channel.
    **kwargs: any other `QuantSpec` field, e.g. `granularity="tensor"`,
      `clip=(-3.0, 3.0)`, `rounding="stochastic"`.

  Returns:
    The `QuantSpec`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)
    >>> q = jq.quantize(w, jq.int3())
    >>> q.values.shape, sorted(set(q.int_values().ravel().tolist()))
    ((64, 3), [-3, -2, -1, 0, 1, 2, 3])
  """
  return _shorthand(3, True, group_size, **kwargs)


def fp8_e4m3(**kwargs) -> QuantSpec:
  """8-bit float, 4 exponent and 3 mantissa bits (max 448), per channel.

  s = absmax / 448 per block; the stored code is float8_e4m3fn(x / s)
  (round to nearest even).

  Args:
    **kwargs: other `QuantSpec` fields, e.g. `granularity="tensor"`,
      `group_size=` with `granularity="group"`, `clip=`.

  Returns:
    The `QuantSpec` (`format="fp8_e4m3"`, bits=8).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> q = jq.quantize(jnp.array([[1.0, -0.1]]), jq.fp8_e4m3(
    ...     granularity="tensor"))
    >>> q.values.dtype, q.dequantize().tolist()
    (dtype(float8_e4m3fn), [[1.0, -0.098214291036129]])
  """
  return QuantSpec(bits=8, format="fp8_e4m3", **kwargs)


def fp8_e5m2(**kwargs) -> QuantSpec:
  """8-bit float, 5 exponent and 2 mantissa bits (max 57344), per channel.

  s = absmax / 57344 per block; the stored code is float8_e5m2(x / s)
  (round to nearest even): more range, less precision than e4m3.

  Args:
    **kwargs: other `QuantSpec` fields, e.g. `granularity="tensor"`,
      `group_size=` with `granularity="group"`, `clip=`.

  Returns:
    The `QuantSpec` (`format="fp8_e5m2"`, bits=8).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> q = jq.quantize(jnp.array([[1.0, -0.1]]), jq.fp8_e5m2(
    ...     granularity="tensor"))
    >>> q.values.dtype, q.dequantize().tolist()
    (dtype(float8_e5m2), [[1.0, -0.1071428656578064]])
  """
  return QuantSpec(bits=8, format="fp8_e5m2", **kwargs)


def nf4(group_size: int | None = 64, **kwargs) -> QuantSpec:
  """4-bit normal-float codebook (QLoRA), per group of 64 by default;
  weight-only. Stored two per byte.

  s = absmax per block; the code is the index i of the nearest of the 16
  NF4 values (normal quantiles in [-1, 1], `jaxquant.formats.NF4`) to
  x / s, and x ~ NF4[i] * s.

  Args:
    group_size: elements per group (granularity "group"); None for one
      scale per channel (or per tensor with `granularity="tensor"`).
    **kwargs: other `QuantSpec` fields, e.g. `group_axis=`.

  Returns:
    The `QuantSpec` (`format="nf4"`, bits=4).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)
    >>> q = jq.quantize(w, jq.nf4())
    >>> q, q.values.shape, q.scale.shape   # 4-bit indices, packed 2 per byte
    (QArray(nf4/g64, shape=(64, 8), dtype=float32, nbytes=288), (64, 4), (1, 8))
  """
  if group_size is not None:
    kwargs.setdefault("granularity", "group")
  return QuantSpec(bits=4, format="nf4", group_size=group_size, **kwargs)


def int2(group_size: int | None = None, **kwargs) -> QuantSpec:
  """Signed symmetric 2-bit ({-1, 0, 1}), stored four per byte.

  Codes q in [-1, 1], s = absmax per block (x ~ q * s: ternary weights).

  Args:
    group_size: if given, one scale per run of `group_size` elements along
      the group axis (granularity "group"); else per channel.
    **kwargs: any other `QuantSpec` field, e.g. `granularity="tensor"`,
      `clip=(-3.0, 3.0)`, `rounding="stochastic"`.

  Returns:
    The `QuantSpec`.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)
    >>> q = jq.quantize(w, jq.int2())
    >>> q.values.shape, sorted(set(q.int_values().ravel().tolist()))
    ((64, 2), [-1, 0, 1])
  """
  return _shorthand(2, True, group_size, **kwargs)
