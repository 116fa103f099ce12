"""BatchRL-MTF end to end: logs -> user models -> logged fusion data -> policies -> evaluation.

1. SessionLog of KuaiRand-schema logs with the fusion tasks (embedded synthetic by default).
2. Training user model (fitted on train rows; by default its predictions are also the
   ranker's o, or ``ranker.kind=backbone`` fits an rmtl backbone for o) and a held-out
   user model (other size, seed and rows: train + val).
3. Training simulator (train sessions, training user model); evaluation simulator (test
   sessions, held-out user model answering, logged labels where logged).
4. Logged data: behaviour policy (default weighting + Gaussian noise) on train sessions
   (BCQ's data) and on test sessions in the evaluation simulator (FQE / MTF-GAUC data).
5. Policies: equal weights, the behaviour default, CEM (on the training simulator),
   BCQ (offline, on the logged data), SB3 TD3 (online, training simulator).
6. Evaluation per policy: conservative FQE value, MTF-GAUC, simulator total reward and
   depth under the held-out user model (and under the training one, for contrast).

Writes RUN_DIR/results.json, RUN_DIR/config.yaml, RUN_DIR/logged_{train,heldout}.npz and
TensorBoard events in RUN_DIR/tb (bcq/alpha/<task>, bcq/critic_q, bcq/critic_loss,
bcq/vae_loss, bcq/actor_loss, cem/alpha/<task>, cem/best_return, fqe/<policy>/<estimate>_loss,
eval/<column>/<policy>)..
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rmtl.fusion.bcq import BCQ
from rmtl.fusion.fqe import ConservativeFQE, mtf_gauc
from rmtl.fusion.baselines import cem_search, train_td3
from rmtl.fusion.data import behaviour_policy, collect, constant_policy, simulate
from rmtl.atomic import write_text
from rmtl.fusion.env import split_rows, split_sessions
from rmtl.fusion.simulator import FUSION_TASKS, FusionSimulator
from rmtl.fusion.user_model import UserResponseModel
from rmtl.errors import ConfigError
from rmtl.fusion.config import FusionConfig
from rmtl.tables import text_table

COLUMNS = ["fqe_value", "fqe_plain", "mtf_gauc", "sim_reward", "sim_depth", "train_sim_reward"]


@dataclass
class FusionResult:
    table: dict  # policy -> {column: value}
    alphas: dict  # policy -> mean alpha per task on held-out states
    run_dir: Path
    timings: dict = field(default_factory=dict)


def _write_text(text: str, path: Path) -> None:
    write_text(path, text)


def _alpha_vector(tasks: list[str], mapping: dict, key: str) -> np.ndarray:
    unknown = set(mapping) - set(tasks) - set(FUSION_TASKS)  # defaults of unused tasks are ignored
    if unknown:
        raise ConfigError(f"unknown task(s) {sorted(unknown)}; tasks are {tasks}", key=key)
    return np.asarray([float(mapping.get(t, 0.0)) for t in tasks], np.float32)


def load_log(cfg: FusionConfig):
    from rmtl.data.prepare import prepare

    synthetic = dict(cfg.data.synthetic) if cfg.data.data_dir is None else None
    if synthetic is not None:
        synthetic.setdefault("seed", cfg.seed)
    prepared = prepare("kuairand", cfg.data.data_dir, cache_dir=cfg.data.cache_dir, session_gap=cfg.data.session_gap,
                       seed=cfg.seed, reader_options={"tasks": list(cfg.data.tasks)}, use_cache=cfg.data.use_cache,
                       synthetic=synthetic or None)
    return prepared.log


def run_fusion(cfg: FusionConfig, *, run_dir: str | os.PathLike | None = None, verbose: bool = True) -> FusionResult:
    """Train and evaluate every configured policy; returns the comparison table."""
    from torch.utils.tensorboard import SummaryWriter

    say = print if verbose else (lambda *a, **k: None)
    run_dir = Path(run_dir or cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), run_dir / "config.yaml")
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    log = load_log(cfg)
    tasks = list(log.spec.tasks)
    train_rows = split_rows(log, "train")
    heldout_rows = np.concatenate([train_rows, split_rows(log, "val")])
    test_sessions = split_sessions(log, "test")
    say(f"log: {log.num_rows:,} impressions, {log.num_sessions:,} sessions, tasks {', '.join(tasks)}")
    lap("data")

    um = cfg.user_model
    ranker = UserResponseModel.fit(log, train_rows, dim=um.dim, epochs=um.epochs, lr=um.lr, l2=um.l2, seed=cfg.seed)
    if cfg.ranker.kind == "backbone":  # o from a fitted backbone; the training user model still answers
        from rmtl.fusion.backbone_ranker import BackboneRanker, fit_backbone

        rk = cfg.ranker
        backbone = fit_backbone(log, rk.backbone, dict(rk.options), epochs=rk.epochs, batch_size=rk.batch_size,
                                lr=rk.lr, seed=cfg.seed)
        ranker_model = BackboneRanker(backbone, log, train_rows)
    else:
        ranker_model = ranker
    heldout = UserResponseModel.fit(log, heldout_rows, dim=um.heldout_dim, epochs=um.epochs, lr=um.lr, l2=um.l2,
                                    seed=cfg.seed + um.heldout_seed_offset)
    lap("user_models")

    env_options = cfg.env  # a FusionEnvConfig: the simulator's own options
    train_sim = FusionSimulator(log, split_sessions(log, "train"), ranker_model, ranker, env_options,
                                profile_rows=train_rows, seed=cfg.seed)
    eval_sim = FusionSimulator(log, test_sessions, ranker_model, heldout, env_options,
                               profile_rows=train_rows, seed=cfg.seed + 1)
    low, high = train_sim.cfg.action_low, train_sim.cfg.action_high
    default_alpha = _alpha_vector(tasks, dict(cfg.behaviour.default_alpha), "behaviour.default_alpha")
    logged = collect(train_sim, behaviour_policy(default_alpha, cfg.behaviour.noise, low, high, seed=cfg.seed),
                     train_sim.sessions, cfg.behaviour.passes)
    held = collect(eval_sim, behaviour_policy(default_alpha, cfg.behaviour.noise, low, high, seed=cfg.seed + 1),
                   test_sessions, cfg.behaviour.heldout_passes)
    logged.save(run_dir / "logged_train.npz")
    held.save(run_dir / "logged_heldout.npz")
    say(f"logged fusion decisions: {len(logged):,} (train sessions), {len(held):,} (held-out sessions)")
    lap("logging")

    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    policies: dict = {}
    try:
        for name in cfg.policies:
            if name == "equal":
                policies[name] = constant_policy(np.full(len(tasks), cfg.eval.equal_alpha, np.float32))
            elif name == "behaviour":
                policies[name] = constant_policy(default_alpha)
            elif name == "cem":
                def on_iter(it, mean, best):
                    for k, t in enumerate(tasks):
                        writer.add_scalar(f"cem/alpha/{t}", float(mean[k]), it)
                    writer.add_scalar("cem/best_return", best, it)
                alpha = cem_search(train_sim, iterations=cfg.cem.iterations, population=cfg.cem.population,
                                   sessions=cfg.cem.sessions, elite_frac=cfg.cem.elite_frac,
                                   init_mean=default_alpha, init_std=cfg.cem.init_std, seed=cfg.seed,
                                   on_iteration=on_iter)
                policies[name] = constant_policy(alpha)
                lap("cem")
            elif name == "bcq":
                b = cfg.bcq
                agent = BCQ(train_sim.obs_dim, len(tasks), low, high, rho=b.rho, gamma=b.gamma, tau=b.tau,
                            lmbda=b.lmbda, hidden=b.hidden, lr=b.lr, n_samples=b.n_samples, seed=cfg.seed)
                probe = logged.obs[:512]

                def on_log(step, logs, agent=agent, probe=probe):
                    writer.add_scalar("bcq/critic_q", logs["q_mean"], step)
                    writer.add_scalar("bcq/critic_loss", logs["critic_loss"], step)
                    writer.add_scalar("bcq/vae_loss", logs["vae_loss"], step)
                    writer.add_scalar("bcq/actor_loss", logs["actor_loss"], step)
                    mean_alpha = agent.act(probe).mean(0)
                    for k, t in enumerate(tasks):
                        writer.add_scalar(f"bcq/alpha/{t}", float(mean_alpha[k]), step)
                agent.fit(logged, b.steps, b.batch_size, log_every=b.log_every, on_log=on_log)
                policies[name] = agent.act
                lap("bcq")
            elif name == "td3":
                if cfg.td3.timesteps == 0:
                    continue
                policies[name] = train_td3(train_sim, timesteps=cfg.td3.timesteps,
                                           learning_starts=cfg.td3.learning_starts, seed=cfg.seed,
                                           hidden=cfg.td3.hidden, action_noise=cfg.td3.action_noise)
                if cfg.num_threads is not None:
                    torch.set_num_threads(int(cfg.num_threads))
                lap("td3")
        say(f"policies trained: {', '.join(policies)}")

        table, alphas = {}, {}
        label_index = tasks.index(cfg.eval.label)
        for p_idx, (name, act) in enumerate(policies.items()):
            values = {}
            for col, cql in (("fqe_value", cfg.fqe.cql_alpha), ("fqe_plain", 0.0)):
                if col == "fqe_plain" and not cfg.fqe.plain:
                    values[col] = float("nan")
                    continue
                fqe = ConservativeFQE(held.obs.shape[1], len(tasks), gamma=cfg.fqe.gamma, cql_alpha=cql,
                                      hidden=cfg.fqe.hidden, lr=cfg.fqe.lr, seed=cfg.seed)
                fqe.fit(held, act, steps=cfg.fqe.steps, batch_size=cfg.fqe.batch_size,
                        on_log=lambda s, d, tag=f"fqe/{name}/{col}_loss": writer.add_scalar(tag, d["loss"], s))
                values[col] = fqe.value(held.initial_obs, act)
            eval_sim.rng = np.random.default_rng(cfg.seed + 1000)  # the same draws for every policy
            sim_stats = simulate(eval_sim, act, test_sessions, cfg.eval.repeats)
            train_sim.rng = np.random.default_rng(cfg.seed + 2000)
            train_stats = simulate(train_sim, act, test_sessions, 1)
            row = {
                **values,
                "mtf_gauc": mtf_gauc(held, act, log.labels, eval_sim.reward_w, label_index=label_index,
                                     beta=eval_sim.cfg.beta, kind=eval_sim.cfg.fusion),
                "sim_reward": sim_stats["total_reward"],
                "sim_reward_se": sim_stats["total_reward_se"],
                "sim_depth": sim_stats["depth"],
                "train_sim_reward": train_stats["total_reward"],
            }
            table[name] = row
            alphas[name] = dict(zip(tasks, np.asarray(act(held.initial_obs), np.float64).mean(0).round(4).tolist()))
            for col, value in row.items():
                writer.add_scalar(f"eval/{col}/{name}", value, 0)
        lap("evaluation")
    finally:
        writer.close()

    result = FusionResult(table, alphas, run_dir, timings)
    _write_text(json.dumps({"table": table, "alphas": alphas, "timings": timings, "tasks": tasks,
                            "logged": {"train": len(logged), "heldout": len(held)}}, indent=2),
                run_dir / "results.json")
    return result


def format_table(table: dict) -> str:
    """One row per policy: FQE value, MTF-GAUC, simulator reward (+- s.e.) and depth."""
    head = ["policy", "fqe_value", "fqe_plain", "mtf_gauc", "sim_reward", "+-se", "sim_depth", "train_sim_reward"]
    rows = [head]
    for name, r in table.items():
        rows.append([name, f"{r['fqe_value']:.3f}", f"{r['fqe_plain']:.3f}", f"{r['mtf_gauc']:.4f}", f"{r['sim_reward']:.3f}",
                     f"{r['sim_reward_se']:.3f}", f"{r['sim_depth']:.2f}", f"{r['train_sim_reward']:.3f}"])
    return text_table(rows, label_columns=1)
