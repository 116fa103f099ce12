"""The RMTL agent: K twin critics Q_k(s, a_k) trained offline TD3-style; the backbone is the actor.

Per critic update (vectorised over tasks and twins):
    a'   = clip(sigmoid(actor_target(s')) + clip(N(0, policy_noise), +-noise_clip), 0, 1)
    y_k  = r_k + gamma * (1 - done) * min_j Q^target_{j,k}(s', a'_k)
    loss = sum_j mean_b w_{b,k} (Q_{j,k}(s, a_k) - y_k)^2, averaged over tasks
with w = 1, or IPS weights that give the rare positives of each task as much total
weight as the negatives. Every ``policy_delay`` updates the targets move by ``tau``
and, when ``actor_update`` is on, the actor (the backbone) takes a TD3+BC step:
    loss_actor = -mean_b sum_k Q_{0,k}(s, pi_k(s)) / mean|.| + bc_alpha * BCE(pi(s), target)
Without an actor, a' is the behaviour policy's logged action at s' (a SARSA target).

Under torchrun (rmtl.distributed) every process draws the same global minibatch (same
generator, same seed) and the same target-policy noise, takes its contiguous slice of
both, and the critic (and actor) gradients are all-reduced share-weighted before each
optimizer step: every process takes the step one process takes on the global minibatch
(up to float summation order), so the critics are the same everywhere and the same as in
one process. Cross-fitting is untouched: folds, pools and held-out sessions are global.
From shards (``train_parts``) the train split is cut into streams of whole sessions, each
process holding only its streams' transitions: the global minibatch is every stream's own
draw (its own generator, ``stream_seed``), so it does not depend on who holds which stream;
folds and held-out sessions are still drawn over the global train sessions.

Cross-fitting (``cross_fit``, the default): train sessions are dealt into ``folds`` folds
and critic set f is trained only on transitions of the other folds; a train row is then
weighted by the set of its own session's fold, which never saw that session. Sets are
trained one after another and share the ``steps`` budget (ceil(steps / folds) each). Without it, one set is trained
on every train row and then weights those same rows: it memorises their labels through the
id fields (measured in docs/rmtl.md), so that is a control, not a default.

The loss-weight formula w = 1 - lam * Q lives here only (``loss_weights``); the rmtl
strategy calls it, with lam / twin from this agent's config unless the caller overrides.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rmtl import distributed
from rmtl.agents.config import AgentConfig
from rmtl.agents.critics import TwinTaskCritics
from rmtl.agents.replay import RowReplay
from rmtl.envs.context import context_dim, session_context
from rmtl.checkpoint import load_user_file, save_atomic
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.device import resolve_device
from rmtl.envs.transitions import Transitions
from rmtl.errors import ConfigError, DataError
from rmtl.predict import predict

FORMAT_VERSION = 2  # 2: cross-fitted critic sets, session folds, session context


def backbone_embedding(actor: nn.Module | None):
    """The backbone's FeatureEmbedding when it has the standard one, else None."""
    features = getattr(actor, "features", None) if actor is not None else None
    return features if features is not None and hasattr(features, "table") else None


def ips_weights(labels: np.ndarray, clip: float) -> np.ndarray:
    """float32 [2, K]: weight of a negative (row 0) and a positive (row 1) label per task
    (``ips_from_rate`` of the labels' positive rate).

    Each class gets half of the total weight (weights 1 / (2 * class rate)), the ratio of a
    positive's to a negative's weight is clipped to [1 / clip, clip], and the weights are
    rescaled so the average weight over the data is 1.
    """
    return ips_from_rate(labels.sum(axis=0, dtype=np.float64) / max(len(labels), 1), clip)


def ips_from_rate(rate: np.ndarray, clip: float) -> np.ndarray:
    """``ips_weights`` of tasks with positive rates ``rate`` [K]."""
    rate = np.clip(np.asarray(rate, np.float64), 1e-6, 1 - 1e-6)
    ratio = np.clip((1 - rate) / rate, 1.0 / clip, clip)  # w_pos / w_neg
    w_neg = 1.0 / ((1 - rate) + rate * ratio)  # so that w_neg * (1 - rate) + w_pos * rate = 1
    return np.stack([w_neg, w_neg * ratio]).astype(np.float32)


