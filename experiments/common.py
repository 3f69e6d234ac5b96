"""The experiment skeleton and the helpers every script in experiments/ shares.

Every script has the same shape:

  NAME = "bitwidth_sweep"                       # results/<NAME>/ by default

  def parser():                                 # --quick, --out, --seed
    p = common.parser(__doc__, NAME, quick="small tensors (CI)")
    p.add_argument("--rounds", type=int, default=7)   # its own options
    return p

  def run(args) -> dict: ...                    # the numbers: results.json
  def markdown(report) -> str: ...              # results.md, also printed
  def figures(report) -> dict: ...              # file name -> draw(path)

  def main(argv=None):
    return common.main(NAME, parser, run, markdown, figures, argv)

`main` parses the arguments, calls `run`, then `publish`es: results.md,
results.json (the report without its `_`-prefixed keys, which hold objects
for the figures only) and the figures, under `--out` or `results/<NAME>/`;
it returns the whole report.

Shared pieces:

  console   tty(), progress(iterable, desc) (a tqdm bar on a terminal,
            cleared when done), log(...) (prints above any open bar, so a
            bar and a result never share a line)
  training  train(apply_fn, params, batches, tx=..., steps=...): the one
            training loop; train_step, cross_entropy, shuffled_batches
  timing    seconds(fn, *args) (one awaited call), median_seconds,
            time_rounds + median_ratios (variants interleaved in rounds),
            Timer (wall and CPU seconds per phase)
  outputs   results_dir, format_table, write_table, write_json,
            save_figure, publish
  metrics   sqnr_db (jq.sqnr_db: 10 log10(sum x^2 / sum err^2), pytrees too)

Data loaders (digits, MNIST, PTB, word similarity) are in `experiments.data`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jaxquant import sqnr_db  # noqa: E402,F401  (re-exported for the scripts)

# ------------------------------------------------------------------ skeleton


def parser(doc: str, name: str, *, quick: str = "small and fast (CI)",
           seed: int = 0) -> argparse.ArgumentParser:
  """An argparse parser with the three options every script takes.

  `--quick` (help text `quick`: what the quick mode shrinks), `--out`
  (default results/<name>) and `--seed`; add the script's own options to
  the returned parser. The description is the first line of `doc`.
  """
  p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  p.add_argument("--quick", action="store_true", help=quick)
  p.add_argument("--out", default=None,
                 help=f"output folder (default results/{name})")
  p.add_argument("--seed", type=int, default=seed,
                 help=f"random seed (default {seed})")
  return p


def main(name: str, make_parser: Callable[[], argparse.ArgumentParser],
         run: Callable[[argparse.Namespace], dict],
         markdown: Callable[[dict], str],
         figures: Callable[[dict], dict] | None = None, argv=None) -> dict:
  """Parses `argv`, runs, publishes under --out or results/<name>/.

  Returns the report `run` made (keys starting with `_` included; they are
  left out of results.json).
  """
  args = make_parser().parse_args(argv)
  report = run(args)
  out = results_dir(name, args.out)
  data = {k: v for k, v in report.items() if not str(k).startswith("_")}
  publish(out, markdown(report), data, figures(report) if figures else {})
  return report


# ------------------------------------------------------------------- console


def tty() -> bool:
  """Whether progress bars are shown: stderr is a terminal."""
  return sys.stderr.isatty()


def progress(iterable, desc: str | None = None, **kwargs):
  """A tqdm bar on a terminal (stderr), silent otherwise.

  The bar is cleared when the loop ends (`leave=False`); print inside the
  loop with `log`, never `print`, so that no result lands on the bar's line.
  """
  kwargs.setdefault("disable", not tty())
  return tqdm(iterable, desc=desc, leave=False, **kwargs)


def log(*args, **kwargs) -> None:
  """`print` to stdout, flushed, with any open bar cleared first and
  redrawn below the printed line."""
  with tqdm.external_write_mode(file=sys.stdout):
    print(*args, **kwargs, flush=True)


# ------------------------------------------------------------------- outputs


def results_dir(name: str, out=None) -> Path:
  """`out` if given, else `results/<name>/`; created if missing."""
  path = Path(out) if out is not None else Path("results") / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def _cell(value) -> str:
  if isinstance(value, (float, np.floating)):
    return "nan" if math.isnan(value) else f"{value:.2f}"
  return str(value)


def format_table(rows: list[dict]) -> str:
  """A markdown table; columns in first-seen key order, floats to 2 places."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |"
            for row in rows]
  return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path, title: str | None = None) -> str:
  """Writes `rows` as a markdown table (under `# title` if given)."""
  text = format_table(rows)
  if title:
    text = f"# {title}\n\n{text}"
  Path(path).write_text(text)
  return text


