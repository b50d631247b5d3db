"""Sweeps: one recipe over a grid of config values and seeds, every cell an ordinary run folder.

    kdistill sweep RECIPE distill.temperature=1,4,8 train.lr=0.01,0.003 --seeds 0,1,2 --jobs 2

The sweep folder `<out_dir>/<name>/` holds `sweep.json` (the grid), one run folder per cell
(`distill.temperature=4,train.lr=0.01,seed=0`), `logs/` and, at the end, `results.md` and
`results.csv` (mean and standard deviation over seeds per grid point) and `runs.csv` (every cell).
Teachers live beside it, in `<out_dir>/teachers/teacher-<key>/` (run folders holding only a teacher).

Work is shared wherever the result cannot differ: every cell gets its teacher as
`teacher.checkpoint`, trained once per distinct teacher config (with the recipe's seed) for every
sweep in the same out_dir; its soft labels (cached views, tapped features) are built once per distinct
entry, with every thread, before the cells start; cells that differ only in `distill.*` keys share
one baseline (trained by the first of them, then copied). Every grid value is parsed and checked,
by building each cell's full config, before anything runs. A finished cell whose config is
unchanged is skipped; an interrupted one is resumed: a killed sweep, run again, goes on where it
stopped. Each cell runs as a `kdistill` process (`--jobs N` at once, each with its share of the
CPU threads, or its own GPU when there are several).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdistill.config import load_config
from kdistill.errors import KdistillError

# Imported now, not when first needed: a sweep runs for hours, and code edited meanwhile must not
# reach this process half-way (its cells are new processes and get the new code whole).
from kdistill.pipeline import Pipeline, changed_keys, recipe_objective, resolve_teacher_signal
from kdistill.storage import atomic_write_text
from kdistill.study import figure, mean_sd_text
from kdistill.train.distributed import die_with_parent

SWEEP_FILE = "sweep.json"
# What a cell's result is summarised by: (label, path in metrics.json), in table order.
FIGURES = (("student val", "student.val_accuracy"), ("student test", "student.test_accuracy"),
           ("baseline test", "baseline.test_accuracy"), ("teacher test", "teacher.test_accuracy"),
           ("gap recovered", "gap_recovered"), ("student params", "student.params"),
           ("student train s", "student.train_seconds"), ("student s / epoch", "student.median_epoch_seconds"),
           ("distill overhead", "distill_overhead"))
# And what is a word, not a number: every seed's value, once each.
WORDS = (("teacher signal", "teacher_signal"),)


@dataclass(frozen=True, eq=False)  # compared by identity: the config inside is not hashable
class Cell:
    """One run of the sweep: the grid point's overrides and a seed."""

    point: tuple[tuple[str, str], ...]  # (key, value) per axis, as given
    seed: int
    cfg: DictConfig  # resolved and validated, as the cell will run

    @property
    def label(self) -> str:
        """The grid point without the seed: how results are grouped."""
        return ",".join(f"{k}={v}" for k, v in self.point) or "recipe"

    @property
    def name(self) -> str:
        return folder_name(f"{self.label},seed={self.seed}")


def folder_name(text: str) -> str:
    """A run folder name for `text`: path separators and spaces replaced; long names shortened with a hash."""
    plain = "".join("_" if ch in "/\\ \t\n" else ch for ch in text)
    if len(plain.encode()) > 200:
        plain = plain.encode()[:180].decode(errors="ignore") + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return plain.lstrip("-.") or "cell"


