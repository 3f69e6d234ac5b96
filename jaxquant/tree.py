"""Whole-pytree helpers: paths, `quantize_tree`, `dequantize_tree`, `nbytes`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import QArray, quantize
from jaxquant.rules import Recipe


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def key_name(key) -> str:
  """One path component: the key's plain name, with '~' written '~0' and
  '/' written '~1' (JSON Pointer, RFC 6901), so `{'a/b': x}` and
  `{'a': {'b': y}}` get different paths ('a~1b' and 'a/b')."""
  name = jax.tree_util.keystr((key,), simple=True, separator="/")
  return name.replace("~", "~0").replace("/", "~1")


def path_str(keypath) -> str:
  """'/'-joined names of a `jax.tree_util` key path: 'params/Dense_0/kernel'.

  A final `.value` attribute (where Flax NNX `Variable`s keep their array) is
  left out, so an NNX kernel is 'linear/kernel' like a Linen one. Paths stay
  unique: the node holding `.value` is not itself a leaf.
  """
  keypath = tuple(keypath)
  if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and (
      keypath[-1].name == "value"):
    keypath = keypath[:-1]
  return "/".join(key_name(k) for k in keypath)


def leaves_with_paths(tree) -> list[tuple[str, Any]]:
  """(path, leaf) pairs; `QArray`s count as leaves. Paths are unique."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
  out, seen = [], {}
  for keypath, leaf in flat:
    path = path_str(keypath)
    if path in seen:  # keys that print alike, e.g. 1 and '1' in a custom node
      raise ValueError(
          f"{path}: two leaves share this path ({_keys(seen[path])} and "
          f"{_keys(keypath)}); rename one of the keys")
    seen[path] = keypath
    out.append((path, leaf))
  return out


def _keys(keypath) -> str:
  return jax.tree_util.keystr(tuple(keypath))


def is_float_array(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def quantize_tree(params, recipe: Recipe, *, key=None):
  """Weight-only quantization of every float leaf a rule gives a spec.

  Axes not named in the spec follow the Flax kernel layout `(..., in, out)`
  (channels last, groups along axis -2); `jq.quantize_params` reads them
  from the model instead. Non-float leaves are left alone.

  Args:
    params: a pytree of float arrays (other leaves are kept as they are).
    recipe: a `Recipe`; a leaf's '/'-joined path picks its rule (the first
      that fully matches). A non-optional rule that decides no path raises
      ValueError, as does a path that cannot be quantized with its spec.
    key: a PRNG key, needed by rules with `rounding="stochastic"`.

  Returns:
    `params` with a `QArray` in place of every float leaf whose rule has a
    weight spec.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)}}
    >>> recipe = jq.Recipe([jq.Rule(".*kernel", weight=jq.int8()),
    ...                     jq.Rule(".*bias", weight=None)])
    >>> q = jq.quantize_tree(params, recipe)
    >>> q["dense"]["kernel"].scale.shape, q["dense"]["bias"].shape
    ((1, 4), (4,))
  """
  paths = leaves_with_paths(params)
  floats = [p for p, leaf in paths
            if is_float_array(leaf) and not is_qarray(leaf)]
  recipe.check_used(floats, [p for p, _ in paths])
  keys = iter(jax.random.split(key, len(paths))) if key is not None else None

  def visit(keypath, leaf):
    path = path_str(keypath)
    leaf_key = next(keys) if keys is not None else None
    spec = recipe.weight_spec(path)
    if spec is None or not is_float_array(leaf) or is_qarray(leaf):
      return leaf  # already quantized leaves are left as they are
    return quantize(leaf, spec, key=leaf_key, where=path)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)


def dequantize_tree(tree):
  """Replaces every `QArray` leaf by its dequantized float array.

  Args:
    tree: a pytree, e.g. from `quantize_tree` or `jq.quantize_params`.

  Returns:
    The same structure with `q.dequantize()` in place of every `QArray` q
    (shape `q.shape`, dtype `q.dtype`); other leaves unchanged.

  Example:
    >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
    >>> q = jq.quantize_tree({"kernel": w},
    ...                      jq.Recipe([jq.Rule(".*", weight=jq.int4())]))
    >>> w_hat = jq.dequantize_tree(q)["kernel"]
    >>> w_hat.shape, bool(jnp.all(jnp.abs(w_hat - w) <= q["kernel"].scale / 2))
    ((8, 4), True)
  """
  return jax.tree_util.tree_map(
      lambda x: x.dequantize() if is_qarray(x) else x, tree, is_leaf=is_qarray)


def nbytes(tree) -> int:
  """Total bytes of a pytree's arrays; a `QArray` counts its packed storage.

  A `QArray` counts its values, scales and zero points (and its static
  activation scale and zero point); any other leaf with a shape and dtype counts
  size * itemsize; Python scalars count 0.

  Args:
    tree: any pytree.

  Returns:
    The number of bytes, an int.

  Example:
    >>> w = jnp.ones((4, 8))
    >>> jq.nbytes({"w": w})                                 # 32 float32
    128
    >>> jq.nbytes({"w": jq.quantize(w, jq.int8())})         # 32 + 8 scales
    64
    >>> jq.nbytes({"w": jq.quantize(w, jq.int4())})         # 16 + 8 scales
    48
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
    if is_qarray(leaf):
      total += leaf.nbytes
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total