def publish(out: Path, markdown: str, data, figures: dict) -> None:
  """Writes results.md and results.json, draws `figures` (file name ->
  function of the path), and prints the markdown and what was written."""
  out = Path(out)
  (out / "results.md").write_text(markdown)
  write_json(data, out / "results.json")
  for name, draw in figures.items():
    draw(out / name)
  log(markdown)
  log(f"wrote {out}/" + ", ".join(["results.md", "results.json",
                                   *figures]))


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array__"):
    return _jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)  # JSON has no nan / inf
  return obj


def write_json(obj, path) -> None:
  """JSON with NumPy / JAX arrays as lists, nan and inf as strings."""
  Path(path).write_text(json.dumps(_jsonable(obj), indent=1) + "\n")


def save_figure(fig, path, dpi: int = 120) -> None:
  """Saves and closes a matplotlib figure (Agg backend)."""
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)


# ------------------------------------------------------------------ training


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels (any leading axes)."""
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def train_step(apply_fn: Callable, tx, loss: Callable = cross_entropy, *,
               with_lr: bool = False):
  """A jitted `(params, opt_state, x, y) -> (params, opt_state, loss)`.

  One step of the optax optimizer `tx` on `loss(apply_fn(params, x), y)`.
  With `with_lr`, the step takes a fifth argument `lr` that multiplies
  `tx`'s update: a traced scalar, so one compiled step serves any
  learning-rate schedule computed on the host.
  """
  import jax
  import optax

  def step(params, opt_state, x, y, lr=None):
    value, grads = jax.value_and_grad(
        lambda p: loss(apply_fn(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    if lr is not None:
      updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, value

  if with_lr:
    return jax.jit(step)
  return jax.jit(lambda params, opt_state, x, y: step(params, opt_state, x,
                                                      y))


def train(apply_fn: Callable, params, batches, *, tx, steps: int,
          lr: float | Callable[[int], float] | None = None,
          loss: Callable = cross_entropy, step: Callable | None = None,
          desc: str | None = None):
  """The training loop of every experiment: `steps` steps of `tx`.

  Args:
    apply_fn: `apply_fn(params, x) -> outputs`, e.g. `model.apply` or a
      `jq.fake_quant_apply(model.apply, recipe)` for QAT.
    params: the initial parameters.
    batches: an iterator of `(x, y)`, e.g. `shuffled_batches(...)`; exactly
      `steps` batches are taken from it.
    tx: the optax optimizer; its state is initialised here.
    steps: the number of steps.
    lr: None (tx's update as it is: tx has its own learning rate), or a
      multiplier of the update: a float, or a function of the step index
      (0 .. steps-1) evaluated on the host, e.g. a cosine schedule with `tx`
      a learning-rate-free direction such as
      `optax.chain(optax.scale_by_adam(), optax.scale(-1.0))`.
    loss: `loss(outputs, y) -> scalar`.
    step: a `train_step(apply_fn, tx, loss, with_lr=lr is not None)` to
      reuse (no recompilation).
    desc: the progress bar's label.

  Returns:
    `(params, losses)`: the trained parameters and the loss of every step.
  """
  import jax
  import jax.numpy as jnp
  step = step or train_step(apply_fn, tx, loss, with_lr=lr is not None)
  opt_state = tx.init(params)
  losses = []
  bar = progress(range(steps), desc)
  every = max(1, steps // 20)
  for t in bar:
    x, y = next(batches)
    if lr is None:
      params, opt_state, value = step(params, opt_state, x, y)
    else:
      rate = lr(t) if callable(lr) else lr
      params, opt_state, value = step(params, opt_state, x, y,
                                      jnp.float32(rate))
    losses.append(value)
    if not bar.disable and t % every == 0:
      bar.set_postfix(loss=f"{float(value):.3f}", refresh=False)
  return params, [float(v) for v in jax.device_get(losses)]


def shuffled_batches(x, y, batch: int, seed: int, *,
                     carry_over: bool = False):
  """Endless minibatches `(x[idx], y[idx])`, reshuffled every epoch.

  The order comes from `numpy.random.default_rng(seed)`, one permutation
  per epoch. An epoch's last `len(x) % batch` examples are dropped, or,
  with `carry_over`, start the first batch of the next epoch.
  """
  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  while True:
    if len(order) < batch:
      fresh = rng.permutation(len(x))
      order = np.concatenate([order, fresh]) if carry_over else fresh
    idx, order = order[:batch], order[batch:]
    yield x[idx], y[idx]


# -------------------------------------------------------------------- timing


def seconds(fn: Callable, *args) -> float:
  """Wall seconds of one call `fn(*args)`, its result awaited."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def median_seconds(fn: Callable, args, calls: int) -> float:
  """Median of `calls` timings of `fn(*args)` (see `seconds`)."""
  return statistics.median(seconds(fn, *args) for _ in range(calls))


def cpu_name() -> str:
  """This CPU's model name, cores and vector features that pick kernels
  (from /proc/cpuinfo, as `lscpu` shows them)."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or platform.machine()
  flags = set(info.get("flags", "").split())
  simd = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2")
          if f in flags]
  return (f"{info.get('model name', platform.machine())}, "
          f"{os.cpu_count()} cores, {'/'.join(simd) or 'no AVX2'}")


def time_rounds(variants: dict, rounds: int, calls: int, *, seed: int = 0,
                desc: str = "timing", warmup: bool = True
                ) -> dict[str, list[float]]:
  """Seconds per call of each variant in each of `rounds` rounds.

  `variants`: name -> `(fn, args)`. Every variant is called once first
  (compilation, warm caches; `warmup=False` skips that call, where the
  caller ran each on these arguments already). Each round times every
  variant once, as the median of `calls` calls, in a fresh random order
  (from `seed`), so that a slow spell of a shared machine spreads over all
  variants; compare variants by their per-round ratios (`median_ratios`).
  """
  import jax
  for fn, args in variants.values() if warmup else ():
    jax.block_until_ready(fn(*args))
  names = list(variants)
  times = {name: [] for name in names}
  rng = np.random.default_rng(seed)
  for _ in progress(range(rounds), desc=desc):
    for i in rng.permutation(len(names)):
      times[names[i]].append(median_seconds(*variants[names[i]], calls))
  return times


def median_ratios(times: dict[str, list[float]], base: str = "float"
                  ) -> dict[str, float]:
  """Per variant: the median over rounds of its time / `base`'s time in
  the same round (`base` itself: 1.0)."""
  return {name: statistics.median(t / b for t, b in zip(ts, times[base]))
          for name, ts in times.items()}


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


class Timer:
  """Wall and process CPU seconds (all threads, user + system) per phase.

    timer = Timer()
    with timer("train"):
      ...
    timer.wall["train"], timer.cpu["train"]

  CPU seconds are the load-independent figure when other jobs share the
  cores: on an otherwise idle machine wall ~ CPU / (cores kept busy).
  """

  def __init__(self):
    self.wall: dict[str, float] = {}
    self.cpu: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
      yield
    finally:
      self.wall[name] = time.perf_counter() - wall
      self.cpu[name] = _cpu_seconds() - cpu


# --------------------------------------------------------------------------
# Memory, measured in a subprocess of its own


def rss_mb() -> float:
  """This process's resident memory now, MiB (Linux /proc)."""
  import resource
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, MiB (Linux VmHWM; not
  ru_maxrss, which a subprocess inherits from the parent it forked from)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  raise OSError("no VmHWM in /proc/self/status")


CHILD = "--child"  # argv of a script's own measurement subprocess


def in_child(module: str, **kwargs) -> dict:
  """Runs `python -m module --child '<kwargs json>'` and returns the JSON
  its last output line holds: one measurement in a fresh process, so
  that its peak memory is its own."""
  import subprocess
  done = subprocess.run([sys.executable, "-m", module, CHILD,
                         json.dumps(kwargs)], capture_output=True, text=True,
                        check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main_or_child(name, make_parser, run, markdown, figures, child, argv):
  """`main`, or, for `--child '<json>'`, print `child(**json)` as JSON."""
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == [CHILD]:
    print(json.dumps(child(**json.loads(argv[1]))))
    return None
  return main(name, make_parser, run, markdown, figures, argv)
