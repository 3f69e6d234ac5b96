"""Which lowering a quantized matmul gets on the machine at hand.

One place for backend-, machine- and shape-dependent choices. Every choice
computes the same numbers (within float32 rounding); only the speed differs,
and `jq.report` names the one taken per matmul (`OpRecord.lowering`).

The choices, decided at trace time from static shapes and the machine:

- **Row padding.** XLA:CPU multiplies a one-row `dot(s8, s8) -> s32` 5-9x
  slower than float32 (it has a fast float matrix-vector path, no int8 one);
  with the quantized activation padded by zero rows to 4 the same dot takes
  0.5-0.9x the float time. Zero rows add zero terms, and are sliced off.
- **Weight-only as int8 parts.** A float activation `x` is split, per row,
  into int8 parts: with `r_0 = x / s_x` (`s_x = max|x_row| / 127`),
  `h_i = round(r_i)` and `r_{i+1} = 254 (r_i - h_i)`,

      x = s_x (h_0 + h_1 / 254 + h_2 / 254^2 + ...),

  within `2^-23 max|x_row|` with 3 parts for float32 (float32's own
  rounding of `x / s_x` is half of that), and `2^-16 max|x_row|` with 2 for
  bfloat16 / float16 (finer than their own rounding). The parts are stacked
  as extra rows of one int8 dot with the stored int8 weight, instead of
  materialising a dequantized float weight on every call (what XLA:CPU does
  with `convert` + float dot: 1.3-8x float time at 1-256 rows).
  This pays while the stacked rows are few next to the weight's output
  features (the dequantization it saves is per weight element, the
  splitting per activation element).
- **Per-group weights** (int4 in groups of 128): XLA:CPU runs a batched
  int8 dot (groups as the batch dimension) well only for a few rows; one
  int8 dot per group is faster beyond, until the per-group partial sums
  (groups x rows x features) outweigh the dot, where the float dot of the
  dequantized weight (and, with int8 activations, of the quantized
  activation: the same numbers up to float rounding) wins. The batched
  dot's range is set for decode loops, where XLA unpacks the int4 weight
  once, before the loop (up to 12 stacked rows on this CPU); a step
  jitted on its own unpacks on every call, and there one dot per group
  measured faster at 1-4 rows.
- **Stored layout and one row.** `quantize_params` stores an int8 weight
  with its contracted axes last (`QArray.order`, `stored_order`): XLA:CPU's
  int8 dot is as fast or faster on that layout at every row count (4096 x
  4096, 1-256 rows: 0.28-0.60x float vs 0.29-0.92x for the `(K, N)`
  layout), and with one row a float reduction over the stored codes
  (`kernels.row_reduce_matmul`) streams them at 0.43-0.64x float, weight-only
  included, where no int8 dot has a one-row path.
- **Backends.** XLA:GPU and XLA:TPU fuse the int -> float conversion into
  their GEMMs and have fast int8 paths: weight-only keeps the dequantized
  float dot, int8 dots are not padded.

The machine decides (`machine()`): on an x86 CPU with AVX-512 VNNI or
AVX-VNNI the int8 dot is fast and all three apply; on other CPUs
(AVX2-only: a raw `dot(s8, s8)` at prefill is 1.06x float there) rows are
padded but weight-only stays a float dot. `PROFILES` holds the table with
the measurements behind each row; `python -m experiments.lowering_probe`
re-measures the formulations on the machine at hand. `JAXQUANT_MACHINE=KEY`
in the environment takes another machine's choices on this one (tests run
an AVX2-only CPU's choices on a VNNI CPU so).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform

import jax
import jax.numpy as jnp

from jaxquant import native

# --------------------------------------------------------------------------
# What one matmul runs


@dataclasses.dataclass(frozen=True)
class Lowering:
  """How one quantized matmul is computed.

  Attributes:
    kernel: 'int8 dot', 'grouped int8 dot', 'fp8 dot', 'float dot of the
      dequantized weight' or 'float dot'.
    min_rows: the activation's rows (product of its free dimensions) are
      padded with zero rows up to this many.
    act_parts: weight-only: the float activation is split into this many
      int8 parts (0: it is not).
    note: why, when it is not the plain kernel.
  """

  kernel: str
  min_rows: int = 1
  act_parts: int = 0
  note: str = ""

  def describe(self) -> str:
    bits = [self.kernel]
    if self.act_parts:
      bits.append(f"activation as {self.act_parts} int8 parts")
    if self.min_rows > 1:
      bits.append(f"rows padded to {self.min_rows}")
    return ", ".join(bits) + (f" ({self.note})" if self.note else "")


INT8_DOT, GROUPED_DOT, FP8_DOT = "int8 dot", "grouped int8 dot", "fp8 dot"
PER_GROUP_DOTS = "int8 dot per group"
DEQUANTIZED = "float dot of the dequantized weight"
ROW_REDUCE = "float row reduction over the stored int8 weight"
FAKE_QUANT_DOT = "float dot of the quantized activation and dequantized weight"
FLOAT_DOT = "float dot"
NATIVE_DOT = "native int8 dot (jaxquant C++ kernel)"

# --------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Profile:
  """The lowering choices for one kind of machine, and why.

  Attributes:
    min_rows: int8 dots with fewer activation rows are padded to this many.
    weight_only_parts: per-channel weight-only matmuls run as an int8 dot on
      the activation's int8 parts while the stacked rows (rows x parts) are
      at most this fraction of the output features; 0: never. (Above it the
      activation-side work outgrows the dequantization it saves.)
    grouped_rows: for per-group weights, `(batched, per_group)`: with at
      most `batched` stacked rows one int8 dot with the groups as a batch
      dimension; while groups x stacked rows is at most `per_group`, one
      int8 dot per group; beyond, a float dot of the (quantized) activation
      and the dequantized weight. None: always the batched int8 dot with
      int8 activations, the dequantized float dot weight-only.
    contract_last: `quantize_params` stores per-channel integer weights
      with their contracted axes last (`stored_order`).
    row_reduce: a one-row matmul on a weight stored so runs as a float
      reduction over its codes (`ROW_REDUCE`).
    native_rows: `(int8, weight_only)`: per-channel int8 matmuls with at
      most `int8` activation rows, and weight-only ones with at most
      `weight_only` stacked rows (rows x activation parts), run jaxquant's
      own C++ kernel (`NATIVE_DOT`, `jaxquant.native`) where it is loaded.
    evidence: the measurements behind the row.
  """

  min_rows: int = 1
  weight_only_parts: float = 0.0
  grouped_rows: tuple[int, int] | None = None
  contract_last: bool = False
  row_reduce: bool = False
  native_rows: tuple[int, int] = (0, 0)
  evidence: str = ""


PROFILES = {
    "cpu/x86-vnni": Profile(
        min_rows=4, weight_only_parts=0.5, grouped_rows=(12, 2048),
        contract_last=True, row_reduce=True, native_rows=(16, 64),
        evidence=(
            "Native int8 dot (its AVX2 loops; no VNNI loops yet): measured "
            "on the AVX2-only EPYC only (cpu/other), not on a VNNI CPU. "
            "Stored (N, K), 4096 x 4096 / 4096 x 11008 (issue 10 probe, "
            "same run): int8 dot padded to 4 rows 0.58-0.60x float at 1 row,"
            " 0.36-0.48x at 2-16, 0.27-0.31x at 64-256, vs 0.91-0.92x, "
            "0.53-0.67x, 0.29-0.37x stored (K, N); one-row float reduction "
            "over the codes 0.47-0.56x (W8A8), 0.43-0.64x (weight-only). "
            "2-core AMD EPYC (AVX-512 VNNI), jax 0.12, 4096 x 4096, time / "
            "float32 dot (experiments.decode, experiments.lowering_probe): "
            "dot(s8,s8) 1 row 7.4x, padded to 4 rows 0.7-0.9x; 2-256 rows "
            "0.3-0.5x. Weight-only: convert + float dot 1.3-8x, 3 int8 parts"
            " 0.5-1.1x at 1-256 rows. W4A8 g128 (int4 unpacked per call): "
            "batched int8 dot 1.6-2.7x, one int8 dot per group 0.97-1.8x, "
            "the float dot 1.6-9x at 1-256 rows (per group best up to 64 "
            "rows, float at 256); with int8 weights (unpacking hoisted, as "
            "in a decode loop) batched 1.4x vs per group 1.65x at 4 rows. "
            "A 4096 x 4096 layer in a fori_loop (unpacking hoisted), "
            "batched / per group: W4A16 g128 1.18x / 2.11x at 1 row, 0.62x "
            "/ 0.99x at 2 (6 stacked rows), 0.81x / 1.22x at 4 (12), 1.35x "
            "/ 1.30x at 8 (24); W4A8 g128 0.63x / 0.88x at 4 rows, 0.69x / "
            "1.23x at 8, 0.88x / 0.84x at 16, 1.06x / 0.96x at 24; the 168M"
            " decoder's W4A16 decode loop (experiments.generate) at batch 4:"
            " 0.79x / 0.98x float. Called once per step instead, per group "
            "wins at 1-4 rows (W4A16 1.23-1.49x vs 1.55-1.95x at 4 rows). "
            "384 x 1536 (3 groups): parts 1.11x vs dequantized 1.84x at 64 "
            "rows, 0.87x vs 0.78x at 256, 2.3x vs 1.0x at 2560; per group "
            "0.35-0.53x vs float 0.90-0.96x at 256-1024 rows, 1.9x vs 1.05x"
            " at 2560.")),
    "cpu/other": Profile(
        min_rows=4, contract_last=True, native_rows=(16, 64),
        evidence=(
            "2-core AVX2-only AMD EPYC, jax 0.12.1, 4096 x 4096 and 4096 x "
            "11008, time / float32 dot, 5 interleaved rounds "
            "(experiments.decode, 2026-12-08): W8A8 on the native int8 dot "
            "(AVX2) 0.18-0.35x at 1-16 rows vs 0.32-0.76x on XLA's int8 dot"
            " (padded); at 64 rows 0.66-0.68x vs 0.70-0.72x: up to 16 rows."
            " W8A16 (3 int8 parts: 3-48 stacked rows) 0.26-0.90x at 1-16 "
            "rows vs the dequantized float dot 3.1-33x; at 64 rows (192 "
            "stacked) the float dot. "
            "AVX2-only AMD EPYC, jaxlib 0.10.2 (issue 10): dot(s8,s8) 1 row "
            "5.6x float, padded to 4 rows ~1.0x; at prefill 1.06x, so "
            "weight-only int8 parts (3 dots) would lose to the float dot. "
            "Stored (N, K) (../shared/probes/matvec_formulations.py): int8 "
            "dot padded to 4 rows 1.0x float at 1 row, 0.22x at 4; a one-row "
            "float reduction over the codes 27x (2 rows: 0.74x), so none.")),
    "gpu": Profile(
        min_rows=4, weight_only_parts=0.5, grouped_rows=(64, 0),
        evidence=(
            "NVIDIA H100, jax 0.11.2, 4096 x 4096, time / float32 dot at "
            "JAX's default precision (experiments.lowering_probe; every call "
            "~0.1-0.2 ms, launch-bound): dot(s8,s8) unpadded 0.76-0.94x, "
            "padded to 4 rows 0.71-0.92x. Weight-only: the dequantized "
            "float dot 1.09-1.36x (XLA:GPU does not fuse the conversion "
            "into the GEMM), 3 int8 parts 0.56-0.88x at 1-16 rows, 1.08-"
            "1.30x at 64-256. W4A8 g128: batched int8 dot 0.79-1.07x at 1-16"
            " rows, 1.22x at 64, 1.28x at 256 (float dot 0.92-1.39x, 0.98x "
            "at 256); one dot per group 1.37-1.88x. W4A16 g128: batched "
            "parts 0.98-1.16x at 1-16 rows, dequantized 1.08-1.30x.")),
    "tpu": Profile(evidence="XLA:TPU fuses the conversion; not measured."),
}


# The environment variable that names the profile `machine()` returns,
# whatever the hardware: a test run (or a user) can take another machine's
# lowerings on this one, e.g. `JAXQUANT_MACHINE=cpu/other` on a VNNI CPU to
# run what an AVX2-only CPU runs. Every profile computes the same numbers
# within float32 rounding on any backend; only the speed follows the host.
MACHINE_ENV = "JAXQUANT_MACHINE"


@functools.cache
def _cpu_flags() -> frozenset:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def detected_machine(backend: str | None = None) -> str:
  """The `PROFILES` key of the hardware at hand: 'gpu', 'tpu',
  'cpu/x86-vnni' (an x86 CPU with AVX-512 VNNI or AVX-VNNI) or
  'cpu/other'."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return backend if backend in PROFILES else "gpu"
  vnni = {"avx512_vnni", "avx_vnni"} & _cpu_flags()
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  return "cpu/x86-vnni" if x86 and vnni else "cpu/other"


