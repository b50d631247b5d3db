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

# Seed 002's study (BENCHMARKS.md): hours on a CPU, most of it the residual teacher. Stop it and run it
# again at will: finished cells are kept, an interrupted training resumes. The report is built at the end.
KD := $(VENV)/bin/kdistill
STUDY := --seeds 0,1,2 --jobs $(or $(JOBS),2)
.PHONY: study
study: setup data
	$(KD) sweep study_fashion_mnist teacher.name=resnet,mlp $(STUDY) --name study_objectives \
	    'distill.losses={kd: {weight: 1}},{kd: {weight: 0.9}, ce: {weight: 0.1}},{logit_mse: {weight: 1}},{tang: {weight: 1}}'
	$(KD) sweep study_fashion_mnist distill.temperature=1,2,4,5,8,10,20 $(STUDY) --name study_temperature
	$(KD) sweep study_fashion_mnist train.augment.crop_padding=2 train.augment.hflip=true \
	    distill.teacher_signal=cached_views $(STUDY) --name study_augmentation
	$(KD) report runs/study_objectives runs/study_temperature runs/study_augmentation --out runs/study_report
