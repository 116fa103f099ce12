"""The RMTL pipeline, end to end:

    prepare -> pretrain the backbone with EW -> transitions from its train predictions
    -> train the critics (cross-fitted by session; optionally the actor) -> fine-tune with
    w = 1 - lam * Q, and with EW as the control, both early-stopped on val from the same
    pretrained weights (which compete too: a fine-tune that is worse on val is not kept)
    -> evaluate on test (AUC, logloss, session logloss, GAUC, calibration, Platt logloss).

    from rmtl.config import load_config
    from rmtl.pipeline import run_pipeline
    result = run_pipeline(load_config("quickstart"))
    print(result.table)

``train_agent`` is the agent stage alone (``rmtl agent``), for a backbone trained elsewhere.
Everything a stage writes lands under the run directory: pretrain/, agent/, finetune/
(and ew_control/), each with its TensorBoard events; comparison.txt and pipeline.json
(``rmtl pipeline`` also writes config.yaml). Fine-tuning's TensorBoard steps continue
pretraining's (one axis); the agent's steps are critic updates, on their own axis.

``resume=True`` continues a run directory: each fit resumes from its last.pt (a finished
one is only re-evaluated), the agent stage loads agent/agent.pt when it was saved.

Under torchrun every stage is data-parallel (rmtl.distributed): the fits shard each global
batch, the agent shards each critic minibatch (rmtl.agents.rmtl_agent), predictions for
the transitions and the tables are sharded and gathered; only rank 0 writes files and
prints, and every rank returns the same result.

With ``data.shards`` (a sharded entry) no process holds the log: the fits stream each
process's shards (rmtl.data.shard_stream), the agent stage reads the train rows of its
streams only (``agent_parts``: whole sessions, folds over the global train sessions, one
generator per stream), and the tables gather the val / test rows to rank 0. With
``data.shard_streams`` fixed the result does not depend on the process count (up to float
summation order); docs/shards.md.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from rmtl import distributed
from rmtl.agents.rmtl_agent import ReplayPart, RMTLAgent, stream_seed
from rmtl.atomic import read_json, write_json, write_text
from rmtl.config import RunConfig, StrategyConfig
from rmtl.data import shard_stream
from rmtl.data.shard_parts import train_part, train_sessions
from rmtl.data.shard_stream import ShardSource
from rmtl.data.sessionlog import SessionLog
from rmtl.envs.transitions import build_transitions
from rmtl.distributed import predict_sharded
from rmtl.predict import predict
from rmtl.tables import text_table

TABLE_METRICS = ("auc", "logloss", "session_logloss", "gauc", "calibration", "platt_logloss")


@dataclass
class ArmResult:
    """One fine-tuning arm: test metrics of the weights it kept, and its test predictions."""
    name: str
    metrics: dict  # {task: {metric: value}} on test, calibration metrics included
    probs: np.ndarray  # float32 [test rows, K]
    kept: str  # "finetuned" | "pretrained" (the fine-tune never beat the start on val)
    finetuned_metrics: dict | None = None  # test metrics of the fine-tune's best-on-val weights, kept or not
    steps: int = 0
    best_step: int = -1
    val_auc: float = float("nan")
    seconds: float = 0.0


@dataclass
class AgentStage:
    agent: RMTLAgent
    path: Path
    history: dict
    seconds: float
    num_transitions: int


@dataclass
class PipelineResult:
    before: dict  # test metrics of the EW-pretrained backbone {task: {metric: value}}
    after: dict  # test metrics after fine-tuning with the critics' weights
    table: str
    run_dir: Path
    agent_path: Path
    control: dict | None = None  # test metrics of the EW fine-tuning control (agent.ew_control)
    seconds: dict = field(default_factory=dict)  # stage -> wall-clock seconds
    arms: dict = field(default_factory=dict)  # name -> ArmResult ("rmtl", "ew" when the control ran)


def train_agent(cfg: RunConfig, log, backbone: nn.Module, *, run_dir: str | os.PathLike,
                actor: nn.Module | None = None, out_path: str | os.PathLike | None = None,
                say: Callable[[str], None] = lambda s: None, resume: bool = False) -> AgentStage:
    """The agent stage: behaviour actions from ``backbone``'s train predictions, critics
    trained on all train transitions, saved to ``<run_dir>/agent/agent.pt``.

    ``log``: the SessionLog, or a sharded entry (``ShardSource``, ``data.shards``): each
    process then reads the train rows of its own streams only (``agent_parts``).
    ``actor`` (default: ``backbone``; when given, a copy with the same weights) proposes
    the next actions a'; with
    ``agent.actor_update`` it is also updated (TD3+BC) in place. ``out_path`` replaces
    the default file; its folder also gets the TensorBoard events and history.json.
    ``resume``: an agent file already there (a finished stage) is loaded instead.
    Under torchrun: data-parallel critic updates, the same agent on every rank, rank 0 writes.
    """
    ac = cfg.agent
    target = Path(out_path) if out_path is not None else Path(run_dir) / "agent" / "agent.pt"
    out = target.parent
    main = distributed.is_main()
    say = say if main else (lambda s: None)
    t0 = time.perf_counter()
    num_transitions = _train_rows(log)
    if distributed.from_rank0(resume and target.exists()):
        return _load_agent_stage(target, num_transitions, backbone if actor is None else actor, t0)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    parts, streams, sharing, num_sessions = agent_parts(cfg, log, backbone)
    agent = RMTLAgent(log.spec, ac, backbone if actor is None else actor, seed=cfg.seed)
    sets = f"{agent.num_sets} cross-fitted critic sets" if agent.num_sets > 1 else "1 critic set (not cross-fitted)"
    cut = f", {_count(streams, 'stream')}" if isinstance(log, ShardSource) else ""
    say(f"agent: {num_transitions:,} transitions ({ac.behaviour} behaviour{cut}), {sets}, {ac.steps} updates in all")
    total = agent.num_sets * -(-ac.steps // agent.num_sets)
    with _writer(out if main else None) as writer, _progress(total, "agent", cfg.train.progress and main) as bar:
        history = agent.train_parts(parts, streams=streams, sharing=sharing, num_sessions=num_sessions,
                                    writer=writer, progress=bar.update)
    if main:
        agent.save(target)
        _write_json({"history": history, "config": agent.state_dict()["config"]}, out / "history.json")
    _barrier()  # the agent file exists for every rank that can see it before anyone goes on
    return AgentStage(agent=agent, path=target, history=history, seconds=time.perf_counter() - t0,
                      num_transitions=num_transitions)


def agent_parts(cfg: RunConfig, log, backbone: nn.Module) -> tuple[list[ReplayPart], int, tuple | None, int]:
    """(this process's ReplayParts, the stream count, its sharing, the train session count).

    In memory: one stream, the whole train split on every process (its predictions sharded
    and gathered), each process taking its slice of every minibatch. From shards: the train
    rows are cut into S = ``data.shard_streams`` streams (shard_stream.assign, as the fits'),
    each process reads its streams' train rows (whole sessions: users are partitioned by
    hash) and predicts, draws its behaviour noise (``stream_seed``) and builds the
    transitions of those rows alone. A frozen actor's a' are these predictions."""
    ac = cfg.agent
    batch = cfg.train.eval_batch_size

    def part(train_log: SessionLog, preds: np.ndarray, stream: int, sessions: np.ndarray) -> ReplayPart:
        transitions = build_transitions(train_log, preds if ac.behaviour == "noisy" else None, policy=ac.behaviour,
                                        noise_std=ac.behaviour_noise, seed=stream_seed(cfg.seed, stream),
                                        reward=ac.reward, context=ac.context)
        return ReplayPart(train_log, transitions, sessions, stream=stream, probs=preds)

    if not isinstance(log, ShardSource):
        train_log = log.split("train") if "train" in log.splits and len(log.splits) > 1 else log
        preds = predict_sharded(backbone, train_log, batch_size=batch)
        sharing = (distributed.rank(), distributed.world_size()) if distributed.active() else None
        return [part(train_log, preds, 0, np.arange(train_log.num_sessions))], 1, sharing, train_log.num_sessions
    streams = shard_streams(cfg)
    with distributed.all_or_none("reading the train shards"):
        mine, sharing = shard_stream.assign(distributed.rank(), distributed.world_size(), streams)
        distributed.check_global_batch(ac.batch_size, "agent.batch_size", max(streams, distributed.world_size()))
        parts = []
        for s in mine:
            tp = train_part(log, s, streams)
            parts.append(part(tp.log, predict(backbone, tp.log, batch), s, tp.sessions))
    return parts, streams, sharing, train_sessions(log)


def shard_streams(cfg: RunConfig) -> int:
    """The stream count of a sharded run (``data.shard_streams``, default the process count):
    the pipeline's fits and its agent cut the train rows the same way."""
    return int(cfg.data.shard_streams or distributed.world_size())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _train_rows(log) -> int:
    if isinstance(log, ShardSource):
        return int(sum(int(s["rows_by_split"]["train"]) for s in log.meta["shards"]))
    return (log.split("train") if "train" in log.splits and len(log.splits) > 1 else log).num_rows


def _load_agent_stage(path: Path, num_transitions: int, actor: nn.Module, t0: float) -> AgentStage:
    """A finished agent stage of a run being resumed: its critics (and updated actor)."""
    agent = RMTLAgent.load(path, actor=actor)
    saved = path.parent / "history.json"
    history = read_json(saved, "agent history")["history"] if saved.exists() else {"td_loss": [float("nan")]}
    return AgentStage(agent=agent, path=path, history=history, seconds=time.perf_counter() - t0,
                      num_transitions=num_transitions)


def _writer(folder: Path | None):
    """TensorBoard events in ``folder``; None (no writer) on the other ranks."""
    from contextlib import nullcontext

    from torch.utils.tensorboard import SummaryWriter

    return nullcontext(None) if folder is None else SummaryWriter(str(folder))


def _barrier() -> None:
    if distributed.active():
        import torch.distributed as dist

        dist.barrier()


def _progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on a terminal; nothing otherwise (the stage's lines say enough in a log)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)


def _finetune_cfg(cfg: RunConfig, strategy: StrategyConfig) -> RunConfig:
    ac = cfg.agent
    train = replace(cfg.train, epochs=ac.finetune_epochs or cfg.train.epochs, lr=ac.finetune_lr or cfg.train.lr,
                    eval_every=ac.finetune_eval_every, patience=ac.finetune_patience)
    return replace(cfg, strategy=strategy, train=train)


def evaluate_full(model: nn.Module, log, batch_size: int = 8192) -> tuple[dict, np.ndarray | None]:
    """({task: {auc, logloss, session_logloss, gauc, calibration, platt_logloss}} on test, test probs).

    Platt scaling is fitted on the val split's predictions and applied to test. ``log`` may
    be a sharded entry (ShardSource): each process predicts its own val / test rows, which
    are gathered to rank 0 in global row order (the numbers of one process over all
    shards); rank 0 sends the metrics to all, and only rank 0 gets the test probabilities."""
    from rmtl.calibration import calibration_metrics
    from rmtl.metrics import evaluate_predictions

    if isinstance(log, ShardSource):
        return _evaluate_shards(model, log, batch_size)
    val, test = log.split("val"), log.split("test")
    # under torchrun each rank predicts its share of the rows; all get every row's probabilities
    pv, pt = predict_sharded(model, val, batch_size), predict_sharded(model, test, batch_size)
    metrics = evaluate_predictions(test.labels, pt, test.session_of_row(), test.user, log.spec.tasks)
    for k, task in enumerate(log.spec.tasks):
        metrics[task].update(calibration_metrics(val.labels[:, k], pv[:, k], test.labels[:, k], pt[:, k]))
    return metrics, pt


def _evaluate_shards(model: nn.Module, source: ShardSource, batch_size: int) -> tuple[dict, np.ndarray | None]:
    from rmtl.calibration import calibration_metrics
    from rmtl.metrics import evaluate_predictions
    from rmtl.predict import task_columns

    val = shard_stream.gather_predictions(model, source.split("val"), batch_size, dst=0)
    test = shard_stream.gather_predictions(model, source.split("test"), batch_size, dst=0)
    metrics = probs = None
    if test is not None:  # rank 0
        tasks = [source.spec.tasks[c] for c in task_columns(model, source.spec.num_tasks)]
        probs = test["probs"]
        metrics = evaluate_predictions(test["labels"], probs, test["session"], test["user"], tasks)
        for k, task in enumerate(tasks):
            metrics[task].update(calibration_metrics(val["labels"][:, k], val["probs"][:, k],
                                                     test["labels"][:, k], probs[:, k]))
    return distributed.from_rank0(metrics), probs


def finetune_arm(cfg: RunConfig, log: SessionLog, start: nn.Module, start_val_auc: float, name: str,
                 strategy_cfg: StrategyConfig, *, strategy: nn.Module | None = None,
                 run_dir: str | os.PathLike, tag: str | None = None, step_offset: int = 0,
                 resume: bool = False) -> ArmResult:
    """Fine-tune a copy of ``start`` (early-stopped on val, best-on-val weights kept); the start
    weights are kept instead when no evaluation beat ``start_val_auc`` (mean val AUC).
    ``resume``: continue from ``<run_dir>/<tag>/last.pt`` when there is one."""
    from rmtl.metrics import mean_metric
    from rmtl.train import fit

    t = time.perf_counter()
    model = copy.deepcopy(start)
    tag = tag or name
    ft = fit(_finetune_cfg(cfg, strategy_cfg), prepared=_prepared(log), model=model, strategy=strategy, run_dir=run_dir,
             tag=tag, step_offset=step_offset, resume=_resumable(resume, run_dir, tag))
    val_auc = mean_metric(ft.metrics["val"], "auc")
    ft_metrics, probs = evaluate_full(model, log, cfg.train.eval_batch_size)
    metrics, kept = ft_metrics, "finetuned"
    if not val_auc > start_val_auc:
        metrics, probs = evaluate_full(start, log, cfg.train.eval_batch_size)
        kept = "pretrained"
    return ArmResult(name=name, metrics=metrics, probs=probs, kept=kept, finetuned_metrics=ft_metrics, steps=ft.steps,
                     best_step=ft.best_step, val_auc=val_auc, seconds=time.perf_counter() - t)


def _prepared(log) -> SessionLog | None:
    """What ``fit`` is given: the SessionLog, or None for a sharded entry (fit streams cfg.data.shards)."""
    return None if isinstance(log, ShardSource) else log


def _resumable(resume: bool, run_dir, tag: str) -> bool:
    """Rank 0's answer for all (every rank then reads the file: run_dir must be shared)."""
    return distributed.from_rank0(resume and (Path(run_dir) / tag / "last.pt").exists())


def run_pipeline(cfg: RunConfig, *, prepared=None, model: nn.Module | None = None,
                 run_dir: str | os.PathLike | None = None, say: Callable[[str], None] = print,
                 resume: bool = False) -> PipelineResult:
    """Run every stage (see the module docstring); ``model`` overrides cfg.model. ``resume``
    continues the stages of ``run_dir`` that did not finish. Under torchrun only rank 0
    calls ``say`` and writes files; every rank returns the same result."""
    from rmtl.metrics import mean_metric
    from rmtl.train import fit, load_everywhere, resolve_data_dir
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    from rmtl.device import resolve_device

    distributed.init(distributed.local_device(resolve_device(cfg.train.device)))  # torchrun: no-op if joined
    main = distributed.is_main()
    say = say if main else (lambda s: None)
    seconds: dict[str, float] = {}
    root = Path(run_dir if run_dir is not None else cfg.run_dir)
    t = time.perf_counter()
    if cfg.data.shards and prepared is None:  # each process streams / reads its own shards, stage by stage
        cfg = replace(cfg, data=replace(cfg.data, shard_streams=shard_streams(cfg)))  # one cut for every stage
        with distributed.all_or_none("loading the shards"):
            log = ShardSource.open(resolve_data_dir(cfg.data.shards))
        rows, sessions = int(log.meta["num_rows"]), int(log.meta["num_sessions"])
        where = f" in {len(log.meta['shards'])} shards, {_count(cfg.data.shard_streams, 'stream')}"
    else:
        log = load_everywhere(cfg, prepared)
        rows, sessions, where = log.num_rows, log.num_sessions, ""
    seconds["prepare"] = time.perf_counter() - t
    say(f"data: {rows:,} rows, {sessions:,} sessions{where}, tasks {', '.join(log.spec.tasks)}")

    t = time.perf_counter()
    ew = StrategyConfig(name="ew", options={})
    pre = fit(replace(cfg, strategy=ew), prepared=_prepared(log), model=model, run_dir=root, tag="pretrain",
              resume=_resumable(resume, root, "pretrain"))
    seconds["pretrain"] = time.perf_counter() - t
    say(f"pretrain (EW): {pre.steps} steps, {seconds['pretrain']:.0f}s")
    pretrained = pre.model.eval()
    pre_val = mean_metric(pre.metrics["val"], "auc")

    # the actor is a copy, so the pretrained weights stay intact (the agent may update it)
    actor = copy.deepcopy(pretrained)
    stage = train_agent(cfg, log, pretrained, run_dir=root, actor=actor, say=say, resume=resume)
    seconds["agent"] = stage.seconds
    stopped = ""
    if cfg.agent.critic_eval_every is not None:
        stopped = f", early stop after {'+'.join(map(str, stage.history['stopped_at']))} updates"
    say(f"agent: {seconds['agent']:.0f}s, final TD loss {stage.history['td_loss'][-1]:.4f}{stopped}, saved {stage.path}")

    start = actor if cfg.agent.actor_update else pretrained
    start_val = pre_val if start is pretrained else mean_metric(_val_metrics(cfg, start, log), "auc")
    strategy = RMTLStrategy(log.spec.num_tasks, agent=stage.agent)  # lam / twin: the agent's (one source)
    arms = {"rmtl": finetune_arm(cfg, log, start, start_val, "rmtl", StrategyConfig(name="rmtl", options={}),
                                 strategy=strategy, run_dir=root, tag="finetune", step_offset=pre.steps,
                                 resume=resume)}
    seconds["finetune"] = arms["rmtl"].seconds
    say(f"fine-tune (RMTL weights): {arms['rmtl'].steps} steps, kept {arms['rmtl'].kept}, {seconds['finetune']:.0f}s")
    if cfg.agent.ew_control:
        # fine-tuning continues pretraining's TensorBoard axis (the EW control runs beside it)
        arms["ew"] = finetune_arm(cfg, log, pretrained, pre_val, "ew", ew, run_dir=root, tag="ew_control",
                                  step_offset=pre.steps, resume=resume)
        seconds["ew_control"] = arms["ew"].seconds
        say(f"fine-tune (EW control): {arms['ew'].steps} steps, kept {arms['ew'].kept}, {seconds['ew_control']:.0f}s")

    before, _ = evaluate_full(pretrained, log, cfg.train.eval_batch_size)
    after = arms["rmtl"].metrics
    control = arms["ew"].metrics if "ew" in arms else None
    table = comparison_table(before, after, control)
    result = PipelineResult(before=before, after=after, table=table, run_dir=root, agent_path=stage.path,
                            control=control, seconds=seconds, arms=arms)
    if main:
        write_text(root / "comparison.txt", table + "\n")
        _write_json({"before": before, "after": after, "control": control, "seconds": seconds,
                     "kept": {k: a.kept for k, a in arms.items()}, "agent": str(stage.path),
                     "processes": distributed.world_size()}, root / "pipeline.json")
    return result


def _val_metrics(cfg: RunConfig, model: nn.Module, log) -> dict:
    from rmtl.train import evaluate

    if isinstance(log, ShardSource):
        return shard_stream.evaluate_gathered(model, log.split("val"), cfg.train.eval_batch_size)
    return evaluate(model, log.split("val"), cfg.train.eval_batch_size, predictor=predict_sharded)


def comparison_table(before: dict, after: dict, control: dict | None = None,
                     metrics=TABLE_METRICS) -> str:
    """One row per (task, metric): before, after and the difference (after - before).

    AUC, GAUC: higher is better; logloss, session logloss, Platt logloss: lower is better;
    calibration (mean prediction / label rate): 1 is perfect.
    """
    head = ["task", "metric", "EW pretrained", "RMTL fine-tuned", "diff"]
    if control is not None:
        head += ["EW fine-tuned", "RMTL - EW ft"]
    rows = [head]
    for task in before:
        for m in metrics:
            b, a = before[task].get(m, float("nan")), after[task].get(m, float("nan"))
            row = [task, m, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}"]
            if control is not None:
                c = control[task].get(m, float("nan"))
                row += [f"{c:.4f}", f"{a - c:+.4f}"]
            rows.append(row)
    return (text_table(rows, label_columns=2, rule="line")
            + "\n(test split; AUC, GAUC higher is better; logloss, session logloss lower is better; calibration = "
              "mean prediction / label rate, 1 is perfect; platt_logloss = logloss after Platt scaling fitted on val)")


def _write_json(obj: dict, path: Path) -> None:
    write_json(path, obj, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))


def load_backbone(path: str | os.PathLike, cfg: RunConfig, spec) -> nn.Module:
    """A pretrained backbone from a file: a checkpoint dict with 'model' (what fit writes:
    best.pt / last.pt) or a bare state_dict for cfg.model. Weights only: a whole pickled
    nn.Module would need a full unpickler, which could run code from the file."""
    from rmtl.checkpoint import load_user_file
    from rmtl.errors import DataError
    from rmtl.train import build_model

    path = Path(path)
    obj = load_user_file(path, "backbone checkpoint")
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise DataError("expected a checkpoint with a 'model' state_dict, or a state_dict", path=path)
    model = build_model(cfg.model, spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise DataError(f"the weights do not fit model '{cfg.model.name}' with the config's options ({first})",
                        path=path) from None
    return model
