# The two commands of the README. Both set up .venv with every workspace package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKSPACE := -e . -e backends/dram -e backends/redis -e 'backends/ssd[uring]' -e backends/ucx -e conformance
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml setup.py proto/pegaflow/v1/*.proto pegaflow_core/native/*.c backends/*/pyproject.toml conformance/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(WORKSPACE) -r requirements-dev.txt
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pegaflow demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) pegaflow_core/_proto build *.egg-info
