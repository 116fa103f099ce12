"""Side-by-side final metrics of several runs, and a PNG of the strategy weights over
training read back from the runs' TensorBoard event files.

    table, png = make_report(["runs/ew", "runs/pcgrad"], out="report.png")
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

from rmtl.atomic import atomic_path, read_json
from rmtl.errors import DataError
from rmtl.metrics import METRICS
from rmtl.tables import text_table

WEIGHT_PREFIX = "weights/"


def find_fits(run_dir: str | os.PathLike) -> list[Path]:
    """The folders of one run that hold a fit's metrics.json (``<run>/<tag>/``), sorted by
    time; a run dir that IS such a folder counts too."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError("not a run directory", path=root)
    if (root / "metrics.json").exists():
        return [root]
    fits = sorted((p.parent for p in root.glob("*/metrics.json")), key=lambda p: (p / "metrics.json").stat().st_mtime)
    if not fits:
        raise DataError("no metrics.json found (is the run finished?)", path=root)
    return fits


def _label(fit_dir: Path, root: Path, fits: list[Path]) -> str:
    """The run's folder name; 'run/tag' when the run holds several fits (e.g. pretrain, finetune)."""
    return root.name if fit_dir == root or len(fits) == 1 else f"{root.name}/{fit_dir.name}"


def collect_metrics(run_dirs: Sequence[str | os.PathLike], split: str = "test") -> dict[str, dict]:
    """{column label: {task: {metric: value}}} for every fit of every run, in the given order."""
    out: dict[str, dict] = {}
    for run in run_dirs:
        root = Path(run)
        fits = find_fits(root)
        for fit_dir in fits:
            data = read_json(fit_dir / "metrics.json", "metrics file")
            if split not in data:
                raise DataError(f"has no '{split}' metrics", path=fit_dir / "metrics.json")
            label = _label(fit_dir, root, fits)
            while label in out:  # two runs with the same folder name
                label += "'"
            out[label] = data[split]
    return out


def format_table(metrics: dict[str, dict], metric_names: Sequence[str] = METRICS) -> str:
    """Rows task/metric, one column per run; the best value of each row is starred."""
    labels = list(metrics)
    tasks: list[str] = []
    for mets in metrics.values():
        tasks += [t for t in mets if t not in tasks]
    rows = []
    for task in tasks:
        for name in metric_names:
            values = [metrics[l].get(task, {}).get(name) for l in labels]
            finite = [v for v in values if v is not None and not math.isnan(v)]
            best = None
            if finite:
                best = max(finite) if name in ("auc", "gauc") else min(finite)
            cells = []
            for v in values:
                if v is None:
                    cells.append("-")
                elif math.isnan(v):
                    cells.append("nan")
                else:
                    cells.append(f"{v:.4f}" + ("*" if len(finite) > 1 and v == best else " "))
            rows.append([f"{task} {name}", *cells])
    head = ["metric", *labels]
    return text_table([head, *rows], label_columns=1, rule="columns")


def read_scalars(event_dir: str | os.PathLike, prefix: str = WEIGHT_PREFIX) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of the scalar tags starting with ``prefix`` in one event folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.ERROR)  # it warns about the purges a resumed run asks for
    try:
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(prefix):
            events = acc.Scalars(tag)
            out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def plot_weights(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One subplot per task, one line per run (fit): the strategy's weight over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for run in run_dirs:
        root = Path(run)
        fits = find_fits(root)
        for fit_dir in fits:
            series[_label(fit_dir, root, fits)] = {tag[len(WEIGHT_PREFIX):]: sv for tag, sv in read_scalars(fit_dir).items()}
    tasks: list[str] = []
    for per_task in series.values():
        tasks += [t for t in per_task if t not in tasks]
    n = max(len(tasks), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks or ["(no weights logged)"]):
        for label, per_task in series.items():
            if task in per_task:
                steps, values = per_task[task]
                ax.plot(steps, values, label=label, linewidth=1.2)
        ax.set_title(f"weight of {task}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def make_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = "report.png",
                split: str = "test") -> tuple[str, Path | None]:
    """(the metrics table, the PNG path or None when ``out`` is None)."""
    table = format_table(collect_metrics(run_dirs, split))
    png = plot_weights(run_dirs, out) if out is not None else None
    return table, png
