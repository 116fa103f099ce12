"""The one prediction loop: probabilities of a model over the rows of a split, in row order,
and the metrics of those predictions.

    probs = predict(model, log.split("test"))        # [N, K] float32
    evaluate(model, log.split("val"))                 # {task: {auc, logloss, session_logloss, gauc}}
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rmtl.data.sessionlog import SessionLog
from rmtl.metrics import evaluate_predictions


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (cpu for a module without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def task_columns(model: nn.Module, num_tasks: int) -> list[int]:
    """The label columns the model predicts, in its output order: all of them, unless the
    model says otherwise (a SingleTask built for one task exposes ``task_columns``)."""
    return list(getattr(model, "task_columns", range(num_tasks)))


@torch.no_grad()
def predict_arrays(model: nn.Module, sparse: np.ndarray, dense: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """sigmoid(model(sparse, dense)) as float32 [N, K], in chunks of ``batch_size`` rows
    (eval mode, no grad; the model's train/eval mode is restored afterwards)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(sparse), batch_size):
            s = torch.from_numpy(np.ascontiguousarray(sparse[lo:lo + batch_size])).to(device)
            d = torch.from_numpy(np.ascontiguousarray(dense[lo:lo + batch_size])).to(device)
            out.append(torch.sigmoid(model(s, d).float()).cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def predict(model: nn.Module, log_split: SessionLog, batch_size: int = 8192) -> np.ndarray:
    """Probabilities [N, K] for every row of a split, in row order."""
    probs = predict_arrays(model, log_split.sparse, log_split.dense, batch_size)
    if probs.shape[0] == 0:
        return np.zeros((0, len(task_columns(model, log_split.spec.num_tasks))), dtype=np.float32)
    return probs


def evaluate(model: nn.Module, log_split: SessionLog, batch_size: int = 8192, *,
             predictor=predict) -> dict[str, dict[str, float]]:
    """{task: {auc, logloss, session_logloss, gauc}} of the model on one split; ``predictor``
    has predict's signature (rmtl.distributed.predict_sharded splits the rows over processes)."""
    probs = predictor(model, log_split, batch_size=batch_size)
    cols = task_columns(model, log_split.spec.num_tasks)
    return evaluate_predictions(log_split.labels[:, cols], probs, log_split.session_of_row(), log_split.user,
                                [log_split.spec.tasks[c] for c in cols])
