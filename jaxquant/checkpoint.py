"""Saving and loading (quantized) pytrees without pickle.

File layout (format version 2):

  b"JAXQUANT" | version: 1 byte | SHA-256: 32 bytes
  | header length: 8 bytes, little-endian | header: msgpack | data

The checksum covers every byte but its own. The header holds `tree`, the
structure (dicts with string or integer keys, lists, tuples, NamedTuples by
type and field names, None, bool / int / float / str scalars, leaf marks,
and any other pytree node -- an Equinox module, an NNX `State` or
`Variable` -- by type name and child keys), and `leaves`, (path, what)
pairs in data order: an array's dtype and shape, a PRNG key's
implementation, or a `QArray`'s spec, logical shape and dtype and the dtype
and shape of each of its arrays. The data are those arrays' bytes, back to
back.

Leaves stream to and from disk in chunks: neither `save` nor `load` keeps a
second copy of a large array. `load` checks the header (every `QArray`'s
values, scales and zero points against its spec, shape and dtype) and
`like` before it reads data, verifies the checksum after, and only then
builds the tree: a corrupt or mismatched file raises `ValueError` and never
yields a half-built tree. A file holds data, never code: nodes other than
dicts, lists, tuples, NamedTuples and None are rebuilt from `like=`, which
such files need. Writes go to a temporary file that is fsynced and renamed
into place (an existing file keeps its permissions), then the folder is
fsynced. Version 1 files (one msgpack tree) still load.

Example:
  >>> import os, tempfile
  >>> qparams = {"w": jq.quantize(jnp.ones((4, 8)), jq.int4())}
  >>> path = os.path.join(tempfile.mkdtemp(), "model.jq")
  >>> jq.save(path, qparams)
  >>> restored = jq.load(path, like=qparams)  # `like`: optional check
  >>> restored["w"].spec == qparams["w"].spec
  True
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import math
import os
import stat
from typing import Any, Callable

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from jaxquant import numerics, packing
from jaxquant.qarray import ActQuant, QArray, check_order, with_order
from jaxquant.spec import QuantSpec
from jaxquant.tree import key_name

MAGIC = b"JAXQUANT"
VERSION = 2
_DIGEST = len(MAGIC) + 1     # offset of the SHA-256
_PREFIX = _DIGEST + 32       # magic, version and checksum
_CHUNK = 16 << 20            # bytes per read / write: bounds the extra memory
_ALIGN = 64                  # XLA:CPU adopts 64-byte aligned buffers, no copy
_QFIELDS = ("values", "scale", "zero_point", "act_scale", "act_zero_point",
            "in_scale")


def _qarray_fields(q: QArray) -> dict:
  """A QArray's arrays under their names in the file (None when absent)."""
  act = q.act
  return {"values": q.values, "scale": q.scale, "zero_point": q.zero_point,
          "act_scale": None if act is None else act.scale,
          "act_zero_point": None if act is None else act.zero_point,
          "in_scale": q.in_scale}
_ABSENT = object()           # no `like` for this subtree
_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "float16", "float32", "float64", "bfloat16",
           "complex64", "complex128", "int2", "int4", "uint2", "uint4",
           "float4_e2m1fn", "float8_e3m4", "float8_e4m3", "float8_e4m3fn",
           "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
           "float8_e5m2fnuz", "float8_e8m0fnu")


# --------------------------------------------------------------------------
# save


def save(path: str | os.PathLike, tree) -> None:
  """Writes `tree` to `path`: any pytree of arrays, `QArray`s and scalars.

  Dicts, lists, tuples, NamedTuples and None load back by themselves;
  other nodes (Equinox modules, NNX `State`s, registered classes) load
  with `like=`. Leaves: arrays (PRNG keys too), `QArray`s, bool, int,
  float, str. The file is written to a temporary name and renamed into
  place; no pickle, so loading runs no code (see the module docstring for
  the format).

  Args:
    path: the file to write (replaced if it exists).
    tree: the pytree, e.g. `qparams` from `jq.quantize_params` or `Stats`.

  Returns:
    None.

  Raises:
    ValueError: for a tree it cannot encode (e.g. dict keys that are not
      str or int, or an unsupported leaf).

  Example:
    >>> import os, tempfile
    >>> qparams = {"kernel": jq.quantize(jnp.ones((16, 8)), jq.int4()),
    ...            "bias": jnp.zeros(8)}
    >>> path = os.path.join(tempfile.mkdtemp(), "qparams.jq")
    >>> jq.save(path, qparams)
    >>> restored = jq.load(path)
    >>> restored["kernel"], jq.nbytes(restored) == jq.nbytes(qparams)
    (QArray(int4/ch, shape=(16, 8), dtype=float32, nbytes=96), True)
  """
  leaves: dict[str, Any] = {}
  tree_header = _describe(tree, (), (), leaves, {})
  header = {"tree": tree_header, "leaves": [
      [p, _leaf_header(x, p)] for p, x in leaves.items()]}
  try:
    head = msgpack.packb(header, use_bin_type=True)
  except (ValueError, TypeError, OverflowError) as e:
    raise ValueError(f"cannot encode the tree ({e}); keep keys and scalars "
                     "to plain str, int, float and bool") from e
  arrays = [a for x in leaves.values() for a in _leaf_arrays(x).values()]
  _write_atomically(path, lambda f: _write(f, head, arrays))


