"""Every row of every scheme's runs, mean and standard deviation over seeds: the tables of BENCHMARKS.md,
"Schemes". A scheme's metrics.json lists its own rows (peers, generations, exits, teachers, their
ensembles); an offline run has teacher, baseline and student.

    python benchmarks/schemes.py runs/schemes_self runs/schemes_online ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from kdistill.report import row_title, rows_of


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values) * scale
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="sweep folders (each cell a run or scheme folder)")
    args = parser.parse_args()
    print("| sweep | setting | model | test % | CPU b1 (ms) | params | s / epoch | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in map(Path, args.folders):
        settings: dict[str, list[dict]] = defaultdict(list)
        for path in sorted(folder.glob("*/metrics.json")):
            setting = path.parent.name.rsplit(",seed=", 1)[0]
            settings[setting].append(json.loads(path.read_text()))
        for setting, runs in settings.items():
            for row in rows_of(runs[0]):
                rows = [m[row] for m in runs if row in m]
                latency = [r["latency_ms"]["batch_1"] for r in rows if "batch_1" in r.get("latency_ms", {})]
                epoch = [r["median_epoch_seconds"] for r in rows if r.get("median_epoch_seconds")]
                print(f"| {folder.name} | {setting} | {row_title(runs[0], row)} | "
                      f"{_spread([r['test_accuracy'] for r in rows], 100)} | {_spread(latency, 1, 3)} | "
                      f"{rows[0]['params']:,} | {_spread(epoch, 1, 1)} | {len(rows)} |")


if __name__ == "__main__":
    main()
