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

# The method table (BENCHMARKS.md, issue 10): every method on one setting, the residual teacher to seed 000's
# student (20 epochs, the same schedule for all), 3 seeds; the papers' weights (RepDistiller's, mdistiller's).
# Student taps: conv1 16x28x28, conv2 32x14x14, fc1 64; teacher: stages.0 32x28x28, stages.1 64x14x14,
# stages.2 128x7x7. RKD, PKT and CC compare the pooled embeddings the classifiers receive (fc2@input 64,
# head@input 128), as RepDistiller does. Hours on a CPU; resumable like the study. FSP is left out: no student
# and teacher layer pairs have equal channels here. Review fuses two levels: with conv1 too, its fusion
# modules at 28x28 cost 25x the student's step (115 s an epoch).
METHODS := --seeds 0,1,2 --jobs $(or $(JOBS),2)
METHOD_LOSSES := \
  {ce: {weight: 0.1}, kd: {weight: 0.9}},\
  {ce: {weight: 1}, dkd: {weight: 1, warmup_epochs: 2}},\
  {ce: {weight: 1}, dist: {weight: 1, beta: 2, gamma: 2, temperature: 4}},\
  {ce: {weight: 0.1}, ls_kd: {weight: 9, temperature: 2}},\
  {ce: {weight: 0.1}, reverse_kd: {weight: 0.9}},\
  {ce: {weight: 0.1}, js: {weight: 0.9}},\
  {ce: {weight: 1}, hint: {type: fitnet, student: conv2, teacher: stages.1, weight: 100}},\
  {ce: {weight: 1}, at: {student: conv2, teacher: stages.1, weight: 1000}},\
  {ce: {weight: 1}, nst: {student: conv2, teacher: stages.1, weight: 50}},\
  {ce: {weight: 1}, vid: {student: conv2, teacher: stages.1, weight: 1}},\
  {ce: {weight: 1}, crd: {student: fc1, teacher: stages.2, weight: 0.8, negatives: 1024}},\
  {ce: {weight: 1}, sp: {student: fc1, teacher: stages.2, weight: 3000}},\
  {ce: {weight: 1}, rkd_distance: {student: fc2@input, teacher: head@input, weight: 25}, rkd_angle: {student: fc2@input, teacher: head@input, weight: 50}},\
  {ce: {weight: 1}, pkt: {student: fc2@input, teacher: head@input, weight: 30000}},\
  {ce: {weight: 1}, cc: {student: fc2@input, teacher: head@input, weight: 0.02}},\
  {ce: {weight: 1}, review: {student: [conv2, fc1], teacher: [stages.1, stages.2], warmup_epochs: 2}}
# Then the goal's sweeps, 30 epochs each: the best response methods alone, KD with one more term, and KD
# with crop + flip on the student's batches, taught on cached teacher views.
COMBO_LOSSES := \
  {ce: {weight: 0.1}, kd: {weight: 0.9}},\
  {ce: {weight: 0.1}, js: {weight: 0.9}},\
  {ce: {weight: 0.1}, kd: {weight: 0.9}, dist: {weight: 1, beta: 2, gamma: 2, temperature: 4}},\
  {ce: {weight: 0.1}, kd: {weight: 0.9}, at: {student: conv2, teacher: stages.1, weight: 1000}},\
  {ce: {weight: 0.1}, kd: {weight: 0.9, temperature: 2}},\
  {ce: {weight: 0.1}, kd: {weight: 0.9, temperature: 8}},\
  {ce: {weight: 0.1}, js: {weight: 0.9, temperature: 2}},\
  {ce: {weight: 0.1}, js: {weight: 0.9}, dist: {weight: 1, beta: 2, gamma: 2, temperature: 4}},\
  {ce: {weight: 0.1}, kd: {weight: 0.9}, pkt: {student: fc2@input, teacher: head@input, weight: 30000}}
