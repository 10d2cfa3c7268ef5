# The two commands of the README. Both set up .venv with every workspace package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKSPACE := -e . -e backends/dram -e backends/cuda -e backends/redis -e 'backends/ssd[uring]' -e backends/gds -e backends/ucx -e backends/rdma -e conformance -e connectors/vllm -e connectors/sglang
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
SGLANG_VENV := .venv-sglang

# The whole suite: every workspace package in .venv, then each engine connector against the real
# engine package in its own venv (vLLM and SGLang pin their own torch; they never share .venv).
# The reference engine (bench/engine) needs torch too: it runs in the vLLM venv's CPU torch.
test: $(STAMP)
	$(PY) -m pytest
	connectors/vllm/setup-test-env.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest connectors/vllm
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e backends/ssd -e bench/engine
	$(VLLM_VENV)/bin/python -m pytest bench/engine
	connectors/sglang/setup-test-env.sh $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pytest connectors/sglang
	$(MAKE) test-rdma

# pegaflow-rdma over real verbs: boots a Debian VM under qemu (software emulation) with soft-RoCE
# devices and runs the RDMA tests in it (TransportContract, faults, a two-daemon fetch). Needs root;
# caches the VM's root file system in .cache/rdma-vm/. The last step of `make test`; docs/rdma.md.
test-rdma: $(STAMP)
	PYTHON=$(PY) backends/rdma/vm/test-rdma.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) pegaflow_core/_proto pegaflow_core/_native build *.egg-info
