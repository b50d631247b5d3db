#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (about 6 minutes on one GPU; BENCHMARKS.md "GPU"):
#   1. the test suite with the GPU visible: `device: auto` then puts the pipeline tests on it, and
#      the CUDA-only tests (fp16 with a gradient scaler, data on the device) run instead of skipping;
#   2. two processes under torchrun with NCCL, when the machine has two GPUs;
#   3. the GPU rows of BENCHMARKS.md: loop throughput (seed student, residual teacher) and the
#      cached-KD epoch over the baseline's;
#   4. the seed recipe end to end on the GPU, in bf16.
# Usage: bash scripts/gpu-checks.sh [OUT_DIR]   logs land in OUT_DIR (default runs/gpu-checks), run folders
#        in $RUN_DIR (default OUT_DIR/runs)
# Each step has its own time limit, so one that hangs does not hide the others' results.
set -u
out=${1:-runs/gpu-checks}
py=${PY:-python3}
runs=${RUN_DIR:-$out/runs}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, report the status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s (log: $out/$name.log)"
    tail -n 15 "$out/$name.log"
}
nvidia-smi -L
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")

workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n 6)
step tests 200 "$py" -m pytest -q -p no:cacheprovider "${workers[@]}"
if [ "$gpus" -ge 2 ]; then
    step torchrun-nccl 120 "$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m kdistill run \
        digits_quick device=cuda "out_dir=$runs/nccl"
else
    echo "== torchrun-nccl: skipped, NCCL needs two GPUs and this machine has $gpus"
fi
step throughput-student 120 "$py" -m benchmarks.throughput --device cuda --rounds 3
step throughput-teacher 90 "$py" -m benchmarks.throughput --device cuda --rounds 3 --no-compile \
    --model resnet --model-kwargs '{"width": 32, "depth": 2}'
step overhead 70 "$py" -m benchmarks.overhead --device cuda --rounds 3
step seed-recipe 120 "$py" -m kdistill run seed_fashion_mnist device=cuda train.precision=bf16 \
    teacher.train.precision=bf16 "out_dir=$runs/seed"
cp "$runs"/seed/*/metrics.json "$out/seed_metrics.json" 2>/dev/null || true
