"""`rmtl compare`: a paired, multi-seed, significance-tested comparison of loss weightings.

Per seed: one EW-pretrained backbone and one cross-fitted agent; then every arm fine-tunes
a copy of that same backbone with the same batch order (the seed's), early-stopped on val
(rmtl.pipeline.finetune_arm). Arms:

- ew        the control: equal weights
- rmtl      the critics' weights w = 1 - lam * Q
- lam0      rmtl with lam = 0 (w = 1: must equal ew; a check of the plumbing)
- shuffled  the rmtl weights permuted within each batch (same distribution, no link to rows)
- label     each row gets its label class's mean rmtl weight (what the weights do via labels alone)
- any registered strategy name (uw, pcgrad, dwa, ...)

Across seeds: mean +- sd of each arm's difference to ew, a paired t-test and a Wilcoxon
signed-rank p-value. Within each seed: a session-level paired bootstrap CI of the same
difference on test. Seeds run in parallel processes (one torch thread each where cores
allow); the data are prepared once (fixed across seeds: only training randomness varies).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from rmtl.atomic import atomic_path, write_json, write_text
from rmtl.config import RunConfig, StrategyConfig
from rmtl.data.prepare import as_session_log
from rmtl.data.shard_stream import ShardSource
from rmtl.errors import ConfigError
from rmtl.tables import text_table

RMTL_ARMS = {"rmtl": {}, "lam0": {"lam": 0.0}, "shuffled": {"transform": "shuffle"}, "label": {"transform": "label"}}
DEFAULT_ARMS = ("ew", "rmtl", "lam0", "shuffled", "label")
CONTROL = "ew"
STAT_METRICS = ("auc", "logloss", "session_logloss", "gauc", "calibration", "platt_logloss")
BOOT_METRICS = ("auc", "logloss", "session_logloss")


def check_arms(arms: list[str] | tuple[str, ...]) -> list[str]:
    """Arm names in order, the control first; an unknown name is a ConfigError naming --arms."""
    from rmtl.weighting import available_strategies

    known = set(RMTL_ARMS) | set(available_strategies())
    out = [CONTROL]
    for a in arms:
        a = a.strip()
        if not a:
            continue
        if a not in known:
            raise ConfigError(f"unknown arm '{a}'; known: {', '.join(sorted(known))}", key="--arms")
        if a not in out:
            out.append(a)
    return out


def check_counts(seeds: int, jobs: int | None, bootstrap: int) -> None:
    if int(seeds) < 1:
        raise ConfigError(f"expected an integer >= 1, got {seeds}", key="--seeds")
    if jobs is not None and int(jobs) < 1:
        raise ConfigError(f"expected an integer >= 1, got {jobs}", key="--jobs")
    if int(bootstrap) < 0:
        raise ConfigError(f"expected an integer >= 0, got {bootstrap}", key="--bootstrap")


# ----------------------------------------------------------------------------- one seed

def _arm_strategy(name: str, agent, seed: int):
    """(StrategyConfig, strategy object or None) of an arm."""
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    if name in RMTL_ARMS:
        return StrategyConfig(name="rmtl", options=dict(RMTL_ARMS[name])), \
            RMTLStrategy(agent.spec.num_tasks, agent=agent, seed=seed, **RMTL_ARMS[name])
    return StrategyConfig(name=name, options={}), None


def run_seed(cfg: RunConfig, seed: int, arms: list[str], root: str | os.PathLike, *, bootstrap: int = 200,
             threads: int | None = None, say: Callable[[str], None] = lambda s: None) -> dict:
    """Pretrain, agent and every arm for one seed; returns a JSON-ready dict."""
    import torch

    from rmtl.metrics import mean_metric
    from rmtl.pipeline import _prepared, finetune_arm, train_agent
    from rmtl.train import fit

    if threads:
        torch.set_num_threads(int(threads))
    root = Path(root) / f"seed{seed}"
    t0 = time.perf_counter()
    data_seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    cfg = replace(cfg, seed=int(seed), data=replace(cfg.data, seed=data_seed),
                  train=replace(cfg.train, progress=False))
    log = _seed_data(cfg)
    pre = fit(replace(cfg, strategy=StrategyConfig(name="ew", options={})), prepared=_prepared(log), run_dir=root,
              tag="pretrain")
    pretrained = pre.model.eval()
    pre_val = mean_metric(pre.metrics["val"], "auc")
    stage = train_agent(cfg, log, pretrained, run_dir=root)
    say(f"seed {seed}: pretrained ({pre.steps} steps) and agent trained, {time.perf_counter() - t0:.0f}s")
    results = {}
    for name in arms:
        strategy_cfg, strategy = _arm_strategy(name, stage.agent, seed)
        results[name] = finetune_arm(cfg, log, pretrained, pre_val, name, strategy_cfg, strategy=strategy,
                                     run_dir=root, tag=name, step_offset=pre.steps)
    test = shard_test_rows(log) if isinstance(log, ShardSource) else log.split("test")
    boot = {}
    if bootstrap:
        for name, arm in results.items():
            if name != CONTROL:
                boot[name] = bootstrap_ci(test, arm.probs, results[CONTROL].probs, log.spec.tasks, draws=bootstrap,
                                          seed=seed)
    out = {"seed": int(seed), "seconds": time.perf_counter() - t0,
           "arms": {n: {"metrics": a.metrics, "finetuned_metrics": a.finetuned_metrics, "kept": a.kept,
                        "steps": a.steps, "best_step": a.best_step,
                        "val_auc": a.val_auc, "seconds": a.seconds} for n, a in results.items()},
           "bootstrap": boot}
    say(f"seed {seed}: done in {out['seconds']:.0f}s")
    return out


def _seed_data(cfg: RunConfig):
    """A seed's data: the SessionLog (from the cache run_compare filled), or the sharded entry
    of ``data.shards``, which every stage then streams / reads per stream (rmtl.pipeline)."""
    from rmtl.train import load_data, resolve_data_dir

    if cfg.data.shards:
        return ShardSource.open(resolve_data_dir(cfg.data.shards))
    return as_session_log(load_data(cfg.data, cfg.seed))


def shard_test_rows(source: ShardSource):
    """What the bootstrap reads of a sharded entry's test split, in the order of the gathered
    probabilities (global row order): ``session_ptr`` and ``labels``."""
    from types import SimpleNamespace

    parts = list(source.chunks("test", part=0, parts=1))
    row = np.concatenate([c["row"] for c in parts])
    order = np.argsort(row, kind="stable")
    session = np.concatenate([c["session"] for c in parts])[order]
    labels = np.concatenate([c["labels"] for c in parts])[order]
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    return SimpleNamespace(session_ptr=np.r_[starts, len(session)].astype(np.int64), labels=labels)


def bootstrap_ci(test, probs: np.ndarray, control: np.ndarray, tasks, *, draws: int = 200, seed: int = 0,
                 level: float = 0.95) -> dict:
    """{task: {metric: [lo, hi]}}: percentile CI of (arm - control) over test sessions resampled
    with replacement (both arms on the same resample: paired)."""
    from rmtl.metrics import _bce, auc

    rng = np.random.default_rng([int(seed), 11])
    ptr = np.asarray(test.session_ptr, dtype=np.int64)
    lengths = np.diff(ptr)
    n_sess = len(lengths)
    sess_of_row = np.repeat(np.arange(n_sess), lengths)
    out: dict = {}
    alpha = (1 - level) / 2
    diffs = {t: {m: np.empty(draws) for m in BOOT_METRICS} for t in tasks}
    per_sess = {}
    for k, t in enumerate(tasks):
        y = test.labels[:, k].astype(np.float64)
        da = _bce(y, probs[:, k].astype(np.float64)) - _bce(y, control[:, k].astype(np.float64))
        per_sess[t] = (np.bincount(sess_of_row, weights=da, minlength=n_sess), lengths)
    for d in range(draws):
        pick = rng.integers(0, n_sess, n_sess)
        counts = np.bincount(pick, minlength=n_sess)
        rows = np.repeat(np.arange(len(sess_of_row)), counts[sess_of_row])  # each row as often as its session
        for k, t in enumerate(tasks):
            y = test.labels[rows, k]
            diffs[t]["auc"][d] = auc(y, probs[rows, k]) - auc(y, control[rows, k])
            sums, lens = per_sess[t]
            diffs[t]["logloss"][d] = float((counts * sums).sum() / (counts * lens).sum())
            diffs[t]["session_logloss"][d] = float((counts * sums / np.maximum(lens, 1)).sum() / n_sess)
    for t in tasks:
        out[t] = {m: [float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha))]
                  for m, v in diffs[t].items()}
    return out


# ----------------------------------------------------------------------------- across seeds

def paired_stats(diffs: list[float]) -> dict:
    """mean, sd, paired t-test p and Wilcoxon signed-rank p of per-seed differences."""
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], dtype=np.float64)
    out = {"n": int(len(d)), "mean": float(d.mean()) if len(d) else float("nan"),
           "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "t_p": float("nan"), "wilcoxon_p": float("nan")}
    if len(d) > 1 and np.any(d != 0):
        if d.std() > 0:
            out["t_p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
        try:
            out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
        except ValueError:
            pass
    elif len(d) > 1:  # identical to the control on every seed
        out["t_p"] = out["wilcoxon_p"] = 1.0
    return out


def summarise(per_seed: list[dict], arms: list[str], tasks: list[str], key: str = "metrics") -> dict:
    """Per arm, task and metric: paired stats of (arm - ew) over seeds. ``key`` "metrics" = the
    weights each arm kept; "finetuned_metrics" = its fine-tune's best-on-val weights even when
    the pretrained ones were kept (what the weighting did to the fine-tune itself)."""
    summary: dict = {}
    for arm in arms:
        if arm == CONTROL:
            continue
        summary[arm] = {"kept_pretrained": sum(s["arms"][arm]["kept"] == "pretrained" for s in per_seed)}
        for t in tasks:
            summary[arm][t] = {}
            for m in STAT_METRICS:
                d = [s["arms"][arm][key][t][m] - s["arms"][CONTROL][key][t][m] for s in per_seed]
                summary[arm][t][m] = {**paired_stats(d), "diffs": d}
    summary[CONTROL] = {"kept_pretrained": sum(s["arms"][CONTROL]["kept"] == "pretrained" for s in per_seed),
                        **{t: {m: {"mean": float(np.mean([s["arms"][CONTROL][key][t][m] for s in per_seed]))}
                               for m in STAT_METRICS} for t in tasks}}
    return summary


def compare_table(summary: dict, arms: list[str], tasks: list[str], metrics=("auc", "logloss", "session_logloss",
                                                                             "calibration", "platt_logloss")) -> str:
    rows = [["arm", "task", "metric", "mean diff to ew", "sd", "t-test p", "wilcoxon p"]]
    for arm in arms:
        if arm == CONTROL:
            continue
        for t in tasks:
            for m in metrics:
                s = summary[arm][t][m]
                rows.append([arm, t, m, f"{s['mean']:+.5f}", f"{s['sd']:.5f}", f"{s['t_p']:.3g}", f"{s['wilcoxon_p']:.3g}"])
    kept = ", ".join(f"{a} {summary[a]['kept_pretrained']}" for a in arms)
    return (text_table(rows, label_columns=3, rule="line")
            + f"\n(difference = arm - ew on test, paired by seed; seeds where an arm kept the pretrained weights "
              f"because its fine-tune never beat them on val: {kept})")


def plot(summary: dict, per_seed: list[dict], arms: list[str], tasks: list[str], path: Path,
         metrics=("auc", "logloss", "session_logloss")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in arms if a != CONTROL]
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(4 * len(metrics), 3 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            for x, arm in enumerate(others):
                s = summary[arm][t][m]
                ax.scatter(np.full(len(s["diffs"]), x), s["diffs"], s=10, alpha=0.5, color="grey")
                ax.errorbar([x], [s["mean"]], yerr=[0 if math.isnan(s["sd"]) else s["sd"]], fmt="o", capsize=4)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xticks(range(len(others)), others, rotation=30)
            ax.set_title(f"{t} {m}: arm - ew")
    fig.suptitle(f"paired differences to EW over {len(per_seed)} seeds (mean +- sd; dots = seeds)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def run_compare(cfg: RunConfig, *, seeds: int = 10, arms=DEFAULT_ARMS, jobs: int | None = None,
                out_dir: str | os.PathLike | None = None, bootstrap: int = 200,
                say: Callable[[str], None] = print) -> dict:
    """Run every seed (in parallel where cores allow), write compare.json, compare.txt and compare.png."""
    from rmtl.train import load_data

    check_counts(seeds, jobs, bootstrap)
    arms = check_arms(list(arms))
    root = Path(out_dir if out_dir is not None else cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = min(int(jobs or cores), int(seeds))
    threads = max(1, cores // jobs)
    t0 = time.perf_counter()
    data_seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    if cfg.data.shards:  # prepared already: each seed streams it
        tasks = list(_seed_data(cfg).spec.tasks)
    else:
        prepared = load_data(replace(cfg.data, seed=data_seed), cfg.seed)  # once, so workers read the cache
        tasks = list(as_session_log(prepared).spec.tasks)
    seed_list = [cfg.seed + i for i in range(int(seeds))]
    say(f"compare: {len(arms)} arms ({', '.join(arms)}) x {seeds} seeds, {jobs} process(es) x {threads} thread(s)")
    if jobs == 1:
        per_seed = [run_seed(cfg, s, arms, root, bootstrap=bootstrap, threads=threads, say=say) for s in seed_list]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, cfg, s, arms, root, bootstrap=bootstrap, threads=threads)
                       for s in seed_list]
            per_seed = []
            for s, f in zip(seed_list, futures):
                per_seed.append(f.result())
                say(f"seed {s}: done in {per_seed[-1]['seconds']:.0f}s")
    summary = summarise(per_seed, arms, tasks)
    summary_ft = summarise(per_seed, arms, tasks, key="finetuned_metrics")
    table = (compare_table(summary, arms, tasks) + "\n\nThe fine-tunes' own best-on-val weights (kept or not):\n"
             + compare_table(summary_ft, arms, tasks, metrics=("auc", "logloss", "session_logloss")))
    result = {"arms": arms, "tasks": tasks, "seeds": seed_list, "summary": summary, "summary_finetuned": summary_ft,
              "per_seed": per_seed,
              "seconds": time.perf_counter() - t0, "jobs": jobs, "threads": threads}
    write_json(root / "compare.json", result, default=_json_default)
    write_text(root / "compare.txt", table + "\n")
    plot(summary, per_seed, arms, tasks, root / "compare.png")
    result["table"] = table
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
