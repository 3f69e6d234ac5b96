"""The transform's parts, each against a brute-force or NumPy reference.

- `layout.reshape_groups`: the finest pairing of contiguous dims with equal
  products, against an enumeration of every pairing;
- the layout rules (`interpreter.RULES[primitive]`): moving a keepdims scale
  through transpose / reshape / broadcast / squeeze / slice / dynamic_slice
  equals the op applied to the fully broadcast scale, and the `AxisMap`
  names exactly the parameter axes each output dimension is indexed by;
- `analysis._knapsack` (auto_recipe's multiple-choice knapsack) against
  every combination of choices;
- the trace cache: `quantized_apply` / `fake_quant_apply` trace the user's
  function once per abstract signature (`chex.assert_max_traces`).
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jaxquant as jq
import zoo
from jaxquant.analysis import _knapsack
from jaxquant.transform import RULES, LayoutRule, identity_map
from jaxquant.transform.layout import reshape_groups

# ------------------------------------------------------------ reshape_groups


@st.composite
def reshapes(draw, max_dims=5):
  """(old, new): two shapes with the same product, built by grouping a list
  of factors in order (old) and the same factors shuffled (new), with size-1
  dims sprinkled in."""
  factors = draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_dims))

  def shape(fs):
    cuts = draw(st.lists(st.booleans(), min_size=len(fs) - 1,
                         max_size=len(fs) - 1))
    dims, current = [], fs[0]
    for f, cut in zip(fs[1:], cuts):
      if cut:
        dims.append(current)
        current = f
      else:
        current *= f
    dims.append(current)
    for _ in range(draw(st.integers(0, 2))):
      dims.insert(draw(st.integers(0, len(dims))), 1)
    return tuple(dims)

  return shape(factors), shape(draw(st.permutations(factors)))


def compositions(n: int):
  """Every split of range(n) into contiguous non-empty runs."""
  for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
    runs, run = [], [0]
    for i, cut in enumerate(cuts, start=1):
      if cut:
        runs.append(tuple(run))
        run = []
      run.append(i)
    runs.append(tuple(run))
    yield runs


def finest_pairing_size(old, new) -> int:
  """Brute force: the most groups of any pairing of contiguous runs of old
  and new dims (run k with run k) with equal products."""
  best = 0
  for a in compositions(len(old)):
    for b in compositions(len(new)):
      if len(a) == len(b) and all(
          math.prod(old[i] for i in ga) == math.prod(new[j] for j in gb)
          for ga, gb in zip(a, b)):
        best = max(best, len(a))
  return best


@given(reshapes())
def test_reshape_groups_is_the_finest_pairing(shapes):
  old, new = shapes
  groups = reshape_groups(old, new)
  # A pairing of contiguous runs covering every dim, in order...
  assert [i for gi, _ in groups for i in gi] == list(range(len(old)))
  assert [j for _, gj in groups for j in gj] == list(range(len(new)))
  for gi, gj in groups:
    assert gi and gj  # both shapes are non-empty here
    assert math.prod(old[i] for i in gi) == math.prod(new[j] for j in gj)
  # ... with as many groups as any such pairing has.
  assert len(groups) == finest_pairing_size(old, new), groups
  # NumPy: the reshape factorises over the groups.
  x = np.arange(math.prod(old)).reshape(old)
  blocks = [math.prod(old[i] for i in gi) for gi, _ in groups]
  np.testing.assert_array_equal(x.reshape(blocks),
                                x.reshape(new).reshape(blocks))


def test_reshape_groups_examples():
  assert reshape_groups((2, 3, 4), (6, 4)) == [((0, 1), (0,)), ((2,), (1,))]
  assert reshape_groups((2, 3), (3, 2)) == [((0, 1), (0, 1))]
  assert reshape_groups((6, 1), (6,)) == [((0, 1), (0,))]  # trailing 1 joins
  assert reshape_groups((1, 1), ()) == [((0, 1), ())]  # to a scalar
  assert reshape_groups((), (1,)) == [((), (0,))]
  assert reshape_groups((), ()) == []


# ------------------------------------------------------------- layout rules


def _eqn(fn, x, name):
  """The equation of primitive `name` in the jaxpr of `fn(x)`, or None
  when JAX skipped a no-op (e.g. the identity permutation)."""
  eqns = [e for e in jax.make_jaxpr(fn)(x).eqns if e.primitive.name == name]
  assert len(eqns) <= 1
  return eqns[0] if eqns else None


def check_layout_rule(fn, name, in_shape, varies, others=(), exact=True):
  """Checks RULES[name] on the op of `fn`, for a keepdims scale that has the
  full size on the axes where `varies` and size 1 elsewhere.

  The AxisMap must list every input axis an output dimension is indexed by;
  with `exact`, no other (a reshape lists every axis of a merged group on
  every dimension the group becomes). Returns False when the rule declines
  to move the scale (None).
  """
  rule = RULES[name]
  assert isinstance(rule, LayoutRule)
  x = jnp.zeros(in_shape, jnp.float32)
  eqn = _eqn(fn, x, name)
  if eqn is None:  # no such op was emitted: fn is the identity
    assert fn(x).shape == x.shape
    return True
  out_shape = tuple(eqn.outvars[0].aval.shape)

  # The AxisMap: output dim k lists the input axes it is indexed by.
  axes = rule.axes(eqn.params, identity_map(len(in_shape)), in_shape,
                   out_shape)
  assert len(axes) == len(out_shape)
  for a, size in enumerate(in_shape):
    index = np.broadcast_to(
        np.arange(size, dtype=np.float32).reshape(
            [size if d == a else 1 for d in range(len(in_shape))]), in_shape)
    moved = np.asarray(fn(jnp.asarray(index)))
    for k in range(len(out_shape)):
      varies_along_k = moved.size and np.ptp(moved, axis=k).max() > 0
      if varies_along_k:
        assert a in axes[k], (name, eqn.params, a, k, axes)
      elif a in axes[k] and exact:
        assert size == 1 or out_shape[k] == 1, (name, eqn.params, a, k, axes)

  # The keepdims scale, moved, equals the op on the broadcast scale.
  rng = np.random.default_rng(len(in_shape))
  scale_shape = tuple(d if v else 1 for d, v in zip(in_shape, varies))
  scale = rng.uniform(1.0, 2.0, scale_shape).astype(np.float32)
  expected = np.asarray(fn(jnp.asarray(np.broadcast_to(scale, in_shape))))
  moved = rule.scale(eqn.params, jnp.asarray(scale), in_shape, out_shape,
                     list(others))
  if moved is None:
    return False
  assert moved.ndim == len(out_shape)
  assert all(m in (1, o) for m, o in zip(moved.shape, out_shape)), (
      moved.shape, out_shape)
  np.testing.assert_array_equal(np.broadcast_to(moved, out_shape), expected)
  return True


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def varies_for(shape):
  return st.lists(st.booleans(), min_size=len(shape), max_size=len(shape))


@given(st.data())
def test_transpose_moves_scales_and_axes(data):
  shape = data.draw(shapes)
  perm = tuple(data.draw(st.permutations(range(len(shape)))))
  assert check_layout_rule(lambda x: lax.transpose(x, perm), "transpose",
                           shape, data.draw(varies_for(shape)))


@given(reshapes(max_dims=4), st.data())
def test_reshape_moves_scales_and_axes(shapes_, data):
  old, new = shapes_
  varies = data.draw(varies_for(old))
  moved = check_layout_rule(lambda x: x.reshape(new), "reshape", old, varies,
                            exact=False)
  # It declines exactly when a group merges a varying dim with a constant
  # one (then the scale would need the full size there).
  mixed = any(len({varies[i] for i in gi if old[i] != 1}) > 1
              for gi, _ in reshape_groups(old, new))
  assert moved != mixed


@given(st.data())
def test_broadcast_in_dim_moves_scales_and_axes(data):
  shape = data.draw(st.lists(st.integers(1, 3), max_size=3).map(tuple))
  out_ndim = data.draw(st.integers(max(1, len(shape)), len(shape) + 2))
  dims = tuple(sorted(data.draw(st.lists(
      st.integers(0, out_ndim - 1), min_size=len(shape), max_size=len(shape),
      unique=True))))
  out = [data.draw(st.integers(1, 3)) for _ in range(out_ndim)]
  for i, d in enumerate(dims):
    if shape[i] != 1:
      out[d] = shape[i]
  out = tuple(out)
  assert check_layout_rule(lambda x: lax.broadcast_in_dim(x, out, dims),
                           "broadcast_in_dim", shape,
                           data.draw(varies_for(shape)))


@given(st.data())
def test_squeeze_moves_scales_and_axes(data):
  shape = data.draw(st.lists(st.integers(1, 3), min_size=1,
                             max_size=4).map(tuple))
  shape = shape + (1,) if 1 not in shape else shape
  ones = [d for d, s in enumerate(shape) if s == 1]
  dims = tuple(data.draw(st.lists(st.sampled_from(ones), min_size=1,
                                  unique=True)))
  assert check_layout_rule(lambda x: lax.squeeze(x, dims), "squeeze", shape,
                           data.draw(varies_for(shape)))


@given(st.data())
def test_slice_moves_scales_and_axes(data):
  shape = data.draw(shapes)
  start = [data.draw(st.integers(0, s - 1)) for s in shape]
  limit = [data.draw(st.integers(b + 1, s)) for b, s in zip(start, shape)]
  strides = [data.draw(st.integers(1, 3)) for _ in shape]
  assert check_layout_rule(lambda x: lax.slice(x, start, limit, strides),
                           "slice", shape, data.draw(varies_for(shape)))


@given(st.data())
def test_dynamic_slice_moves_scales_and_axes(data):
  shape = data.draw(shapes)
  sizes = [data.draw(st.integers(1, s)) for s in shape]
  # Starts may be out of range: dynamic_slice clamps them, scale and value
  # alike.
  starts = [data.draw(st.integers(0, s + 1)) for s in shape]
  index = [jnp.int32(i) for i in starts]
  assert check_layout_rule(lambda x: lax.dynamic_slice(x, index, sizes),
                           "dynamic_slice", shape,
                           data.draw(varies_for(shape)), others=index)


def test_casts_and_copies_keep_scales_and_axes():
  """A cast changes the values' dtype, not where they are: the scale (kept
  in float32) and the AxisMap pass through unchanged."""
  x = jnp.zeros((2, 3), jnp.float32)
  eqn = _eqn(lambda x: x.astype(jnp.bfloat16), x, "convert_element_type")
  scale = jnp.arange(3, dtype=jnp.float32).reshape(1, 3)
  for name in ("convert_element_type", *(n for n in ("copy", "copy_p")
                                        if n in RULES)):
    rule = RULES[name]
    assert rule.regroups is False
    assert rule.scale(eqn.params, scale, (2, 3), (2, 3), []) is scale
    assert rule.axes(eqn.params, identity_map(2), (2, 3),
                     (2, 3)) == identity_map(2)


# ----------------------------------------------------------------- knapsack


@st.composite
def knapsack_options(draw, max_size):
  paths = draw(st.integers(1, 4))
  return {f"layer{p}": [(f"layer{p}-option{o}",
                         draw(st.integers(0, max_size)),
                         float(draw(st.integers(0, 50))))
                        for o in range(draw(st.integers(1, 4)))]
          for p in range(paths)}


def brute_force(options, budget):
  """The least summed drop over every choice with summed size <= budget."""
  best = None
  for choice in itertools.product(*options.values()):
    if sum(size for _, size, _ in choice) <= budget:
      drop = sum(d for _, _, d in choice)
      best = drop if best is None else min(best, drop)
  return best


def totals(options, choice):
  picked = [next(o for o in options[path] if o[0] == spec)
            for path, spec in choice.items()]
  return sum(o[1] for o in picked), sum(o[2] for o in picked)


@given(knapsack_options(max_size=400), st.integers(-5, 1000))
def test_knapsack_is_exact_for_budgets_up_to_1000(options, budget):
  """Up to 1000 bytes the DP counts single bytes: the exact optimum."""
  choice = _knapsack(options, budget)
  best = brute_force(options, budget)
  if best is None or budget <= 0:
    assert choice is None or totals(options, choice) == (0, 0.0)
    return
  assert set(choice) == set(options)
  size, drop = totals(options, choice)
  assert size <= budget and drop == best


@given(knapsack_options(max_size=200_000), st.integers(1001, 400_000))
def test_knapsack_within_its_rounding_for_large_budgets(options, budget):
  """Above 1000 bytes sizes are counted in units of ceil(budget / 1000),
  rounded up: the choice always fits, and it is at least as good as the
  optimum for the budget less one unit per layer."""
  unit = math.ceil(budget / 1000)
  choice = _knapsack(options, budget)
  slack = brute_force(options, budget - unit * len(options))
  if choice is None:
    assert slack is None
    return
  size, drop = totals(options, choice)
  assert size <= budget
  assert drop >= brute_force(options, budget)
  if slack is not None:
    assert drop <= slack


# -------------------------------------------------------------- trace cache

W8A8 = jq.Recipe([jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())])


@pytest.fixture
def mlp():
  model = zoo.MLP()
  x = jax.random.normal(jax.random.key(0), (8, 20))
  params = model.init(jax.random.key(1), x)
  return model, params, x


def _counting(apply_fn, n):
  """`apply_fn` that fails on its n+1-st trace, and a list of its traces."""
  traces = []

  def counted(params, x):
    if isinstance(x, jax.core.Tracer):  # a trace, not a call on arrays
      traces.append(x.shape)
    return apply_fn(params, x)

  return chex.assert_max_traces(counted, n=n), traces


def test_jitted_quantized_apply_traces_the_model_once(mlp):
  model, params, x = mlp
  chex.clear_trace_counter()
  qparams = jq.quantize_params(model.apply, params, W8A8, x)
  apply_fn, traces = _counting(model.apply, n=1)
  qapply = jax.jit(jq.quantized_apply(apply_fn, W8A8))
  first = qapply(qparams, x)
  for _ in range(3):
    np.testing.assert_array_equal(qapply(qparams, x), first)
  assert traces == [(8, 20)]
  with pytest.raises(ValueError, match="traced > 1 times"):
    qapply(qparams, x[:3])  # a new shape: traced again (chex's error, wrapped)


def test_quantized_apply_caches_its_trace_per_shape(mlp):
  """Without jax.jit, the engine's own cache: one trace per signature."""
  model, params, x = mlp
  chex.clear_trace_counter()
  qparams = jq.quantize_params(model.apply, params, W8A8, x)
  apply_fn, traces = _counting(model.apply, n=2)
  qapply = jq.quantized_apply(apply_fn, W8A8)
  for batch in (x, x, x[:3], x, x[:3], x):
    qapply(qparams, batch)
  assert traces == [(8, 20), (3, 20)]


def test_fake_quant_training_step_traces_the_model_once(mlp):
  model, params, x = mlp
  chex.clear_trace_counter()
  apply_fn, traces = _counting(model.apply, n=1)
  qat_apply = jq.fake_quant_apply(apply_fn, W8A8)
  y = jnp.zeros(8, jnp.int32)

  @jax.jit
  def step(p):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        qat_apply(p, x), y).mean()
    return jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p,
                                  jax.grad(loss)(p))

  for _ in range(3):
    params = step(params)
  assert traces == [(8, 20)]