def stream_seed(seed: int, stream: int) -> int:
    """The seed of stream ``stream``'s generators: ``seed`` itself for stream 0 (so one stream
    draws what the in-memory agent draws), an independent one for the others."""
    if stream == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class ReplayPart:
    """The transitions of one stream of the train split: whole sessions (in memory: all of
    them, stream 0 of 1), with each session's index among all train sessions."""
    log: SessionLog
    transitions: Transitions
    sessions: np.ndarray  # int64 [log.num_sessions]: index among all train sessions (folds, held-out draw)
    stream: int = 0
    probs: np.ndarray | None = None  # [rows, K]: a frozen actor's probabilities (default: predicted)


def session_folds(num_sessions: int, folds: int, seed: int) -> np.ndarray:
    """int64 [S]: each session's fold, balanced (sizes differ by at most one) and seeded."""
    order = np.random.default_rng([int(seed), 7]).permutation(int(num_sessions))
    fold = np.empty(int(num_sessions), np.int64)
    fold[order] = np.arange(int(num_sessions)) % int(folds)
    return fold


class _EarlyStop:
    """Held-out TD error of one critic set: remembers the best critics (and targets) and
    says when ``patience`` evaluations in a row brought no lower error."""

    def __init__(self, rows: torch.Tensor, patience: int):
        self.rows, self.patience = rows, patience
        self.best, self.best_step, self.best_state, self.bad, self.history = float("inf"), 0, None, 0, []

    def observe(self, td: float, step: int, agent: "RMTLAgent") -> None:
        self.history.append(td)
        if td < self.best:
            self.best, self.best_step, self.bad = td, step, 0
            self.best_state = copy.deepcopy((agent.critic.state_dict(), agent.critic_target.state_dict()))
        else:
            self.bad += 1

    @property
    def done(self) -> bool:
        return self.bad >= self.patience

    def restore(self, agent: "RMTLAgent") -> None:
        if self.best_state is not None:
            agent.critic.load_state_dict(self.best_state[0])
            agent.critic_target.load_state_dict(self.best_state[1])


