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
6. Evaluation per policy: the offline value estimates of ``ope.estimators`` (DR on slates, the
   default, with bootstrap intervals; WPDIS; slate FQE; optionally FQE on alpha and the
   conservative lower bound; rmtl.fusion.estimators), MTF-GAUC, simulator total reward and
   depth under the held-out user model (and under the training one).

6b. Validation of the offline estimators: the evaluation simulator's true discounted value
   of each policy next to each estimate (error per policy) and each estimator's rank
   correlation with the truth, and the tie-aware pair check (rmtl.fusion.validation).

Writes RUN_DIR/results.json, RUN_DIR/config.yaml, RUN_DIR/logged_{train,heldout}.npz,
RUN_DIR/policies/<policy>.pt, RUN_DIR/fqe/<policy>_<critic>.pt and TensorBoard events in RUN_DIR/tb (bcq/alpha/<task>, bcq/critic_q, bcq/critic_loss,
bcq/vae_loss, bcq/actor_loss, cem/alpha/<task>, cem/best_return, fqe/<policy>/<estimate>_loss,
eval/<column>/<policy>).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rmtl.fusion.bcq import BCQ
from rmtl.fusion.estimators import ESTIMATORS, critics_for, estimate_all, labels, make_critic
from rmtl.fusion.fqe import ConservativeFQE, gauc_mean, gauc_resampled, mtf_gauc_groups, user_bootstrap
from rmtl.fusion.ope import bootstrap_counts, weight_support
from rmtl.fusion.slates import SlateSpec
from rmtl.fusion.baselines import cem_search, train_td3
from rmtl.fusion.data import behaviour_policy, collect, constant_policy, simulate
from rmtl.atomic import write_text
from rmtl.fusion.env import split_rows, split_sessions
from rmtl.fusion.simulator import FUSION_TASKS, FusionSimulator
from rmtl.fusion.user_model import UserResponseModel
from rmtl.fusion.policies import save_policy
from rmtl.fusion.progress import StageProgress
from rmtl.fusion.validation import distinguishable_pairs, estimator_report, format_report, resolution, true_value
from rmtl.errors import ConfigError
from rmtl.fusion.config import FusionConfig
from rmtl.tables import text_table

COLUMNS = ["true_value", "mtf_gauc", "sim_reward", "sim_depth", "train_sim_reward"]  # + each estimator's column


@dataclass
class FusionResult:
    table: dict  # policy -> {column: value}
    alphas: dict  # policy -> mean alpha per task on held-out states
    run_dir: Path
    timings: dict = field(default_factory=dict)
    estimators: dict = field(default_factory=dict)  # validation.estimator_report: errors, rank correlations


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


def _fit_critic(cfg: FusionConfig, kind: str, held, act, spec, writer, tag: str, advance) -> ConservativeFQE:
    fqe = make_critic(kind, held, spec, cfg.fqe, cfg.seed)
    done = 0

    def on_log(step, logs):
        nonlocal done
        writer.add_scalar(tag, logs["loss"], step)
        advance(step - done)
        done = step

    return fqe.fit(held, act, steps=cfg.fqe.steps, batch_size=cfg.fqe.batch_size, on_log=on_log, log_every=50)


@dataclass
class World:
    """The simulated world of a fusion run: the log, the training simulator (train sessions,
    training user model) and the evaluation simulator (test sessions, held-out user model)."""

    log: object
    tasks: list
    train_sim: FusionSimulator
    eval_sim: FusionSimulator
    test_sessions: np.ndarray
    default_alpha: np.ndarray


