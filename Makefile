# Every target installs what it needs into .venv first, so a fresh clone needs only python3 and git.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m crawler demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

lint: $(STAMP)
	$(PY) -m compileall -q crawler pipelines tests

$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.tarball
	$(PY) -m bench.index
	$(PY) -m bench.status
	$(PY) -m bench.worker_memory

clean:
	rm -rf $(VENV) .sandbox reports build *.egg-info
