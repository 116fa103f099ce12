"""RMTL: per-sample, per-task loss weights from the agent's critics.

    w_{i,k} = 1 - lam * Q_k(s_i, sigmoid(logit_{i,k}))      (detached; >= 1 because Q <= 0)
    loss    = mean_k mean_i w_{i,k} * BCE_{i,k}

The formula itself is RMTLAgent.loss_weights (one place); lam and twin come from the
agent's checkpoint unless given here. A train row is weighted by the critic set that never
saw its session (cross-fitting), with the session context the critics were trained on;
both need the train split, which the training loop hands over through ``bind_log``.

``transform`` turns the strategy into the sanity arms of ``rmtl compare``:
- "none": the critics' weights;
- "shuffle": the same weights permuted within each batch, per task (keeps their
  distribution, breaks their link to the rows);
- "label": each row gets the mean weight of its label class (per task), measured over the
  train split: what the weights do through the labels alone.
The critics are frozen here; they were trained by the agent stage.
"""

from __future__ import annotations

import math
import os

import numpy as np

import torch
from torch import nn

from rmtl.errors import ConfigError
from rmtl.weighting.base import Strategy

TWINS = ("min", "mean", "first")
TRANSFORMS = ("none", "shuffle", "label")


class RMTLStrategy(Strategy):
    name = "rmtl"

    def __init__(self, num_tasks: int, agent=None, checkpoint: str | os.PathLike | None = None,
                 lam: float | None = None, twin: str | None = None, transform: str = "none", seed: int = 0):
        super().__init__(int(num_tasks))
        if lam is not None:
            try:
                lam = float(lam)
            except (TypeError, ValueError):
                raise ConfigError(f"expected a number >= 0, got {lam!r}", key="strategy.options.lam") from None
            if not math.isfinite(lam) or lam < 0:
                raise ConfigError(f"expected a number >= 0, got {lam!r}", key="strategy.options.lam")
        if twin is not None and twin not in TWINS:
            raise ConfigError(f"expected one of {', '.join(TWINS)}, got {twin!r}", key="strategy.options.twin")
        if transform not in TRANSFORMS:
            raise ConfigError(f"expected one of {', '.join(TRANSFORMS)}, got {transform!r}",
                              key="strategy.options.transform")
        if agent is None:
            if checkpoint is None:
                raise ConfigError("the rmtl strategy needs trained critics: give strategy.options.checkpoint "
                                  "(the agent file written by `rmtl agent` / `rmtl pipeline`) or pass agent=",
                                  key="strategy.options.checkpoint")
            from rmtl.agents.rmtl_agent import RMTLAgent

            agent = RMTLAgent.load(checkpoint)
        if agent.spec.num_tasks != self.num_tasks:
            raise ConfigError(f"the agent's critics cover {agent.spec.num_tasks} tasks, the model {self.num_tasks}",
                              key="strategy.options.checkpoint")
        agent.critics.requires_grad_(False)
        # kept outside the module tree on purpose: the critics are frozen, so they must not
        # join the training loop's optimizer (which also holds strategy.parameters())
        self.__dict__["agent"] = agent
        self.lam = agent.config.lam if lam is None else lam  # one source: the checkpoint, unless overridden
        self.twin = agent.config.twin if twin is None else twin
        self.transform = transform
        self.tasks = list(agent.spec.tasks)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._row_fold = self._row_context = self._class_weights = None
        self._row_index = None  # sorted global train rows of the bound table (None: rows index it directly)

    def bind_parts(self, parts, num_sessions: int, model: nn.Module | None = None, counted: bool = True) -> None:
        """The train rows this process streams (rmtl.data.shard_parts.TrainPart of each of its
        streams, whole sessions): each row's critic set and session context, looked up by the
        global train row a streamed batch carries. What ``bind_log`` gives, for these rows only
        (``num_sessions``: all train sessions, which the agent's folds must cover). For
        ``transform="label"`` the class means are summed over every process's parts
        (``counted``: False for a process whose streams another process already counts)."""
        from rmtl import distributed

        agent = self.agent
        rows = np.concatenate([p.rows for p in parts])
        order = np.argsort(rows, kind="stable")
        fold = np.concatenate([agent.fold_of_sessions(p.sessions[p.log.session_of_row()], num_sessions)
                               for p in parts])
        self._row_index = torch.from_numpy(rows[order])
        self._row_fold = torch.from_numpy(fold[order])
        ctxs = [agent.context_of(p.log) for p in parts]
        self._row_context = None if ctxs[0] is None else torch.from_numpy(np.concatenate(ctxs)[order])
        self._class_weights = None
        if self.transform == "label":
            k = self.num_tasks
            sums, counts = torch.zeros(2, k, dtype=torch.float64), torch.zeros(2, k, dtype=torch.float64)
            for p in parts if counted else []:
                s, c = self._label_sums(p.log, model, p.rows)
                sums, counts = sums + s, counts + c
            total = distributed.sum_over_ranks([*sums.flatten().tolist(), *counts.flatten().tolist()])
            sums, counts = (torch.tensor(total[:2 * k], dtype=torch.float64).view(2, k),
                            torch.tensor(total[2 * k:], dtype=torch.float64).view(2, k))
            self._class_weights = (sums / counts.clamp_min(1)).float()

    def bind_log(self, train_log, model: nn.Module | None = None) -> None:
        """The train split the model is fine-tuned on: each row's critic set (its session's
        fold) and session context; for ``transform="label"`` also the class-mean weights."""
        agent = self.agent
        self._row_index = None
        self._row_fold = torch.from_numpy(agent.fold_of_rows(train_log))
        ctx = agent.context_of(train_log)
        self._row_context = None if ctx is None else torch.from_numpy(ctx)
        self._class_weights = None
        if self.transform == "label":
            self._class_weights = self._label_means(train_log, model)

    def _label_means(self, log, model: nn.Module | None, batch_size: int = 8192) -> torch.Tensor:
        """[2, K]: mean weight of negatives (row 0) and positives (row 1) over the train split,
        at the predictions of ``model`` as it is when bound (0.5 without a model)."""
        sums, counts = self._label_sums(log, model, np.arange(log.num_rows), batch_size)
        return (sums / counts.clamp_min(1)).float()

    def _label_sums(self, log, model: nn.Module | None, rows: np.ndarray, batch_size: int = 8192):
        """(weight sums, row counts) [2, K] float64 per label class over ``log``'s rows, whose
        keys in the bound table are ``rows``."""
        from rmtl.predict import predict

        probs = predict(model, log) if model is not None else np.full(log.labels.shape, 0.5, np.float32)
        sums, counts = torch.zeros(2, self.num_tasks, dtype=torch.float64), torch.zeros(2, self.num_tasks, dtype=torch.float64)
        for lo in range(0, log.num_rows, batch_size):
            w = self._critic_weights(torch.from_numpy(log.sparse[lo:lo + batch_size]),
                                     torch.from_numpy(log.dense[lo:lo + batch_size]),
                                     torch.from_numpy(probs[lo:lo + batch_size]),
                                     torch.from_numpy(rows[lo:lo + batch_size])).double()
            y = torch.from_numpy(log.labels[lo:lo + batch_size]).double()
            sums[1] += (w * y).sum(0)
            sums[0] += (w * (1 - y)).sum(0)
            counts[1] += y.sum(0)
            counts[0] += (1 - y).sum(0)
        return sums, counts

    def _check_features(self, model: nn.Module) -> None:
        """The critics index the same vocabularies as the model: a log prepared differently would not fit."""
        spec = getattr(model, "spec", None)
        if spec is None or getattr(self, "_checked", False):
            return
        mine = self.agent.spec
        if list(spec.cardinalities) != list(mine.cardinalities) or spec.num_dense != mine.num_dense:
            raise ConfigError("the critics were trained on a different feature layout (sparse cardinalities "
                              f"{list(mine.cardinalities)}, {mine.num_dense} dense) than the model's "
                              f"({list(spec.cardinalities)}, {spec.num_dense} dense); retrain them on this data",
                              key="strategy.options.checkpoint")
        self._checked = True

    def _critic_weights(self, sparse, dense, probs, rows: torch.Tensor | None) -> torch.Tensor:
        agent = self.agent
        needs = agent.num_sets > 1 or agent.context_names
        if needs and self._row_fold is None:
            raise ValueError("these critics are cross-fitted and/or read session context: call "
                             "strategy.bind_log(train_split) first (fit does)")
        fold = context = None
        if rows is not None and self._row_fold is not None:
            rows = rows.cpu().long()
            if self._row_index is not None:  # streamed rows: their places in the bound table
                rows = torch.searchsorted(self._row_index, rows)
            fold = self._row_fold.index_select(0, rows)
            context = None if self._row_context is None else self._row_context.index_select(0, rows)
        return agent.loss_weights(sparse, dense, probs, lam=self.lam, twin=self.twin, fold=fold, context=context)

    def weights(self, sparse: torch.Tensor, dense: torch.Tensor, logits: torch.Tensor,
                rows: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K] weights of a batch (``rows``: its row indices in the bound train split), detached, >= 1."""
        probs = torch.sigmoid(logits.detach().float())
        if self.transform == "label":
            if self._class_weights is None or labels is None:
                raise ValueError("transform='label' needs bind_log(train_split) and the batch labels")
            cw = self._class_weights.to(logits.device)
            w = torch.where(labels > 0.5, cw[1], cw[0])
        else:
            w = self._critic_weights(sparse, dense, probs, rows).to(logits.device)
            if self.transform == "shuffle":
                perm = torch.argsort(torch.rand(w.shape, generator=self._gen), dim=0).to(w.device)
                w = w.gather(0, perm)
        self._last_w = w
        return w

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        context = context or {}
        batch, logits = context.get("batch"), context.get("logits")
        if batch is None or logits is None:
            raise ValueError("the rmtl strategy needs context['batch'] (features) and context['logits'] (predictions)")
        self._check_features(model)
        w = self.weights(batch.sparse, batch.dense, logits, rows=batch.rows, labels=batch.labels).to(losses.dtype)
        loss = (losses * w).mean(dim=0).mean()
        loss.backward()
        self._logs = {}
        for k, task in enumerate(self.tasks):
            self._logs[f"rmtl/weight_mean/{task}"] = float(w[:, k].mean())
            self._logs[f"rmtl/weight_max/{task}"] = float(w[:, k].max())
        return w.detach()
