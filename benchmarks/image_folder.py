"""An image folder end to end: write Fashion-MNIST's test images as PNG files, one folder per class,
then time the first load (decode every file, write the cache), the second (read the cache), and
optionally one `kdistill run` on the folder.

    python -m benchmarks.image_folder              # all 10,000 test images
    python -m benchmarks.image_folder --limit 500 --run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from kdistill.data import load_data


def write_folder(root: Path, limit: int | None) -> int:
    data = load_data("fashion_mnist", download=False)
    images, labels = data.test.images, data.test.labels
    count = len(labels) if limit is None else min(limit, len(labels))
    for i in range(count):
        folder = root / data.classes[int(labels[i])].replace("/", "-")  # "T-shirt/top" is not a folder name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy(), mode="L").save(folder / f"{i:05d}.png")
    return count


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="write only the first N test images")
    parser.add_argument("--run", action="store_true", help="also time `kdistill run` on the folder (MLPs, 3 epochs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "fashion_png", Path(tmp) / "cache"
        os.environ["KDISTILL_IMAGE_CACHE"] = str(cache)
        write_s, count = timed(lambda: write_folder(root, args.limit))
        options = dict(val_size=0.1, image_size=28, channels=1)
        first_s, first = timed(lambda: load_data("image_folder", root=root, **options))
        second_s, second = timed(lambda: load_data("image_folder", root=root, **options))
        assert (first.train.images == second.train.images).all()
        rows = [("write PNG files", write_s), ("first load: decode and cache", first_s),
                ("second load: from the cache", second_s)]
        if args.run:
            command = [sys.executable, "-m", "kdistill", "run", "digits_quick", "data.name=image_folder",
                       f"data.root={root}", "data.image_size=28", "data.channels=1", "teacher.train.epochs=3",
                       "train.epochs=3", f"out_dir={tmp}/runs", "--quiet"]
            run_s, done = timed(lambda: subprocess.run(command, capture_output=True, text=True))
            if done.returncode:
                raise SystemExit(f"kdistill run failed: {done.stderr.strip()}")
            rows.append(("kdistill run (cache warm, 3 + 3 + 3 epochs of MLPs)", run_s))
            print(done.stdout)
        print(f"{count:,} PNG files of 28x28, {first.num_classes} classes; "
              f"{len(first.train):,} train / {len(first.val):,} val / {len(first.test):,} test\n")
        print("| step | seconds |\n| --- | --- |")
        for step, seconds in rows:
            print(f"| {step} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
