"""What the training loop writes to TensorBoard, and under which tags.

Tags (see docs/training.md):
  train/loss/<task>            mean per-sample BCE over the last ``log_every`` steps
  train/samples_per_sec        training throughput over the same window
  weights/<task>               the strategy's weight for the task (per-sample weights: their batch mean)
  weights_hist/<task>          histogram of per-sample weights (strategies returning [B, K])
  strategy/<name>              what ``strategy.last_logs()`` returns (e.g. gradient cosines), except its
                               ``weight/<task>`` entries, which are weights/<task> already
  gates/<task>/expert_<e>      MoE gate usage (model.last_gate_usage, [K, E]) when the backbone has it
  val/<task>/<metric>          validation metrics at every evaluation; val/mean_auc
  final/<split>/<task>/<metric> metrics of the best checkpoint on val and test
  HParams tab                  the run's config (flattened keys) against its final/<split>/<task>/<metric>

Steps are global: the fits of one pipeline (pretrain, then fine-tune) continue one axis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.tensorboard import SummaryWriter


class TrainLogger:
    def __init__(self, log_dir: str | Path, tasks: Sequence[str], *, purge_step: int | None = None):
        self.tasks = list(tasks)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def train_window(self, step: int, mean_losses: torch.Tensor, weights: torch.Tensor | None,
                     strategy_logs: Mapping[str, float], gate_usage: torch.Tensor | None,
                     samples_per_sec: float | None) -> None:
        w = self.writer
        for task, value in zip(self.tasks, mean_losses.tolist()):
            w.add_scalar(f"train/loss/{task}", value, step)
        if samples_per_sec is not None:
            w.add_scalar("train/samples_per_sec", samples_per_sec, step)
        if weights is not None:
            weights = weights.detach().float().cpu()
            if weights.dim() == 2:  # per-sample weights [B, K]
                for k, task in enumerate(self.tasks):
                    w.add_histogram(f"weights_hist/{task}", weights[:, k], step)
                weights = weights.mean(0)
            for task, value in zip(self.tasks, weights.reshape(-1).tolist()):
                w.add_scalar(f"weights/{task}", value, step)
        for name, value in strategy_logs.items():
            if name.startswith("weight/"):
                continue  # the strategy's own copy of the weights above (weights/<task>)
            try:
                w.add_scalar(f"strategy/{name}", float(value), step)
            except (TypeError, ValueError):
                continue  # a non-scalar log entry is the strategy's business, not TensorBoard's
        if gate_usage is not None:
            usage = gate_usage.detach().float().cpu()
            if usage.dim() == 2 and usage.shape[0] == len(self.tasks):
                for k, task in enumerate(self.tasks):
                    for e, value in enumerate(usage[k].tolist()):
                        w.add_scalar(f"gates/{task}/expert_{e}", value, step)

    def metrics(self, prefix: str, step: int, metrics: Mapping[str, Mapping[str, float]]) -> None:
        for task, mets in metrics.items():
            for name, value in mets.items():
                self.writer.add_scalar(f"{prefix}/{task}/{name}", float(value), step)

    def hparams(self, config: Any, final_metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        """The HParams tab: ``config`` (a dataclass or mapping, flattened to dotted keys) against
        the final metrics, which are already scalars of this run (``final/<split>/<task>/<metric>``)."""
        from torch.utils.tensorboard.summary import hparams

        params = flatten_hparams(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config))
        metric_tags = {f"final/{split}/{task}/{name}": float(v) for split, per_task in final_metrics.items()
                       for task, mets in per_task.items() for name, v in mets.items()}
        exp, ssi, sei = hparams(params, metric_tags)
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}; values TensorBoard cannot show as they
    are (None, lists, empty dicts) become strings."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_hparams(value, full + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[full] = value
        else:
            out[full] = str(value)
    return out