def machine(backend: str | None = None) -> str:
  """The `PROFILES` key whose lowerings run when none is named
  (`machine=None`): `$JAXQUANT_MACHINE` where set, else the hardware's
  (`detected_machine`).

  Raises:
    ValueError: `$JAXQUANT_MACHINE` names no profile.
  """
  forced = os.environ.get(MACHINE_ENV)
  if forced:
    if forced not in PROFILES:
      raise ValueError(f"{MACHINE_ENV}={forced!r}: use one of "
                       f"{sorted(PROFILES)}, or unset it for this machine's")
    return forced
  return detected_machine(backend)


def check_machine(key) -> None:
  if key is not None and not isinstance(key, Profile) and key not in PROFILES:
    raise ValueError(f"machine={key!r}: use one of {sorted(PROFILES)}, a "
                     "lowering.Profile, or None for this machine's")


def profile(key: str | Profile | None = None) -> Profile:
  """`key` itself if a `Profile`, else its `PROFILES` row (this machine's
  when None)."""
  return key if isinstance(key, Profile) else PROFILES[key or machine()]


def act_parts(dtype) -> int:
  """Int8 parts that carry a float activation of `dtype` to its precision
  (0 when none do: float64)."""
  bits = jnp.finfo(dtype).nmant + 1
  if bits > 24:
    return 0
  return 2 if bits <= 11 else 3