def build_world(cfg: FusionConfig, progress: StageProgress | None = None, say=lambda *a, **k: None) -> World:
    """Steps 1-3 of the run (deterministic under cfg.seed after torch.manual_seed(cfg.seed))."""
    progress = progress or StageProgress(enabled=False)
    with progress.stage("data"):
        log = load_log(cfg)
    tasks = list(log.spec.tasks)
    train_rows = split_rows(log, "train")
    heldout_rows = np.concatenate([train_rows, split_rows(log, "val")])
    test_sessions = split_sessions(log, "test")
    say(f"log: {log.num_rows:,} impressions, {log.num_sessions:,} sessions, tasks {', '.join(tasks)}")

    um = cfg.user_model
    with progress.stage("user_models", detail=f"training and held-out user models, {um.epochs} epochs each"):
        ranker = UserResponseModel.fit(log, train_rows, dim=um.dim, epochs=um.epochs, lr=um.lr, l2=um.l2,
                                       seed=cfg.seed)
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

    env_options = cfg.env  # a FusionEnvConfig: the simulator's own options
    train_sim = FusionSimulator(log, split_sessions(log, "train"), ranker_model, ranker, env_options,
                                profile_rows=train_rows, seed=cfg.seed)
    eval_sim = FusionSimulator(log, test_sessions, ranker_model, heldout, env_options,
                               profile_rows=train_rows, seed=cfg.seed + 1)
    default_alpha = _alpha_vector(tasks, dict(cfg.behaviour.default_alpha), "behaviour.default_alpha")
    return World(log, tasks, train_sim, eval_sim, test_sessions, default_alpha)


