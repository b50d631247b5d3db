"""One report over many runs: `kdistill report PATH...` on run folders and sweep folders.

Runs whose configs differ only in the seed (and in where or how fast they ran) are one *setting*:
the report gives their mean and standard deviation, and error bars in every plot. The keys whose
values differ between settings are the report's axes: for each numeric one, a plot of accuracy
against it (the temperature, a loss weight, ...). Then accuracy against size and latency, with the
teachers, baselines and distilled students as labelled points and the accuracy-latency frontier
drawn, and the validation curves.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdistill.config.describe import flatten
from kdistill.errors import KdistillError
from kdistill.report import read_history
from kdistill.storage import atomic_write, atomic_write_text

ROLES = ("teacher", "baseline", "student")
# Keys that do not make runs different settings: the seed (averaged over), and where or how fast they ran.
NOT_SETTINGS = ("seed", "name", "out_dir", "threads", "device", "data.root", "data.download", "data.on_device",
                "distill.cache_dir", "eval.")
MAX_CURVES = 12  # settings drawn in the curves plot: more lines than this is no longer readable


@dataclass
class Run:
    folder: Path
    config: dict  # flattened: "train.lr" -> 0.01
    metrics: dict

    def figure(self, path: str):
        return figure(self.metrics, path)


def figure(metrics: dict, path: str) -> float | None:
    """The number at a dotted path of metrics.json ("student.test_accuracy"), or None."""
    value = metrics
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def mean_sd_text(mean: float | None, sd: float | None, path: str) -> str:
    """"88.00 ± 2.83 %" for accuracies, "1,210" for parameter counts, "5.4" for seconds, 3 decimals otherwise;
    "–" for no value."""
    if mean is None:
        return "–"
    percent = path.endswith("accuracy")
    digits = 2 if percent else 0 if path.endswith("params") else 1 if path.endswith("seconds") else 3
    scale = 100 if percent else 1
    text = f"{mean * scale:,.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")
    return text + (" %" if percent else "")


@dataclass
class Setting:
    """Runs with the same config but for the seed."""

    key: tuple
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    def values(self, path: str) -> list[float]:
        return [v for run in self.runs if (v := run.figure(path)) is not None]

    def mean(self, path: str) -> float | None:
        values = self.values(path)
        return statistics.fmean(values) if values else None

    def sd(self, path: str) -> float | None:
        values = self.values(path)
        return statistics.stdev(values) if len(values) > 1 else None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run (a folder with metrics.json and config.yaml) in or under the paths given."""
    runs: list[Run] = []
    seen: set[Path] = set()  # a run folder given alone and inside its sweep folder counts once
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise KdistillError(f"{path} is not a folder: give run folders or sweep folders")
        found = [path] if (path / "metrics.json").is_file() else \
            sorted({p.parent for p in path.glob("*/metrics.json")} | {p.parent for p in path.glob("*/*/metrics.json")})
        found = [f for f in found if (f / "config.yaml").is_file()]
        if not found:
            raise KdistillError(f"{path} holds no finished kdistill runs (no metrics.json with a config.yaml in it or "
                                "its subfolders): give run folders or sweep folders")
        for folder in found:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(_read_run(folder))
    return runs


def _read_run(folder: Path) -> Run:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise KdistillError(f"{folder}: cannot read its config.yaml or metrics.json ({error})") from None
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise KdistillError(f"{folder}: config.yaml or metrics.json is not kdistill's")
    return Run(folder, flatten(config), metrics)


def group(runs: list[Run]) -> tuple[list[Setting], list[str]]:
    """The settings (runs equal but for the seed), and the config keys whose values differ between them."""
    settings: dict[tuple, Setting] = {}
    for run in runs:
        key = tuple(sorted((k, json.dumps(v)) for k, v in run.config.items() if not k.startswith(NOT_SETTINGS)))
        settings.setdefault(key, Setting(key)).runs.append(run)
    found = list(settings.values())
    keys = sorted({k for s in found for k, _ in s.key})
    varying = [k for k in keys if len({dict(s.key).get(k) for s in found}) > 1]
    # The shared teacher's path says the same as the teacher keys beside it: name it only if nothing else does.
    shown = [k for k in varying if k != "teacher.checkpoint"] or varying
    # A label says what sets a setting apart: with one varying key, its value; with several, the keys
    # whose value differs from the most common one (a study over many axes would otherwise repeat them all).
    usual = {k: collections.Counter(dict(s.key).get(k) for s in found).most_common(1)[0][0]
             for k in shown} if len(shown) > 1 else {}
    for setting in found:
        values = dict(setting.key)
        setting.label = ", ".join(f"{_short(k)}={_plain(values.get(k))}" for k in shown
                                  if k not in usual or values.get(k) != usual[k]) or "the recipe as it is"
    return found, shown


