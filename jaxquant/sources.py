"""Leaf-by-leaf sources of float params, for quantizing without a float copy.

`jq.quantize_params(apply_fn, abstract, recipe, x, source=...)` takes
abstract params (`jax.eval_shape(model.init, ...)`) and a `source`, a
function `path -> array` called once per leaf; each leaf is quantized (and
placed with its abstract leaf's sharding) before the next is read. Peak
memory: the quantized tree plus about one float leaf.

  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  qparams = jq.quantize_params(model.apply, abstract, recipe, x,
                               source=jq.sources.checkpoint("params.jq"))

Paths are '/'-joined, as in recipes (`params/Dense_0/kernel`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from jaxquant.checkpoint import leaf_reader
from jaxquant.tree import leaves_with_paths

Source = Callable[[str], Any]


def checkpoint(path: str | os.PathLike) -> Source:
  """The leaves of a `jq.save` file, each read on demand (the checksum is
  verified once, first). See `jaxquant.checkpoint.leaf_reader`."""
  return leaf_reader(path)


def tree(params) -> Source:
  """The leaves of an in-memory tree (e.g. NumPy arrays on the host, to be
  placed sharded on devices leaf by leaf).

  Example:
    >>> read = jq.sources.tree({"dense": {"kernel": np.ones((2, 3))}})
    >>> read("dense/kernel").shape
    (2, 3)
  """
  leaves = dict(leaves_with_paths(params))

  def read(path: str):
    if path not in leaves:
      raise ValueError(f"source tree has no leaf {path!r}; it holds "
                       f"{list(leaves)[:6]}")
    return leaves[path]

  return read


def safetensors(path: str | os.PathLike,
                name: Callable[[str], str] | None = None) -> Source:
  """The tensors of a `.safetensors` file, each read on demand (memory-
  mapped by the `safetensors` package).

  Args:
    path: the file.
    name: leaf path -> tensor name; by default the path itself, or, when
      the file has no such tensor, the path with '.' for '/' (the
      Hugging Face convention).
  """
  from safetensors import safe_open  # here: only this source needs it
  handle = safe_open(os.fspath(path), framework="numpy")
  names = set(handle.keys())

  def read(leaf_path: str):
    tensor = name(leaf_path) if name else leaf_path
    if name is None and tensor not in names:
      tensor = leaf_path.replace("/", ".")
    if tensor not in names:
      raise ValueError(f"{path}: no tensor {tensor!r} for leaf {leaf_path!r};"
                       f" it holds {sorted(names)[:6]}; pass name=")
    return np.asarray(handle.get_tensor(tensor))

  return read


def abstract(params):
  """`params` as `jax.ShapeDtypeStruct`s, keeping each array's sharding:
  the abstract tree for `quantize_params(..., source=)`."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                     sharding=getattr(a, "sharding", None)),
      params)