def _path(names) -> str:
  return "/".join(names)


def _where(names) -> str:
  return _path(names) or "the root"


def _describe(x, names, keys, leaves, seen):
  """The header entry of `x`; arrays and `QArray`s go to `leaves`."""
  if isinstance(x, QArray) or _is_array(x):
    path = _path(names)
    if path in seen:  # keys that print alike: 1 and '1' in one node
      raise ValueError(f"{path}: two leaves share this path "
                       f"({_keystr(seen[path])} and {_keystr(keys)}); "
                       "rename one of the keys")
    seen[path], leaves[path] = keys, x
    return {"t": "leaf"}
  if x is None:
    return {"t": "none"}
  if type(x) in (bool, int, float, str):
    if type(x) is int and not -2**63 <= x < 2**64:
      raise ValueError(f"{_where(names)}: integer {x} does not fit 64 bits; "
                       "store it as a string or an array")
    return {"t": "scalar", "v": x}
  kind, children = _node(x, names)
  items = [_describe(c, names + (n,), keys + (k,), leaves, seen)
           for n, k, c in children]
  if kind == "dict":
    return {"t": kind, "keys": list(x), "items": items}
  if kind in ("list", "tuple"):
    return {"t": kind, "items": items}
  if kind == "namedtuple":
    return {"t": kind, "name": type(x).__name__, "fields": list(x._fields),
            "items": items}
  return {"t": kind, "type": _type_name(x),
          "keys": [n for n, _, _ in children], "items": items}


def _node(x, names):
  """(kind, [(name, key, child)]) of a pytree node."""
  if type(x) is dict:
    for k in x:
      if type(k) not in (str, int):
        raise ValueError(f"{_where(names)}: dict key {k!r} is not a str or "
                         "an int; checkpoints keep str and int keys only")
    keys = [jax.tree_util.DictKey(k) for k in x]
    return "dict", [(key_name(k), k, v) for k, v in zip(keys, x.values())]
  if type(x) in (list, tuple):
    return type(x).__name__, [(str(i), jax.tree_util.SequenceKey(i), v)
                              for i, v in enumerate(x)]
  children = _children(x)
  if children is None:
    raise ValueError(f"{_where(names)}: cannot save a {type(x).__name__}; "
                     "convert it to dicts, lists and arrays first")
  children = [(key_name(k), k, c) for k, c in children]
  fields = list(getattr(x, "_fields", ())) if isinstance(x, tuple) else None
  return ("namedtuple" if [n for n, _, _ in children] == fields else "node",
          children)


