# make demo: set up .venv and run the demo; make test: set up .venv and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-compiled bench bench-full docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vi-toolkit demo --quick --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q -n auto  # one worker a core (pytest-xdist)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the exact-answer tests with every fit compiled (compile="auto" for any length; fits the
# compiled step cannot follow fall back with their warning); 36 s on 2 cores with Inductor's
# cache warm, 13 minutes with it cold in one worker on a loaded machine
test-compiled: $(STAMP)
	$(PY) -m pytest -q -n auto --compile-all -rw tests/test_posteriors.py tests/test_fit.py \
		tests/test_gmm.py tests/test_hmm.py tests/test_ppca.py tests/test_discriminant.py tests/test_bayesnet.py

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	for script in benchmarks/*.py; do \
		$(PY) $$script --quick --out out/bench/$$(basename $$script .py) || exit 1; \
	done

# full size (well over an hour on 2 cores: minibatch_convergence.py alone took 19 minutes);
# the VAE benchmarks read Fashion-MNIST from Debian's
# dataset-fashion-mnist package (or pass --data-root to the scripts)
bench-full: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	for script in benchmarks/*.py; do \
		$(PY) $$script --out out/bench-full/$$(basename $$script .py) || exit 1; \
	done

# the API reference from the docstrings, warnings as errors: docs/_build/html/index.html
docs: $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	rm -rf docs/api  # autosummary writes a page per module here at each build
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) out .pytest_cache docs/_build docs/api
