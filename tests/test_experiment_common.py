"""experiments/common.py: the script skeleton, the training loop, the
batching, the timing helpers and the console output."""

import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common


def test_parser_has_the_three_shared_options_and_more():
  p = common.parser("Title line.\n\nMore text.", "thing", quick="tiny")
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args([])
  assert (args.quick, args.out, args.seed, args.rounds) == (False, None, 0,
                                                            7)
  args = p.parse_args(["--quick", "--out", "d", "--seed", "3"])
  assert (args.quick, args.out, args.seed) == (True, "d", 3)
  assert p.description == "Title line."
  assert "results/thing" in p.format_help()


def test_main_runs_publishes_and_returns_the_report(tmp_path, capsys):
  drawn = []

  def run(args):
    return {"seed": args.seed, "rows": [{"a": 1.0}], "_object": object()}

  def figures(report):
    return {"plot.png": lambda path: drawn.append(path)}

  report = common.main("thing", lambda: common.parser("T.", "thing"), run,
                       lambda r: f"# md {r['seed']}\n", figures,
                       ["--seed", "5", "--out", str(tmp_path)])
  assert report["seed"] == 5 and "_object" in report
  assert (tmp_path / "results.md").read_text() == "# md 5\n"
  assert json.loads((tmp_path / "results.json").read_text()) == {
      "seed": 5, "rows": [{"a": 1.0}]}  # `_` keys stay out of the JSON
  assert drawn == [tmp_path / "plot.png"]
  out = capsys.readouterr().out
  assert out.startswith("# md 5\n") and "results.md, results.json, plot.png" in out


def test_shuffled_batches_drop_or_carry_the_remainder():
  x, y = np.arange(10), np.arange(10) * 10
  batches = common.shuffled_batches(x, y, 4, seed=0)
  first = [next(batches) for _ in range(4)]  # 2 per epoch, 2 left over
  rng = np.random.default_rng(0)
  for epoch in range(2):
    order = rng.permutation(10)
    for i in range(2):
      xb, yb = first[2 * epoch + i]
      np.testing.assert_array_equal(xb, order[4 * i:4 * i + 4])
      np.testing.assert_array_equal(yb, xb * 10)
  carried = common.shuffled_batches(x, y, 4, seed=0, carry_over=True)
  seen = np.concatenate([next(carried)[0] for _ in range(5)])  # 2 epochs
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(seen, np.concatenate(
      [rng.permutation(10), rng.permutation(10)]))


def test_train_minimises_the_loss_and_lr_scales_the_update():
  """Least squares by Adam; `lr` multiplies the update each step."""
  x = jax.random.normal(jax.random.key(0), (64, 3))
  w_true = jnp.array([[1.0], [-2.0], [0.5]])
  y = x @ w_true
  apply_fn = lambda p, x: x @ p["w"]
  mse = lambda out, y: jnp.mean((out - y) ** 2)
  params = {"w": jnp.zeros((3, 1))}

  def batches():
    while True:
      yield x, y

  trained, losses = common.train(apply_fn, params, batches(),
                                 tx=optax.adam(0.1), steps=200, loss=mse)
  assert len(losses) == 200 and losses[-1] < 1e-3 * losses[0]
  np.testing.assert_allclose(trained["w"], w_true, atol=0.02)
  # lr = 0 at every step: nothing moves (the loss is still recorded).
  same, losses = common.train(apply_fn, params, batches(), tx=optax.sgd(1.0),
                              steps=3, loss=mse, lr=lambda t: 0.0)
  np.testing.assert_array_equal(same["w"], params["w"])
  assert losses == [pytest.approx(float(mse(apply_fn(params, x), y)))] * 3
  # One SGD step with lr 0.5 on tx = sgd(1.0) is one SGD step of 0.5.
  half, _ = common.train(apply_fn, params, batches(), tx=optax.sgd(1.0),
                         steps=1, loss=mse, lr=0.5)
  grad = jax.grad(lambda p: mse(apply_fn(p, x), y))(params)["w"]
  np.testing.assert_allclose(half["w"], -0.5 * grad, rtol=1e-6)


def test_time_rounds_and_median_ratios():
  calls = []
  variants = {"float": (lambda v: calls.append("f") or v, (jnp.ones(3),)),
              "other": (lambda v: calls.append("o") or v, (jnp.ones(3),))}
  times = common.time_rounds(variants, rounds=3, calls=2, seed=0)
  assert set(times) == {"float", "other"}
  assert all(len(t) == 3 and all(s > 0 for s in t) for t in times.values())
  assert calls.count("f") == calls.count("o") == 1 + 3 * 2  # warm-up + timed
  calls.clear()  # warmup=False: the timed calls only
  common.time_rounds(variants, rounds=1, calls=2, seed=0, warmup=False)
  assert calls.count("f") == calls.count("o") == 2
  ratios = common.median_ratios({"float": [1.0, 2.0, 4.0],
                                 "other": [3.0, 2.0, 2.0]})
  assert ratios == {"float": 1.0, "other": 1.0}  # median of (3, 1, 0.5)
  assert common.median_ratios({"float": [2.0], "x": [1.0]})["x"] == 0.5


def test_timer_records_wall_and_cpu_seconds():
  timer = common.Timer()
  with timer("work"):
    sum(i * i for i in range(200_000))
  assert timer.wall["work"] > 0 and timer.cpu["work"] >= 0


def test_log_clears_an_open_bar_first(monkeypatch):
  """On a terminal (stdout and stderr the same screen), a result printed
  while a bar is open gets a line of its own: the bar is erased first and
  redrawn below; at the end the bar is erased (`leave=False`)."""
  screen = io.StringIO()
  monkeypatch.setattr(sys, "stderr", screen)
  monkeypatch.setattr(sys, "stdout", screen)
  for i in common.progress(range(3), "work", disable=False, file=screen):
    if i == 1:
      common.log("result 0.9889")
  lines = screen.getvalue().split("\n")
  (line,) = [l for l in lines if "result" in l]
  assert "work" in line.split("result")[0]  # the bar was there ...
  assert line.rsplit("\r", 1)[1] == "result 0.9889"  # ... and erased
  assert "work" in lines[-1] and lines[-1].rstrip(" ").endswith("\r")
  assert lines[-1].rsplit("\r", 2)[1].strip() == ""  # erased at the end
  assert common.progress(range(2), "quiet").disable  # not a terminal here
