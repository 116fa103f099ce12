"""`rmtl pipeline` under torchrun (2 gloo processes, CPU, tiny data).

One spawn of 2 processes (the scheme of test_distributed.py; here the processes join
through torchrun's environment variables, so the CLI's own start-up path runs) does:
- the agent's critic (and TD3+BC actor) updates on a tiny log: compared below with one
  process on the same global minibatches;
- `rmtl pipeline` end to end ("full"), and the same run interrupted during the RMTL
  fine-tune ("cut"), which one process then resumes;
- a start that fails on process 1 only (`rmtl pipeline` and `rmtl train`).

Tolerance of the agent comparison: critics and actor after 6 updates to atol 2e-5 (float32
sums in another order: two share-weighted halves vs one mean; Adam's first steps are
about lr = 1e-3 each, so a wrong gradient moves weights by ~1e-3); the logged TD losses to
rtol 1e-5. The pipeline comparisons use dropout 0 (masks are drawn per process).
"""

import contextlib
import io
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawned import exit_now  # noqa: E402
from test_train import tiny_log  # noqa: E402

from rmtl import checkpoint as ckpt  # noqa: E402
from rmtl.agents.config import AgentConfig  # noqa: E402
from rmtl.agents.rmtl_agent import RMTLAgent  # noqa: E402
from rmtl.backbones import build  # noqa: E402
from rmtl.callbacks import Callback  # noqa: E402
from rmtl.cli import main  # noqa: E402
from rmtl.envs import build_transitions  # noqa: E402
from rmtl.errors import DataError  # noqa: E402

FAST = ["train.epochs=1", "train.batch_size=128", "train.device=cpu", "train.progress=false", "train.bf16=false",
        "train.checkpoint_every=1", "train.num_threads=1", "model.options.dropout=0",
        "agent.steps=40", "agent.batch_size=64", "agent.device=cpu", "agent.log_every=10"]
CUT_AT = 3  # the "cut" run dies after this many RMTL fine-tune steps (last.pt written at each)


def agent_run() -> tuple[RMTLAgent, dict]:
    """Critics cross-fitted over 2 folds with held-out early stopping, and the TD3+BC actor
    (target-policy noise, actor gradients, the global |Q| normaliser): 6 updates."""
    torch.manual_seed(0)
    log = tiny_log().split("train")
    actor = build("mmoe", log.spec, embed_dim=8, num_experts=2, expert_dims=[16], tower_dims=[8], dropout=0.0)
    cfg = AgentConfig(steps=12, batch_size=64, lr=1e-3, actor_update=True, policy_delay=2, log_every=2,
                      critic_eval_every=3, critic_patience=5, device="cpu", critic_hidden=[16, 8])
    agent = RMTLAgent(log.spec, cfg, actor, seed=3)
    transitions = build_transitions(log, None, policy="random", seed=1, context=cfg.context)
    history = agent.train(log, transitions)
    return agent, history


def agent_state(agent: RMTLAgent) -> dict:
    return {"critics": {k: v.clone() for k, v in agent.critics.state_dict().items()},
            "targets": {k: v.clone() for k, v in agent.critic_targets.state_dict().items()},
            "actor": {k: v.clone() for k, v in agent.actor.state_dict().items()}}


class Cut(Exception):
    pass


