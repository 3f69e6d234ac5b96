"""Builds jaxquant's optional C++ kernels (jaxquant/native/*.cc).

The kernels are XLA FFI handlers, compiled against the FFI headers that ship
in jaxlib (a build requirement, pyproject.toml) into one shared library,
jaxquant/native/_kernels*.so, which jaxquant loads with ctypes: they are not
a Python extension module. Where no C++17 compiler (or no jaxlib headers)
is found, the build says so and goes on; jaxquant then runs everywhere on
its XLA formulations, and `jq.report` says why (`jaxquant.native`).

Flags: warnings are errors in our code (the XLA headers are included as
system headers: theirs are not ours to fix); nothing is tuned to the build
machine's CPU (no -march=native): the AVX2 loops are compiled per function
(`__attribute__((target))`) and chosen at run time from the CPU's features.
"""

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Path("jaxquant/native")
SOURCES = sorted(str(p) for p in NATIVE.glob("*.cc"))
HEADERS = sorted(str(p) for p in NATIVE.glob("*.h"))


def jaxlib_headers():
  """(include folder, jaxlib version) of the installed jaxlib, or None."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  include = Path(spec.submodule_search_locations[0]) / "include"
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    return None
  return str(include), importlib.metadata.version("jaxlib")


class OptionalKernels(build_ext):
  """Builds the kernels where it can; warns and skips where it cannot."""

  def build_extension(self, ext):
    found = jaxlib_headers()
    if found is None:
      print("jaxquant: C++ kernels not built (jaxlib's XLA FFI headers were "
            "not found); jaxquant runs on its XLA formulations",
            file=sys.stderr)
      return
    include, version = found
    ext.extra_compile_args = [
        "-std=c++17", "-O3", "-DNDEBUG", "-fPIC", "-Wall", "-Wextra",
        "-Werror", "-isystem", include,
        f'-DJAXQUANT_FFI_HEADERS="{version}"']
    super().build_extension(ext)


setup(
    ext_modules=[Extension("jaxquant.native._kernels", SOURCES,
                           depends=HEADERS, language="c++", optional=True)],
    cmdclass={"build_ext": OptionalKernels},
)