def split_values(text: str) -> list[str]:
    """`1,2,[3,4]` -> ["1", "2", "[3,4]"]: commas split values except inside brackets, braces or quotes."""
    values, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_axes(items: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2,...` per item -> [(key, values)]; a key given twice or an empty value is refused."""
    axes, seen = [], set()
    for item in items:
        key, equals, rest = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise KdistillError(f"sweep axis {item!r} is not key=v1,v2,... (example: distill.temperature=1,4,8)")
        values = split_values(rest)
        if any(v == "" for v in values):
            raise KdistillError(f"sweep axis {item!r} has an empty value: separate values with single commas")
        if key in seen:
            raise KdistillError(f"sweep axis {key} is given twice: list all its values in one key=v1,v2,...")
        seen.add(key)
        axes.append((key, values))
    return axes


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise KdistillError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise KdistillError(f"--seeds {text!r}: give distinct non-negative integers")
    return seeds


class Sweep:
    """The grid of a recipe: its cells, its folder, and how to run them."""

    def __init__(self, recipe: str, items: list[str], seeds: list[int] | None = None, name: str | None = None,
                 jobs: int = 1):
        if jobs < 1:
            raise KdistillError(f"--jobs must be at least 1, got {jobs}")
        self.recipe, self.jobs = recipe, jobs
        given = parse_axes(items)
        for key, values in given:
            if key == "seed" or key == "name" or (key == "out_dir" and len(values) > 1):
                fix = {"seed": "use --seeds 0,1,2", "name": "use --name for the sweep folder; cells are named "
                       "after their values"}.get(key, "give one out_dir: the sweep folder goes there")
                raise KdistillError(f"sweep: {key} is set by the sweep itself: {fix}")
        # A key with one value is set in every cell, not an axis of the grid (nor part of cell names).
        self.fixed = [f"{key}={values[0]}" for key, values in given if len(values) == 1]
        self.axes = [(key, values) for key, values in given if len(values) > 1]
        base = load_config(recipe, [*self.fixed, *(f"{key}={values[0]}" for key, values in self.axes)])
        self.base_seed = int(base.seed)
        self.seeds = seeds if seeds is not None else [self.base_seed]
        self.folder = Path(base.out_dir) / folder_name(name or f"{base.name}_sweep")
        self.cells = [self._cell(point, seed) for point in itertools.product(*(
            [(key, v) for v in values] for key, values in self.axes)) for seed in self.seeds]
        names: dict[str, Cell] = {}
        for cell in self.cells:
            other = names.setdefault(cell.name, cell)
            if other is not cell:
                raise KdistillError(f"sweep cells {other.label!r} and {cell.label!r} would share the run folder "
                                    f"{cell.name!r}: give each value once, and values that differ in more than "
                                    "path separators or spaces")

    def _cell(self, point: tuple[tuple[str, str], ...], seed: int) -> Cell:
        overrides = [f"{key}={value}" for key, value in point]
        try:
            cfg = load_config(self.recipe, [*self.fixed, *overrides, f"seed={seed}"])
        except KdistillError as error:
            raise KdistillError(f"sweep cell {','.join(overrides) or 'recipe'}: {error}") from None
        return Cell(point, seed, cfg)

    # -- what is shared ---------------------------------------------------------------------
    def teacher_key(self, cell: Cell) -> str | None:
        """Cells with equal keys get the same teacher; None when the recipe gives a teacher checkpoint, or its
        scheme arranges its teachers itself (every scheme but offline: its cell is one `kdistill run`)."""
        if cell.cfg.teacher.checkpoint or cell.cfg.scheme != "offline":
            return None
        return _digest({"teacher": _plain(cell.cfg.teacher), "data": _plain(cell.cfg.data), "seed": self.base_seed})

    def baseline_key(self, cell: Cell) -> str:
        """Cells with equal keys train the same baseline (same student, training, data and seed)."""
        return _digest({"student": _plain(cell.cfg.student), "train": _plain(cell.cfg.train),
                        "data": _plain(cell.cfg.data), "seed": cell.seed})

    def signal_key(self, cell: Cell) -> str | None:
        """Cells with equal keys read the same cached teacher signal (soft labels, views, tapped features);
        None when the cell's student gets none from the cache (or its scheme builds its own)."""
        if cell.cfg.scheme != "offline":
            return None
        objective = recipe_objective(cell.cfg)
        signal = resolve_teacher_signal(cell.cfg, objective)[0]
        if signal not in ("cached", "cached_views"):
            return None
        views = signal == "cached_views"
        # The teacher config and data fix the teacher too where the sweep trains it (with the one recipe seed).
        return _digest({"teacher": _plain(cell.cfg.teacher), "data": _plain(cell.cfg.data),
                        "top_k": cell.cfg.distill.top_k,
                        "views": [cell.cfg.distill.views, _plain(cell.cfg.train.augment)] if views else None,
                        "taps": sorted(objective.teacher_taps)})

    def teacher_dir(self, key: str) -> Path:
        """Shared by the sweeps of one out_dir: a teacher config is trained once for all of them."""
        return self.folder.parent / "teachers" / f"teacher-{key}"

    def overrides(self, cell: Cell, threads: int | None, device: str | None) -> list[str]:
        """The command-line overrides that make `cell` run in its folder with the shared teacher."""
        items = [*self.fixed, *(f"{key}={value}" for key, value in cell.point)]
        items += [f"seed={cell.seed}", f"out_dir={self.folder}", f"name={cell.name}"]
        key = self.teacher_key(cell)
        if key is not None:
            items.append(f"teacher.checkpoint={self.teacher_dir(key) / 'teacher' / 'model.safetensors'}")
        if threads is not None:
            items.append(f"threads={threads}")
        if device is not None:
            items.append(f"device={device}")
        return items

    # -- running ----------------------------------------------------------------------------
    def run(self, say=print) -> Path:
        """Run every cell not done yet; write the results; returns results.md's path."""
        self._claim()
        slots = _slots(self.jobs, self.cells[0].cfg.device)
        todo = [c for c in self.cells if not self.finished(c)]
        done_before = len(self.cells) - len(todo)
        if done_before:
            say(f"sweep {self.folder}: {done_before} of {len(self.cells)} cells already done, skipped")
        teachers = {}
        for cell in todo:
            key = self.teacher_key(cell)
            if key is not None and not (self.teacher_dir(key) / "teacher" / "model.safetensors").exists():
                teachers.setdefault(key, cell)
        baselines: dict[str, Cell] = {}
        # A grown grid's new cells take the baseline a finished cell already has, where one does.
        trained = [c for c in self.cells if (self.folder / c.name / "baseline" / "model.safetensors").exists()]
        for cell in [*trained, *todo]:
            if cell.cfg.scheme == "offline":  # a scheme's cell trains its baselines in its own run folders
                baselines.setdefault(self.baseline_key(cell), cell)
        failures: list[str] = []
        # Teachers first, then one baseline per distinct student and training, then every cell.
        # On CPUs the teachers train one at a time with every thread: a small teacher finishing early
        # would otherwise leave the large one on half the threads while the other slot idles.
        teacher_slots = slots if slots[0][1] is not None else _slots(1, "cpu")
        self._parallel([("train", self.teacher_dir(k).name, c) for k, c in teachers.items()], teacher_slots, say,
                       failures, what="teacher")
        firsts = [c for c in baselines.values() if not (self.folder / c.name / "baseline" / "model.safetensors")
                  .exists()]
        self._parallel([("train --baseline", c.name, c) for c in firsts], slots, say, failures, what="baseline")
        for cell in todo:
            if cell.cfg.scheme == "offline":
                self._share_baseline(cell, baselines[self.baseline_key(cell)])
        # The teacher signal next, once per distinct entry and with every thread: cells sharing a cache would
        # otherwise wait, one slot idle, while the first of them builds it on its share of the threads.
        signals: dict[str, Cell] = {}
        for cell in todo:
            key = self.signal_key(cell)
            if key is not None:
                signals.setdefault(key, cell)
        self._parallel([("soft-labels", c.name, c) for c in signals.values()], teacher_slots, say, failures,
                       what="teacher signal")
        progress = _Progress(len(todo), time.perf_counter(), say)
        self._parallel([("run", c.name, c) for c in todo], slots, say, failures, what="cell", progress=progress)
        path = self.write_results()
        if failures:
            raise KdistillError(f"{len(failures)} sweep step(s) failed ({'; '.join(failures[:3])}); the logs are in "
                                f"{self.folder / 'logs'}; run the same sweep again to retry them")
        return path

    def _claim(self) -> None:
        """Create the sweep folder, or check that it holds this recipe's sweep (a grid may grow)."""
        record = {"made_by": "kdistill sweep", "recipe": str(self.recipe), "fixed": self.fixed, "axes": self.axes,
                  "seeds": self.seeds}
        path = self.folder / SWEEP_FILE
        if self.folder.exists() and any(self.folder.iterdir()) and not path.exists():
            raise KdistillError(f"{self.folder} exists and is not a kdistill sweep folder: give another --name "
                                "or out_dir")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2))

    def finished(self, cell: Cell) -> bool:
        """Done, with the config it would run with now (so a changed recipe reruns what it changes)."""
        run_dir = self.folder / cell.name
        if not (run_dir / "metrics.json").exists() or not (run_dir / "config.yaml").exists():
            return False
        wanted = load_config(self.recipe, self.overrides(cell, None, None))
        try:
            return not changed_keys(OmegaConf.create((run_dir / "config.yaml").read_text()), wanted)
        except Exception:  # noqa: BLE001  an unreadable config means: run it (the pipeline says what it finds)
            return False

    def _share_baseline(self, cell: Cell, first: Cell) -> None:
        """Give `cell` the baseline `first` trained (same student, training, data and seed)."""
        source, run_dir = self.folder / first.name / "baseline", self.folder / cell.name
        if cell is first or not (source / "model.safetensors").exists() or (run_dir / "baseline").exists():
            return
        # The run folder is claimed (marker, config) by the pipeline first: kdistill writes only into its own.
        cfg = load_config(self.recipe, self.overrides(cell, None, None))
        with Pipeline(cfg, resume=True, progress="quiet"):
            pass
        target = run_dir / "baseline"
        shutil.copytree(source, target.with_name("baseline.partial"), dirs_exist_ok=True)
        os.replace(target.with_name("baseline.partial"), target)

    def _parallel(self, steps: list[tuple[str, str, Cell]], slots: list[tuple[int | None, str | None]], say,
                  failures: list[str], *, what: str, progress: _Progress | None = None) -> None:
        if not steps:
            return
        free = list(slots)

        def launch(step: tuple[str, str, Cell]) -> tuple[str, int, float, Path]:
            command, name, cell = step
            log_path = self.folder / "logs" / f"{name}.{command.split()[0]}.log"
            threads, device = free.pop()
            try:
                began = time.perf_counter()
                items = self.overrides(cell, threads, device)
                if what == "teacher":  # its own folder, with the recipe's seed
                    mine = ("name=", "seed=", "teacher.checkpoint=", "out_dir=")
                    items = [i for i in items if not i.startswith(mine)]
                    items += [f"out_dir={self.teacher_dir(self.teacher_key(cell)).parent}", f"name={name}",
                              f"seed={self.base_seed}"]
                # Not --quiet: the log keeps the run's lines (data, teacher signal, epochs) for later reading.
                argv = [sys.executable, "-m", "kdistill", *command.split(), str(self.recipe), *items, "--resume"]
                with open(log_path, "w") as log:
                    # A killed sweep stops its cells (they resume), rather than leaving them to run on unseen.
                    code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
                return name, code, time.perf_counter() - began, log_path
            finally:
                free.append((threads, device))

        with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
            for name, code, seconds, log_path in pool.map(launch, steps):
                if code != 0:
                    last = _last_line(log_path)
                    failures.append(f"{what} {name}: {last}")
                    say(f"{what} {name} failed after {seconds:.0f} s: {last}")
                elif progress is not None:
                    progress.cell_done(name, self.folder / name / "metrics.json", seconds)
                else:
                    say(f"{what} {name} {'cached' if what == 'teacher signal' else 'trained'} in {seconds:.0f} s")

    # -- results ----------------------------------------------------------------------------
    def metrics(self) -> dict[Cell, dict]:
        found = {}
        for cell in self.cells:
            path = self.folder / cell.name / "metrics.json"
            if path.exists():
                metrics = found[cell] = json.loads(path.read_text())
                # Folders evaluated before metrics.json recorded the median epoch: their training summary has it.
                student, summary = metrics.get("student"), self.folder / cell.name / "student" / "summary.json"
                if isinstance(student, dict) and "median_epoch_seconds" not in student and summary.exists():
                    student["median_epoch_seconds"] = json.loads(summary.read_text()).get("median_epoch_seconds")
        return found

    def write_results(self) -> Path:
        """results.md, results.csv (per grid point: mean and sd over seeds) and runs.csv (per cell)."""
        found = self.metrics()
        keys = [key for key, _ in self.axes]
        with open(self.folder / "runs.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*keys, "seed", *(path for _, path in FIGURES), *(path for _, path in WORDS)])
            for cell, metrics in found.items():
                writer.writerow([*(v for _, v in cell.point), cell.seed, *(figure(metrics, p) for _, p in FIGURES),
                                 *(metrics.get(p) for _, p in WORDS)])
        groups: dict[str, list[tuple[Cell, dict]]] = {}
        for cell, metrics in found.items():
            groups.setdefault(cell.label, []).append((cell, metrics))
        rows = [summarise(label, entries) for label, entries in groups.items()]
        with open(self.folder / "results.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*keys, "seeds", *(f"{path}_{stat}" for _, path in FIGURES for stat in ("mean", "sd")),
                             *(path for _, path in WORDS)])
            for row in rows:
                writer.writerow([*row["values"], row["seeds"],
                                 *(row[path][stat] for _, path in FIGURES for stat in ("mean", "sd")),
                                 *(row[path] for _, path in WORDS)])
        path = self.folder / "results.md"
        atomic_write_text(path, results_markdown(self, rows))
        return path


def summarise(label: str, entries: list[tuple[Cell, dict]]) -> dict:
    """Mean and sample standard deviation over seeds of every figure of one grid point."""
    row = {"label": label, "values": [v for _, v in entries[0][0].point], "seeds": len(entries)}
    for _, path in FIGURES:
        values = [v for _, m in entries if (v := figure(m, path)) is not None]
        row[path] = {"mean": statistics.fmean(values) if values else None,
                     "sd": statistics.stdev(values) if len(values) > 1 else None}
    for _, path in WORDS:
        row[path] = ", ".join(sorted({str(m[path]) for _, m in entries if m.get(path) is not None}))
    return row


def results_markdown(sweep: Sweep, rows: list[dict]) -> str:
    keys = [key for key, _ in sweep.axes]
    lines = [f"# Sweep {sweep.folder.name}", "",
             f"Recipe `{sweep.recipe}`; seeds {', '.join(map(str, sweep.seeds))}; "
             f"{sum(r['seeds'] for r in rows)} of {len(sweep.cells)} runs finished. Mean ± standard deviation over "
             "seeds. Choose by the validation column; the test columns are for the record.", ""]
    scored = [r for r in rows if r["student.val_accuracy"]["mean"] is not None]
    best = max(scored, key=lambda r: r["student.val_accuracy"]["mean"])["label"] if scored else None
    lines.append("| " + " | ".join([*keys, "seeds", *(label for label, _ in FIGURES + WORDS)]) + " |")
    lines.append("|" + " --- |" * (len(keys) + 1 + len(FIGURES) + len(WORDS)))
    for row in rows:
        cells = [f"`{v}`" for v in row["values"]] + [str(row["seeds"])]
        cells += [mean_sd_text(row[path]["mean"], row[path]["sd"], path) for _, path in FIGURES]
        cells += [row[path] or "–" for _, path in WORDS]
        if row["label"] == best:
            cells[len(keys) + 1] = f"**{cells[len(keys) + 1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best by validation accuracy: `{best}` (in bold)."]
    return "\n".join(lines) + "\n"


class _Progress:
    """A line per finished cell, with an estimate of the time left."""

    def __init__(self, total: int, started: float, say):
        self.total, self.started, self.say, self.done = total, started, say, 0

    def cell_done(self, name: str, metrics_path: Path, seconds: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done)
        result = ""
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            student, val = figure(metrics, "student.test_accuracy"), figure(metrics, "student.val_accuracy")
            if student is not None and val is not None:
                result = f": student {100 * student:.2f} % (val {100 * val:.2f} %)"
        self.say(f"[{self.done}/{self.total}] {name}{result} in {seconds:.0f} s; "
                 f"{'done' if self.done == self.total else f'about {_duration(left)} left'}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _slots(jobs: int, device: str) -> list[tuple[int | None, str | None]]:
    """(threads, device) per parallel job: the CPU's threads shared out, or one GPU each when there are enough."""
    import torch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus >= jobs > 1:
        return [(None, f"cuda:{i}") for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    return [(threads, None)] * jobs


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _digest(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"