def _children(x):
  """[(key, child)] one level down a registered node; None for a leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      x, is_leaf=lambda y: y is not x)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:
    return None
  return [(keypath[0], child) for keypath, child in flat]


def _unflatten(like, children):
  return jax.tree_util.tree_structure(
      like, is_leaf=lambda y: y is not like).unflatten(children)


def _type_name(x) -> str:
  return f"{type(x).__module__}.{type(x).__qualname__}"


def _keystr(keys) -> str:
  return jax.tree_util.keystr(tuple(keys))


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_arrays(x) -> dict:
  """The arrays a leaf stores, by field name, in data order."""
  if isinstance(x, QArray):
    return {n: a for n, a in _qarray_fields(x).items() if a is not None}
  if _is_key(x):
    return {"data": jax.random.key_data(x)}
  return {"data": x}


def _leaf_header(x, path) -> dict:
  arrays = {n: {"dtype": jnp.dtype(a.dtype).name, "shape": list(np.shape(a))}
            for n, a in _leaf_arrays(x).items()}
  if isinstance(x, QArray):
    header = {"t": "qarray", "spec": dataclasses.asdict(x.spec),
              "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name,
              "order": None if x.order is None else list(x.order),
              "act_spec": None if x.act is None else dataclasses.asdict(
                  x.act.spec), "arrays": arrays}
  elif _is_key(x):
    header = {"t": "key", "impl": str(jax.random.key_impl(x)),
              **arrays["data"]}
  else:
    header = {"t": "array", **arrays["data"]}
  try:  # the checks `load` makes, so that every file written loads
    _plan(_unpack(msgpack.packb(header, use_bin_type=True)), path)
  except _Invalid as e:
    raise ValueError(f"cannot save {e}") from None
  return header


def _write(f, head: bytes, arrays) -> None:
  f.write(MAGIC + bytes([VERSION]) + bytes(32))  # checksum goes in last
  digest = hashlib.sha256(MAGIC + bytes([VERSION]))
  _put(f, digest, memoryview(len(head).to_bytes(8, "little") + head))
  for a in arrays:
    for piece in _host_pieces(a):
      _put(f, digest, _bytes(piece))
  f.seek(_DIGEST)
  f.write(digest.digest())


def _put(f, digest, data: memoryview) -> None:
  for i in range(0, len(data), _CHUNK):
    digest.update(data[i:i + _CHUNK])
    f.write(data[i:i + _CHUNK])


def _host_pieces(a):
  """`a` in C order as host arrays of native byte order: a view of a host
  array, or slices of an accelerator one."""
  if isinstance(a, jax.Array) and _on_accelerator(a):
    yield from _device_pieces(a)
    return
  a = np.ascontiguousarray(a)
  # The header names dtypes without a byte order: store native bytes.
  yield a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _on_accelerator(a: jax.Array) -> bool:
  return any(d.platform != "cpu" for d in a.devices())


def _device_pieces(a: jax.Array):
  """Host copies of slices of `a` of at most about `_CHUNK` bytes. Never
  `np.asarray(a)`: it would keep a host copy of all of `a` on `a`."""
  if a.ndim == 0:
    yield np.asarray(a.reshape(1))
    return
  row = a.nbytes // max(a.shape[0], 1)  # bytes per index of axis 0
  if row > _CHUNK and a.ndim > 1:
    for i in range(a.shape[0]):
      yield from _device_pieces(a[i])
    return
  step = max(1, _CHUNK // max(row, 1))
  for i in range(0, a.shape[0], step):
    yield np.asarray(a[i:i + step])


def _bytes(a: np.ndarray) -> memoryview:
  return memoryview(a.reshape(-1).view(np.uint8))


def _write_atomically(path, write: Callable) -> None:
  target = os.path.realpath(path)  # through a symlink, as open() writes
  fd, tmp = _create_temp(target)
  try:
    with os.fdopen(fd, "wb") as f:
      _keep_mode(target, tmp)
      write(f)
      f.flush()
      os.fsync(f.fileno())  # on disk before the rename makes it visible
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_folder(os.path.dirname(target))  # so that the rename survives too


def _create_temp(target: str):
  folder, name = os.path.split(target)
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
  while True:
    tmp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.tmp")
    with contextlib.suppress(FileExistsError):
      # Mode 0o666 less the umask, as for any new file.
      return os.open(tmp, flags, 0o666), tmp


def _keep_mode(target: str, tmp: str) -> None:
  try:
    mode = stat.S_IMODE(os.stat(target).st_mode)
  except FileNotFoundError:
    return
  os.chmod(tmp, mode)


def _fsync_folder(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:  # e.g. Windows, which cannot open folders
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


# --------------------------------------------------------------------------
# load


def load(path: str | os.PathLike, like=None):
  """Reads a tree written by `save`.

  With `like` (a tree of the saved structure, with arrays,
  `ShapeDtypeStruct`s or `QArray`s as leaves), checks every path, shape,
  dtype and `QuantSpec`, and rebuilds custom nodes (Equinox modules, NNX
  `State`s) as `like` has them, and places every array with the sharding
  of its counterpart in `like` (a `jax.Array`'s or a `ShapeDtypeStruct`'s,
  field by field for a `QArray`), so sharded params load sharded. Without
  it, NamedTuples load as NamedTuples
  of the same name and fields. Arrays load as `jax.Array`s, except 64-bit
  ones while jax runs 32-bit: those stay NumPy arrays rather than lose bits.

  Args:
    path: a file written by `jq.save`.
    like: optional, a tree of the expected structure; needed for custom
      pytree nodes.

  Returns:
    The tree.

  Raises:
    ValueError: naming the file, for a corrupt file (checksum included) or
      one that does not match `like`; no half-built tree is returned.

  Example:
    >>> import collections, os, tempfile
    >>> State = collections.namedtuple("State", "step w")
    >>> path = os.path.join(tempfile.mkdtemp(), "state.jq")
    >>> jq.save(path, State(step=3, w=jnp.arange(3.0)))
    >>> jq.load(path)                     # a NamedTuple of the same fields
    State(step=3, w=Array([0., 1., 2.], dtype=float32))
    >>> jq.load(path, like=State(0, jnp.zeros(4)))
    Traceback (most recent call last):
    ...
    ValueError: ... w: the file holds a float32 array of shape (3,), ...
  """
  like = _ABSENT if like is None else like
  try:
    with open(path, "rb") as f:
      header, data = _open(f)
      tree, plans = _parse(header)
      stubs = {p: plan.stub() for p, plan in plans.items()}
      _build_tree(tree, like, stubs, dry=True)  # before reading any data
      leaves = data.read(plans)
    return _build_tree(tree, like, leaves, dry=False)
  except _Invalid as e:
    raise ValueError(f"{path}: checkpoint is corrupt ({e}); write it again "
                     "with jq.save from the original tree") from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  except (TypeError, KeyError, IndexError, AttributeError, OverflowError,
          RecursionError) as e:  # a header that slipped past the checks
    raise ValueError(f"{path}: checkpoint is corrupt ({type(e).__name__}: "
                     f"{e})") from e


def leaf_reader(path: str | os.PathLike) -> Callable[[str], Any]:
  """`leaf path -> leaf` of a checkpoint, each read from disk on demand.

  For `jq.quantize_params(..., source=)` on a model too big for a float
  copy in memory. The file's checksum is verified first, in one streaming
  pass (no leaf kept), so a corrupt file raises here, not mid-way; each
  call then reads just that leaf's bytes. Leaf paths are those of
  `jax.tree_util` flattening ('/'-joined keys, as in recipes).

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "params.jq")
    >>> jq.save(path, {"dense": {"kernel": jnp.ones((2, 3))}})
    >>> read = jq.checkpoint.leaf_reader(path)
    >>> read("dense/kernel").shape, sorted(read.paths)
    ((2, 3), ['dense/kernel'])
  """
  with open(path, "rb") as f:
    try:
      header, data = _open(f)
      if data.f is not f:  # version 1: one block, no offsets to seek
        raise ValueError(f"{path}: a version-1 checkpoint; jq.load it and "
                         "jq.save it again to read it leaf by leaf")
      _, plans = _parse(header)
      start = f.tell()
      while data.left:
        data.take(min(_CHUNK, data.left))
      if data.expected is not None and data.digest.digest() != data.expected:
        raise _Invalid("checksum mismatch")
    except _Invalid as e:
      raise ValueError(f"{path}: checkpoint is corrupt ({e})") from e
  offsets, at = {}, start
  for leaf_path, plan in plans.items():
    offsets[leaf_path] = at
    at += sum(_nbytes(d, s) for _, d, s in plan.arrays)
  # NNX leaves are saved as '.../kernel/value'; recipes say '.../kernel'.
  aliases = {p[:-len("/value")]: p for p in plans
             if p.endswith("/value") and p[:-len("/value")] not in plans}
  return _LeafReader(os.fspath(path), plans, offsets, aliases)


@dataclasses.dataclass(frozen=True)
class _LeafReader:
  file: str
  plans: dict
  offsets: dict
  aliases: dict

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(self.plans)

  def __call__(self, leaf_path: str):
    leaf_path = self.aliases.get(leaf_path, leaf_path)
    if leaf_path not in self.plans:
      raise ValueError(f"{self.file}: no leaf {leaf_path!r}; it holds "
                       f"{list(self.plans)[:6]}")
    plan = self.plans[leaf_path]
    with open(self.file, "rb") as f:
      f.seek(self.offsets[leaf_path])
      data = _Data(f, sum(_nbytes(d, s) for _, d, s in plan.arrays),
                   hashlib.sha256(), None)
      return plan.make({n: data._array(d, s, leaf_path)
                        for n, d, s in plan.arrays})


class _Invalid(ValueError):
  """A header entry that describes no loadable node or leaf."""


def _mismatch(names, what: str) -> ValueError:
  return ValueError(f"tree does not match `like`: {_where(names)}: {what}; "
                    "pass like= a tree of the saved structure, or leave it "
                    "out")


def _open(f):
  """(header, data reader), by format version."""
  prefix = f.read(_PREFIX)
  if len(prefix) < _PREFIX or not prefix.startswith(MAGIC):
    raise ValueError("not a jaxquant checkpoint (bad header)")
  version, digest = prefix[len(MAGIC)], prefix[_DIGEST:]
  if version == 1:
    return _open_v1(f, digest)
  if version != VERSION:
    raise ValueError(f"checkpoint format version {version}; this jaxquant "
                     f"reads versions 1 to {VERSION}: upgrade jaxquant")
  size = os.fstat(f.fileno()).st_size - _PREFIX
  data = _Data(f, size, hashlib.sha256(prefix[:_DIGEST]), digest)
  return _unpack(data.take(int.from_bytes(data.take(8), "little"))), data


def _unpack(head: bytes):
  try:
    return msgpack.unpackb(head, raw=False)
  except (ValueError, msgpack.UnpackException) as e:
    raise _Invalid(f"header: {e}") from e


class _Data:
  """Reads the data section in chunks, hashing as it goes."""

  def __init__(self, f, size: int, digest, expected: bytes | None):
    self.f, self.left, self.digest, self.expected = f, size, digest, expected

  def take(self, n: int) -> bytes:
    if n > self.left:
      raise _Invalid("file is truncated")
    data = self.f.read(n)
    self.left -= n
    self.digest.update(data)
    return data

  def read(self, plans: dict) -> dict:
    """Each plan's leaf; sizes checked before, the checksum after."""
    need = sum(_nbytes(d, s) for p in plans.values() for _, d, s in p.arrays)
    if need != self.left:
      raise _Invalid(f"{self.left} data bytes, the header describes {need}")
    arrays = {p: {n: self._array(d, s, p) for n, d, s in plan.arrays}
              for p, plan in plans.items()}
    if self.expected is not None and self.digest.digest() != self.expected:
      raise _Invalid("checksum mismatch")
    return {p: plan.make(arrays[p]) for p, plan in plans.items()}

  def _array(self, dtype, shape, path):
    a = _empty(shape, dtype)
    view = _bytes(a)
    for i in range(0, len(view), _CHUNK):
      part = view[i:i + _CHUNK]
      if self.f.readinto(part) != len(part):
        raise _Invalid("file is truncated")
      self.digest.update(part)
    self.left -= len(view)
    if dtype == np.bool_ and a.size and a.view(np.uint8).max() > 1:
      raise _Invalid(f"{path}: booleans other than 0 and 1")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
      return a  # 64-bit while jax runs 32-bit: keep every bit
    return _to_device(a)


