# The two commands of the README. Both set up .venv with every workspace package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKSPACE := -e . -e backends/dram -e backends/redis -e 'backends/ssd[uring]' -e backends/ucx -e backends/rdma -e conformance -e connectors/vllm
STAMP := $(VENV)/.installed

.PHONY: demo test test-rdma setup clean

$(STAMP): pyproject.toml setup.py proto/pegaflow/v1/*.proto pegaflow_core/native/*.c backends/*/pyproject.toml connectors/*/pyproject.toml conformance/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(WORKSPACE) -r requirements-dev.txt
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pegaflow demo

VLLM_VENV := .venv-vllm

# The whole suite: every workspace package in .venv, then the vLLM connector against the real
# vLLM package in its own venv (vLLM pins its own torch; it never shares .venv).
test: $(STAMP)
	$(PY) -m pytest
	connectors/vllm/setup-test-env.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest connectors/vllm

# pegaflow-rdma over real verbs: boots a Debian VM under qemu (software emulation) with soft-RoCE
# devices and runs the RDMA tests in it (TransportContract, faults, a two-daemon fetch). Needs root;
# caches the VM's root file system in .cache/rdma-vm/. Not part of `make test`: see docs/rdma.md.
test-rdma: $(STAMP)
	PYTHON=$(PY) backends/rdma/vm/test-rdma.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) pegaflow_core/_proto pegaflow_core/_native build *.egg-info
