"""The benchmark script runs (quick mode) and reports sane ratios."""

import json

from experiments import bench


def test_bench_quick_runs_and_writes_results(tmp_path):
  rows = bench.main(["--quick", "--peers", "--out", str(tmp_path)])
  assert (tmp_path / "results.md").exists()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == rows
  tasks = [(r["model"].split(",")[0], r["task"]) for r in rows]
  assert ("MLP 784-1024-1024-10", "W8A8 inference") in tasks
  assert ("MLP 784-1024-1024-10", "QAT step") in tasks
  for row in rows:
    assert 0.01 < float(row["jaxquant / float"]) < 100, row
