"""quantize_params(..., source=): abstract params, leaves read one by one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import zoo


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(32)(x)))


MODEL = MLP()
X = jax.random.normal(jax.random.key(1), (4, 16))
PARAMS = MODEL.init(jax.random.key(0), X)
ABSTRACT = jax.eval_shape(MODEL.init, jax.random.key(0), X)


def assert_trees_equal(a, b):
  la, lb = (jax.tree_util.tree_leaves(t) for t in (a, b))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rule", [
    dict(weight=jq.int8()), dict(weight=jq.int4(group_size=8)),
    dict(weight=jq.int8(), act=jq.int8(clip=(-3.0, 3.0)))])
def test_abstract_params_with_a_source_equal_the_concrete_run(rule):
  recipe = jq.Recipe([jq.Rule(r".*kernel", **rule)])
  read = []
  source = jq.sources.tree(jax.device_get(PARAMS))
  got = jq.quantize_params(MODEL.apply, ABSTRACT, recipe, X,
                           source=lambda p: read.append(p) or source(p))
  assert_trees_equal(got, jq.quantize_params(MODEL.apply, PARAMS, recipe, X))
  assert sorted(read) == sorted(p for p, _ in jq.tree.leaves_with_paths(
      PARAMS))  # each leaf read once, biases too


def test_a_method_with_stats_works_from_a_source():
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(),
                              method=jq.gptq())])
  stats = jq.calibrate(MODEL.apply, PARAMS, recipe, [X, 2 * X],
                       progress=False)
  got = jq.quantize_params(MODEL.apply, ABSTRACT, recipe, X, stats=stats,
                           source=jq.sources.tree(PARAMS), progress=False)
  assert_trees_equal(got, jq.quantize_params(
      MODEL.apply, PARAMS, recipe, X, stats=stats, progress=False))


def test_checkpoint_source_reads_leaf_by_leaf(tmp_path):
  path = tmp_path / "float.jq"
  jq.save(path, PARAMS)
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int4(group_size=8))])
  got = jq.quantize_params(MODEL.apply, jq.sources.abstract(PARAMS), recipe,
                           X, source=jq.sources.checkpoint(path))
  assert_trees_equal(got, jq.quantize_params(MODEL.apply, PARAMS, recipe, X))
  with pytest.raises(ValueError, match="no leaf 'params/nope'"):
    jq.sources.checkpoint(path)("params/nope")
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt.*checksum"):
    jq.sources.checkpoint(path)


def test_checkpoint_source_of_an_nnx_state(tmp_path):
  graphdef, state = nnx.split(zoo.NNXMLP(nnx.Rngs(0)))
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((4, 20))
  jq.save(tmp_path / "nnx.jq", state)  # leaves saved as '.../kernel/value'
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8())])
  got = jq.quantize_params(apply_fn, jq.sources.abstract(state), recipe, x,
                           source=jq.sources.checkpoint(tmp_path / "nnx.jq"))
  assert_trees_equal(got, jq.quantize_params(apply_fn, state, recipe, x))


def test_safetensors_source(tmp_path):
  safetensors = pytest.importorskip("safetensors.numpy")
  tensors = {p.replace("/", "."): np.asarray(a)
             for p, a in jq.tree.leaves_with_paths(PARAMS)}
  safetensors.save_file(tensors, tmp_path / "m.safetensors")
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8())])
  got = jq.quantize_params(
      MODEL.apply, ABSTRACT, recipe, X,
      source=jq.sources.safetensors(tmp_path / "m.safetensors"))
  assert_trees_equal(got, jq.quantize_params(MODEL.apply, PARAMS, recipe, X))
  with pytest.raises(ValueError, match="no tensor 'x.y'.*name="):
    jq.sources.safetensors(tmp_path / "m.safetensors")("x/y")


def test_bad_sources_name_the_leaf():
  recipe = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8())])
  with pytest.raises(ValueError, match="params/Dense_0/bias: params are "
                     "abstract.*source="):
    jq.quantize_params(MODEL.apply, ABSTRACT, recipe, X)
  wrong = lambda path: np.zeros((3,), np.float32)
  with pytest.raises(ValueError, match=r"params/Dense_0/bias: source gave "
                     r"shape \(3,\).*\(8,\) float32"):
    jq.quantize_params(MODEL.apply, ABSTRACT, recipe, X, source=wrong)
