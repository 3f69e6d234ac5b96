"""Matplotlib figures for `LayerReport` (imported only when plotting)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
# Figure objects, not pyplot: drawing files must not switch the backend of a
# notebook the user is working in.
from matplotlib.figure import Figure


def _grid(n):
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, list(axes.flat)


def _short(path: str) -> str:
  parts = path.split("/")
  return "/".join(parts[-3:-1] if len(parts) > 2 else parts)


def layer_figures(report, folder) -> list[Path]:
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rows = report.rows
  saved = []

  fig, axes = _grid(len(rows))
  for ax, row in zip(axes, rows):
    w = report.weights[row.path].ravel()
    ax.hist(w, bins=100, color="#4477aa", log=True)
    for c in (-row.weight_clip, row.weight_clip):
      ax.axvline(c, color="#cc3311", ls="--", lw=1)
    ax.set_title(f"{_short(row.path)}  {row.weight_spec}", fontsize=9)
  fig.suptitle("weights (dashed: largest clip of any channel)")
  fig.tight_layout()
  saved.append(_save(fig, folder / "weights.png"))

  with_acts = [r for r in rows if r.path in report.activations]
  if with_acts:
    fig, axes = _grid(len(with_acts))
    for ax, row in zip(axes, with_acts):
      a = np.asarray(report.activations[row.path], np.float32).ravel()
      ax.hist(a, bins=100, color="#228833", log=True)
      clip = row.act_clip or (float(a.min()), float(a.max()))
      for c in clip:
        ax.axvline(c, color="#cc3311", ls="--", lw=1)
      kind = "static clip" if row.act_clip else "batch range"
      ax.set_title(f"{_short(row.path)}  {row.act_spec} ({kind})", fontsize=9)
    fig.suptitle("activations entering each matmul (one batch)")
    fig.tight_layout()
    saved.append(_save(fig, folder / "activations.png"))

  fig = Figure(figsize=(max(5, 0.9 * len(rows) + 2), 3.5))
  ax = fig.subplots()
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r.weight_sqnr for r in rows], 0.4, label="weight SQNR")
  ax.bar(x + 0.2, [r.output_sqnr for r in rows], 0.4, label="output SQNR")
  ax.set_xticks(x, [_short(r.path) for r in rows], rotation=30, ha="right",
                fontsize=8)
  ax.set_ylabel("dB")
  ax.legend()
  ax.set_title("SQNR per layer (each layer quantized alone)")
  fig.tight_layout()
  saved.append(_save(fig, folder / "sqnr.png"))
  return saved


def _save(fig, path: Path) -> Path:
  fig.savefig(path, dpi=110)
  return path
