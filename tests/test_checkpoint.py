"""jq.save / jq.load: every pytree, validated loads, durable writes."""

import copy
import dataclasses
import hashlib
import os
import re
import stat
import struct
import tempfile
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, strategies as st

import jaxquant as jq
import zoo
from jaxquant import checkpoint
from jaxquant.tree import leaves_with_paths

MAGIC = b"JAXQUANT"
PREFIX = len(MAGIC) + 1 + 32


# --------------------------------------------------------------------------
# helpers


_params = zoo.param_tree
RECIPE = zoo.TREE_RECIPE


def _canon(x, scalars=True):
  """`x` with NamedTuples as (name, fields, items) and, unless `scalars`,
  Python scalars as their type: what a load without `like` can compare."""
  if isinstance(x, tuple) and hasattr(x, "_fields"):
    return ("NamedTuple", type(x).__name__, x._fields,
            [_canon(v, scalars) for v in x])
  if type(x) in (dict, list, tuple):
    items = [(k, _canon(v, scalars)) for k, v in
             (x.items() if type(x) is dict else enumerate(x))]
    return dict(items) if type(x) is dict else type(x)(v for _, v in items)
  if not scalars and type(x) in (bool, int, float, str):
    return type(x).__name__
  return x


def _bits(x) -> bytes:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


def assert_bitwise_equal(got, want, scalars=True):
  """Same structure (QArray specs, shapes, dtypes included), same bits."""
  got_leaves, got_def = jax.tree_util.tree_flatten(_canon(got, scalars))
  want_leaves, want_def = jax.tree_util.tree_flatten(_canon(want, scalars))
  assert got_def == want_def
  for g, w in zip(got_leaves, want_leaves):
    if hasattr(w, "dtype"):
      assert (g.dtype, g.shape, _bits(g)) == (w.dtype, w.shape, _bits(w))
    elif type(w) is float:
      assert type(g) is float and struct.pack("<d", g) == struct.pack("<d", w)
    else:
      assert (type(g), g) == (type(w), w)


def _write_v1(path, tree):
  """A version-1 file, byte for byte as jaxquant 0.1.0 wrote it."""
  def array(x):
    a = np.asarray(x)
    return {"t": "array", "dtype": jnp.dtype(a.dtype).name,
            "shape": list(a.shape), "data": a.tobytes()}

  def encode(x):
    if isinstance(x, jq.QArray):
      opt = lambda a: None if a is None else array(a)
      spec = lambda s: None if s is None else dataclasses.asdict(s)
      return {"t": "qarray", "spec": spec(x.spec), "shape": list(x.shape),
              "dtype": jnp.dtype(x.dtype).name, "values": array(x.values),
              "scale": array(x.scale), "zero_point": opt(x.zero_point),
              "act_scale": opt(x.act and x.act.scale),
              "act_zero_point": opt(x.act and x.act.zero_point),
              "act_spec": spec(x.act and x.act.spec)}
    if isinstance(x, dict):
      return {"t": "dict", "items": {k: encode(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
      return {"t": type(x).__name__, "items": [encode(v) for v in x]}
    if x is None or isinstance(x, (bool, int, float, str)):
      return {"t": "scalar", "value": x}
    return array(x)

  payload = msgpack.packb(encode(tree), use_bin_type=True)
  with open(path, "wb") as f:
    f.write(MAGIC + bytes([1]) + hashlib.sha256(payload).digest() + payload)


def _split(blob: bytes):
  """(header, data) of a version-2 file."""
  n = int.from_bytes(blob[PREFIX:PREFIX + 8], "little")
  return msgpack.unpackb(blob[PREFIX + 8:PREFIX + 8 + n]), blob[
      PREFIX + 8 + n:]


def _join(header, data: bytes) -> bytes:
  """A version-2 file with a valid checksum."""
  head = msgpack.packb(header, use_bin_type=True)
  body = len(head).to_bytes(8, "little") + head + data
  version = MAGIC + bytes([2])
  return version + hashlib.sha256(version + body).digest() + body


# --------------------------------------------------------------------------
# round trips and the basic promises


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
  q = jq.quantize_tree(_params(), jq.Recipe([
      jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=8)),
      jq.Rule(r".*Dense_1/kernel", weight=jq.uint8()),
      jq.Rule(r".*embedding", weight=jq.int2(granularity="tensor",
                                              clip="mse"))]))
  q["extra"] = [jnp.ones(3, jnp.bfloat16), (1, "a", None, -0.0, True)]
  path = tmp_path / "model.jq"
  jq.save(path, q)
  assert_bitwise_equal(jq.load(path), q)
  assert_bitwise_equal(jq.load(path, like=q), q)


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
  q = jq.quantize_tree(_params(), RECIPE)
  path = tmp_path / "model.jq"
  jq.save(path, q)
  blob = bytearray(path.read_bytes())
  blob[-10] ^= 0xFF
  bad = tmp_path / "bad.jq"
  bad.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="corrupt.*checksum mismatch"):
    jq.load(bad)
  bad.write_bytes(b"PK\x03\x04 not ours")
  with pytest.raises(ValueError, match="not a jaxquant checkpoint"):
    jq.load(bad)
  other = jq.quantize_tree(_params(), jq.Recipe([
      jq.Rule(".*kernel", weight=jq.int8())]))
  with pytest.raises(ValueError, match="Dense_0/kernel was saved with a "
                     "different QuantSpec"):
    jq.load(path, like=other)
  smaller = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
  with pytest.raises(ValueError, match="does not match `like`"):
    jq.load(path, like=smaller)


