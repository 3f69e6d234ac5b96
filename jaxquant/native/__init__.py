"""jaxquant's own C++ kernels for XLA:CPU, called through XLA's FFI.

`setup.py` compiles `jaxquant/native/*.cc` (one kernel family per file) into
one shared library where a C++17 compiler and jaxlib's FFI headers exist;
everywhere else jaxquant runs on its XLA formulations. `status()` says which,
and why; `jq.report` quotes it where a kernel would have run.

    >>> x = np.array([[1, -2, 3]], np.int8)
    >>> w = np.array([[4, 5, 6], [-7, 8, 9]], np.int8)
    >>> if jq.native.status().loaded:
    ...   print(jq.native.int8_dot(x, w))
    ... else:
    ...   print(x.astype(np.int32) @ w.T.astype(np.int32))
    [[12  4]]

The kernels run in XLA's compiled program as FFI custom calls (target names
`TARGETS`); loading registers them with JAX once per process.
`JAXQUANT_NATIVE=0` in the environment keeps them unloaded (the XLA
formulations run; the numbers are the same).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The environment variable that keeps the kernels unloaded when "0".
NATIVE_ENV = "JAXQUANT_NATIVE"
INT8_DOT_TARGET = "jaxquant_int8_dot"
TARGETS = {INT8_DOT_TARGET: "JaxquantInt8Dot"}  # FFI target: C symbol
# The inner loops `variant=` can force (0: the best this CPU runs).
VARIANTS = {"portable": 1, "avx2": 2}


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the kernels are loaded, which inner loop they run, and why.

  Attributes:
    loaded: the kernels are registered with JAX and can run.
    variant: the inner loop this CPU runs ('avx2', 'portable'); '' when not
      loaded.
    reason: why they are not loaded, or what was loaded.
    variants: the inner loops this CPU can run (`int8_dot(variant=)`).
  """

  loaded: bool
  variant: str
  reason: str
  variants: tuple[str, ...] = ()


def _library() -> Path | None:
  found = sorted(Path(__file__).parent.glob("_kernels*.so"))
  return found[0] if found else None


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@functools.cache
def status() -> Status:
  """Loads the kernels once per process (registering their FFI targets)
  and says how that went."""
  if os.environ.get(NATIVE_ENV) == "0":
    return Status(False, "", f"{NATIVE_ENV}=0")
  path = _library()
  if path is None:
    return Status(False, "", "jaxquant's C++ kernels are not built (no "
                  "C++17 compiler or jaxlib headers at install: see setup.py)")
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:
    return Status(False, "", f"cannot load {path.name}: {e}")
  headers = lib.JaxquantFfiHeaders
  headers.restype = ctypes.c_char_p
  built = headers().decode()
  running = importlib.metadata.version("jaxlib")
  # XLA runs handlers built against its own or an older FFI API only.
  if _version(running) < _version(built):
    return Status(False, "", f"built against jaxlib {built}'s FFI headers, "
                  f"running jaxlib {running}: reinstall jaxquant")
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  best = {v: k for k, v in VARIANTS.items()}[lib.JaxquantBestVariant()]
  runs = tuple(k for k, v in VARIANTS.items() if lib.JaxquantSupports(v))
  return Status(True, best, f"{path.name}, {best} loops, FFI headers of "
                f"jaxlib {built}", runs)


def int8_dot(x, w, variant: str | None = None):
  """`x @ w.T` of int8 `x` (M, K) and int8 `w` (N, K), as exact int32 sums.

  The same integers as `lax.dot_general(x, w, (((1,), (1,)), ((), ())),
  preferred_element_type=jnp.int32)` (int32 wraps alike: callers keep K
  within the int32 bound). Under `jax.vmap` a batched `x` is folded into
  rows; a batched `w` takes XLA's dot.

  Args:
    x: int8 (M, K).
    w: int8 (N, K).
    variant: force an inner loop (`VARIANTS`); None: the best this CPU runs.

  Raises:
    ValueError: the kernels are not loaded (`status()`), or bad operands.
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  _check("int8_dot", variant, (x, w), lambda: (x.dtype, w.dtype) == (
      jnp.int8, jnp.int8) and x.shape[1] == w.shape[1],
         "int8 (M, K) and (N, K)")
  call = lambda x, w: jax.ffi.ffi_call(INT8_DOT_TARGET, _out(x, w, jnp.int32))(
      x, w, variant=np.int32(VARIANTS.get(variant, 0)))
  return _rows_batched(call, _xla_int8_dot)(x, w)


def _out(x, w, dtype):
  return jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), dtype)


def _check(name: str, variant, arrays, ok, expected: str) -> None:
  """Raises ValueError unless the kernels are loaded, `arrays` are 2-D and
  `ok()`, and `variant` runs here."""
  if not status().loaded:
    raise ValueError(f"jaxquant.native.{name}: {status().reason}")
  if any(a.ndim != 2 for a in arrays) or not ok():
    got = ", ".join(f"{a.dtype}{a.shape}" for a in arrays)
    raise ValueError(f"jaxquant.native.{name}: got {got}; expected "
                     f"{expected}")
  if variant is not None and variant not in status().variants:
    raise ValueError(f"variant={variant!r}: this CPU runs "
                     f"{list(status().variants)}; or None for the best")


def _xla_int8_dot(x, w):
  batch = ((0,), (0,)) if w.ndim == 3 else ((), ())
  return lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), batch),
                         preferred_element_type=jnp.int32)


def _rows_batched(call, reference):
  """`call(x, *weight)` under `jax.vmap`: a batched x folds into rows; a
  batched weight runs `reference`, XLA's formulation of the same sums."""
  @jax.custom_batching.custom_vmap
  def f(x, *weight):
    return call(x, *weight)

  @f.def_vmap
  def _(axis_size, batched, x, *weight):
    if any(batched[1:]):
      x = x if batched[0] else jnp.broadcast_to(x, (axis_size,) + x.shape)
      weight = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b in zip(weight, batched[1:])]
      return reference(x, *weight), True
    b, m, k = x.shape
    rows = f(x.reshape(b * m, k), *weight)  # the examples' rows stacked
    return rows.reshape(b, m, rows.shape[-1]), True

  return f
