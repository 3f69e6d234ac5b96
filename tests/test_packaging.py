"""Packaging: the wheel installs only `jaxquant`, and its runtime dependencies
are exactly what jaxquant/ imports (offline: no build isolation, no index)."""

import ast
import email.parser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# jax's compiled backend: never imported by name, declared for its version range.
IMPLIED = {"jaxlib"}


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(tmp_path_factory, **env) -> Path:
  # Build from a copy: an in-tree build would reuse a stale build/lib (and
  # the copy leaves out the kernels built in place).
  src = tmp_path_factory.mktemp("src") / "jaxquant"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".*", "__pycache__", "*.egg-info", "build", "dist", "*.so"))
  out = tmp_path_factory.mktemp("wheel")
  build = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
       "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
      capture_output=True, text=True, cwd=out, env=dict(os.environ, **env))
  assert build.returncode == 0, (
      "pip wheel failed (the test extra brings setuptools>=77):\n"
      + build.stdout + build.stderr)
  wheels = list(out.glob("jaxquant-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  return build_wheel(tmp_path_factory)


def _kernels_in(wheel: Path) -> list[str]:
  with zipfile.ZipFile(wheel) as zf:
    return [n for n in zf.namelist()
            if re.fullmatch(r"jaxquant/native/_kernels.*\.so", n)]


@pytest.mark.skipif(not shutil.which("g++"), reason="no C++ compiler here")
def test_wheel_carries_the_kernels_where_a_compiler_exists(wheel):
  assert len(_kernels_in(wheel)) == 1


def test_wheel_builds_without_a_compiler(tmp_path_factory):
  # No compiler: the optional kernels are skipped, the wheel still builds
  # (jaxquant then runs its XLA formulations: tests/test_native.py).
  wheel = build_wheel(tmp_path_factory, CC="false", CXX="false")
  assert not _kernels_in(wheel)


def _metadata(wheel: Path):
  with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(zf.read(name).decode())


def _runtime_requirements(wheel: Path) -> dict[str, str]:
  """{normalized name: version specifier} of the Requires-Dist with no extra."""
  reqs = {}
  for req in _metadata(wheel).get_all("Requires-Dist") or []:
    if re.search(r";.*\bextra\b", req):
      continue
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)
    reqs[_normalize(name)] = req[len(name):].split(";")[0].strip()
  return reqs


def _third_party_imports() -> dict[str, set[str]]:
  """{top-level module: files importing it} for jaxquant/'s non-stdlib imports."""
  found: dict[str, set[str]] = {}
  for path in sorted((ROOT / "jaxquant").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top != "jaxquant" and top not in sys.stdlib_module_names:
          found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
  return found


def test_wheel_installs_only_the_jaxquant_package(wheel):
  with zipfile.ZipFile(wheel) as zf:
    tops = {n.split("/")[0] for n in zf.namelist()}
  tops = {t for t in tops if not t.endswith(".dist-info")}
  assert tops == {"jaxquant"}, tops
  with zipfile.ZipFile(wheel) as zf:
    assert "jaxquant/__init__.py" in zf.namelist()


def test_runtime_dependencies_are_what_jaxquant_imports(wheel):
  imports = _third_party_imports()
  assert {"jax", "numpy"} <= set(imports)  # the scan found the imports
  to_dist = importlib.metadata.packages_distributions()
  needed = {}
  for module, files in imports.items():
    for dist in to_dist.get(module, [module]):
      needed[_normalize(dist)] = files
  declared = _runtime_requirements(wheel)
  missing = {d: sorted(f) for d, f in needed.items() if d not in declared}
  assert not missing, (
      f"jaxquant/ imports packages missing from [project] dependencies: "
      f"{missing}")
  unused = set(declared) - set(needed) - IMPLIED
  assert not unused, (
      f"[project] dependencies jaxquant/ never imports (move them to an "
      f"extra): {sorted(unused)}")
  # jax and jaxlib move together: the tested range is declared for both.
  assert declared["jax"] and declared["jax"] == declared["jaxlib"], declared

