#!/usr/bin/env bash
# Screen teacher settings by accuracy, all at once on one GPU (or any device): each variant is the
# fashion_mnist_resnet teacher for 40 epochs with cutout 8 plus its own overrides, trained by
# `kdistill train`, then evaluated once on the test set by `kdistill eval`. Accuracy only: the
# 30-minute limit of issue 9 is measured on the CPU, one run alone (BENCHMARKS.md "A 95 % teacher").
# Usage: bash scripts/screen-teachers.sh OUT_DIR 'NAME KEY=VALUE ...' ['NAME KEY=VALUE ...' ...]
#   e.g. bash scripts/screen-teachers.sh runs/screen 'recipe' 'plain teacher.train.ema_decay=null teacher.train.label_smoothing=0'
# Environment: DEVICE (default cuda), PY (default python3), LIMIT seconds per variant (default 440).
set -u
out=${1:?usage: screen-teachers.sh OUT_DIR VARIANT...}
shift
py=${PY:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
common=(fashion_mnist_resnet teacher.train.epochs=40 teacher.train.augment.cutout=8 "device=${DEVICE:-cuda}"
        eval.latency_repeats=3 "eval.latency_batches=[1]")
for variant in "$@"; do
    read -r name overrides <<<"$variant"
    (
        # shellcheck disable=SC2086  # the overrides are words on purpose
        OMP_NUM_THREADS=2 timeout "${LIMIT:-440}" "$py" -m kdistill train "${common[@]}" "out_dir=$out/$name" \
            $overrides >"$out/$name.log" 2>&1 &&
            OMP_NUM_THREADS=2 timeout 60 "$py" -m kdistill eval "${common[@]}" "out_dir=$out/$name" $overrides \
                >>"$out/$name.log" 2>&1
        echo "== $name: exit $?"
    ) &
done
wait
for variant in "$@"; do
    read -r name _ <<<"$variant"
    "$py" - "$out/$name" "$name" <<'PY'
import json, pathlib, sys
found = list(pathlib.Path(sys.argv[1]).glob("*/metrics.json"))
if not found:
    print(f"{sys.argv[2]}: no metrics (see its log)")
else:
    t = json.loads(found[0].read_text())["teacher"]
    print(f"{sys.argv[2]}: test {100 * t['test_accuracy']:.2f} %, val {100 * t['val_accuracy']:.2f} %, "
          f"best epoch {t['best_epoch']}, {t['train_seconds']:.0f} s")
PY
done