def free_axes(ndim: int, contract, batch) -> list[int]:
  """The axes of a matmul operand that are neither contracted nor batch."""
  return [d for d in range(ndim) if d not in contract and d not in batch]


def _free_sizes(shape, contract, batch) -> list[int]:
  return [shape[d] for d in free_axes(len(shape), contract, batch)]


def rows(site) -> int:
  """The activation's rows: the product of its free dimensions."""
  return math.prod(_free_sizes(site.act_shape, site.act_contract,
                               site.act_batch))


def features(site) -> int:
  """The weight's output features: the product of its free dimensions."""
  return math.prod(_free_sizes(site.weight_shape, site.weight_contract,
                               site.weight_batch))


def has_row_axis(site) -> bool:
  return bool(_free_sizes(site.act_shape, site.act_contract, site.act_batch))


def _padding(site, prof: Profile, parts: int) -> int:
  if site.primitive != "dot_general" or not has_row_axis(site):
    return 1
  return prof.min_rows if rows(site) * max(parts, 1) < prof.min_rows else 1


# One dot per group unrolls into this many dots at most (compile time).
MAX_GROUP_DOTS = 64


def _grouped(site, prof: Profile, parts: int, groups: int
             ) -> Lowering | None:
  """The grouped lowering for `rows x parts` stacked rows (parts = 0: int8
  activations) and `groups` groups, or None where the float dot is faster."""
  stacked = rows(site) * max(parts, 1)
  if prof.grouped_rows is None:
    return Lowering(GROUPED_DOT, _padding(site, prof, parts), parts)
  batched, per_group = prof.grouped_rows
  looped = groups * stacked <= per_group
  if stacked <= batched or (looped and groups > MAX_GROUP_DOTS):
    return Lowering(GROUPED_DOT, _padding(site, prof, parts), parts)
  if looped:
    return Lowering(PER_GROUP_DOTS, _padding(site, prof, parts), parts)
  return None


