"""Side-by-side final metrics of several runs, and a PNG of the strategy weights over
training read back from the runs' TensorBoard event files.

    table, png = make_report(["runs/ew", "runs/pcgrad"], out="report.png")
    table, _ = make_report(glob("runs/*"), out=None, group=True)   # seeds pooled: mean +- sd

Columns are labelled ``model/strategy/s<seed>`` from each fit's metrics.json (older runs:
from the run's config.yaml), plus the fit's tag when a run holds several fits.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import numpy as np

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


@dataclass
class Fit:
    """One fit of a run, as ``rmtl report`` shows it."""
    folder: Path  # the folder holding metrics.json
    run: Path  # the run dir given on the command line
    tag: str  # train, pretrain, finetune, ...
    model: str
    strategy: str
    seed: int | None
    data: dict  # the whole metrics.json
    config: dict  # the run's config.yaml ({} when absent)
    label: str = ""  # model/strategy/s<seed>[ tag][ [folder]]
    unseeded: str = ""  # model/strategy[ tag]: what the seeds of one setting share

    @property
    def setting(self) -> str:
        """The run's config without what differs between the seeds of one setting."""
        rest = {k: v for k, v in self.config.items() if k not in ("seed", "run_dir")}
        if isinstance(rest.get("data"), dict):
            rest["data"] = {k: v for k, v in rest["data"].items() if k != "seed"}
        return json.dumps(rest, sort_keys=True, default=str)


def _run_config(root: Path) -> dict:
    """The run's config.yaml as a plain dict ({} when absent or unreadable; metrics.json suffices)."""
    path = root / "config.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        loaded = yaml.safe_load(path.read_text())  # safe: a named file must not run code
    except Exception:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def collect_fits(run_dirs: Sequence[str | os.PathLike]) -> list[Fit]:
    """Every fit of every run, labelled ``model/strategy/s<seed>`` (plus `` tag`` when a run
    holds several fits, plus `` [folder]`` when two labels would still be equal)."""
    fits: list[Fit] = []
    for run in run_dirs:
        root = Path(run)
        folders = find_fits(root)
        config = _run_config(root if root not in folders else root.parent)
        for folder in folders:
            data = read_json(folder / "metrics.json", "metrics file")
            model = data.get("model_name") or (config.get("model") or {}).get("name") or data.get("model", "?")
            strategy = (data.get("strategy_name") or (config.get("strategy") or {}).get("name")
                        or data.get("strategy", "?"))
            seed = data.get("seed", config.get("seed"))
            fit = Fit(folder, root, data.get("tag", folder.name), str(model), str(strategy), seed, data, config)
            tag = f" {fit.tag}" if len(folders) > 1 else ""
            fit.label = f"{fit.model}/{fit.strategy}" + (f"/s{seed}" if seed is not None else "") + tag
            fit.unseeded = f"{fit.model}/{fit.strategy}{tag}"
            fits.append(fit)
    seen: dict[str, int] = {}
    for fit in fits:
        seen[fit.label] = seen.get(fit.label, 0) + 1
    for fit in fits:
        if seen[fit.label] > 1:  # e.g. two runs that differ only in the learning rate
            fit.label += f" [{fit.run.name}]"
    return fits


def collect_metrics(run_dirs: Sequence[str | os.PathLike], split: str = "test") -> dict[str, dict]:
    """{column label: {task: {metric: value}}} for every fit of every run, in the given order."""
    out: dict[str, dict] = {}
    for fit in collect_fits(run_dirs):
        if split not in fit.data:
            raise DataError(f"has no '{split}' metrics", path=fit.folder / "metrics.json")
        label = fit.label
        while label in out:  # the same run given twice
            label += "'"
        out[label] = fit.data[split]
    return out


def group_seeds(run_dirs: Sequence[str | os.PathLike], split: str = "test") -> dict[str, dict]:
    """{label without seed: {task: {metric: (mean, sd, n)}}}: the fits that differ only in
    the seed, pooled (sd with n - 1; nan for one seed)."""
    groups: dict[tuple[str, str], list[Fit]] = {}
    for fit in collect_fits(run_dirs):
        if split not in fit.data:
            raise DataError(f"has no '{split}' metrics", path=fit.folder / "metrics.json")
        groups.setdefault((fit.unseeded, fit.setting), []).append(fit)
    out: dict[str, dict] = {}
    for (label, _), fits in groups.items():
        if sum(key[0] == label for key in groups) > 1:  # same model/strategy, other settings (lr, ...)
            label += f" [{fits[0].run.name}]"
        members = [f.data[split] for f in fits]
        per_task: dict[str, dict] = {}
        for task in members[0]:
            per_task[task] = {}
            for name in members[0][task]:
                values = np.array([m.get(task, {}).get(name, np.nan) for m in members], dtype=np.float64)
                sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
                per_task[task][name] = (float(values.mean()), sd, len(values))
        out[f"{label} (n={len(members)})"] = per_task
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
            cells_in = [metrics[l].get(task, {}).get(name) for l in labels]
            # a cell is a value, or (mean, sd, n) of a group of seeds
            values = [c[0] if isinstance(c, (tuple, list)) else c for c in cells_in]
            finite = [v for v in values if v is not None and not math.isnan(v)]
            best = None
            if finite:
                best = max(finite) if name in ("auc", "gauc") else min(finite)
            cells = []
            for v, c in zip(values, cells_in):
                if v is None:
                    cells.append("-")
                elif math.isnan(v):
                    cells.append("nan")
                else:
                    sd = f" +- {c[1]:.4f}" if isinstance(c, (tuple, list)) and not math.isnan(c[1]) else ""
                    cells.append(f"{v:.4f}{sd}" + ("*" if len(finite) > 1 and v == best else " "))
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
    for fit in collect_fits(run_dirs):
        series[fit.label] = {tag[len(WEIGHT_PREFIX):]: sv for tag, sv in read_scalars(fit.folder).items()}
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
                split: str = "test", group: bool = False) -> tuple[str, Path | None]:
    """(the metrics table, the PNG path or None when ``out`` is None); ``group`` pools the
    seeds of one setting into mean +- sd columns."""
    table = format_table(group_seeds(run_dirs, split) if group else collect_metrics(run_dirs, split))
    png = plot_weights(run_dirs, out) if out is not None else None
    return table, png
