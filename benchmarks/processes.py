"""One process against N processes (DDP, gloo on the CPU): the same training, the same result?

Trains the seed student from scratch (`kdistill train --baseline`) on Fashion-MNIST with one
process and with `--nproc N`, the same global batch, seed and epochs, and the same total number of
threads (one process with N threads against N processes with one each). Prints samples/s, the
validation accuracy of each epoch and the largest weight difference. On a 2-core CPU the point is
equal results, not speed.

    python -m benchmarks.processes --nproc 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

RECIPE = "recipes/seed_fashion_mnist.yaml"


def train(out: Path, nproc: int, threads: int, epochs: int) -> dict:
    command = [sys.executable, "-m", "kdistill", "train", RECIPE, "--baseline", "--quiet", f"out_dir={out}",
               f"threads={threads}", f"train.epochs={epochs}", "--nproc", str(nproc)]
    subprocess.run(command, check=True, env={**os.environ, "KDISTILL_CACHE_DIR": str(out / "cache")})
    folder = out / "seed_fashion_mnist" / "baseline"
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_second": json.loads((folder / "summary.json").read_text())["train_samples_per_second"],
            "val_accuracy": [h["val_accuracy"] for h in history], "train_loss": [h["train_loss"] for h in history],
            "weights": load_file(folder / "model.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = train(Path(tmp) / "one", 1, args.nproc, args.epochs)
        many = train(Path(tmp) / "many", args.nproc, 1, args.epochs)
    worst = max((one["weights"][k] - many["weights"][k]).abs().max().item() for k in one["weights"])
    print(f"{'processes':<10} {'samples/s':>10}  val accuracy by epoch   train loss by epoch")
    for name, result in ((f"1 x {args.nproc} threads", one), (f"{args.nproc} x 1 thread", many)):
        print(f"{name:<10} {result['samples_per_second']:>10.0f}  {result['val_accuracy']}  {result['train_loss']}")
    print(f"largest weight difference: {worst:.3g}")
    print(json.dumps({"nproc": args.nproc, "epochs": args.epochs, "max_weight_difference": worst,
                      **{name: {k: v for k, v in r.items() if k != "weights"}
                         for name, r in (("one_process", one), ("processes", many))}}))


if __name__ == "__main__":
    main()
