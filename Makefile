PYTHON ?= python3

.PHONY: install run test bench

# torch first: on a machine without CUDA, 2.13.0 is the local CPU build (anything else pulls GBs of CUDA)
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[server,test]'

run: install
	$(PYTHON) -m fastswitch serve

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) benchmarks/offline_throughput.py