def test_save_is_atomic_and_rejects_unknown_leaves(tmp_path):
  path = tmp_path / "x.jq"
  with pytest.raises(ValueError, match="a/b: cannot save a object"):
    jq.save(path, {"a": {"b": object()}})
  assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------
# 9. every pytree the engine takes


class Pair(NamedTuple):
  first: Any
  second: Any


class Single(NamedTuple):
  value: Any


def test_optax_state_round_trips_with_and_without_like(tmp_path):
  params = _params()["params"]
  bundle = {"params": jq.quantize_tree(params, RECIPE),
            "opt_state": optax.adam(1e-3).init(params), "step": 7}
  path = tmp_path / "train.jq"
  jq.save(path, bundle)
  exact = jq.load(path, like=bundle)
  assert_bitwise_equal(exact, bundle)
  assert type(exact["opt_state"][0]) is optax.ScaleByAdamState
  plain = jq.load(path)  # NamedTuples of the same names and fields
  assert_bitwise_equal(plain, bundle)
  assert plain["opt_state"][0]._fields == ("count", "mu", "nu")


def _eqx_arrays():
  model = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(1))
  arrays, static = eqx.partition(model, eqx.is_array)
  arrays = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[1].weight),
                       arrays, replace_fn=lambda w: jq.quantize(
                           w, jq.int4(group_size=2) if w.shape[0] == 8
                           and w.shape[1] == 6 else jq.int8()))
  return arrays, static


def test_equinox_module_round_trips_with_like(tmp_path):
  arrays, static = _eqx_arrays()
  assert isinstance(arrays.layers[0].weight, jq.QArray)
  path = tmp_path / "eqx.jq"
  jq.save(path, arrays)
  with pytest.raises(ValueError, match=r"the root is a equinox\..*MLP node, "
                     r"which the file cannot rebuild .*pass like="):
    jq.load(path)
  restored = jq.load(path, like=arrays)
  assert_bitwise_equal(restored, arrays)
  float_arrays = eqx.partition(eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(1)),
                               eqx.is_array)[0]
  with pytest.raises(ValueError, match="layers/0/weight: the file holds a "
                     "QArray"):
    jq.load(path, like=float_arrays)


def _nnx_state():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 6, rngs=rngs)
      self.out = nnx.Linear(6, 2, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)  # a PRNG key in the state

  state = nnx.state(Net(nnx.Rngs(0)))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jq.quantize(x, jq.int8()) if jax.tree_util.keystr(
          p, simple=True, separator="/") == "dense/kernel/value" else x, state)


