"""The RMTL pipeline, end to end:

    prepare -> pretrain the backbone with EW -> transitions from its train predictions
    -> train the critics (and optionally the actor) -> fine-tune with w = 1 - lam * Q
    -> evaluate both on test, one side-by-side table.

    from rmtl.config import load_config
    from rmtl.pipeline import run_pipeline
    result = run_pipeline(load_config("quickstart"))
    print(result.table)

``train_agent`` is the agent stage alone (``rmtl agent``), for a backbone trained elsewhere.
Everything a stage writes lands under the run directory: pretrain/, agent/, finetune/
(and ew_control/), each with its TensorBoard events; comparison.txt and pipeline.json
(``rmtl pipeline`` also writes config.yaml). Fine-tuning's TensorBoard steps continue
pretraining's (one axis); the agent's steps are critic updates, on their own axis.
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

from rmtl.agents.rmtl_agent import RMTLAgent
from rmtl.atomic import write_json, write_text
from rmtl.config import RunConfig, StrategyConfig
from rmtl.data.prepare import as_session_log
from rmtl.data.sessionlog import SessionLog
from rmtl.envs.transitions import build_transitions
from rmtl.predict import predict
from rmtl.tables import text_table

TABLE_METRICS = ("auc", "logloss", "session_logloss")


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


def train_agent(cfg: RunConfig, log: SessionLog, backbone: nn.Module, *, run_dir: str | os.PathLike,
                actor: nn.Module | None = None, out_path: str | os.PathLike | None = None,
                say: Callable[[str], None] = lambda s: None) -> AgentStage:
    """The agent stage: behaviour actions from ``backbone``'s train predictions, critics
    trained on all train transitions, saved to ``<run_dir>/agent/agent.pt``.

    ``actor`` (default: ``backbone``; when given, a copy with the same weights) proposes
    the next actions a'; with
    ``agent.actor_update`` it is also updated (TD3+BC) in place. ``out_path`` replaces
    the default file; its folder also gets the TensorBoard events and history.json.
    """
    ac = cfg.agent
    target = Path(out_path) if out_path is not None else Path(run_dir) / "agent" / "agent.pt"
    out = target.parent
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_log = log.split("train") if "train" in log.splits and len(log.splits) > 1 else log
    # the backbone's train predictions: the behaviour actions (plus noise), and a' of a frozen actor
    preds = predict(backbone, train_log, batch_size=cfg.train.eval_batch_size)
    actions = preds if ac.behaviour == "noisy" else None
    transitions = build_transitions(train_log, actions, policy=ac.behaviour, noise_std=ac.behaviour_noise,
                                    seed=cfg.seed, reward=ac.reward)
    say(f"agent: {len(transitions):,} transitions ({ac.behaviour} behaviour), {ac.steps} critic updates")
    agent = RMTLAgent(log.spec, ac, backbone if actor is None else actor, seed=cfg.seed)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:
        # a frozen actor starts from the backbone's weights, so its a' are these predictions
        history = agent.train(train_log, transitions, writer=writer, actor_probs=preds)
    path = agent.save(target)
    _write_json({"history": history, "config": agent.state_dict()["config"]}, out / "history.json")
    return AgentStage(agent=agent, path=path, history=history, seconds=time.perf_counter() - t0,
                      num_transitions=len(transitions))


def _finetune_cfg(cfg: RunConfig, strategy: StrategyConfig) -> RunConfig:
    train = replace(cfg.train, epochs=cfg.agent.finetune_epochs or cfg.train.epochs,
                    lr=cfg.agent.finetune_lr or cfg.train.lr)
    return replace(cfg, strategy=strategy, train=train)


def run_pipeline(cfg: RunConfig, *, prepared=None, model: nn.Module | None = None,
                 run_dir: str | os.PathLike | None = None, say: Callable[[str], None] = print) -> PipelineResult:
    """Run every stage (see the module docstring); ``model`` overrides cfg.model."""
    from rmtl.train import fit, load_data
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    seconds: dict[str, float] = {}
    root = Path(run_dir if run_dir is not None else cfg.run_dir)
    t = time.perf_counter()
    if prepared is None:
        prepared = load_data(cfg.data, cfg.seed)
    log = as_session_log(prepared)
    seconds["prepare"] = time.perf_counter() - t
    say(f"data: {log.num_rows:,} rows, {log.num_sessions:,} sessions, tasks {', '.join(log.spec.tasks)}")

    t = time.perf_counter()
    ew = StrategyConfig(name="ew", options={})
    pre = fit(replace(cfg, strategy=ew), prepared=log, model=model, run_dir=root, tag="pretrain")
    seconds["pretrain"] = time.perf_counter() - t
    say(f"pretrain (EW): {pre.steps} steps, {seconds['pretrain']:.0f}s")
    pretrained_state = copy.deepcopy(pre.model.state_dict())

    # the actor (and later the fine-tuned model) is a copy, so the pretrained weights stay intact
    actor = copy.deepcopy(pre.model)
    stage = train_agent(cfg, log, pre.model, run_dir=root, actor=actor, say=say)
    seconds["agent"] = stage.seconds
    say(f"agent: {seconds['agent']:.0f}s, final TD loss {stage.history['td_loss'][-1]:.4f}, saved {stage.path}")

    t = time.perf_counter()
    strategy = RMTLStrategy(log.spec.num_tasks, agent=stage.agent, lam=cfg.agent.lam, twin=cfg.agent.twin)
    ft_cfg = _finetune_cfg(cfg, StrategyConfig(name="rmtl", options={"lam": cfg.agent.lam}))
    # fine-tuning continues pretraining's TensorBoard axis (the EW control runs beside it)
    ft = fit(ft_cfg, prepared=log, model=actor, strategy=strategy, run_dir=root, tag="finetune",
             step_offset=pre.steps)
    seconds["finetune"] = time.perf_counter() - t
    say(f"fine-tune (RMTL weights): {ft.steps} steps, {seconds['finetune']:.0f}s")

    control = None
    if cfg.agent.ew_control:
        t = time.perf_counter()
        ctrl_model = copy.deepcopy(pre.model)
        ctrl_model.load_state_dict(pretrained_state)
        ctrl = fit(_finetune_cfg(cfg, ew), prepared=log, model=ctrl_model, run_dir=root, tag="ew_control",
                   step_offset=pre.steps)
        control = ctrl.metrics["test"]
        seconds["ew_control"] = time.perf_counter() - t

    before, after = pre.metrics["test"], ft.metrics["test"]
    table = comparison_table(before, after, control)
    result = PipelineResult(before=before, after=after, table=table, run_dir=root, agent_path=stage.path,
                            control=control, seconds=seconds)
    write_text(root / "comparison.txt", table + "\n")
    _write_json({"before": before, "after": after, "control": control, "seconds": seconds,
                 "agent": str(stage.path)}, root / "pipeline.json")
    return result


def comparison_table(before: dict, after: dict, control: dict | None = None,
                     metrics=TABLE_METRICS) -> str:
    """One row per (task, metric): before, after and the difference (after - before).

    AUC: higher is better; logloss and session logloss: lower is better.
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
            + "\n(test split; AUC higher is better, logloss and session logloss lower is better)")


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