def _loads_to_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def _to_device(a: np.ndarray) -> jax.Array:
  """`a` on the default device. XLA:CPU adopts the aligned buffer, no copy.
  An accelerator gets slices of about `_CHUNK` bytes, each awaited, since a
  whole-array transfer stages a second host copy; they are joined on the
  device (which briefly holds the leaf twice)."""
  if not _loads_to_accelerator():
    return jax.device_put(a)
  flat, step = a.reshape(-1), max(1, _CHUNK // a.itemsize)
  if flat.size <= step:
    return jax.device_put(a).block_until_ready()
  parts = [jax.device_put(flat[i:i + step]).block_until_ready()
           for i in range(0, flat.size, step)]
  return _joined(a.shape, *parts)


@functools.partial(jax.jit, static_argnums=0)
def _joined(shape, *parts):
  return jnp.concatenate(parts).reshape(shape)


def _nbytes(dtype, shape) -> int:
  return math.prod(shape) * dtype.itemsize


def _empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data start 64-byte aligned."""
  n = _nbytes(dtype, shape)
  raw = np.empty(n + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + n].view(dtype).reshape(shape)


# Parsing the header: every field type-checked, every QArray validated.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One leaf: its arrays (name, dtype, shape) in data order, and how to
  make the leaf from them (or from `ShapeDtypeStruct`s, for checks)."""

  arrays: tuple
  make: Callable[[dict], Any]

  def stub(self):
    return self.make({n: jax.ShapeDtypeStruct(s, d)
                      for n, d, s in self.arrays})


def _get(d, key, *types):
  """`d[key]`, checked to be of one of `types` (None: None; bool is no int)."""
  if not isinstance(d, dict) or key not in d:
    raise _Invalid(f"an entry has no {key!r}")
  v = d[key]
  if not any(v is None if t is None else _isinstance(v, t) for t in types):
    raise _Invalid(f"{key!r} is {str(v)[:40]!r}")
  return v


def _isinstance(v, t) -> bool:
  return isinstance(v, t) and not (isinstance(v, bool) and t is not bool)


def _parse(header):
  """(tree description, {path: _Plan}), every leaf checked."""
  if not isinstance(header, dict):
    raise _Invalid("the header is not a map")
  plans = {}
  for entry in _get(header, "leaves", list):
    if not (isinstance(entry, list) and len(entry) == 2
            and isinstance(entry[0], str)) or entry[0] in plans:
      raise _Invalid(f"bad leaf entry {str(entry)[:40]!r}")
    plans[entry[0]] = _plan(entry[1], entry[0])
  return _get(header, "tree", dict), plans


def _plan(d, path) -> _Plan:
  kind = _get(d, "t", str)
  if kind == "array":
    return _Plan((("data",) + _array_of(d, path),), lambda a: a["data"])
  if kind == "key":
    impl = _get(d, "impl", str)
    plan = _Plan((("data",) + _array_of(d, path),),
                 lambda a: _wrap_key(a["data"], impl))
    try:
      plan.stub()
    except (ValueError, TypeError) as e:
      raise _Invalid(f"{path}: PRNG key data: {e}") from e
    return plan
  if kind == "qarray":
    return _qarray_plan(d, path)
  raise _Invalid(f"{path}: unknown leaf kind {kind!r:.40}")


def _wrap_key(data, impl: str):
  wrap = functools.partial(jax.random.wrap_key_data, impl=impl)
  if isinstance(data, jax.ShapeDtypeStruct):
    return jax.eval_shape(wrap, data)
  return wrap(data)


def _array_of(d, path) -> tuple:
  return (_dtype(_get(d, "dtype", str), path),
          _shape(_get(d, "shape", list), path))


def _dtype(name: str, path) -> np.dtype:
  if name not in _DTYPES:
    raise _Invalid(f"{path}: unsupported dtype {name[:40]!r}")
  return jnp.dtype(name)


def _shape(dims: list, path) -> tuple:
  if len(dims) > 32 or not all(_isinstance(n, int) and 0 <= n < 2**48
                               for n in dims):
    raise _Invalid(f"{path}: bad shape {str(dims)[:40]}")
  return tuple(dims)


def _spec(fields, path) -> QuantSpec:
  """A QuantSpec from its fields; QuantSpec checks their types and values."""
  names = {f.name for f in dataclasses.fields(QuantSpec)}
  if not isinstance(fields, dict) or not fields.keys() <= names:
    raise _Invalid(f"{path}: bad QuantSpec {str(fields)[:60]}")
  for name, value in fields.items():
    if isinstance(value, list) and all(  # msgpack has no tuples
        _isinstance(v, int) or _isinstance(v, float) for v in value):
      fields = {**fields, name: tuple(value)}
    elif value is not None and type(value) not in (bool, int, float, str):
      raise _Invalid(f"{path}: bad QuantSpec {name} {str(value)[:40]}")
  try:
    return QuantSpec(**fields)
  except (ValueError, TypeError) as e:
    raise _Invalid(f"{path}: {e}") from e


def _qarray_plan(d, path) -> _Plan:
  spec = _spec(_get(d, "spec", dict), path)
  act = _get(d, "act_spec", dict, None)
  act = None if act is None else _spec(act, path)
  shape = _shape(_get(d, "shape", list), path)
  dtype = _dtype(_get(d, "dtype", str), path)
  order = _get(d, "order", list, None) if "order" in d else None
  try:
    check_order(order, len(shape), f"{path}: QArray")
  except (ValueError, TypeError) as e:
    raise _Invalid(str(e)) from None
  order = None if order is None else tuple(order)
  given = _get(d, "arrays", dict)
  if not {"values", "scale"} <= given.keys() <= set(_QFIELDS):
    raise _Invalid(f"{path}: QArray arrays {sorted(map(str, given))[:6]}")
  arrays = tuple((n,) + _array_of(_get(given, n, dict), path)
                 for n in _QFIELDS if n in given)
  plan = _Plan(arrays, lambda a: QArray(
      a["values"], a["scale"], a.get("zero_point"), spec, shape, dtype,
      None if act is None and a.get("act_scale") is None else ActQuant(
          a.get("act_scale"), a.get("act_zero_point"), act),
      a.get("in_scale"), order))
  problem = _qarray_problem(plan.stub(), path)
  if problem:
    raise _Invalid(f"{path}: QArray {problem}")
  return plan


def _qarray_problem(q: QArray, path) -> str | None:
  """Why the fields of `q` do not fit its spec, shape and dtype, if so."""
  if not jnp.issubdtype(q.dtype, jnp.floating):
    return f"dtype {q.dtype} is not a float dtype"
  try:
    spec = numerics.resolve_axes(q.spec, len(q.shape), path)
  except ValueError as e:
    return str(e)
  if spec.granularity == "group" and q.shape[spec.group_axis] % spec.group_size:
    return f"group_size {spec.group_size} does not divide shape {q.shape}"
  fields = _qarray_fields(q)
  act = None if q.act is None else q.act.spec
  if ((q.zero_point is None) != spec.symmetric
      or (fields["act_scale"] is None) != (act is None)
      or (fields["act_zero_point"] is None) != (act is None
                                                or act.symmetric)):
    return "zero points or act scale do not fit its specs"
  scale = _scale_shape(q.shape, spec)
  act_shape = None if act is None else tuple(fields["act_scale"].shape)
  if act_shape is not None and len(act_shape) > len(q.shape):
    return f"act scale has shape {act_shape}, more axes than the weight"
  if q.in_scale is not None and (
      len(q.in_scale.shape) != len(q.shape)
      or any(n not in (1, d) for n, d in zip(q.in_scale.shape, q.shape))
      or not jnp.issubdtype(q.in_scale.dtype, jnp.floating)):
    return (f"in_scale has shape {tuple(q.in_scale.shape)} and dtype "
            f"{q.in_scale.dtype}, expected a float keepdims shape of "
            f"{q.shape}")
  want = {"values": (_values_shape(q.stored_shape, spec),
                     _values_dtype(spec)),
          "scale": (scale, None), "zero_point": (scale, None),
          "act_scale": (act_shape, None), "act_zero_point": (act_shape, None)}
  for name, (shape, dtype) in want.items():
    a = fields[name]
    if a is not None and tuple(a.shape) != shape:
      return f"{name} has shape {tuple(a.shape)}, expected {shape}"
    if a is not None and (a.dtype != dtype if dtype is not None else
                          not jnp.issubdtype(a.dtype, jnp.floating)):
      return f"{name} has dtype {a.dtype}, expected {dtype or 'a float'}"
  return None


def _values_shape(shape, spec) -> tuple:
  if not spec.packed:
    return tuple(shape)
  n = shape[-1] if shape else 1  # packing.pack stores a scalar as (1,)
  return tuple(shape[:-1]) + (packing.packed_length(n, spec.bits),)


def _values_dtype(spec) -> np.dtype:
  return jnp.dtype(jnp.uint8 if spec.packed else numerics.storage_dtype(spec))


def _scale_shape(shape, spec) -> tuple:
  if spec.granularity == "group":
    axis = spec.group_axis
    return shape[:axis] + (shape[axis] // spec.group_size,) + shape[axis + 1:]
  axes = numerics.reduction_axes(spec, len(shape))
  return tuple(1 if a in axes else d for a, d in enumerate(shape))


# Building the tree from its description, checking `like` on the way.


def _in_order_of(leaf, like):
  """A QArray `leaf` with its codes stored in `like`'s order (quantized on
  one machine, loaded for another: `QArray.order`)."""
  if isinstance(leaf, QArray) and isinstance(like, QArray) and (
      leaf.order != like.order):
    return with_order(leaf, like.order)
  return leaf


def _placed(leaf, like):
  """`leaf` with the sharding of `like` (an array, `ShapeDtypeStruct` or
  `QArray`, field by field), where `like` has one."""
  if isinstance(leaf, QArray) and isinstance(like, QArray):
    fields = {n: _placed(a, b) for (n, a), b in zip(
        _qarray_fields(leaf).items(), _qarray_fields(like).values())}
    act = leaf.act and dataclasses.replace(
        leaf.act, scale=fields["act_scale"],
        zero_point=fields["act_zero_point"])
    return dataclasses.replace(
        leaf, values=fields["values"], scale=fields["scale"],
        zero_point=fields["zero_point"], in_scale=fields["in_scale"], act=act)
  sharding = getattr(like, "sharding", None)
  if leaf is None or not isinstance(sharding, jax.sharding.Sharding) or (
      not isinstance(leaf, jax.Array)):
    return leaf
  return jax.device_put(leaf, sharding)


def _build_tree(d, like, leaves: dict, dry: bool):
  """The tree `d` describes; `dry`: checks only, with stub leaves."""
  leaves = dict(leaves)
  tree = _build(d, like, (), leaves, dry)
  if leaves:
    raise _Invalid(f"leaves outside the tree: {sorted(leaves)[:3]}")
  return tree


def _build(d, like, names, leaves: dict, dry: bool):
  kind = _get(d, "t", str)
  if kind == "leaf":
    if _path(names) not in leaves:
      raise _Invalid(f"{_where(names)}: no such leaf, or used twice")
    leaf = leaves.pop(_path(names))
    if like is not _ABSENT:
      _check_leaf(leaf, like, names)
      if not dry:
        leaf = _placed(_in_order_of(leaf, like), like)
    return leaf
  if kind in ("none", "scalar"):
    value = None if kind == "none" else _get(d, "v", bool, int, float, str)
    if like is not _ABSENT and type(like) is not type(value):
      raise _mismatch(names, f"the file holds {value!r:.40}, `like` "
                      f"{_what(like)}")
    return value
  if kind not in _BUILDERS:
    raise _Invalid(f"{_where(names)}: unknown node kind {kind!r:.40}")
  return _BUILDERS[kind](d, like, names, leaves, dry)


def _items(d, names_in, likes, names, leaves, dry) -> list:
  items = _get(d, "items", list)
  if len(items) != len(names_in):
    raise _Invalid(f"{_where(names)}: {len(items)} items, {len(names_in)} "
                   "names")
  return [_build(item, like, names + (name,), leaves, dry)
          for item, name, like in zip(items, names_in, likes)]


def _build_dict(d, like, names, leaves, dry):
  keys = _get(d, "keys", list)
  if not all(type(k) in (str, int) for k in keys) or len(set(keys)) != len(
      keys):
    raise _Invalid(f"{_where(names)}: bad dict keys")
  if like is not _ABSENT and (type(like) is not dict
                              or like.keys() != set(keys)):
    raise _mismatch(names, f"the file holds a dict with keys {keys[:8]}, "
                    f"`like` {_what(like)}")
  likes = [_ABSENT if like is _ABSENT else like[k] for k in keys]
  children = [key_name(jax.tree_util.DictKey(k)) for k in keys]
  return dict(zip(keys, _items(d, children, likes, names, leaves, dry)))


def _build_sequence(d, like, names, leaves, dry):
  kind, n = d["t"], len(_get(d, "items", list))
  if like is not _ABSENT and (type(like) not in (list, tuple)
                              or type(like).__name__ != kind or len(like) != n):
    raise _mismatch(names, f"the file holds a {kind} of {n} items, `like` "
                    f"{_what(like)}")
  likes = [_ABSENT] * n if like is _ABSENT else like
  items = _items(d, [str(i) for i in range(n)], likes, names, leaves, dry)
  return items if kind == "list" else tuple(items)


def _build_namedtuple(d, like, names, leaves, dry):
  name, fields = _get(d, "name", str), _get(d, "fields", list)
  if not all(isinstance(f, str) for f in fields):
    raise _Invalid(f"{_where(names)}: bad NamedTuple fields")
  if like is _ABSENT:
    try:
      cls = _namedtuple(name, tuple(fields))
    except ValueError as e:
      raise _Invalid(f"{_where(names)}: {e}") from e
  elif (isinstance(like, tuple) and type(like).__name__ == name
        and list(getattr(like, "_fields", ())) == fields):
    cls = type(like)
  else:
    raise _mismatch(names, f"the file holds a {name}{tuple(fields)}, `like` "
                    f"{_what(like)}")
  likes = [_ABSENT] * len(fields) if like is _ABSENT else like
  return cls(*_items(d, fields, likes, names, leaves, dry))


@functools.lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple):
  """One class per (name, fields), so that loaded trees compare equal."""
  return collections.namedtuple(name, fields)


def _build_node(d, like, names, leaves, dry):
  kind, keys = _get(d, "type", str), _get(d, "keys", list)
  if like is _ABSENT:
    raise ValueError(
        f"{_where(names)} is a {kind} node, which the file cannot rebuild (it "
        "holds data, not code): pass like= a tree of the same structure, "
        "e.g. the freshly initialised model or optimizer state")
  children = _children(like)
  if children is None or _type_name(like) != kind or [
      key_name(k) for k, _ in children] != keys:
    raise _mismatch(names, f"the file holds a {kind} with keys {keys[:8]}, "
                    f"`like` {_what(like)}")
  items = _items(d, keys, [c for _, c in children], names, leaves, dry)
  if dry:
    return None
  try:
    return _unflatten(like, items)
  except Exception as e:  # the node type's own checks refused the children
    raise _mismatch(names, f"{kind} refused the loaded children "
                    f"({type(e).__name__}: {e})") from e


_BUILDERS = {"dict": _build_dict, "list": _build_sequence,
             "tuple": _build_sequence, "namedtuple": _build_namedtuple,
             "node": _build_node}


def _check_leaf(got, want, names) -> None:
  """Raises unless leaf `got` (array or QArray) matches `like` leaf `want`."""
  if (_kind(got) != _kind(want) or tuple(got.shape) != tuple(want.shape)
      or got.dtype != want.dtype):
    raise _mismatch(names, f"the file holds {_what(got)}, `like` "
                    f"{_what(want)}")
  if not isinstance(got, QArray):
    return
  got_act, want_act = (q.act and q.act.spec for q in (got, want))
  if got.spec != want.spec or got_act != want_act:
    raise _mismatch(names, f"{_path(names)} was saved with a different "
                    f"QuantSpec ({got.spec}, act {got_act}; `like` has "
                    f"{want.spec}, act {want_act})")
  got_fields, want_fields = _qarray_fields(got), _qarray_fields(want)
  for name in _QFIELDS:
    a, b = got_fields[name], want_fields[name]
    if name == "values" and got.order != want.order:
      continue  # re-laid in `like`'s order (`_in_order_of`)
    if (a is None) != (b is None) or a is not None and (
        tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
      raise _mismatch(names, f"QArray {name} is {_what(a)} in the file, "
                      f"{_what(b)} in `like`")


def _kind(x) -> str:
  if isinstance(x, QArray):
    return "qarray"
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return "key" if _is_key(x) else "array"
  return "other"


def _what(x) -> str:
  kind = _kind(x)
  if kind == "qarray":
    return (f"a QArray ({x.spec.short()}) of shape {tuple(x.shape)}, "
            f"{jnp.dtype(x.dtype).name}")
  if kind in ("array", "key"):
    return f"a {x.dtype} array of shape {tuple(x.shape)}"
  return "None" if x is None else f"a {type(x).__name__}"


# Version 1: one checksummed msgpack tree, the arrays' bytes inline.


def _open_v1(f, digest: bytes):
  payload = f.read()
  if hashlib.sha256(payload).digest() != digest:
    raise _Invalid("checksum mismatch")
  leaves, chunks = [], []
  tree = _from_v1(_unpack(payload), (), leaves, chunks)
  sizes = [_nbytes(d, s) for p, entry in leaves
           for _, d, s in _plan(entry, p).arrays]
  if sizes != [len(c) for c in chunks]:
    raise _Invalid("array byte counts do not match their shapes")
  data = b"".join(chunks)
  return ({"tree": tree, "leaves": leaves},
          _Data(io.BytesIO(data), len(data), hashlib.sha256(), None))


def _from_v1(d, names, leaves, chunks) -> dict:
  """A version-1 entry as a version-2 description."""
  kind = _get(d, "t", str)
  if kind in ("array", "qarray"):
    leaves.append([_path(names), _leaf_from_v1(d, chunks)])
    return {"t": "leaf"}
  if kind == "scalar":
    v = _get(d, "value", bool, int, float, str, None)
    return {"t": "none"} if v is None else {"t": "scalar", "v": v}
  if kind == "dict":
    items = _get(d, "items", dict)
    return {"t": kind, "keys": list(items), "items": [
        _from_v1(v, names + (key_name(jax.tree_util.DictKey(k)),), leaves,
                 chunks) for k, v in items.items()]}
  if kind in ("list", "tuple"):
    return {"t": kind, "items": [
        _from_v1(v, names + (str(i),), leaves, chunks)
        for i, v in enumerate(_get(d, "items", list))]}
  raise _Invalid(f"{_where(names)}: unknown entry kind {kind!r:.40}")


def _leaf_from_v1(d, chunks) -> dict:
  def array(a):
    chunks.append(_get(a, "data", bytes))
    return {"dtype": _get(a, "dtype", str), "shape": _get(a, "shape", list)}

  if d["t"] == "array":
    return {"t": "array", **array(d)}
  return {"t": "qarray", "spec": d.get("spec"), "shape": d.get("shape"),
          "dtype": d.get("dtype"), "act_spec": d.get("act_spec"),
          "arrays": {n: array(d[n]) for n in _QFIELDS
                     if d.get(n) is not None}}
