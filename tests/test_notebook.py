"""The tutorial notebook: generated from its script, and it runs (QUICK mode)."""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = NOTEBOOKS / "quantization_tutorial.ipynb"
KERNEL = "jaxquant-test-python"


def _builder():
  spec = importlib.util.spec_from_file_location(
      "build_tutorial", NOTEBOOKS / "build_tutorial.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_notebook_is_what_the_script_generates():
  expected = _builder().render()
  assert NOTEBOOK.read_text(encoding="utf-8") == expected, (
      "notebooks/quantization_tutorial.ipynb is stale: run "
      "python notebooks/build_tutorial.py")
  nb = nbformat.reads(expected, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  # The first code cell is the Colab installer, with the URL to edit.
  assert "google.colab" in code[0].source
  assert 'JAXQUANT_SPEC = "jaxquant @ git+https://github.com/OWNER/jaxquant"' \
      in code[0].source


def _kernel_for_this_interpreter(folder: Path, monkeypatch):
  """A kernelspec running `sys.executable`, found before any other one."""
  spec_dir = folder / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "jaxquant test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(folder / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(folder / "ipython"))  # no user profile
  monkeypatch.delenv("MPLBACKEND", raising=False)
  # The kernel imports the jaxquant of this checkout, like the tests do.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def _text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream" and out.name == "stdout":
        parts.append(out.text)
      elif "text/plain" in out.get("data", {}):
        parts.append(out.data["text/plain"])
  return "".join(parts)


def _number(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f"no output matching {pattern!r} in:\n{text}"
  return float(match.group(1))


def test_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
  _kernel_for_this_interpreter(tmp_path, monkeypatch)
  monkeypatch.setenv("JAXQUANT_QUICK", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's mkdtemp
  work = tmp_path / "cwd"  # the kernel's working directory
  work.mkdir()
  before = sorted(p.name for p in NOTEBOOKS.iterdir())
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys; print('kernel prefix:', sys.prefix)"))
  client = NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                          resources={"metadata": {"path": str(work)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  errors = [out for cell in nb.cells for out in cell.get("outputs", [])
            if out.output_type == "error"]
  assert not errors
  text = _text(nb)
  assert "QUICK mode" in text
  # The kernel ran in this interpreter's environment (the venv).
  assert f"kernel prefix: {sys.prefix}\n" in text
  float_acc = _number(r"float32: test accuracy (\d\.\d+)", text)
  assert float_acc > 0.85
  # Step 2: the chosen mixed-precision recipe is printed.
  assert "Recipe([" in text and "Rule('params/Dense_0/kernel'" in text
  # Step 3: checkpoint round trip.
  assert "identical after load: True" in text
  # Step 5: all four matmuls ran int8, and the StableHLO has i8 x i8 ops.
  assert re.search(r"^4 int8, 0 weight-only, 0 float$", text, re.M), text
  assert "StableHLO: 4 int8 matmuls/convolutions, 0 float32 ones" in text
  assert re.search(r"dot_general +\(tensor<\d+x\d+xi8>, tensor<\d+x\d+xi8>\)"
                   r" -> tensor<\d+x\d+xi32>", text)
  w8a8 = _number(r"static W8A8, minmax scales: +accuracy (\d\.\d+)", text)
  assert w8a8 >= float_acc - 0.02
  # Step 6: fine-tuning recovers what 2-bit PTQ lost.
  ptq = _number(r"W2A8 PTQ: +accuracy (\d\.\d+)", text)
  qaft = _number(r"W2A8 after \d+ epochs of fine-tuning: accuracy (\d\.\d+)",
                 text)
  assert qaft > ptq + 0.03, (ptq, qaft)
  # Figures are inline (the digits, layer_report's three, and the plots).
  images = sum("image/png" in out.get("data", {}) for cell in nb.cells
               for out in cell.get("outputs", []))
  assert images >= 8
  # Nothing was written next to the notebook.
  assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))