def test_nnx_state_round_trips_with_like(tmp_path):
  state = _nnx_state()
  assert isinstance(state["dense"]["kernel"].get_value(), jq.QArray)
  path = tmp_path / "nnx.jq"
  jq.save(path, state)
  with pytest.raises(ValueError, match=r"the root is a flax\.nnx.*State node"):
    jq.load(path)
  restored = jq.load(path, like=state)
  assert type(restored) is type(state)
  assert type(restored["out"]["kernel"]) is nnx.Param
  assert_bitwise_equal(restored, state)


def test_linen_variables_round_trip(tmp_path):
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x))
      return nn.Dense(2)(x)

  variables = Net().init(jax.random.key(0), jnp.ones((1, 4)))
  q = jq.quantize_tree(variables, jq.Recipe([
      jq.Rule(".*kernel", weight=jq.int4(group_size=2))]))
  assert [p for p, _ in leaves_with_paths(q)][:3] == [
      "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var",
      "params/BatchNorm_0/bias"]
  path = tmp_path / "linen.jq"
  jq.save(path, q)
  assert_bitwise_equal(jq.load(path), q)
  assert_bitwise_equal(jq.load(path, like=q), q)


def test_every_width_and_granularity_round_trips(tmp_path):
  x = jax.random.normal(jax.random.key(2), (4, 6), jnp.bfloat16)
  combos = [(g, signed, sym) for g in ("tensor", "channel", "group")
            for signed in (True, False) for sym in (True, False)]
  # Widths cycle through 2..8 across the 12 granularity / sign / symmetry
  # combinations: every width and every combination at least once.
  tree = {f"{g}/{signed:d}{sym:d}": jq.quantize(x, jq.QuantSpec(
      bits=2 + i % 7, signed=signed, symmetric=sym, granularity=g,
      group_size=2 if g == "group" else None))
          for i, (g, signed, sym) in enumerate(combos)}
  tree["formats"] = [jq.quantize(x, jq.fp8_e4m3()),
                     jq.quantize(x, jq.fp8_e5m2(granularity="tensor")),
                     jq.quantize(x, jq.nf4(group_size=2))]
  path = tmp_path / "all.jq"
  jq.save(path, tree)
  assert_bitwise_equal(jq.load(path, like=tree), tree)


def test_prng_keys_and_64_bit_numpy_keep_their_bits(tmp_path):
  tree = {"key": jax.random.key(3, impl="rbg"),
          "f64": np.array([np.pi, -0.0, np.nan]), "u64": np.uint64(2**64 - 1)}
  jq.save(tmp_path / "k.jq", tree)
  assert_bitwise_equal(jq.load(tmp_path / "k.jq", like=tree), tree)


# --------------------------------------------------------------------------
# 10. QArray fields are validated on load


def _bad_qarrays():
  x = jax.random.normal(jax.random.key(4), (4, 8))
  ch, g4 = jq.quantize(x, jq.int8()), jq.quantize(x, jq.int4(group_size=2))
  asym, fp8 = jq.quantize(x, jq.uint8()), jq.quantize(x, jq.fp8_e4m3())
  r = dataclasses.replace
  return {
      "scale shape": (r(ch, scale=ch.scale.reshape(8, 1)),
                      r"scale has shape \(8, 1\), expected \(1, 8\)"),
      "group count": (r(g4, scale=g4.scale[:1]),
                      r"scale has shape \(1, 8\), expected \(2, 8\)"),
      "values shape": (r(g4, values=g4.values.reshape(8, 2)),
                       r"values has shape \(8, 2\), expected \(4, 4\)"),
      "unpacked int4": (r(g4, values=g4.int_values()),
                        r"values has shape \(4, 8\), expected \(4, 4\)"),
      "values dtype": (r(ch, values=ch.values.view(jnp.uint8)),
                       "values has dtype uint8, expected int8"),
      "int scale": (r(ch, scale=ch.scale.astype(jnp.int32)),
                    "scale has dtype int32, expected a float"),
      "no zero point": (r(asym, zero_point=None), "zero points"),
      "fp8 codes": (r(fp8, values=fp8.values.astype(jnp.float8_e5m2)),
                    "values has dtype float8_e5m2, expected float8_e4m3fn"),
      "int dtype": (r(ch, dtype=np.dtype(np.int32)),
                    "dtype int32 is not a float dtype"),
  }


