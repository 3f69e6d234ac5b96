"""The README's examples run and print what their comments claim.

Each python block under a README section is executed statement by statement
(`run_block`), keeping the value of every bare expression line, so the
tests can compare a line such as `q.values.dtype, q.scale.shape  # (int8,
(1, 128))` with the comment the README prints beside it. Blocks that use
names defined elsewhere (`params`, `model`, ...) get them from the block
they continue (the transform example's MLP) or from a small tree built
here. The analysis example (auto_recipe over 7 widths, figures written to
the working folder) is left to tests/test_analysis.py.
"""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def section_block(heading: str) -> str:
  """The first python block under the `## heading` section."""
  section = TEXT.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


NUMERICS = section_block("Numerics")
RULES = section_block("Rules, recipes and whole trees")
CHECKPOINTS = section_block("Checkpoints")
TRANSFORM = section_block("The transform engine: int8 inference and QAT for "
                          "an unmodified `apply`")
CALIBRATION = section_block("Calibration and static-range PTQ")


def run_block(code: str, namespace: dict | None = None):
  """Executes `code`; returns (namespace, {expression line: its value})."""
  ns = {} if namespace is None else namespace
  values = {}
  for stmt in ast.parse(code).body:
    source = ast.get_source_segment(code, stmt)
    if isinstance(stmt, ast.Expr):
      values[source] = eval(compile(ast.Expression(stmt.value), "README",
                                    "eval"), ns)
    else:
      exec(compile(ast.Module([stmt], []), "README", "exec"), ns)
  return ns, values


def claim(code: str, line_start: str) -> str:
  """The `# comment` of the line of `code` that starts with `line_start`."""
  (line,) = [l for l in code.splitlines() if l.startswith(line_start)]
  return line.split("#", 1)[1].strip()


def test_self_contained_blocks_are_the_ones_checked_here():
  starts_with_import = [b for b in re.findall(r"```python\n(.*?)```", TEXT,
                                              re.S) if b.startswith("import")]
  assert starts_with_import == [NUMERICS, TRANSFORM]


def test_numerics_example_prints_what_it_claims():
  ns, values = run_block(NUMERICS)
  x, q, x_hat = ns["x"], ns["q"], ns["x_hat"]

  dtype, shape = values["q.values.dtype, q.scale.shape"]
  assert (dtype, shape) == (jnp.int8, (1, 128))
  assert claim(NUMERICS, "q.values.dtype") == f"({dtype}, {shape})"

  # x_hat = q.dequantize()  # |x_hat - x| <= scale / 2
  assert claim(NUMERICS, "x_hat =") == "|x_hat - x| <= scale / 2"
  assert np.all(np.abs(x_hat - x) <= q.scale / 2 * (1 + 1e-6))

  values_shape, ratio = values["q4.values.shape, q4.nbytes / x.nbytes"]
  assert values_shape == (256, 64)  # 128 int4 columns, 2 per byte
  # 256 x 64 bytes of values + 8 groups x 128 float32 scales, over 4 x 256 x 128
  assert ratio == (256 * 64 + 8 * 128 * 4) / x.nbytes == 0.15625
  assert claim(NUMERICS, "q4.values.shape").startswith(
      f"({values_shape}, {ratio:.3f}: values + scales")

  asym = values["jq.quantize(x, jq.uint8())"]
  assert asym.values.dtype == jnp.uint8 and asym.zero_point is not None
  clipped = values['jq.quantize(x, jq.int8(granularity="tensor", '
                   'clip=(-3.0, 3.0)))'].dequantize()
  assert float(jnp.abs(x).max()) > 3.0
  np.testing.assert_allclose(float(jnp.abs(clipped).max()), 3.0, rtol=1e-6)
  mse = values['jq.quantize(x, jq.int2(clip="mse"))'].dequantize()
  absmax = jq.quantize(x, jq.int2()).dequantize()
  assert jq.sqnr_db(x, mse) > jq.sqnr_db(x, absmax) + 1.0  # "minimising"
  stochastic = values['jq.quantize(x, jq.int8(rounding="stochastic"), '
                      'key=jax.random.key(1))'].dequantize()
  assert np.all(np.abs(stochastic - x) <= q.scale * (1 + 1e-6))
  assert not np.array_equal(stochastic, x_hat)  # not round-to-nearest

  # fake_quant: forward = quantize -> dequantize, gradient straight through
  # (1 everywhere: absmax clipping clips nothing).
  np.testing.assert_array_equal(ns["y"],
                                jq.quantize(x, jq.int4()).dequantize())
  np.testing.assert_array_equal(ns["g"], np.ones(x.shape, np.float32))


def _small_tree():
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  return {"params": {
      "Embed_0": {"embedding": jax.random.normal(k1, (100, 64))},
      "Dense_0": {"kernel": jax.random.normal(k2, (64, 64)),
                  "bias": jnp.zeros(64)},
      "Dense_1": {"kernel": jax.random.normal(k3, (64, 10)),
                  "bias": jnp.zeros(10)}}}


@pytest.fixture(scope="module")
def rules_example():
  params = _small_tree()
  ns, values = run_block(RULES, {"jq": jq, "params": params})
  return params, ns, values


