"""Saving and loading (quantized) pytrees without pickle.

File layout: the magic bytes `JAXQUANT`, a format version byte, the SHA-256
of the payload, then the payload: msgpack of a tagged tree of dicts, lists,
tuples, arrays (dtype, shape, raw bytes), `QArray`s (spec fields + arrays),
None and Python scalars. Loading verifies the checksum and every array's
byte count, and builds the whole tree before returning it, so a corrupt or
mismatched file raises `ValueError` and never yields a half-loaded tree.
Writes go to a temporary file that is renamed into place.

Example:
  >>> jq.save("model.jq", qparams)
  >>> restored = jq.load("model.jq", like=qparams)  # optional shape check
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec
from jaxquant.tree import leaves_with_paths

MAGIC = b"JAXQUANT"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 32


def save(path: str | os.PathLike, tree) -> None:
  """Writes `tree` (arrays, `QArray`s, dicts, lists, tuples) to `path`."""
  payload = msgpack.packb(_encode(tree, ""), use_bin_type=True)
  blob = MAGIC + bytes([VERSION]) + hashlib.sha256(payload).digest() + payload
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".jaxquant-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load(path: str | os.PathLike, like=None):
  """Reads a tree written by `save`; with `like`, checks paths and shapes."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _HEADER or not blob.startswith(MAGIC):
    raise ValueError(f"{path}: not a jaxquant checkpoint (bad header)")
  if blob[len(MAGIC)] != VERSION:
    raise ValueError(f"{path}: checkpoint format version {blob[len(MAGIC)]}, "
                     f"this jaxquant reads version {VERSION}")
  digest, payload = blob[len(MAGIC) + 1:_HEADER], blob[_HEADER:]
  if hashlib.sha256(payload).digest() != digest:
    raise ValueError(f"{path}: checkpoint is corrupt (checksum mismatch)")
  try:
    tree = _decode(msgpack.unpackb(payload, raw=False), "")
  except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
    raise ValueError(f"{path}: checkpoint is corrupt ({e})") from e
  if like is not None:
    _check_like(tree, like, path)
  return tree


def _array(x, where):
  arr = np.asarray(x)
  return {"t": "array", "dtype": jnp.dtype(arr.dtype).name,
          "shape": list(arr.shape), "data": arr.tobytes()}


def _optional(x, where):
  return None if x is None else _array(x, where)


def _encode(x, where):
  if isinstance(x, QArray):
    return {"t": "qarray", "spec": dataclasses.asdict(x.spec),
            "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name,
            "values": _array(x.values, where), "scale": _array(x.scale, where),
            "zero_point": _optional(x.zero_point, where),
            "act_scale": _optional(x.act_scale, where),
            "act_zero_point": _optional(x.act_zero_point, where),
            "act_spec": None if x.act_spec is None else dataclasses.asdict(
                x.act_spec)}
  if isinstance(x, Mapping):
    for k in x:
      if not isinstance(k, str):
        raise ValueError(f"{where}: dict key {k!r} is not a string; "
                         "checkpoints keep string keys only")
    return {"t": "dict", "items": {k: _encode(v, f"{where}/{k}")
                                   for k, v in x.items()}}
  if isinstance(x, (list, tuple)):
    return {"t": type(x).__name__,
            "items": [_encode(v, f"{where}/{i}") for i, v in enumerate(x)]}
  if x is None or isinstance(x, (bool, int, float, str)):
    return {"t": "scalar", "value": x}
  if isinstance(x, (np.ndarray, jax.Array, np.generic)):
    return _array(x, where)
  raise ValueError(f"{where or 'tree'}: cannot save a {type(x).__name__}; "
                   "convert it to dicts, lists and arrays first")


def _decode_array(d, where):
  dtype = jnp.dtype(d["dtype"])
  shape = tuple(d["shape"])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(d["data"]) != expected:
    raise ValueError(f"{where}: {len(d['data'])} bytes for {d['dtype']}"
                     f"{list(shape)}, expected {expected}")
  return jnp.asarray(np.frombuffer(d["data"], dtype).reshape(shape))


def _spec(fields) -> QuantSpec:
  fields = dict(fields)
  for name in ("channel_axes", "clip"):
    if isinstance(fields.get(name), list):
      fields[name] = tuple(fields[name])
  return QuantSpec(**fields)


def _decode(d, where):
  kind = d["t"]
  if kind == "array":
    return _decode_array(d, where)
  if kind == "qarray":
    optional = lambda k: None if d.get(k) is None else _decode_array(d[k],
                                                                     where)
    return QArray(_decode_array(d["values"], where),
                  _decode_array(d["scale"], where), optional("zero_point"),
                  _spec(d["spec"]), tuple(d["shape"]), jnp.dtype(d["dtype"]),
                  optional("act_scale"), optional("act_zero_point"),
                  None if d.get("act_spec") is None else _spec(d["act_spec"]))
  if kind == "dict":
    return {k: _decode(v, f"{where}/{k}") for k, v in d["items"].items()}
  if kind in ("list", "tuple"):
    items = [_decode(v, f"{where}/{i}") for i, v in enumerate(d["items"])]
    return items if kind == "list" else tuple(items)
  if kind == "scalar":
    return d["value"]
  raise ValueError(f"{where}: unknown entry kind {kind!r}")


def _check_like(tree, like, path):
  got = dict(leaves_with_paths(tree))
  want = dict(leaves_with_paths(like))
  if got.keys() != want.keys():
    missing = sorted(want.keys() - got.keys())[:5]
    extra = sorted(got.keys() - want.keys())[:5]
    raise ValueError(f"{path}: tree does not match `like`: missing {missing}, "
                     f"unexpected {extra}")
  for p, leaf in want.items():
    a, b = got[p], leaf
    if (getattr(a, "shape", None) != getattr(b, "shape", None)
        or type(a) is not type(b) and not (
            hasattr(a, "shape") and hasattr(b, "shape"))):
      raise ValueError(f"{path}: {p} has shape {getattr(a, 'shape', a)}, "
                       f"expected {getattr(b, 'shape', b)}")
    if isinstance(b, QArray) and (not isinstance(a, QArray) or a.spec != b.spec):
      raise ValueError(f"{path}: {p} was saved with a different QuantSpec")