class CutFinetune(Callback):
    """Dies after CUT_AT steps of the RMTL fine-tune, as a killed run would (last.pt is there)."""

    name = "cut"

    def on_step_end(self, trainer, step):
        if trainer.tag == "finetune" and trainer.state.step == CUT_AT:
            raise Cut()


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _worker(rank: int, world: int, port: int, root: str, config: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(root)
    out = {}
    import torch.distributed as dist

    from rmtl import train as train_module

    try:
        out["full"] = _cli(["pipeline", "-c", config, *FAST, "--run-dir", str(root / "full")])  # joins the group
        agent, history = agent_run()
        out["agent"] = agent_state(agent), history
        plain = train_module.default_callbacks
        train_module.default_callbacks = lambda tc: [*plain(tc), CutFinetune()]
        try:
            _cli(["pipeline", "-c", config, *FAST, "--run-dir", str(root / "cut")])
            out["cut"] = "finished"
        except Cut:
            out["cut"] = "cut"
        finally:
            train_module.default_callbacks = plain
        real_load = train_module.load_data

        def load_data(*args, **kwargs):  # process 1 cannot read the data (e.g. another node's disk)
            if rank == 1:
                raise DataError("no such file or directory", path="/elsewhere/events.csv")
            return real_load(*args, **kwargs)

        train_module.load_data = load_data
        out["bad"] = _cli(["pipeline", "-c", config, *FAST, "--run-dir", str(root / "bad")])
        out["bad_train"] = _cli(["train", "-c", config, *FAST, "--run-dir", str(root / "bad_train")])
        train_module.load_data = real_load
        torch.save(out, root / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_now()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text("data:\n  source: retailrocket\n  synthetic: {users: 60, items: 40}\n"
                    f"  cache_dir: {folder / 'cache'}\nmodel:\n  name: mmoe\nrun_dir: {folder / 'unused'}\n")
    return path


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_pipeline")
    config = write_config(root)
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(config)), nprocs=2, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return root, config, ranks


def files(run: Path) -> list[str]:
    """Relative paths, TensorBoard event files named by their folder only."""
    return sorted(str(p.relative_to(run).parent / "events") if p.name.startswith("events.out") else
                  str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_pipeline_under_two_processes_writes_one_set_of_outputs(ddp):
    root, _, ranks = ddp
    (code0, out0, _), (code1, out1, err1) = ranks[0]["full"], ranks[1]["full"]
    assert code0 == code1 == 0
    assert "RMTL fine-tuned" in out0 and "EW fine-tuned" in out0 and out1 == "" and err1 == ""
    run = root / "full"
    tags = ["pretrain", "finetune", "ew_control"]
    expected = sorted(["config.yaml", "comparison.txt", "pipeline.json", "agent/agent.pt", "agent/history.json",
                       "agent/events", *[f"{t}/{f}" for t in tags for f in ("best.pt", "last.pt", "metrics.json", "events")]])
    assert files(run) == expected  # one events file per folder: one writer
    assert not list(run.rglob(".*"))  # no temporaries left behind
    saved = json.loads((run / "pipeline.json").read_text())
    assert saved["processes"] == 2
    assert f"{saved['after']['ctr']['auc']:.4f}" in out0


def test_agent_update_under_two_processes_equals_one_process(ddp):
    _, _, ranks = ddp
    agent, history = agent_run()
    single = agent_state(agent)
    for r in range(2):
        state, hist = ranks[r]["agent"]
        for part in ("critics", "targets", "actor"):
            for key, value in single[part].items():
                torch.testing.assert_close(state[part][key], value, rtol=0, atol=2e-5, msg=f"rank {r} {part} {key}")
        np.testing.assert_allclose(hist["td_loss"], history["td_loss"], rtol=1e-5)
        assert hist["heldout/td"] == pytest.approx(history["heldout/td"], rel=1e-5)
        assert hist["stopped_at"] == history["stopped_at"]
    for part in ("critics", "actor"):  # the same agent on every rank, exactly
        for key, value in ranks[0]["agent"][0][part].items():
            assert torch.equal(ranks[1]["agent"][0][part][key], value), key


def test_pipeline_is_deterministic_for_a_fixed_process_count(ddp):
    root, _, _ = ddp
    for rel in ("pretrain/last.pt", "agent/agent.pt"):  # the "cut" run got this far, like "full"
        a, b = ckpt.load(root / "full" / rel), ckpt.load(root / "cut" / rel)
        for key, value in (a["model"] if "model" in a else a["critics"]).items():
            assert torch.equal(value, (b["model"] if "model" in b else b["critics"])[key]), f"{rel} {key}"


def test_a_two_process_pipeline_resumes_in_one_process(ddp, tmp_path, capsys):
    """The 2-process run cut after 3 RMTL fine-tune steps, resumed by one process, ends
    where the uninterrupted 2-process run ends (up to float summation order)."""
    root, _, ranks = ddp
    assert ranks[0]["cut"] == ranks[1]["cut"] == "cut"
    cut, full = root / "cut", root / "full"
    assert ckpt.load(cut / "finetune" / "last.pt")["loop"]["step"] == CUT_AT
    assert not (cut / "ew_control").exists() and not (cut / "pipeline.json").exists()
    critics = (cut / "agent" / "agent.pt").stat().st_mtime_ns
    assert main(["pipeline", "--resume", "--run-dir", str(cut)]) == 0  # config.yaml of the run dir
    assert "RMTL fine-tuned" in capsys.readouterr().out
    assert (cut / "agent" / "agent.pt").stat().st_mtime_ns == critics  # loaded, not retrained
    for tag in ("finetune", "ew_control"):
        a, b = ckpt.load(cut / tag / "last.pt"), ckpt.load(full / tag / "last.pt")
        assert a["loop"]["step"] == b["loop"]["step"] > CUT_AT
        for key, value in b["model"].items():
            torch.testing.assert_close(a["model"][key], value, rtol=0, atol=1e-4, msg=f"{tag} {key}")
    got, want = (json.loads((run / "pipeline.json").read_text()) for run in (cut, full))
    for arm in ("before", "after", "control"):
        for task, mets in want[arm].items():
            assert got[arm][task]["auc"] == pytest.approx(mets["auc"], abs=1e-3)
            assert got[arm][task]["logloss"] == pytest.approx(mets["logloss"], abs=1e-4)
    assert got["processes"] == 1


@pytest.mark.parametrize("command", ["pipeline", "train"])
def test_a_start_failing_on_one_process_stops_all_with_one_line(ddp, command):
    root, _, ranks = ddp
    case = "bad" if command == "pipeline" else "bad_train"
    (code0, out0, err0), (code1, out1, err1) = ranks[0][case], ranks[1][case]
    assert code0 == code1 == 2
    lines = [line for line in err0.splitlines() if line.strip()]
    assert lines == [f"rmtl {command}: error: loading the data failed on process 1: "
                     "/elsewhere/events.csv: no such file or directory"]
    assert err1 == "" and out1 == ""
    assert not (root / case).exists()  # rank 0's config.yaml and folder removed again
