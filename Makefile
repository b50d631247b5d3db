# make demo: set up .venv and run the default recipe.   make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a CPU build (on this machine's local disk); see README for CUDA builds.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_RECIPE ?= recipes/demo_fashion_mnist.yaml
# glibc returns freed memory to the OS too eagerly for training loops: thousands of page faults per step.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: demo test setup dev data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

dev: $(VENV)/.dev-installed

data:
	@bash scripts/get-fashion-mnist.sh $(FASHION_MNIST)

demo: setup data
	$(VENV)/bin/kdistill run $(DEMO_RECIPE)

test: dev data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs

# Benchmarks (long; results go in BENCHMARKS.md). Quiet machine recommended.
.PHONY: bench-throughput bench-overhead bench-accuracy
bench-throughput: setup data
	$(PY) -m benchmarks.throughput

bench-overhead: setup data
	$(PY) -m benchmarks.overhead

bench-accuracy: setup data
	$(PY) -m benchmarks.accuracy recipes/seed_fashion_mnist.yaml --seeds 0 1 2
	$(PY) -m benchmarks.accuracy recipes/fashion_mnist_resnet.yaml --seeds 0 1 2 --shared-teacher