def run_fusion(cfg: FusionConfig, *, run_dir: str | os.PathLike | None = None, verbose: bool = True,
               progress: StageProgress | None = None) -> FusionResult:
    """Train and evaluate every configured policy; returns the comparison table.

    Trained policies are saved to RUN_DIR/policies/<policy>.pt and the FQE critics to
    RUN_DIR/fqe/<policy>_<critic>.pt (rmtl.fusion.policies.load_policy,
    ConservativeFQE.load read them back)."""
    from torch.utils.tensorboard import SummaryWriter

    say = print if verbose else (lambda *a, **k: None)
    progress = progress or StageProgress(enabled=verbose)
    run_dir = Path(run_dir or cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), run_dir / "config.yaml")
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)

    world = build_world(cfg, progress, say)
    log, tasks, train_sim, eval_sim, test_sessions = (world.log, world.tasks, world.train_sim, world.eval_sim,
                                                      world.test_sessions)
    low, high = train_sim.cfg.action_low, train_sim.cfg.action_high
    default_alpha = world.default_alpha
    with progress.stage("logging"):
        draws = cfg.behaviour.propensity_draws
        logged = collect(train_sim, behaviour_policy(default_alpha, cfg.behaviour.noise, low, high, seed=cfg.seed,
                                                     propensity_draws=draws), train_sim.sessions, cfg.behaviour.passes)
        held = collect(eval_sim, behaviour_policy(default_alpha, cfg.behaviour.noise, low, high, seed=cfg.seed + 1,
                                                  propensity_draws=draws), test_sessions, cfg.behaviour.heldout_passes)
        logged.save(run_dir / "logged_train.npz")
        held.save(run_dir / "logged_heldout.npz")
    say(f"logged fusion decisions: {len(logged):,} (train sessions), {len(held):,} (held-out sessions)")

    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    policies: dict = {}
    try:
        for name in cfg.policies:
            if name == "equal":
                policies[name] = constant_policy(np.full(len(tasks), cfg.eval.equal_alpha, np.float32))
            elif name == "behaviour":
                policies[name] = constant_policy(default_alpha)
            elif name == "cem":
                with progress.stage("cem", total=cfg.cem.iterations, unit="iteration") as advance:
                    def on_iter(it, mean, best):
                        for k, t in enumerate(tasks):
                            writer.add_scalar(f"cem/alpha/{t}", float(mean[k]), it)
                        writer.add_scalar("cem/best_return", best, it)
                        advance()
                    alpha = cem_search(train_sim, iterations=cfg.cem.iterations, population=cfg.cem.population,
                                       sessions=cfg.cem.sessions, elite_frac=cfg.cem.elite_frac,
                                       init_mean=default_alpha, init_std=cfg.cem.init_std, seed=cfg.seed,
                                       on_iteration=on_iter)
                policies[name] = constant_policy(alpha)
            elif name == "bcq":
                b = cfg.bcq
                agent = BCQ(train_sim.obs_dim, len(tasks), low, high, rho=b.rho, gamma=b.gamma, tau=b.tau,
                            lmbda=b.lmbda, hidden=b.hidden, lr=b.lr, n_samples=b.n_samples, seed=cfg.seed)
                probe = logged.obs[:512]
                with progress.stage("bcq", total=b.steps, unit="step") as advance:
                    def on_log(step, logs, agent=agent, probe=probe):
                        writer.add_scalar("bcq/critic_q", logs["q_mean"], step)
                        writer.add_scalar("bcq/critic_loss", logs["critic_loss"], step)
                        writer.add_scalar("bcq/vae_loss", logs["vae_loss"], step)
                        writer.add_scalar("bcq/actor_loss", logs["actor_loss"], step)
                        mean_alpha = agent.act(probe).mean(0)
                        for k, t in enumerate(tasks):
                            writer.add_scalar(f"bcq/alpha/{t}", float(mean_alpha[k]), step)
                        advance(to=step)
                    agent.fit(logged, b.steps, b.batch_size, log_every=b.log_every, on_log=on_log)
                policies[name] = agent
            elif name == "td3":
                if cfg.td3.timesteps == 0:
                    continue
                with progress.stage("td3", total=cfg.td3.timesteps, unit="step") as advance:
                    policies[name] = train_td3(train_sim, timesteps=cfg.td3.timesteps,
                                               learning_starts=cfg.td3.learning_starts, seed=cfg.seed,
                                               hidden=cfg.td3.hidden, action_noise=cfg.td3.action_noise,
                                               on_step=advance)
                if cfg.num_threads is not None:
                    torch.set_num_threads(int(cfg.num_threads))
        for name, act in policies.items():
            save_policy(act, run_dir / "policies" / f"{name}.pt")
        say(f"policies trained: {', '.join(policies)} (saved in {run_dir / 'policies'})")

        table, alphas, true_returns, boot, support = {}, {}, {}, {}, {}
        label_index = tasks.index(cfg.eval.label)
        names = list(cfg.ope.estimators)
        kinds = critics_for(names)
        spec = SlateSpec.of(eval_sim.cfg)
        counts = bootstrap_counts(held, cfg.ope.resamples, cfg.seed)  # the same resamples for every policy
        gauc_users, gauc_counts = user_bootstrap(held, cfg.ope.resamples, cfg.seed)
        with progress.stage("evaluation", total=max(1, len(policies) * len(kinds) * cfg.fqe.steps), unit="FQE step",
                            detail=f"{len(policies)} policies x {len(kinds)} FQE critics") as advance:
            for name, act in policies.items():
                critics = {}
                for kind in kinds:
                    critics[kind] = _fit_critic(cfg, kind, held, act, spec, writer, f"fqe/{name}/{kind}_loss", advance)
                    critics[kind].save(run_dir / "fqe" / f"{name}_{kind}.pt")
                values, samples = estimate_all(names, held, act, spec, cfg.fqe.gamma, critics, counts)
                if samples:  # importance-sampling estimators: how much of the log their weights use
                    support[name] = weight_support(held, act, spec)
                # MTF-GAUC ranks, it is no value; its interval resamples users so it can enter the tie-aware check
                gauc_parts = mtf_gauc_groups(held, act, log.labels, eval_sim.reward_w, label_index=label_index,
                                             beta=eval_sim.cfg.beta, kind=eval_sim.cfg.fusion)
                samples["mtf_gauc"] = gauc_resampled(gauc_parts, gauc_users, gauc_counts)
                boot[name] = samples
                true_returns[name] = true_value(eval_sim, act, test_sessions, gamma=cfg.fqe.gamma,
                                                repeats=cfg.eval.truth_repeats, seed=cfg.seed + 3000)
                eval_sim.rng = np.random.default_rng(cfg.seed + 1000)  # the same draws for every policy
                sim_stats = simulate(eval_sim, act, test_sessions, cfg.eval.repeats)
                train_sim.rng = np.random.default_rng(cfg.seed + 2000)
                train_stats = simulate(train_sim, act, test_sessions, 1)
                row = {
                    "true_value": float(true_returns[name].mean()),
                    "true_value_se": float(true_returns[name].std() / np.sqrt(len(true_returns[name]))),
                    **values,
                    **{f"{col}_se": float(np.std(b, ddof=1)) for col, b in samples.items() if col in values},
                    "mtf_gauc": gauc_mean(gauc_parts),
                    "mtf_gauc_se": float(np.std(samples["mtf_gauc"], ddof=1)),
                    "sim_reward": sim_stats["total_reward"],
                    "sim_reward_se": sim_stats["total_reward_se"],
                    "sim_depth": sim_stats["depth"],
                    "train_sim_reward": train_stats["total_reward"],
                }
                table[name] = row
                alphas[name] = dict(zip(tasks, np.asarray(act(held.initial_obs), np.float64).mean(0).round(4).tolist()))
                for col, value in row.items():
                    writer.add_scalar(f"eval/{col}/{name}", value, 0)
        samples_by_col = {col: {p: boot[p][col] for p in policies} for col in boot[next(iter(boot))]}
        pairs = distinguishable_pairs(true_returns)
        report = estimator_report(table, labels(names, cfg.ope.default), pairs=pairs, samples=samples_by_col,
                                  z=cfg.ope.z)
        report["resolution"] = resolution(true_returns, pairs, sessions=len(test_sessions),
                                          passes=cfg.behaviour.heldout_passes)
        report["default"], report["z"], report["weights"] = cfg.ope.default, cfg.ope.z, support
        for col, rho in report["rank_corr"].items():
            writer.add_scalar(f"eval/rank_corr/{col}", rho, 0)
    finally:
        writer.close()

    timings = dict(progress.timings)
    result = FusionResult(table, alphas, run_dir, timings, report)
    _write_text(json.dumps({"table": table, "alphas": alphas, "timings": timings, "tasks": tasks,
                            "estimators": report, "logged": {"train": len(logged), "heldout": len(held)}},
                           indent=2), run_dir / "results.json")
    return result