def stored_order(sites, spec, ndim: int, key=None) -> tuple | None:
  """The axis order `quantize_params` stores a weight's codes in: its free
  axes, then its contracted ones, where machine `key` has `contract_last`
  and every matmul of the weight is a `dot_general` on the parameter itself
  (up to transposes and casts) contracting the same axes; else None."""
  contract = {s.param_contract for s in sites}
  if not (profile(key).contract_last and sites and len(contract) == 1
          and spec.format == "int" and spec.granularity != "group"
          and all(s.primitive == "dot_general" and not s.regrouped
                  and not s.weight_batch for s in sites)):
    return None
  (contract,) = contract
  order = tuple(sorted(set(range(ndim)) - contract)) + tuple(sorted(contract))
  return None if order == tuple(range(ndim)) else order


def _row_reduce(site, prof: Profile, stored_last: bool) -> bool:
  return (stored_last and prof.row_reduce and site.primitive == "dot_general"
          and rows(site) == 1)


def choose_int8(site, groups: int, key=None, stored_last: bool = False
                ) -> Lowering:
  """The lowering of an int8 x int8 matmul (W8A8, W4A8: `groups` > 0 weight
  groups along the contraction) on machine `key` (a `PROFILES` key or a
  `Profile`; None: this machine); `stored_last`: the weight's codes are
  stored contracted axes last (`kernels.contracted_last`)."""
  prof = profile(key)
  if not groups and _row_reduce(site, prof, stored_last):
    return Lowering(ROW_REDUCE)
  if not groups:
    return Lowering(INT8_DOT, _padding(site, prof, 1))
  return _grouped(site, prof, 0, groups) or Lowering(FAKE_QUANT_DOT)