.PHONY: methods
methods: setup data
	$(KD) sweep fashion_mnist_resnet $(METHODS) --name methods 'distill.losses=$(METHOD_LOSSES)' $(METHODS_EXTRA)
	$(KD) sweep fashion_mnist_resnet $(METHODS) --name methods_30_epochs train.epochs=30 'distill.losses=$(COMBO_LOSSES)' \
	    $(METHODS_EXTRA)
	$(KD) sweep fashion_mnist_resnet $(METHODS) --name methods_30_epochs_augmented train.epochs=30 \
	    train.augment.crop_padding=2 train.augment.hflip=true distill.teacher_signal=cached_views \
	    'distill.losses={ce: {weight: 0.1}, kd: {weight: 0.9}},{ce: {weight: 0.1}, js: {weight: 0.9}}' $(METHODS_EXTRA)
	$(KD) report runs/methods runs/methods_30_epochs runs/methods_30_epochs_augmented --out runs/methods_report

# Every scheme on Fashion-MNIST, 3 seeds each (BENCHMARKS.md, "Schemes"); resumable. Trained teachers to
# start from: SCHEME_TEACHER (fashion_mnist_resnet's teacher, for the assistant chain and the 100 % point),
# MULTI_TEACHERS (multi_teacher.teachers with checkpoints); without them each scheme trains its own.
SCHEMES := --seeds 0,1,2 --jobs 2
SCHEME_TEACHER ?=
MULTI_TEACHERS ?=
.PHONY: schemes
schemes: setup data
	$(KD) sweep self_fashion_mnist $(SCHEMES) --name schemes_self
	$(KD) sweep online_fashion_mnist $(SCHEMES) --name schemes_online
	$(KD) sweep multi_teacher_fashion_mnist $(SCHEMES) --name schemes_multi_teacher multi_teacher.combine=mean,confidence \
	    $(if $(MULTI_TEACHERS),'multi_teacher.teachers=$(MULTI_TEACHERS)')
	$(KD) sweep self_fashion_mnist $(SCHEMES) --name schemes_exits self_distill.mode=exits 'self_distill.exits=[conv1,conv2]'
	$(KD) sweep fashion_mnist_resnet $(SCHEMES) --name schemes_labelled data.labelled_fraction=0.01,0.1
	$(KD) sweep fashion_mnist_resnet $(SCHEMES) --name schemes_labelled_long data.labelled_fraction=0.01 \
	    teacher.train.epochs=390
	$(KD) sweep fashion_mnist_resnet $(SCHEMES) --name schemes_labelled_all $(if $(SCHEME_TEACHER),teacher.checkpoint=$(SCHEME_TEACHER))
	$(KD) sweep noisy_student_fashion_mnist $(SCHEMES) --name schemes_noisy_student
	$(KD) sweep online_fashion_mnist $(SCHEMES) --name schemes_online_teacher online.mode=teacher \
	    'teacher.kwargs={width: 16, depth: 2}' 'distill.losses={ce: {weight: 0.1}, kd: {weight: 0.9}}' distill.temperature=4
	$(KD) sweep assistant_fashion_mnist $(SCHEMES) --name schemes_assistant \
	    $(if $(SCHEME_TEACHER),teacher.checkpoint=$(SCHEME_TEACHER))
	$(PY) benchmarks/labelled_fraction.py runs/schemes_labelled runs/schemes_labelled_long runs/schemes_labelled_all \
	    --out benchmarks/results/labelled_fraction.png

# The deployment headline (BENCHMARKS.md, "Deployment"): fashion_mnist_resnet's run (trained by this target
# when DEPLOY_RUN has none), its teacher pruned twice by half of its channels, each fine-tuned with
# distillation from the teacher; int8 and ONNX of every model; all timed in PyTorch and onnxruntime on one thread.
DEPLOY_RUN ?= runs/fashion_mnist_resnet
DEPLOY_STEPS ?= --source teacher --teacher teacher --prune channels:0.5 --prune channels:0.5 --quantize int8 \
    --export onnx compress.finetune.epochs=8 'compress.finetune.augment={crop_padding: 2, hflip: true}' threads=1
.PHONY: deploy
deploy: setup data
	test -f $(DEPLOY_RUN)/student/model.safetensors || $(KD) run fashion_mnist_resnet out_dir=$(dir $(DEPLOY_RUN)) \
	    name=$(notdir $(DEPLOY_RUN))
	$(KD) compress $(DEPLOY_RUN) $(DEPLOY_STEPS)