@pytest.mark.parametrize("case", sorted(_bad_qarrays()))
def test_load_rejects_qarray_fields_that_disagree(tmp_path, case):
  q, problem = _bad_qarrays()[case]
  path = tmp_path / "bad.jq"
  _write_v1(path, {"w": q})
  with pytest.raises(ValueError, match=f"corrupt.*w: QArray {problem}"):
    jq.load(path)
  with pytest.raises(ValueError, match=f"cannot save w: QArray {problem}"):
    jq.save(tmp_path / "new.jq", {"w": q})


def test_load_rejects_a_rewritten_scale_shape(tmp_path):
  q = {"w": jq.quantize(jnp.ones((4, 8)), jq.int8())}
  jq.save(tmp_path / "m.jq", q)
  header, data = _split((tmp_path / "m.jq").read_bytes())
  header["leaves"][0][1]["arrays"]["scale"]["shape"] = [8, 1]
  (tmp_path / "m.jq").write_bytes(_join(header, data))
  with pytest.raises(ValueError, match=r"corrupt.*w: QArray scale has shape "
                     r"\(8, 1\)"):
    jq.load(tmp_path / "m.jq")


# --------------------------------------------------------------------------
# 11. QArray against float in `like`


def test_like_with_a_float_leaf_where_the_file_has_a_qarray_raises(tmp_path):
  params = _params()
  jq.save(tmp_path / "q.jq", jq.quantize_tree(params, RECIPE))
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: the file "
                     r"holds a QArray \(int4/g8\) of shape \(16, 32\), "
                     r"float32, `like` a float32 array"):
    jq.load(tmp_path / "q.jq", like=params)
  jq.save(tmp_path / "f.jq", params)
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: the file "
                     r"holds a float32 array of shape \(16, 32\), `like` a "
                     r"QArray \(int4/g8\)"):
    jq.load(tmp_path / "f.jq", like=jq.quantize_tree(params, RECIPE))


# --------------------------------------------------------------------------
# 12. durability and permissions


def test_save_fsyncs_the_file_then_renames_then_fsyncs_the_folder(
    tmp_path, monkeypatch):
  events = []
  fsync, replace = os.fsync, os.replace

  def record_fsync(fd):
    info = os.fstat(fd)
    events.append(("fsync", stat.S_ISDIR(info.st_mode), info.st_ino,
                   None if stat.S_ISDIR(info.st_mode) else info.st_size))
    fsync(fd)

  def record_replace(src, dst):
    events.append(("replace", os.path.dirname(src), os.fspath(dst)))
    replace(src, dst)

  monkeypatch.setattr(os, "fsync", record_fsync)
  monkeypatch.setattr(os, "replace", record_replace)
  path = tmp_path / "m.jq"
  jq.save(path, _params())
  written = path.stat()  # fsynced with every byte: flushed before
  folder = os.path.realpath(tmp_path)
  assert events == [("fsync", False, written.st_ino, written.st_size),
                    ("replace", folder, os.path.join(folder, "m.jq")),
                    ("fsync", True, tmp_path.stat().st_ino, None)]


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path,
                                                          monkeypatch):
  path = tmp_path / "m.jq"
  jq.save(path, {"a": jnp.ones(3)})
  before = path.read_bytes()

  def broken_disk(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", broken_disk)
  with pytest.raises(OSError, match="disk full"):
    jq.save(path, {"a": jnp.zeros(5)})
  assert os.listdir(tmp_path) == ["m.jq"] and path.read_bytes() == before


def test_save_keeps_an_existing_files_mode(tmp_path):
  path = tmp_path / "m.jq"
  path.write_bytes(b"")
  os.chmod(path, 0o640)
  jq.save(path, {"a": jnp.ones(3)})
  assert stat.S_IMODE(path.stat().st_mode) == 0o640
  umask = os.umask(0o027)
  try:
    jq.save(tmp_path / "new.jq", {"a": jnp.ones(3)})
  finally:
    os.umask(umask)
  assert stat.S_IMODE((tmp_path / "new.jq").stat().st_mode) == 0o640


# --------------------------------------------------------------------------
# 13. paths of keys with '/' in them


def test_a_slash_in_a_key_gets_its_own_path(tmp_path):
  tree = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(3)}, "c~": jnp.ones(1)}
  assert [p for p, _ in leaves_with_paths(tree)] == ["a/b", "a~1b", "c~0"]
  q = jq.quantize_tree(tree, jq.Recipe([jq.Rule("a/b", weight=jq.int8())]))
  assert isinstance(q["a"]["b"], jq.QArray)
  assert not isinstance(q["a/b"], jq.QArray)
  jq.save(tmp_path / "m.jq", tree)
  assert_bitwise_equal(jq.load(tmp_path / "m.jq", like=tree), tree)
  other = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(99)}, "c~": jnp.ones(1)}
  with pytest.raises(ValueError, match=r"a/b: the file holds a float32 array "
                     r"of shape \(3,\), `like` a float32 array of shape "
                     r"\(99,\)"):
    jq.load(tmp_path / "m.jq", like=other)


