"""Small helpers shared by the experiment scripts: output files and metrics.

  out = results_dir("bitwidth_sweep")            # results/bitwidth_sweep/
  write_table(rows, out / "results.md")          # rows: list of dicts
  write_json({"rows": rows}, out / "results.json")
  save_figure(fig, out / "plot.png")
  sqnr_db(x, x_hat)              # jq.sqnr_db: 10 log10(sum x^2 / sum err^2)
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jaxquant import sqnr_db  # noqa: E402,F401  (re-exported for the scripts)


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
  (out / "results.md").write_text(markdown)
  write_json(data, out / "results.json")
  for name, draw in figures.items():
    draw(out / name)
  print(markdown)
  print(f"wrote {out}/results.md, results.json, {', '.join(figures)}")


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


def progress(iterable, desc: str | None = None, **kwargs):
  """tqdm progress bar on a terminal (stderr), silent otherwise."""
  kwargs.setdefault("disable", not sys.stderr.isatty())
  return tqdm(iterable, desc=desc, leave=False, **kwargs)


def median_seconds(fn, args, calls: int) -> float:
  """Median wall time of `calls` calls of `fn(*args)`, results awaited."""
  import jax
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