def _short(key: str) -> str:
    """A config key as a label: `distill.losses.kd.weight` -> `kd.weight`, `train.augment.hflip` -> `augment.hflip`."""
    for prefix, replacement in (("distill.losses.", ""), ("distill.", ""), ("train.augment.", "augment."),
                                ("teacher.kwargs.", "teacher.")):
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key


def write_study(paths: list[str | Path], out: Path) -> Path:
    """report.md and its plots in `out`; returns report.md's path."""
    runs = find_runs(paths)
    settings, axes = group(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = [*(_plot_against(settings, axes, key, out) for key in axes if _numeric(settings, key)),
             _plot_size_and_latency(settings, out), _plot_curves(settings, out)]
    lines = [f"# Report on {len(runs)} runs in {len(settings)} settings", "",
             "From " + ", ".join(f"`{p}`" for p in paths) + ". Runs that differ only in the seed are one setting: "
             "mean ± standard deviation over seeds. Choose by validation accuracy; the test set is for the record.",
             "", _table(settings, axes), ""]
    scored = [s for s in settings if s.mean("student.val_accuracy") is not None]
    if len(scored) > 1:
        best = max(scored, key=lambda s: s.mean("student.val_accuracy"))
        lines += [f"Best by validation accuracy: **{best.label}**.", ""]
    for title, name in (p for p in plots if p is not None):
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# -- table --------------------------------------------------------------------------------------
COLUMNS = (("teacher test", "teacher.test_accuracy"), ("baseline test", "baseline.test_accuracy"),
           ("student val", "student.val_accuracy"), ("student test", "student.test_accuracy"),
           ("gap recovered", "gap_recovered"), ("student params", "student.params"),
           ("student latency (ms, batch 1)", "student.latency_ms.batch_1"))


def _table(settings: list[Setting], axes: list[str]) -> str:
    head = ["setting", "seeds", *(title for title, _ in COLUMNS)]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in settings:
        cells = [s.label, str(len(s.runs)), *(mean_sd_text(s.mean(path), s.sd(path), path) for _, path in COLUMNS)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- plots --------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def _numeric(settings: list[Setting], key: str) -> bool:
    values = [dict(s.key).get(key) for s in settings]
    parsed = [json.loads(v) if v is not None else None for v in values]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed)


AXIS_TITLES = {"distill.temperature": "temperature T", "train.lr": "learning rate", "train.epochs": "epochs",
               "distill.views": "cached views per sample"}


def _plot_against(settings: list[Setting], axes: list[str], key: str, out: Path) -> tuple[str, str]:
    """Student test accuracy against `key`, one line per combination of the other axes, error bars = sd."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [k for k in axes if k != key]
    series: dict[str, list[Setting]] = {}
    for s in settings:
        values = dict(s.key)
        series.setdefault(", ".join(f"{_short(k)}={_plain(values[k])}" for k in others if k in values)
                          or "distilled student", []).append(s)
    if any(len(members) > 1 for members in series.values()):  # lines only: lone points belong to other axes
        series = {name: members for name, members in series.items() if len(members) > 1}
    if len(series) == 1:  # nothing to tell apart
        series = {"distilled student": next(iter(series.values()))}
    for name, members in series.items():
        members.sort(key=lambda s: json.loads(dict(s.key)[key]))
        xs = [json.loads(dict(s.key)[key]) for s in members]
        ys = [_pct(s.mean("student.test_accuracy")) for s in members]
        errors = [_pct(s.sd("student.test_accuracy")) or 0 for s in members]
        line = ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name).lines[0]
        baselines = {round(m, 6) for s in members if (m := s.mean("baseline.test_accuracy")) is not None}
        if len(baselines) == 1:  # the student from scratch this line should beat, in its colour
            ax.axhline(100 * baselines.pop(), linestyle="--", color=line.get_color(), alpha=0.7,
                       label=f"{name}: baseline" if len(series) > 1 else "baseline (mean)")
    teachers = {round(m, 6) for s in settings if (m := s.mean("teacher.test_accuracy")) is not None}
    if len(teachers) == 1:
        ax.axhline(100 * teachers.pop(), linestyle=":", color="grey", label="teacher (mean)")
    xs = [json.loads(dict(s.key)[key]) for s in settings]
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    title = AXIS_TITLES.get(key, key)
    ax.set(title=f"distilled student's test accuracy against {title}", xlabel=title, ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return f"Accuracy against {title}", _save(fig, out, f"accuracy_vs_{key.replace('.', '_')}.png")


def _plot_size_and_latency(settings: list[Setting], out: Path) -> tuple[str, str] | None:
    """Accuracy against parameters and against CPU latency; every model a labelled point, the frontier drawn."""
    points = []  # (label, role, params, latency, accuracy, sd)
    seen = set()
    for s in settings:
        for role in ROLES:
            accuracy = s.mean(f"{role}.test_accuracy")
            if accuracy is None:
                continue
            name = s.runs[0].metrics.get(role, {}).get("model", role)
            label = f"{role} {name}" if role != "student" else f"student {name} ({s.label})"
            identity = (role, name, round(accuracy, 6))
            if role != "student" and identity in seen:  # the same teacher or baseline in many settings: once
                continue
            seen.add(identity)
            points.append((label, role, s.mean(f"{role}.params"), s.mean(f"{role}.latency_ms.batch_1"),
                           _pct(accuracy), _pct(s.sd(f"{role}.test_accuracy")) or 0))
    if not points:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"teacher": "tab:red", "baseline": "tab:grey", "student": "tab:blue"}
    for ax, index, xlabel in ((panels[0], 2, "parameters"), (panels[1], 3, "latency, batch 1, CPU (ms)")):
        drawn = [p for p in points if p[index] is not None]
        frontier = _frontier([(p[index], p[4]) for p in drawn])
        students = [p for p in drawn if p[1] == "student"]
        best = max(students, key=lambda p: p[4]) if students else None
        for point in drawn:
            label, role, *values = point
            x, y, err = values[index - 2], values[2], values[3]
            ax.errorbar([x], [y], yerr=[err], marker="o", capsize=3, color=colours[role], linestyle="none")
            # Teachers, baselines, the best student and the frontier are named; other students are dots.
            if role != "student" or point is best or (x, y) in frontier:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(frontier) > 1:
            ax.step(*zip(*frontier, strict=True), where="post", color="black", alpha=0.4, label="frontier")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"accuracy against {xlabel.split(',')[0]}")
        ax.grid(alpha=0.3)
    return "Accuracy against size and latency", _save(fig, out, "accuracy_vs_size_and_latency.png")


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by increasing cost."""
    best, kept = -math.inf, []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            kept.append((cost, accuracy))
            best = accuracy
    return kept


def _plot_curves(settings: list[Setting], out: Path) -> tuple[str, str] | None:
    """Validation accuracy per epoch of each setting's distilled student (mean, band = sd), and one baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    baseline_drawn = False
    for s in settings[:MAX_CURVES]:
        for role in ("baseline", "student"):
            if role == "baseline" and baseline_drawn:
                continue
            histories = [h for run in s.runs if (h := read_history(run.folder / role / "metrics.jsonl"))
                         and all(isinstance(r.get("val_accuracy"), (int, float)) for r in h)]
            if not histories:
                continue
            length = min(len(h) for h in histories)
            epochs = [histories[0][i]["epoch"] for i in range(length)]
            per_epoch = [[100 * h[i]["val_accuracy"] for h in histories] for i in range(length)]
            means = [statistics.fmean(v) for v in per_epoch]
            label = s.label if role == "student" else "baseline (first setting)"
            line, = ax.plot(epochs, means, linestyle="--" if role == "baseline" else "-", label=label,
                            marker="o" if length <= 30 else None, markersize=3)
            if len(histories) > 1:
                sds = [statistics.stdev(v) for v in per_epoch]
                ax.fill_between(epochs, [m - d for m, d in zip(means, sds, strict=True)],
                                [m + d for m, d in zip(means, sds, strict=True)], color=line.get_color(), alpha=0.15)
            drawn = True
            baseline_drawn |= role == "baseline"
    if not drawn:
        plt.close(fig)
        return None
    title = "validation accuracy per epoch" + (f" (first {MAX_CURVES} settings)" if len(settings) > MAX_CURVES else "")
    ax.set(title=title, xlabel="epoch", ylabel="validation accuracy (%)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return "Training curves", _save(fig, out, "curves.png")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _plain(encoded: str | None) -> str:
    if encoded is None:
        return "–"
    value = json.loads(encoded)
    return value if isinstance(value, str) else json.dumps(value)
