"""The run's report: metrics.json as a Markdown table and per-epoch curves as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from kdistill.errors import KdistillError
from kdistill.evaluation import busy_latency_note
from kdistill.storage import atomic_write, atomic_write_text

ROLES = ("teacher", "baseline", "student")
HISTORY_KEYS = ("epoch", "train_loss")  # what the curves read from every epoch record
ROLE_TITLES = {"teacher": "teacher", "baseline": "student from scratch", "student": "student distilled"}


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def rows_of(metrics: dict) -> list[str]:
    """The models a metrics.json describes, in table order: a scheme lists its own (`rows`), a run has ROLES."""
    rows = metrics.get("rows")
    return [row for row in (rows if isinstance(rows, list) else ROLES) if row in metrics]


def row_title(metrics: dict, row: str) -> str:
    return metrics[row].get("title") or ROLE_TITLES.get(row, row)


def comparison_table(metrics: dict) -> str:
    """The side-by-side table (Markdown), shared by report.md and the CLI's output."""
    roles = rows_of(metrics)
    # CPU latency always; GPU latency too when the models trained on one.
    timed = [(kind, key) for kind, key in (("cpu", "latency_ms"), ("gpu", "gpu_latency_ms"))
             if any(key in metrics[role] for role in roles)]
    columns = [(kind, key, batch) for kind, key in timed
               for batch in sorted({k for role in roles for k in metrics[role].get(key, {})},
                                   key=lambda k: int(k.split("_")[1]))]
    header = ["model", "arch", "test acc", "val acc", "test NLL", "agreement", "params", "checkpoint",
              *[f"{kind.upper()} b{batch.split('_')[1]} (ms)" for kind, _, batch in columns], "train s", "samples/s"]
    rows = [header, ["---"] * len(header)]
    for role in roles:
        m = metrics[role]
        size = m.get("checkpoint_bytes")
        rows.append([
            row_title(metrics, role), m.get("model", ""), _percent(m["test_accuracy"]), _percent(m.get("val_accuracy")),
            _number(m["test_nll"], 4), _percent(m["agreement"]), f"{m['params']:,}",
            "–" if size is None else f"{size / 1024:,.0f} KiB",
            *[_number(m.get(key, {}).get(batch), 3) for _, key, batch in columns],
            _number(m.get("train_seconds"), 1), _number(m.get("train_samples_per_second"), 0),
        ])
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def result_lines(metrics: dict) -> list[str]:
    """What the comparison table cannot say: the gap recovered (or why it is undefined), noisy latencies."""
    gap = metrics.get("gap_recovered")
    note = metrics.get("gap_recovered_note")
    lines = []
    if gap is not None:
        lines.append(f"gap recovered: {gap:.3f} of the teacher's lead over the baseline ({note})")
    elif note:
        lines.append(f"gap recovered: {note}")
    busy = busy_latency_note(metrics)
    if busy:
        lines.append(f"note: {busy}")
    return lines


def data_line(metrics: dict) -> str | None:
    data = metrics.get("data")
    if not isinstance(data, dict):
        return None
    sizes = " / ".join(f"{n:,} {split}" for split, n in data["sizes"].items())
    shape = "x".join(map(str, data["input_shape"]))
    return f"Data: {data['name']}, {sizes}, {shape}, {data['num_classes']} classes; read from " \
           f"{', '.join(f'`{source}`' for source in data['sources']) or 'built-in data'}."


def class_table(metrics: dict) -> str | None:
    """Test accuracy per class and model (Markdown), when the metrics hold it."""
    data = metrics.get("data")
    roles = [role for role in rows_of(metrics) if "class_accuracy" in metrics[role]]
    if not isinstance(data, dict) or not roles:
        return None
    rows = [["class", *(row_title(metrics, role) for role in roles)], ["---"] * (len(roles) + 1)]
    for i, name in enumerate(data["classes"]):
        rows.append([name, *(_percent(metrics[role]["class_accuracy"][i]) for role in roles)])
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def write_report(run_dir: Path, metrics: dict, config_yaml: str, histories: dict[str, Path] | None = None,
                 notes: list[str] = ()) -> None:
    """report.md and curves.png; a scheme passes its models' histories and what its table cannot say."""
    scheme = metrics.get("scheme")
    lines = [
        f"# kdistill run `{run_dir.name}`" + (f" (scheme: {scheme})" if scheme else ""),
        "",
        comparison_table(metrics),
        "",
        *[f"{line[0].upper()}{line[1:]}." for line in result_lines(metrics)],
        *notes,
        "",
        f"Latency: median forward time on the {metrics.get('latency_device', 'cpu').upper()}"
        + (f" and on the GPU {metrics['gpu_latency_device']} (warmed up, synchronised)"
           if metrics.get("gpu_latency_device") else "")
        + ", the models timed in interleaved rounds so that none is favoured by when it ran.",
        "",
    ]
    overhead = metrics.get("distill_overhead")
    if overhead is not None:
        lines += [f"Distillation epoch time / baseline epoch time (medians): {overhead:.3f} "
                  f"(teacher signal: {metrics.get('teacher_signal', '?')}).", ""]
    lines += ["Model selection used the validation split only; the test set was evaluated once, at the end.", ""]
    if (line := data_line(metrics)) is not None:
        lines += [line, ""]
    lines += ["![curves](curves.png)", ""]
    lines += compressed_section(run_dir)
    if (table := class_table(metrics)) is not None:
        lines += ["## Test accuracy per class", "", table, ""]
    lines += [
        "## Config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    write_curves(run_dir, histories)


def compressed_section(run_dir: Path) -> list[str]:
    """A row per `kdistill compress` model, when the run has them (details in compressed/report.md)."""
    path = run_dir / "compressed" / "metrics.json"
    if not path.is_file():
        return []
    from kdistill.deploy.frontier import compression_table, headline

    try:
        metrics = json.loads(path.read_text())
        lines = ["## Compressed models", "", compression_table(metrics), ""]
        if (line := headline(metrics)) is not None:
            lines += [line, ""]
    except (ValueError, KeyError, TypeError, AttributeError):  # hand-edited or from another version
        return ["## Compressed models", "", f"{path} is unreadable: run `kdistill compress` again.", ""]
    return lines + ["Details and the accuracy-latency-size frontier: [compressed/report.md](compressed/report.md).", ""]


def read_history(path: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl; a line that is not one of ours is a one-line error naming the file."""
    if not path.exists():
        return []
    history = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and all(isinstance(record.get(k), (int, float)) and
                                                 not isinstance(record.get(k), bool) for k in HISTORY_KEYS)):
            raise KdistillError(f"{path} line {number} is not an epoch record of kdistill's; delete the line (or "
                                "retrain that model with --force)")
        history.append(record)
    return history


def write_curves(run_dir: Path, histories: dict[str, Path] | None = None) -> None:
    """curves.png: training loss and validation accuracy per epoch, for the three models of a run or, with
    `histories` ({title: metrics.jsonl}), for the models a scheme trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if histories is None:
        histories = {ROLE_TITLES[role]: run_dir / role / "metrics.jsonl" for role in ROLES}
    for title, path in histories.items():
        history = read_history(path)
        if not history:
            continue
        epochs = [r["epoch"] for r in history]
        ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label=title)
        if all(isinstance(r.get("val_accuracy"), (int, float)) for r in history):
            ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], marker="o", label=title)
    ax_loss.set(title="training loss (each model's own objective)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / "curves.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