class RMTLAgent:
    """Twin per-task critics (+ targets) and optionally the backbone as a TD3+BC actor."""

    def __init__(self, spec: FeatureSpec, config: AgentConfig | None = None, actor: nn.Module | None = None,
                 *, seed: int = 0):
        self.config = replace(config or AgentConfig()).validate()  # a copy: embed_dim is resolved below
        self.spec = spec
        self.device = resolve_device(self.config.device, key="agent.device")
        self.seed = int(seed)
        torch.manual_seed(self.seed)
        cfg = self.config
        features = backbone_embedding(actor)
        embed_dim = cfg.embed_dim or (features.embed_dim if features is not None else 16)
        cfg.embed_dim = int(embed_dim)  # saved resolved, so load() rebuilds the same shapes
        unknown = [f for f in cfg.drop_fields if f not in spec.sparse_fields]
        if unknown:
            raise ConfigError(f"no sparse field '{unknown[0]}'; fields: {', '.join(spec.sparse_fields)}",
                              key="agent.drop_fields")
        self.context_names = tuple(cfg.context)
        self.num_sets = cfg.folds if cfg.cross_fit else 1
        self.critics = nn.ModuleList(
            TwinTaskCritics(spec, embed_dim=embed_dim, hidden=cfg.critic_hidden,
                            context_dim=context_dim(cfg.context, spec.num_tasks),
                            drop_fields=[spec.sparse_fields.index(f) for f in cfg.drop_fields],
                            dropout=cfg.critic_dropout)
            for _ in range(self.num_sets)).to(self.device)
        self.initialised_from_backbone = False
        if features is not None and cfg.init_from_backbone:
            self.initialised_from_backbone = all([self._copy_embeddings(features, c) for c in self.critics])
        self.critic_targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.critic_opts = [torch.optim.Adam(c.parameters(), lr=cfg.lr, weight_decay=cfg.critic_weight_decay,
                                             foreach=True) for c in self.critics]
        self._set = 0  # the critic set being trained (critic / critic_target / critic_opt point at it)
        self.session_fold: np.ndarray | None = None  # int64 [train sessions]: fold of each, set by train()
        self.trained_rows: list[np.ndarray] | None = None  # per set, bool [N]: rows its updates sampled
        self.actor = None
        self.set_actor(actor)
        self.steps_done = 0

    # -- set-up ---------------------------------------------------------------------------
    def set_actor(self, actor: nn.Module | None) -> None:
        """Use ``actor`` (a backbone returning logits [B, K]) for the next actions a'."""
        self.actor = actor
        self.actor_target = None
        self.pretrained = None
        self.actor_opt = None
        if actor is None:
            if self.config.actor_update:
                raise ConfigError("actor_update needs a backbone as the actor", key="agent.actor_update")
            return
        actor.to(self.device)
        if self.config.actor_update:
            self.actor_target = copy.deepcopy(actor).requires_grad_(False).eval()
            self.actor_opt = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=self.config.actor_lr)
            if self.config.bc_target == "pretrained":
                self.pretrained = copy.deepcopy(actor).requires_grad_(False).eval()
        else:
            self.actor_target = actor  # frozen: a' always comes from the pretrained backbone

    @property
    def critic(self) -> TwinTaskCritics:
        return self.critics[self._set]

    @property
    def critic_target(self) -> TwinTaskCritics:
        return self.critic_targets[self._set]

    @property
    def critic_opt(self) -> torch.optim.Optimizer:
        return self.critic_opts[self._set]

    def _copy_embeddings(self, features: nn.Module, critic: TwinTaskCritics) -> bool:
        mine = critic.features
        if features.table.weight.shape != mine.table.weight.shape:
            return False
        with torch.no_grad():
            mine.table.weight.copy_(features.table.weight)
            if getattr(features, "dense_dim", 0) and getattr(mine, "dense_dim", 0) == features.dense_dim:
                mine.dense_proj.load_state_dict(features.dense_proj.state_dict())
        return True

    # -- values ---------------------------------------------------------------------------
    def context_of(self, log: SessionLog) -> np.ndarray | None:
        """float32 [N, C] session context of every row of ``log`` as these critics read it (None: no context)."""
        return session_context(log, self.context_names) if self.context_names else None

    def fold_of_rows(self, log: SessionLog) -> np.ndarray:
        """int64 [N]: the critic set that may weight each row of ``log`` (its session's fold).

        ``log`` must be the train split the agent was trained on (fold_of_sessions)."""
        return self.fold_of_sessions(log.session_of_row(), log.num_sessions)

    def fold_of_sessions(self, sessions: np.ndarray, num_sessions: int) -> np.ndarray:
        """int64: the critic set that may weight rows of the given sessions (indices among
        the ``num_sessions`` train sessions the agent was trained on); -1 when the critics are
        not cross-fitted (the one set saw every row)."""
        if self.num_sets == 1:
            return np.full(len(sessions), -1, np.int64)
        if self.session_fold is None:
            raise ConfigError("the critics are cross-fitted but were never trained (no session folds)",
                              key="agent.cross_fit")
        if len(self.session_fold) != num_sessions:
            raise ConfigError(f"the critics were cross-fitted on a train split of {len(self.session_fold)} sessions; "
                              f"this one has {num_sessions}: retrain them on this data",
                              key="strategy.options.checkpoint")
        return self.session_fold[sessions]

    @torch.no_grad()
    def q_values(self, sparse: torch.Tensor, dense: torch.Tensor, actions: torch.Tensor, *, twin: str = "min",
                 fold: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """Q [B, K] of the given actions (probabilities); ``twin`` = min (clipped double Q) | mean | first.

        ``fold`` [B] picks, per row, the critic set trained without that row's session
        (fold_of_rows); None or -1 = the mean over the sets (rows none of them saw)."""
        dev = self.device
        sparse, dense, actions = sparse.to(dev), dense.to(dev), actions.to(dev)
        context = context.to(dev) if context is not None else None
        qs = []
        for critic in self.critics:
            critic.eval()
            q = critic(sparse, dense, actions, context)
            qs.append(q.min(dim=1).values if twin == "min" else q.mean(dim=1) if twin == "mean" else q[:, 0])
        q = torch.stack(qs)  # [sets, B, K]
        if self.num_sets == 1:
            return q[0]
        mean = q.mean(dim=0)
        if fold is None:
            return mean
        fold = fold.to(dev).long()
        picked = q.gather(0, fold.clamp_min(0).view(1, -1, 1).expand(1, -1, q.shape[2]))[0]
        return torch.where((fold >= 0).unsqueeze(1), picked, mean)

    def loss_weights(self, sparse: torch.Tensor, dense: torch.Tensor, probs: torch.Tensor, *,
                     lam: float | None = None, twin: str | None = None, fold: torch.Tensor | None = None,
                     context: torch.Tensor | None = None) -> torch.Tensor:
        """THE RMTL weight: w = 1 - lam * Q(s, yhat), detached, finite and >= 1 (Q <= 0).

        ``lam`` / ``twin`` default to this agent's config; ``fold`` / ``context`` as in q_values."""
        lam = self.config.lam if lam is None else float(lam)
        twin = self.config.twin if twin is None else twin
        q = self.q_values(sparse, dense, probs.detach(), twin=twin, fold=fold, context=context)
        w = 1.0 - lam * q
        return torch.nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0).clamp_min(1.0)

    def _actor_probs(self, actor: nn.Module, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(actor(sparse, dense))

    # -- training -------------------------------------------------------------------------
    def train(self, log: SessionLog, transitions: Transitions, *, steps: int | None = None, writer=None,
              progress=None, actor_probs: np.ndarray | None = None) -> dict[str, list[float]]:
        """Critic (and optional actor) updates on minibatches sampled from the row-index buffer.

        Returns the history: ``td_loss`` (mean over tasks) and ``td_loss/<task>`` every
        ``log_every`` steps (also written to TensorBoard when ``writer`` is given).
        A frozen actor's probabilities are computed once for every row (or taken from
        ``actor_probs`` [N, K], e.g. the predictions that made the behaviour actions), so a
        critic update costs no backbone forward pass. Under torchrun every process holds the
        whole split and takes its slice of each global minibatch (the module doc).
        """
        part = ReplayPart(log, transitions, np.arange(log.num_sessions, dtype=np.int64), probs=actor_probs)
        sharing = (distributed.rank(), distributed.world_size()) if distributed.active() else None
        return self.train_parts([part], streams=1, sharing=sharing, num_sessions=log.num_sessions, steps=steps,
                                writer=writer, progress=progress)

    def train_parts(self, parts: list["ReplayPart"], *, streams: int, sharing: tuple[int, int] | None,
                    num_sessions: int, steps: int | None = None, writer=None, progress=None) -> dict[str, list[float]]:
        """``train`` on the train split cut into ``streams`` streams of whole sessions, of which
        this process holds ``parts`` (rmtl.data.shard_parts; in memory: the one stream, all of
        it). The global minibatch is every stream's ``batch_size // streams`` transitions,
        drawn from that stream's pool by its own generator (``stream_seed``), in stream order;
        ``sharing`` = (index, count): this process takes that contiguous part of its one
        stream's draw (processes sharing a stream; in memory every process shares stream 0).
        Folds and held-out sessions are drawn over the ``num_sessions`` train sessions (the
        parts' ``sessions`` index them), so neither depends on the stream or process count."""
        cfg = self.config
        if cfg.num_threads is None:
            return self._train(parts, streams, sharing, num_sessions, steps, writer, progress)
        before = torch.get_num_threads()
        torch.set_num_threads(cfg.num_threads)  # small critics: fewer threads are often faster on busy CPUs
        try:
            return self._train(parts, streams, sharing, num_sessions, steps, writer, progress)
        finally:
            torch.set_num_threads(before)

    def _train(self, parts: list["ReplayPart"], streams: int, sharing: tuple[int, int] | None, num_sessions: int,
               steps: int | None, writer, progress) -> dict:
        cfg = self.config
        steps = cfg.steps if steps is None else int(steps)
        steps = -(-steps // self.num_sets)  # the total is split over the sets: cross-fitting costs no extra time
        parts = [self._checked_part(p) for p in parts]
        ips = self._ips(parts, sharing) if cfg.ips else None
        if self.num_sets > 1 and (self.session_fold is None or len(self.session_fold) != num_sessions):
            self.session_fold = session_folds(num_sessions, self.num_sets, self.seed)
        session_of_row = [p.sessions[p.log.session_of_row()] for p in parts]
        row_fold = [self.fold_of_sessions(s, num_sessions) for s in session_of_row]
        tasks = self.spec.tasks
        history: dict[str, list[float]] = {"step": [], "set": [], "td_loss": [], **{f"td_loss/{t}": [] for t in tasks}}
        if self.actor is not None:
            self.actor.eval()  # no dropout / batch-norm updates while it only proposes a'
        frozen = [self._frozen(p) for p in parts]  # a frozen actor's probabilities of every row, or None
        self._frozen_probs = frozen[0] if len(frozen) == 1 else None  # the one part's (inspected by tests)
        self.trained_rows = []
        distributed.check_global_batch(cfg.batch_size, "agent.batch_size", max(streams, distributed.world_size()))
        per_stream = cfg.batch_size // streams  # each stream's rows of a global minibatch
        mine = distributed.part_slice(per_stream, *sharing) if sharing is not None else slice(0, per_stream)
        share = len(parts) * (mine.stop - mine.start) / (per_stream * streams)
        held_sessions = self._heldout_sessions(num_sessions)  # bool [sessions] or None (fixed steps)
        history["stopped_at"] = []  # per set: updates taken (< steps when early stopping stopped it)
        with distributed.all_or_none("checking the critics' replay pools"):  # before any collective of the updates
            for p, fold, sessions in zip(parts, row_fold, session_of_row):
                trainable = np.ones(len(fold), bool) if held_sessions is None else ~held_sessions[sessions]
                for k in range(self.num_sets):
                    if not (trainable & ((fold != k) if self.num_sets > 1 else True)).any():
                        where = f"stream {p.stream} of {streams}" if streams > 1 else "the train split"
                        raise DataError(f"{where} has no transitions to train critic set {k} on (too few sessions "
                                        "outside its fold and the held-out ones): prepare with more shards, run "
                                        "fewer streams (data.shard_streams) or lower agent.folds", column="session")
        for k in range(self.num_sets):
            self._set = k
            replays, held_rows = [], []
            for p, fold, sessions, probs in zip(parts, row_fold, session_of_row, frozen):
                pool = np.ones(p.log.num_rows, bool) if self.num_sets == 1 else fold != k
                if held_sessions is None:
                    rows = None if self.num_sets == 1 else np.flatnonzero(pool)
                else:
                    held = held_sessions[sessions]
                    rows = np.flatnonzero(pool & ~held)
                    held_rows.append(torch.from_numpy(np.flatnonzero(pool & held)))
                replays.append(RowReplay(p.log, p.transitions, self.device, rows=rows, next_probs=probs))
            stopper = None if held_sessions is None else _EarlyStop(held_rows, cfg.critic_patience)
            seen = [torch.zeros(p.log.num_rows, dtype=torch.bool) for p in parts]
            gens = [torch.Generator().manual_seed(stream_seed(self.seed + self.steps_done, p.stream)) for p in parts]
            noise_gens = [torch.Generator(device=self.device).manual_seed(stream_seed(self.seed + 1 + self.steps_done,
                                                                                      p.stream)) for p in parts]
            running = torch.zeros(len(tasks), device=self.device)
            count = 0
            for i in range(steps):
                pieces, noises = [], []
                for replay, gen, noise_gen, used in zip(replays, gens, noise_gens, seen):
                    idx = replay.draw(per_stream, gen)  # the stream's draw: the same on every process holding it
                    used[replay.state_row.index_select(0, idx)] = True
                    noise = self._target_noise(per_stream, noise_gen)  # drawn for the stream's rows too
                    pieces.append(replay.batch(idx[mine]))  # this process's part (all of it unless shared)
                    noises.append(None if noise is None else noise[mine])
                b = pieces[0] if len(pieces) == 1 else {key: torch.cat([x[key] for x in pieces]) for key in pieces[0]}
                td = self._critic_step(b, ips, None if noises[0] is None else torch.cat(noises), share)
                running += td
                count += 1
                self.steps_done += 1
                actor_logs = None
                if self.steps_done % cfg.policy_delay == 0:
                    if cfg.actor_update and k == 0:  # the actor steps against the first set only
                        actor_logs = self._actor_step(b, share)
                    self._soft_update()
                last = i == steps - 1
                if self.steps_done % cfg.log_every == 0 or last:
                    mean = (distributed.share_weighted_sum(running, share=share) / max(count, 1)).cpu().numpy()
                    history["step"].append(self.steps_done)
                    history["set"].append(k)
                    history["td_loss"].append(float(mean.mean()))
                    for j, t in enumerate(tasks):
                        history[f"td_loss/{t}"].append(float(mean[j]))
                    if writer is not None:
                        self._log(writer, b, mean, actor_logs, final=last)
                    running.zero_()
                    count = 0
                if progress is not None:
                    progress(1)
                if stopper is not None and ((i + 1) % cfg.critic_eval_every == 0 or last):
                    stopper.observe(self._heldout_td(replays, stopper.rows, ips, sharing), i + 1, self)
                    for key, value in (("set", k), ("step", i + 1), ("td", stopper.history[-1])):
                        history.setdefault(f"heldout/{key}", []).append(value)
                    if stopper.done:
                        if progress is not None:
                            progress(steps - i - 1)
                        break
            if stopper is not None:
                stopper.restore(self)
            history["stopped_at"].append(i + 1 if steps else 0)
            self.trained_rows.append(torch.cat(seen).numpy())
        self._set = 0
        if distributed.active():  # identical already (same reduced steps); rank 0's, so it is guaranteed
            self._broadcast()
        return history

    def _checked_part(self, part: "ReplayPart") -> "ReplayPart":
        transitions = part.transitions
        if transitions.action.shape[1] != self.spec.num_tasks:
            raise DataError(f"transitions have {transitions.action.shape[1]} tasks, the agent {self.spec.num_tasks}",
                            column="action")
        want = self.critics[0].context_dim
        if want and (transitions.context is None or transitions.context.shape[1] != want):
            # the same features build_transitions makes; computed here when the caller did not ask for them
            part = replace(part, transitions=replace(transitions, context=session_context(part.log, self.context_names)))
        return part

    def _ips(self, parts: list["ReplayPart"], sharing: tuple[int, int] | None) -> torch.Tensor:
        """IPS weights from the label rates of the WHOLE train split (summed over the processes;
        a stream shared by several processes is counted by the first of them)."""
        k = self.spec.num_tasks
        counted = sharing is None or sharing[0] == 0
        sums = [float(x) for x in (sum(p.log.labels.sum(axis=0, dtype=np.float64) for p in parts)
                                   if counted and parts else np.zeros(k))]
        rows = float(sum(p.log.num_rows for p in parts)) if counted else 0.0
        total = distributed.sum_over_ranks([*sums, rows])
        rate = np.asarray(total[:k], np.float64) / max(total[k], 1.0)
        return torch.from_numpy(ips_from_rate(rate, self.config.ips_clip)).to(self.device)

    def _frozen(self, part: "ReplayPart") -> torch.Tensor | None:
        """A frozen actor's probabilities of every row of ``part`` (its a' for any next state)."""
        if self.actor is None or self.config.actor_update:
            return None
        probs = part.probs
        if probs is None:
            probs = predict(self.actor_target, part.log)  # the shared loop: eval mode, no grad
        elif probs.shape != part.log.labels.shape:
            raise DataError(f"actor_probs have shape {probs.shape}, expected {part.log.labels.shape}",
                            column="actor_probs")
        return torch.as_tensor(np.asarray(probs, dtype=np.float32), device=self.device)

    def _broadcast(self) -> None:
        distributed.broadcast_module(self.critics)
        distributed.broadcast_module(self.critic_targets)
        if self.config.actor_update and self.actor is not None:
            distributed.broadcast_module(self.actor)
            distributed.broadcast_module(self.actor_target)

    def _target_noise(self, batch_size: int, gen: torch.Generator) -> torch.Tensor | None:
        """[B, K] target-policy noise of a minibatch (None without an actor: a' is logged)."""
        if self.actor_target is None:
            return None
        noise = torch.randn((batch_size, self.spec.num_tasks), generator=gen, device=self.device)
        return noise * self.config.policy_noise

    def _heldout_sessions(self, num_sessions: int) -> np.ndarray | None:
        """bool [sessions]: the train sessions held out for early stopping (None: early stopping
        off). One seeded draw per session, so every set holds out the same sessions of its folds."""
        cfg = self.config
        if cfg.critic_eval_every is None:
            return None
        held = np.random.default_rng([int(self.seed), 11]).random(num_sessions) < cfg.critic_holdout
        if not held.any():
            raise DataError(f"agent.critic_holdout={cfg.critic_holdout} of {num_sessions} sessions holds out none: "
                            "raise it or turn early stopping off (agent.critic_eval_every: null)", column="session")
        return held

    @torch.no_grad()
    def _heldout_td(self, replays: list[RowReplay], rows: list[torch.Tensor], ips: torch.Tensor | None,
                    sharing: tuple[int, int] | None = None, chunk: int = 8192) -> float:
        """Mean TD error (over rows, twins and tasks; IPS-weighted as in training) of the
        current critic set on the held-out transitions ``rows`` of each replay, against its
        target without target noise; summed over the processes (a shared stream's rows split)."""
        cfg = self.config
        self.critic.eval()
        total, n = 0.0, 0
        for replay, held in zip(replays, rows):
            if sharing is not None:
                held = held[distributed.part_slice(len(held), *sharing)]  # each sharer its part; the sums are added up below
            for start in range(0, len(held), chunk):
                b = replay.batch(held[start:start + chunk])
                if self.actor_target is None:
                    nxt = b["next_action"]
                elif "next_probs" in b:
                    nxt = b["next_probs"]
                else:
                    nxt = self._actor_probs(self.actor_target, b["next_sparse"], b["next_dense"])
                q_next = self.critic_target(b["next_sparse"], b["next_dense"], nxt,
                                            b.get("next_context")).min(dim=1).values
                target = b["reward"] + cfg.gamma * (1.0 - b["done"]).unsqueeze(1) * q_next
                err = (self.critic(b["sparse"], b["dense"], b["action"], b.get("context")) - target.unsqueeze(1)).pow(2)
                if ips is not None:
                    err = err * torch.where(b["labels"] > 0.5, ips[1], ips[0]).unsqueeze(1)
                total += float(err.mean(dim=(1, 2)).sum())
                n += err.shape[0]
        total, n = distributed.sum_over_ranks([total, float(n)])
        return total / max(n, 1)

    def _critic_step(self, b: dict, ips: torch.Tensor | None, noise: torch.Tensor | None,
                     share: float = 1.0) -> torch.Tensor:
        """One TD update on minibatch ``b`` (``noise``: its target-policy noise [B, K]);
        ``share``: b's rows / the global minibatch's, for the gradient all-reduce."""
        cfg = self.config
        self.critic.train()
        with torch.no_grad():
            if self.actor_target is not None:
                if "next_probs" in b:  # a frozen actor's, precomputed
                    nxt = b["next_probs"]
                else:
                    nxt = self._actor_probs(self.actor_target, b["next_sparse"], b["next_dense"])
                nxt = (nxt + noise.clamp(-cfg.noise_clip, cfg.noise_clip)).clamp(0.0, 1.0)
            else:
                nxt = b["next_action"]
            q_next = self.critic_target(b["next_sparse"], b["next_dense"], nxt,
                                        b.get("next_context")).min(dim=1).values  # [B, K]
            target = b["reward"] + cfg.gamma * (1.0 - b["done"]).unsqueeze(1) * q_next
        q = self.critic(b["sparse"], b["dense"], b["action"], b.get("context"))  # [B, 2, K]
        err = (q - target.unsqueeze(1)).pow(2)
        if ips is not None:
            labels = b["labels"]
            w = torch.where(labels > 0.5, ips[1], ips[0])  # [B, K]
            err = err * w.unsqueeze(1)
        per_task = err.mean(dim=0).sum(dim=0)  # [K]: sum over twins, mean over batch
        self.critic_opt.zero_grad(set_to_none=True)
        per_task.mean().backward()
        distributed.reduce_gradients_(self.critic.parameters(), share)  # the global minibatch's gradient
        self.critic_opt.step()
        return per_task.detach() / 2  # mean over twins, for logging

    def _actor_step(self, b: dict, share: float = 1.0) -> dict[str, float]:
        cfg = self.config
        self.actor.train()
        logits = self.actor(b["sparse"], b["dense"])
        probs = torch.sigmoid(logits)
        self.critic.requires_grad_(False)
        q = self.critic(b["sparse"], b["dense"], probs, b.get("context"))[:, 0].sum(dim=1)  # [B]
        self.critic.requires_grad_(True)
        # TD3+BC normalisation by the GLOBAL minibatch's mean |Q| (a batch statistic: reduced)
        scale = distributed.share_weighted_sum(q.abs().mean().detach(), share=share)
        q_term = -q.mean() / scale.clamp_min(1e-6)
        if cfg.bc_target == "pretrained":
            with torch.no_grad():
                target = self._actor_probs(self.pretrained, b["sparse"], b["dense"])
        else:
            target = b["labels"]
        bc = F.binary_cross_entropy_with_logits(logits, target)
        loss = q_term + cfg.bc_alpha * bc
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.reduce_gradients_([p for p in self.actor.parameters() if p.requires_grad], share)
        self.actor_opt.step()
        self.actor.eval()
        return {"bc": float(bc.detach()), "q": float(q.mean().detach()), "loss": float(loss.detach())}

    @torch.no_grad()
    def _soft_update(self) -> None:
        tau = self.config.tau
        pairs = [(self.critic, self.critic_target)]
        if self.config.actor_update and self.actor is not None:
            pairs.append((self.actor, self.actor_target))
        for online, target in pairs:
            src = [p for p in online.parameters()]  # only the set being trained moves
            dst = [p for p in target.parameters()]
            torch._foreach_lerp_(dst, src, tau)

    def _log(self, writer, b: dict, td: np.ndarray, actor_logs: dict | None, final: bool = False) -> None:
        step = self.steps_done
        writer.add_scalar("agent/td_loss", float(td.mean()), step)
        hist = final or step % (10 * self.config.log_every) == 0
        if hist:
            q = self.q_values(b["sparse"], b["dense"], b["action"], context=b.get("context")).cpu()
        for k, t in enumerate(self.spec.tasks):
            writer.add_scalar(f"agent/td_loss/{t}", float(td[k]), step)
            if hist:
                writer.add_histogram(f"agent/q/{t}", q[:, k], step)
                writer.add_scalar(f"agent/q_mean/{t}", float(q[:, k].mean()), step)
        if actor_logs is not None:
            writer.add_scalar("agent/actor_bc", actor_logs["bc"], step)
            writer.add_scalar("agent/actor_q", actor_logs["q"], step)

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "format": FORMAT_VERSION, "spec": self.spec.to_dict(), "config": asdict(self.config),
            "seed": self.seed, "steps_done": self.steps_done,
            "critics": self.critics.state_dict(), "critic_targets": self.critic_targets.state_dict(),
            "session_fold": self.session_fold,
        }
        if self.config.actor_update and self.actor is not None:
            state["actor"] = self.actor.state_dict()
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """Write the critics (and the updated actor's weights, if trained) atomically."""
        return save_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, actor: nn.Module | None = None, *, device: str | None = None) -> "RMTLAgent":
        """An agent from ``save``; ``actor`` is optional (weights need only the critics)."""
        path = Path(path)
        state = load_user_file(path, "agent checkpoint")
        if not isinstance(state, dict) or state.get("format") not in (1, FORMAT_VERSION) or \
                ("critic" not in state and "critics" not in state):
            raise DataError(f"not an RMTL agent checkpoint (format {FORMAT_VERSION} expected)", path=path)
        config = AgentConfig(**state["config"])
        if state["format"] == 1:  # one critic set on every train row, no session context
            config.cross_fit, config.context = False, []
            state = {**state, "critics": {f"0.{k}": v for k, v in state["critic"].items()},
                     "critic_targets": {f"0.{k}": v for k, v in state["critic_target"].items()}}
        if device is not None:
            config.device = device
        if actor is not None and "actor" in state:
            actor.load_state_dict(state["actor"])
        config_no_actor = copy.copy(config)
        config_no_actor.actor_update = False
        config_no_actor.init_from_backbone = False
        agent = cls(FeatureSpec.from_dict(state["spec"]), config_no_actor, None, seed=state["seed"])
        agent.critics.load_state_dict(state["critics"])
        agent.critic_targets.load_state_dict(state["critic_targets"])
        fold = state.get("session_fold")
        agent.session_fold = None if fold is None else np.asarray(fold, dtype=np.int64)
        agent.config = config
        agent.steps_done = int(state["steps_done"])
        if actor is not None:
            agent.set_actor(actor)
        return agent
