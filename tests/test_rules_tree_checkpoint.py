"""Rules, quantize_tree and checkpoints."""

import os

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"params": {
      "embed": {"embedding": jax.random.normal(k[0], (50, 16))},
      "Dense_0": {"kernel": jax.random.normal(k[1], (16, 32)),
                  "bias": jnp.zeros(32)},
      "Dense_1": {"kernel": jax.random.normal(k[2], (32, 10)),
                  "bias": jnp.zeros(10)},
  }, "step": jnp.array(3, jnp.int32)}


RECIPE = jq.Recipe([
    jq.Rule(r".*embedding", weight=None),
    jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=8)),
    jq.Rule(r".*kernel", weight=jq.int8()),
])


def test_first_matching_rule_wins():
  assert RECIPE.weight_spec("params/Dense_0/kernel").bits == 4
  assert RECIPE.weight_spec("params/Dense_1/kernel").bits == 8
  assert RECIPE.weight_spec("params/embed/embedding") is None
  assert RECIPE.match("params/Dense_1/bias") is None


def test_quantize_tree_quantizes_matched_leaves_only():
  params = _params()
  q = jq.quantize_tree(params, RECIPE)
  d0, d1 = q["params"]["Dense_0"]["kernel"], q["params"]["Dense_1"]["kernel"]
  assert isinstance(d0, jq.QArray) and d0.spec.bits == 4
  assert d0.scale.shape == (2, 32)  # groups along the input axis
  assert isinstance(d1, jq.QArray) and d1.scale.shape == (1, 10)
  assert q["params"]["embed"]["embedding"] is params["params"]["embed"][
      "embedding"]
  assert q["step"] is params["step"]
  err = jnp.abs(jq.dequantize_tree(q)["params"]["Dense_1"]["kernel"]
                - params["params"]["Dense_1"]["kernel"])
  assert float(err.max()) <= float(d1.scale.max()) / 2 + 1e-6


def test_nbytes_counts_packed_storage():
  params = _params()
  q = jq.quantize_tree(params, RECIPE)
  saved = (16 * 32 * 4 - (16 * 32 // 2 + 2 * 32 * 4)) + (
      32 * 10 * 4 - (32 * 10 + 10 * 4))
  assert jq.nbytes(params) - jq.nbytes(q) == saved


def test_rule_matching_nothing_lists_available_paths():
  recipe = jq.Recipe([jq.Rule(r".*Conv_0/kernel", weight=jq.int8())])
  with pytest.raises(ValueError, match=r"(?s)'\.\*Conv_0/kernel' matches no "
                     r"parameter.*optional=True.*params/Dense_0/kernel"):
    jq.quantize_tree(_params(), recipe)
  optional = jq.Recipe([jq.Rule(r".*Conv_0/kernel", jq.int8(), optional=True)])
  jq.quantize_tree(_params(), optional)


def test_bad_rules_raise():
  with pytest.raises(ValueError, match="not a valid regex"):
    jq.Rule("(", weight=jq.int8())
  with pytest.raises(ValueError, match="weight must be a QuantSpec"):
    jq.Rule(".*", weight=8)
  with pytest.raises(ValueError, match="act= without weight="):
    jq.Rule(".*", act=jq.int8())


def test_bad_group_size_names_parameter_path():
  recipe = jq.Recipe([jq.Rule(r".*Dense_1/kernel", weight=jq.int4(
      group_size=5))])
  with pytest.raises(ValueError, match="params/Dense_1/kernel: group_size=5"):
    jq.quantize_tree(_params(), recipe)


def test_recipe_prints_readably():
  text = str(RECIPE)
  assert "Rule('.*Dense_0/kernel', weight=int4/g8, act=float)" in text


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
  q = jq.quantize_tree(_params(), jq.Recipe([
      jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=8)),
      jq.Rule(r".*Dense_1/kernel", weight=jq.uint8()),
      jq.Rule(r".*embedding", weight=jq.int2(granularity="tensor",
                                              clip="mse"))]))
  q["extra"] = [jnp.ones(3, jnp.bfloat16), (1, "a", None)]
  path = tmp_path / "model.jq"
  jq.save(path, q)
  restored = jq.load(path, like=q)
  chex.assert_trees_all_equal(restored, q)
  chex.assert_trees_all_equal_structs(restored, q)
  assert restored["params"]["Dense_1"]["kernel"].spec == q["params"][
      "Dense_1"]["kernel"].spec


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
  q = jq.quantize_tree(_params(), RECIPE)
  path = tmp_path / "model.jq"
  jq.save(path, q)
  blob = bytearray(path.read_bytes())
  blob[-10] ^= 0xFF
  bad = tmp_path / "bad.jq"
  bad.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="corrupt"):
    jq.load(bad)
  bad.write_bytes(b"PK\x03\x04 not ours")
  with pytest.raises(ValueError, match="not a jaxquant checkpoint"):
    jq.load(bad)
  other = jq.quantize_tree(_params(), jq.Recipe([jq.Rule(".*kernel", jq.int8())]))
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
