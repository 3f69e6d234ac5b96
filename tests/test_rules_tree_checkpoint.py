"""Rules and quantize_tree (checkpoints: test_checkpoint.py)."""

import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq
import zoo


_params = zoo.param_tree
RECIPE = zoo.TREE_RECIPE


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
  optional = jq.Recipe([jq.Rule(r".*Conv_0/kernel", weight=jq.int8(), optional=True)])
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
