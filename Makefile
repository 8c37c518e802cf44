# Set-up is part of every target: a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenlake-installed
# torch and torchvision are pinned to a pair that imports together (PyPI's torchvision does not
# import beside torch 2.13); pip finds both on this machine's disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-gpu-branch bench lint install-check clean

setup: $(STAMP)

# every extra (extract, probes, demo) and the development tools, as an editable install
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenlake demo --out demo-out

test: $(STAMP)
	$(BIN)/pytest -q

# the extraction suites again, every run through the loop's GPU branch (streams, events, pinned
# buffers) on the CPU fake of CUDA that poisons copies read before their event (extract/_cuda.py)
GPU_BRANCH_TESTS := tests/test_extract.py tests/test_extract_options.py tests/test_policy.py \
	tests/test_resume.py tests/test_ttreg.py tests/test_scale.py tests/test_faults.py \
	tests/test_families.py
test-gpu-branch: $(STAMP)
	TOKENLAKE_FAKE_CUDA=1 $(BIN)/pytest -q $(GPU_BRANCH_TESTS)

bench: $(STAMP)
	$(BIN)/python bench/run.py --out bench-out

lint: $(STAMP)
	$(BIN)/ruff check extract store sql analyze probes cli experiments tests

# `pip install` (not editable) into fresh virtual environments: the read-only install, then the
# extras with the demo and a plan, from outside the checkout (.ci/install-check)
install-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" .ci/install-check

clean:
	rm -rf demo-out bench-out .pytest_cache
