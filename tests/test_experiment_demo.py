"""`make demo` (experiments.demo) prints the table the README shows."""

import json
import pathlib
import re

import pytest

from experiments import demo

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict:
  """The demo's table in the README's Quick start: model -> (acc, bytes)."""
  block = re.search(r"\n```\n(model +accuracy +param bytes\n.*?)```",
                    README.read_text(), re.S).group(1)
  rows = {}
  for line in block.splitlines()[1:]:
    name, acc, size = re.fullmatch(r"(.+?)\s+([0-9.]+)\s+([0-9,]+)",
                                   line).groups()
    rows[name] = (float(acc), int(size.replace(",", "")))
  return rows


# Not marked slow (about 10 s): the full 30-epoch demo, the run `make demo`
# makes, so the README's table is checked against it in CI.
def test_demo_reproduces_the_readme_table(tmp_path, capsys):
  report = demo.main(["--out", str(tmp_path)])
  printed = capsys.readouterr()
  got = {r["model"]: (r["accuracy"], r["param_bytes"]) for r in report["rows"]}
  expected = readme_table()
  assert list(got) == list(expected)
  for name, (acc, size) in expected.items():
    assert got[name][1] == size, name  # bytes: exact
    # Accuracies: as printed on the README's machine; another CPU or JAX
    # version may round a few of the 450 test images differently (int2,
    # far from float, is the most fragile).
    tolerance = 0.05 if "int2" in name else 0.01
    assert got[name][0] == pytest.approx(acc, abs=tolerance), name
  # The W8A8 row runs int8 matmuls, all three of them, before and after XLA.
  assert report["int8_ops"] == {"stablehlo": 3, "compiled": 3,
                                "compiled_matmuls": 3}
  assert "3 int8, 0 weight-only, 0 float" in report["report"]
  # What `make demo` prints: the table, each row on its own line (no
  # progress bar: stderr is not a terminal here).
  for name, (acc, size) in expected.items():
    assert re.search(rf"^{re.escape(name)} +[0-9.]+ +{size:,}$",
                     printed.out, re.M), name
  assert "\r" not in printed.out and "\r" not in printed.err
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == report["rows"] and saved["config"]["epochs"] == 30
  assert (tmp_path / "results.md").read_text() in printed.out