def choose_weight_only(site, groups: int, act_dtype, key=None,
                       stored_last: bool = False) -> Lowering:
  """The lowering of a weight-only matmul on a quantized integer weight."""
  prof = profile(key)
  parts = act_parts(act_dtype)
  if parts and not groups and _row_reduce(site, prof, stored_last):
    return Lowering(ROW_REDUCE)
  # Parts are stacked along a free (row) axis of the activation.
  if not (parts and site.primitive == "dot_general" and has_row_axis(site)):
    return Lowering(DEQUANTIZED)
  if not groups:
    few = rows(site) * parts <= prof.weight_only_parts * features(site)
    return (Lowering(INT8_DOT, _padding(site, prof, parts), parts) if few
            else Lowering(DEQUANTIZED))
  if prof.grouped_rows is None:
    return Lowering(DEQUANTIZED)
  return _grouped(site, prof, parts, groups) or Lowering(DEQUANTIZED)


def native_problem(backend: str | None = None) -> str | None:
  """Why jaxquant's C++ kernels (`jaxquant.native`) cannot run in this
  process (None: they can)."""
  if (backend or jax.default_backend()) != "cpu":
    return "they run on CPU only"
  if jax.device_count() > 1:
    # A custom call is one opaque op to XLA's partitioner: it would gather
    # sharded weights onto every device.
    return f"{jax.device_count()} devices (XLA cannot partition them)"
  status = native.status()
  return None if status.loaded else status.reason


def choose_native(site, parts: int, key=None) -> Lowering | str | None:
  """The native int8 dot for this matmul's rows x `parts` stacked rows
  (parts = 0: int8 activations), where machine `key`'s profile takes it;
  a string saying why not where the profile takes it but it cannot run
  here; None where the profile does not take it."""
  stacked = rows(site) * max(parts, 1)
  limit = profile(key).native_rows[1 if parts else 0]
  if not (site.primitive == "dot_general" and has_row_axis(site)
          and 0 < limit and stacked <= limit):
    return None
  problem = native_problem()
  if problem:
    return f"no native kernel: {problem}"
  return Lowering(NATIVE_DOT, act_parts=parts)


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