def test_paths_of_library_trees_are_unchanged():
  variables = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
  trees = {"linen": ({"params": {"Dense_0": variables["params"]}},
                     "params/Dense_0/bias"),
           "optax": (optax.adam(1e-3).init({"w": jnp.ones(2)}), "0/count"),
           "eqx": (_eqx_arrays()[0], "layers/0/weight"),
           "nnx": (_nnx_state(), "dense/bias"),
           "lists": ([(jnp.ones(1),)], "0/0")}
  for tree, first in trees.values():
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jq.tree.is_qarray)
    # jaxquant's paths: keystr's, less the trailing '/value' of NNX Variables.
    keystrs = [jax.tree_util.keystr(p, simple=True, separator="/")
               .removesuffix("/value") for p, _ in flat[0]]
    paths = [p for p, _ in leaves_with_paths(tree)]
    assert paths == keystrs and paths[0] == first


def test_keys_that_print_alike_are_refused(tmp_path):
  @jax.tree_util.register_pytree_with_keys_class
  class Twin:

    def __init__(self, a, b):
      self.a, self.b = a, b

    def tree_flatten_with_keys(self):
      keys = jax.tree_util.DictKey(1), jax.tree_util.DictKey("1")
      return tuple(zip(keys, (self.a, self.b))), None

    @classmethod
    def tree_unflatten(cls, aux, children):
      return cls(*children)

  twin = Twin(jnp.ones(1), jnp.zeros(1))
  with pytest.raises(ValueError, match=r"1: two leaves share this path "
                     r"\(\[1\] and \['1'\]\); rename one"):
    leaves_with_paths(twin)
  with pytest.raises(ValueError, match=r"1: two leaves share this path"):
    jq.save(tmp_path / "t.jq", twin)


# --------------------------------------------------------------------------
# 14. memory