def test_rules_example_first_match_wins(rules_example):
  params, ns, values = rules_example
  q = ns["qparams"]["params"]
  # r".*embedding" -> weight=None: kept float, the same array.
  assert q["Embed_0"]["embedding"] is params["params"]["Embed_0"]["embedding"]
  # r".*Dense_0/kernel" matches before r".*kernel": int4, groups of 32.
  dense0 = q["Dense_0"]["kernel"]
  assert isinstance(dense0, jq.QArray)
  assert (dense0.spec.bits, dense0.spec.group_size) == (4, 32)
  assert dense0.values.shape == (64, 32)  # packed 2 per byte
  dense1 = q["Dense_1"]["kernel"]
  assert dense1.spec.bits == 8 and dense1.scale.shape == (1, 10)
  assert not isinstance(q["Dense_0"]["bias"], jq.QArray)  # no rule matches
  ratio = values["jq.nbytes(qparams) / jq.nbytes(params)"]
  expected = (100 * 64 * 4 + dense0.nbytes + dense1.nbytes
              + (64 + 10) * 4) / jq.nbytes(params)
  assert ratio == pytest.approx(expected)  # the float embedding dominates
  back = ns["float_params"]["params"]
  for name, qarray in (("Dense_0", dense0), ("Dense_1", dense1)):
    np.testing.assert_array_equal(back[name]["kernel"], qarray.dequantize())


def test_rules_example_unmatched_rule_lists_paths(rules_example):
  params, _, _ = rules_example
  with pytest.raises(ValueError, match="params/Dense_0/kernel"):
    jq.quantize_tree(params, jq.Recipe([jq.Rule(r".*conv.*",
                                                weight=jq.int8())]))
  optional = jq.Recipe([jq.Rule(r".*conv.*", weight=jq.int8(),
                                optional=True)])
  assert jq.quantize_tree(params, optional) is not None


def test_checkpoint_example_round_trips(rules_example, tmp_path,
                                        monkeypatch):
  _, ns, _ = rules_example
  monkeypatch.chdir(tmp_path)
  qparams = ns["qparams"]
  out, _ = run_block(CHECKPOINTS, {"jq": jq, "qparams": qparams})
  restored = out["restored"]
  assert (jax.tree_util.tree_structure(restored)
          == jax.tree_util.tree_structure(qparams))
  for got, want in zip(jax.tree_util.tree_leaves(restored),
                       jax.tree_util.tree_leaves(qparams)):
    np.testing.assert_array_equal(got, want)
  data = bytearray((tmp_path / "model.jq").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (tmp_path / "model.jq").write_bytes(bytes(data))
  with pytest.raises(ValueError):  # "A corrupt file ... raises ValueError"
    jq.load("model.jq", like=qparams)


@pytest.fixture(scope="module")
def transform_example():
  ns, values = run_block(TRANSFORM)
  return ns, values


def test_transform_example_runs_int8_and_trains(transform_example, capsys):
  ns, _ = transform_example
  model, params, qparams, x = (ns["model"], ns["params"], ns["qparams"],
                               ns["x"])
  # "nn.Dense kernel (in, out) -> scale (1, out)" (Flax names the Dense(10),
  # created first, Dense_0).
  for name, shape in (("Dense_0", (128, 10)), ("Dense_1", (64, 128))):
    kernel = qparams["params"][name]["kernel"]
    assert kernel.shape == shape and kernel.values.dtype == jnp.int8
    assert kernel.scale.shape == (1, shape[1])
  ref = model.apply(params, x)
  logits = ns["logits"]
  assert logits.shape == ref.shape == (32, 10)
  assert float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)) < 0.02
  # "s8 x s8 -> s32 dots": both Dense layers, before and after XLA.
  assert tuple(jq.int8_ops(ns["qapply"], qparams, x)) == (2, 2, 2)
  # print(jq.report(...))  # what ran how
  rep = jq.report(model.apply, qparams, ns["recipe"], x)
  assert rep.count("int8") == 2 and "2 int8, 0 weight-only, 0 float" in str(
      rep)
  # grads = jax.grad(...)(params)  # straight-through: float-like gradients
  grads, float_grads = ns["grads"], jax.grad(
      lambda p: model.apply(p, x).sum())(params)
  assert (jax.tree_util.tree_structure(grads)
          == jax.tree_util.tree_structure(params))
  for g, f in zip(jax.tree_util.tree_leaves(grads),
                  jax.tree_util.tree_leaves(float_grads)):
    assert np.all(np.isfinite(g))
    assert float(jnp.linalg.norm(g - f) / jnp.linalg.norm(f)) < 0.1


def test_calibration_example_gives_static_scales(transform_example):
  ns, _ = transform_example
  model, params, x = ns["model"], ns["params"], ns["x"]
  batches = [x, 2 * x]
  out, values = run_block(CALIBRATION, {"jq": jq, "jax": jax, "model": model,
                                        "params": params, "x": x,
                                        "batches": batches})
  table = str(out["stats"].table())
  assert "params/Dense_0/kernel" in table and "params/Dense_1/kernel" in table
  qparams = out["qparams"]
  for name in ("Dense_0", "Dense_1"):
    kernel = qparams["params"][name]["kernel"]
    # act=jq.uint8(): one static scale and zero point per weight.
    assert kernel.act.scale.shape == () and kernel.act.zero_point is not None
  ref = model.apply(params, x)
  got = out["qapply"](qparams, x)
  assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.02
  assert tuple(jq.int8_ops(out["qapply"], qparams, x)) == (2, 2, 2)
