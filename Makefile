# Two set-up commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test install bench data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ztfpsf demo

# one pytest worker per core, a test file's tests on one worker (its module fixtures once)
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

bench: install
	$(PY) benchmarks/bench_fit.py

# The study's real ZTF quadrant (sciimg + mskimg, 57 MB) from the ztfimg sdist on the
# package index, sha256-checked, cached in ~/.cache/ztfpsf/data (ZTFPSF_DATA_DIR).
data: install
	$(PY) -m ztfpsf.datasets

clean:
	rm -rf $(VENV) ztfpsf-demo .pytest_cache