def _status_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _peak_mib(fn):
  """(fn(), peak resident memory above the level before it, in MiB)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
  before = _status_mib("VmRSS")
  out = fn()
  return out, _status_mib("VmHWM") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="peak RSS reset needs Linux /proc")
def test_save_and_load_stream_large_leaves(tmp_path):
  jq.save(tmp_path / "warm.jq", {"w": jnp.ones(3)})  # imports and caches
  jq.load(tmp_path / "warm.jq")
  size = 64  # MiB
  big = {"w": jnp.ones((size, 1 << 18), jnp.float32), "b": jnp.zeros(3)}
  _, saving = _peak_mib(lambda: jq.save(tmp_path / "big.jq", big))
  loaded, loading = _peak_mib(lambda: jq.load(tmp_path / "big.jq"))
  assert saving <= 1.5 * size, saving
  assert loading <= 1.5 * size, loading  # the loaded array included
  assert _bits(loaded["w"]) == _bits(big["w"])


def test_accelerator_arrays_move_in_slices(tmp_path, monkeypatch):
  # On a GPU, np.asarray of a whole array keeps a host copy on the array,
  # and one whole transfer to the device stages a second host copy: both
  # directions go in slices. That path runs here on CPU, in 64-byte pieces.
  x = jax.random.normal(jax.random.key(6), (3, 40))
  tree = {"rows": x, "empty": jnp.zeros((0, 3)), "scalar": jnp.float32(2),
          "odd": x[:, :7].astype(jnp.bfloat16), "mask": x[0] > 0,
          "q": jq.quantize(x, jq.int4(group_size=3, granularity="group",
                                      group_axis=0)),
          "key": jax.random.key(7)}
  jq.save(tmp_path / "plain.jq", tree)
  writes = []
  put = checkpoint._put

  def spy(f, digest, data):
    writes.append(len(data))
    put(f, digest, data)

  monkeypatch.setattr(checkpoint, "_on_accelerator", lambda a: True)
  monkeypatch.setattr(checkpoint, "_put", spy)
  monkeypatch.setattr(checkpoint, "_CHUNK", 64)
  jq.save(tmp_path / "sliced.jq", tree)
  data = writes[1:]  # after the header
  assert max(data) <= 64 and len(data) > len(jax.tree.leaves(tree))
  assert (tmp_path / "sliced.jq").read_bytes() == (
      tmp_path / "plain.jq").read_bytes()
  joins, joined = [], checkpoint._joined
  monkeypatch.setattr(checkpoint, "_loads_to_accelerator", lambda: True)
  monkeypatch.setattr(checkpoint, "_joined", lambda shape, *parts: (
      joins.append(len(parts)), joined(shape, *parts))[1])
  assert_bitwise_equal(jq.load(tmp_path / "sliced.jq", like=tree), tree)
  assert joins and min(joins) > 1


# --------------------------------------------------------------------------
# format versions


def test_version_1_files_still_load(tmp_path):
  x = jax.random.normal(jax.random.key(5), (4, 8))
  tree = {"w": jq.quantize(x, jq.uint8()), "g": jq.quantize(
      x, jq.int4(group_size=4)), "a/b": [jnp.ones(2, jnp.float16),
                                         (1, "s", None, 2.5)]}
  _write_v1(tmp_path / "v1.jq", tree)
  assert_bitwise_equal(jq.load(tmp_path / "v1.jq", like=tree), tree)


def test_unknown_versions_raise(tmp_path):
  jq.save(tmp_path / "m.jq", {"a": jnp.ones(2)})
  blob = bytearray((tmp_path / "m.jq").read_bytes())
  assert blob[len(MAGIC)] == 2
  blob[len(MAGIC)] = 3
  (tmp_path / "m.jq").write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="format version 3; this jaxquant "
                     "reads versions 1 to 2: upgrade jaxquant"):
    jq.load(tmp_path / "m.jq")


# --------------------------------------------------------------------------
# properties


@st.composite
def float_arrays(draw, shape=None):
  dtype = jnp.dtype(draw(st.sampled_from(["float32", "float16", "bfloat16"])))
  if shape is None:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
  raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                       max_size=int(np.prod(shape)) * dtype.itemsize))
  return jnp.asarray(np.frombuffer(raw, dtype).reshape(shape))


@st.composite
def other_arrays(draw):
  dtype = draw(st.sampled_from(["int8", "uint8", "int32", "bool"]))
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
  values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(
      0, 2 if dtype == "bool" else 127, shape)
  return jnp.asarray(values.astype(dtype))


@st.composite
def qarrays(draw):
  granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
  fmt = draw(st.sampled_from(["int"] * 3 + ["fp8_e4m3", "fp8_e5m2", "nf4"]))
  bits, signed, symmetric = (
      (draw(st.integers(2, 8)), draw(st.booleans()), draw(st.booleans()))
      if fmt == "int" else (4 if fmt == "nf4" else 8, True, True))
  spec = jq.QuantSpec(bits=bits, signed=signed, symmetric=symmetric,
                      granularity=granularity, format=fmt,
                      group_size=2 if granularity == "group" else None)
  shape = draw(st.sampled_from([(4,), (2, 3), (2, 4, 3)] if granularity
                               != "group" else [(4,), (4, 3), (2, 2, 3)]))
  x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(
      size=shape)
  q = jq.quantize(jnp.asarray(x, draw(st.sampled_from(
      ["float32", "bfloat16", "float16"]))), spec)
  if draw(st.booleans()):  # a static activation range, as from calibration
    act = jq.QuantSpec(signed=draw(st.booleans()),
                       symmetric=draw(st.booleans()), granularity="tensor")
    q = dataclasses.replace(q, act=jq.ActQuant(
        jnp.float32(0.5), None if act.symmetric else jnp.float32(3), act))
  return q


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(), st.text(max_size=4))
keys = st.text(alphabet="ab/~_", max_size=3)
trees = st.recursive(
    st.one_of(float_arrays(), other_arrays(), qarrays(), scalars),
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children), st.builds(Single, children)),
    max_leaves=6)


@given(tree=trees)
def test_random_trees_round_trip_bit_for_bit(tree):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "t.jq")
    jq.save(path, tree)
    assert_bitwise_equal(jq.load(path, like=tree), tree)
    assert_bitwise_equal(jq.load(path), tree)


def _slots(x, out):
  """(container, key) of every value in a decoded header, scalars' values
  aside: those are data, and a file with another one is another file."""
  items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(
      x, list) else ()
  for k, v in items:
    if not (isinstance(x, dict) and x.get("t") == "scalar" and k == "v"):
      out.append((x, k))
      _slots(v, out)
  return out


replacements = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
    st.text(max_size=6), st.binary(max_size=6),
    st.lists(st.integers(-2, 2**40), max_size=4), st.just({}),
    st.sampled_from(["float32", "int8", "uint8", "bfloat16", "qarray",
                     "array", "key", "leaf", "node", "dict", "tuple", "list",
                     "namedtuple", "none", "scalar", "group", "tensor",
                     "channel", "values", "scale", "zero_point"]))


def _mutate(blob: bytes, data):
  """The file with one random change: bytes (the checksum left stale) or a
  header field (the checksum made valid again)."""
  kind = data.draw(st.sampled_from(["flip", "cut", "insert", "field",
                                    "field", "field"]))
  at = data.draw(st.integers(0, len(blob) - 1))
  if kind == "flip":
    return blob[:at] + bytes([blob[at] ^ data.draw(st.integers(1, 255))]) + \
        blob[at + 1:], False
  if kind == "cut":
    return blob[:at], False
  if kind == "insert":
    return blob[:at] + data.draw(st.binary(min_size=1, max_size=9)) + \
        blob[at:], False
  header, rest = _split(blob)
  slots = _slots(header, [])
  if header["leaves"] and data.draw(st.booleans()):  # aim at the leaves
    slots = _slots(header["leaves"], [])
  container, key = slots[data.draw(st.integers(0, len(slots) - 1))]
  if isinstance(container, dict) and data.draw(st.booleans()):
    del container[key]
  else:
    container[key] = copy.deepcopy(data.draw(st.one_of(
        replacements, st.sampled_from([c[k] for c, k in slots]))))
  return _join(header, rest), True


@given(tree=trees, data=st.data())
def test_mutated_files_load_the_original_or_raise(tree, data):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "t.jq")
    jq.save(path, tree)
    with open(path, "rb") as f:
      blob, field = _mutate(f.read(), data)
    with open(path, "wb") as f:
      f.write(blob)
    for like in (tree, None):
      try:
        got = jq.load(path, like=like)
      except ValueError:
        continue
      if not field:
        assert_bitwise_equal(got, tree)
      elif like is not None:  # with a valid checksum, `like` catches the rest
        assert_bitwise_equal(got, tree, scalars=False)