def format_table(table: dict, estimators: list[str] | None = None) -> str:
    """One row per policy: simulator truth, the value estimates, MTF-GAUC, simulator reward (+- s.e.) and depth."""
    first = next(iter(table.values()))
    cols = [c for c in (estimators or ESTIMATORS) if c in first]
    head = ["policy", "true_value", *cols, "mtf_gauc", "sim_reward", "+-se", "sim_depth", "train_sim_reward"]
    rows = [head]
    for name, r in table.items():
        rows.append([name, f"{r['true_value']:.3f}", *[f"{r[c]:.3f}" for c in cols], f"{r['mtf_gauc']:.4f}",
                     f"{r['sim_reward']:.3f}", f"{r['sim_reward_se']:.3f}", f"{r['sim_depth']:.2f}",
                     f"{r['train_sim_reward']:.3f}"])
    return text_table(rows, label_columns=1)


def format_estimators(result: FusionResult) -> str:
    """Each estimator against the simulator truth: estimate, interval and error per policy, rank
    correlation, share of the truth's pairs, and the default estimator's verdicts."""
    first = next(iter(result.table.values()))
    names = [c for c in ESTIMATORS if c in first]
    default = result.estimators.get("default", names[0] if names else "")
    names = sorted(names, key=lambda c: c != default)  # the default first
    return format_report(result.table, result.estimators, labels(names, default))
