"""`rmtl pipeline` / `rmtl agent` from a sharded entry (data.shards): every stage reads each
process's own shards (rmtl.pipeline.agent_parts, rmtl.data.shard_parts).

Small synthetic KuaiRand release (150 users, ~6.6 k rows, ~700 sessions), tiny MMoE,
dropout 0, fp32 (bf16 autocast would round differently on another batch split).

- 1 shard, 1 stream: the sharded pipeline equals the in-memory pipeline on the same rows
  BIT FOR BIT (pretrained weights, critics, both fine-tunes, every metric of the table):
  the stream's batches are the BatchIterator's, stream 0's generators are the in-memory
  agent's, its behaviour noise the in-memory draw, and the gathered val / test rows are in
  the in-memory order.
- 4 shards, 2 streams: `rmtl pipeline` in 2 gloo processes (run inside the spawn of
  tests/test_shard_stream.py, whose start-up it shares; checked here by
  check_two_process_pipeline) equals one process running both streams. Same global batches and minibatches, so only float32 summation order differs
  (two share-weighted halves vs one mean): weights and critics to atol 2e-5 (measured
  ~1e-6; a wrong batch or a missing all-reduce moves them by ~1e-3), metrics to 1e-4
  (a flipped near-tie moves AUC by ~1e-5 on these rows). Each process reads only its own
  stream's shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmtl.cli import main  # noqa: E402
from rmtl.config import load_config  # noqa: E402
from rmtl.data.shards import load_log, rank_files, read_meta  # noqa: E402
from rmtl.pipeline import run_pipeline  # noqa: E402

TINY = ["model.options.embed_dim=8", "model.options.num_experts=2", "model.options.expert_dims=[16]",
        "model.options.tower_dims=[8]", "model.options.dropout=0", "train.epochs=1", "train.batch_size=256",
        "train.device=cpu", "train.progress=false", "train.num_threads=1", "train.bf16=false",
        "agent.steps=20", "agent.batch_size=64", "agent.device=cpu", "agent.log_every=5",
        "agent.critic_eval_every=4", "agent.ips=true", "agent.finetune_epochs=1", "agent.finetune_eval_every=5"]
TWO = ["agent.actor_update=true", "agent.ew_control=false"]  # the 2-process case: the TD3+BC actor too
ATOL = 2e-5
METRIC_ATOL = 1e-4


def _weights(run: Path, tag: str) -> dict:
    return torch.load(run / tag / "last.pt", weights_only=False)["model"]


def _critics(run: Path) -> dict:
    return torch.load(run / "agent" / "agent.pt", weights_only=False)["critics"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _table(run: Path) -> dict:
    got = json.loads((run / "pipeline.json").read_text())
    return {(arm, t, m): v for arm in ("before", "after", "control") for t, ms in (got[arm] or {}).items()
            for m, v in ms.items()}


def test_one_shard_pipeline_equals_the_in_memory_pipeline_bit_for_bit(shard_entries, tmp_path):
    _, one = shard_entries
    sharded = run_pipeline(load_config("quickstart", [*TINY, f"data.shards={one}"]), run_dir=tmp_path / "s",
                           say=lambda s: None)
    memory = run_pipeline(load_config("quickstart", TINY), prepared=load_log(one), run_dir=tmp_path / "m",
                          say=lambda s: None)
    assert (sharded.before, sharded.after, sharded.control) == (memory.before, memory.after, memory.control)
    for tag in ("pretrain", "finetune", "ew_control"):
        assert _max_diff(_weights(tmp_path / "s", tag), _weights(tmp_path / "m", tag)) == 0.0, tag
    assert _max_diff(_critics(tmp_path / "s"), _critics(tmp_path / "m")) == 0.0
    assert sharded.arms["rmtl"].steps == memory.arms["rmtl"].steps > 0


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def pipeline_from_shards(entry, run_dir: Path) -> dict:
    """`rmtl pipeline` from ``entry`` in this process (under a 2-process group: the spawn of
    tests/test_shard_stream.py, which runs it to share its start-up cost): exit code, output,
    and the shard files each train_part call read into memory."""
    from rmtl import pipeline
    from rmtl.data import shard_parts

    read: list[list[str]] = []
    real = shard_parts.train_part

    def recording(source, stream, streams):
        read.append(source.files(stream, streams))
        return real(source, stream, streams)

    pipeline.train_part = shard_parts.train_part = recording
    try:
        got = _cli(["pipeline", "-c", "quickstart", *TINY, *TWO, f"data.shards={entry}", "--run-dir", str(run_dir)])
    finally:
        pipeline.train_part = shard_parts.train_part = real
    return {"cli": got, "read": read}


def check_two_process_pipeline(entry: Path, two: Path, ranks: list[dict], one: Path) -> None:
    """The 2-process run ``two`` (``ranks``: each process's pipeline_from_shards) against one
    process running both streams (run here, into ``one``)."""
    code, out, _ = _cli(["pipeline", "-c", "quickstart", *TINY, *TWO, f"data.shards={entry}",
                         "data.shard_streams=2", "--run-dir", str(one)])
    assert code == 0 and "2 streams" in out
    assert [r["cli"][0] for r in ranks] == [0, 0]
    assert "EW pretrained" in ranks[0]["cli"][1] and ranks[1]["cli"][1] == ""  # rank 0 prints
    meta = read_meta(entry)
    for r, got in enumerate(ranks):  # the agent stage and the RMTL fine-tune: its own stream's shards only
        assert len(got["read"]) == 2 and all(files == rank_files(meta, r, 2) for files in got["read"]), got["read"]
    assert "shard_streams: 2" in (two / "config.yaml").read_text()  # a resume cuts the rows the same way
    for tag in ("pretrain", "finetune"):
        assert _max_diff(_weights(two, tag), _weights(one, tag)) < ATOL, tag
    assert 0 < _max_diff(_critics(two), _critics(one)) < ATOL  # float order differs, nothing else
    a, b = _table(two), _table(one)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < METRIC_ATOL
    assert json.loads((two / "pipeline.json").read_text())["processes"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # the 2-process run, as if it died before its fine-tune, resumed by ONE process: the
    # config.yaml's 2 streams, the saved critics (not retrained), the 2-process fine-tune
    died = one.parent / "died"
    shutil.copytree(two, died)
    shutil.rmtree(died / "finetune")
    agent_file = (died / "agent" / "agent.pt").read_bytes()
    code, out, _ = _cli(["pipeline", "--resume", "--run-dir", str(died)])
    assert code == 0 and "2 streams" in out
    assert (died / "agent" / "agent.pt").read_bytes() == agent_file
    assert _max_diff(_weights(died, "finetune"), _weights(two, "finetune")) < ATOL
    assert json.loads((died / "pipeline.json").read_text())["processes"] == 1


def test_the_agent_command_trains_the_pipeline_critics_from_shards(shard_entries, tmp_path, capsys):
    """`rmtl agent --backbone <pretrain/best.pt> data.shards=...` trains the critics the
    pipeline trained from the same backbone and streams (bit for bit), and prints a
    fine-tune command that keeps the shards; that command runs."""
    four, _ = shard_entries
    cfg = load_config("quickstart", [*TINY, f"data.shards={four}", "data.shard_streams=2"])
    run_pipeline(cfg, run_dir=tmp_path / "p", say=lambda s: None)
    code = main(["agent", "-c", "quickstart", "--backbone", str(tmp_path / "p" / "pretrain" / "best.pt"), *TINY,
                 f"data.shards={four}", "data.shard_streams=2", "--run-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert code == 0
    assert _max_diff(_critics(tmp_path / "a"), _critics(tmp_path / "p")) == 0.0
    line = next(s for s in out.splitlines() if s.startswith("fine-tune with: "))
    assert f"data.shards={four}" in line and "data.shard_streams=2" in line
    argv = line.removeprefix("fine-tune with: rmtl ").split()
    assert main([*argv, *TINY, "train.max_steps=3", "--run-dir", str(tmp_path / "ft")]) == 0
    metrics = json.loads((tmp_path / "ft" / "train" / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["ctr"]["auc"])


@pytest.mark.parametrize("command", [["pipeline"], ["agent", "--backbone", "best.pt"]])
def test_a_bad_shards_folder_gives_one_line_and_exit_2_in_pipeline_and_agent(shard_entries, tmp_path, capsys, command):
    four, _ = shard_entries
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing", four.parent):
        code = main([*command, "-c", "quickstart", f"data.shards={bad}", "--run-dir", str(tmp_path / "run")])
        out, err = capsys.readouterr()
        err = err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "meta.json" in err[0] and str(bad) in err[0], err
        assert out == ""
        assert not (tmp_path / "run").exists()


def test_stream_parts_hold_whole_sessions_and_bind_the_in_memory_weights(shard_entries):
    """Each stream's train part holds whole sessions: its rows, session indices, transitions
    and session context are the in-memory train split's at its rows; the rmtl strategy bound
    to the parts gives every row the weight bind_log gives it (same critic set, context)."""
    from rmtl.agents.config import AgentConfig
    from rmtl.agents.rmtl_agent import RMTLAgent, session_folds
    from rmtl.data.shard_parts import train_part, train_sessions
    from rmtl.data.shard_stream import ShardSource
    from rmtl.envs import build_transitions
    from rmtl.envs.context import session_context
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    four, _ = shard_entries
    source = ShardSource.open(four)
    full = load_log(four).split("train")
    names = ["position", "elapsed", "gap", "history", "last"]
    whole_ctx = session_context(full, names)
    whole = build_transitions(full, policy="random", seed=0)
    parts = [train_part(source, s, 2) for s in range(2)]
    assert train_sessions(source) == full.num_sessions
    np.testing.assert_array_equal(np.sort(np.concatenate([p.sessions for p in parts])), np.arange(full.num_sessions))
    np.testing.assert_array_equal(np.sort(np.concatenate([p.rows for p in parts])), np.arange(full.num_rows))
    for p in parts:
        assert 0 < p.log.num_rows < full.num_rows
        for name in ("sparse", "dense", "labels", "time", "user"):
            np.testing.assert_array_equal(getattr(p.log, name), getattr(full, name)[p.rows], err_msg=name)
        np.testing.assert_array_equal(p.sessions[p.log.session_of_row()], full.session_of_row()[p.rows])
        mine = build_transitions(p.log, policy="random", seed=0)
        np.testing.assert_array_equal(p.rows[mine.next_row], whole.next_row[p.rows])  # same next state
        np.testing.assert_array_equal(mine.done, whole.done[p.rows])
        np.testing.assert_array_equal(session_context(p.log, names), whole_ctx[p.rows])

    agent = RMTLAgent(full.spec, AgentConfig(device="cpu", critic_hidden=[8], lam=0.5), seed=1)
    agent.session_fold = session_folds(full.num_sessions, agent.num_sets, 1)
    memory, streamed = RMTLStrategy(full.spec.num_tasks, agent=agent), RMTLStrategy(full.spec.num_tasks, agent=agent)
    memory.bind_log(full)
    streamed.bind_parts(parts, full.num_sessions)
    rows = torch.from_numpy(np.random.default_rng(0).permutation(full.num_rows)[:300])
    probs = torch.rand(len(rows), full.spec.num_tasks, generator=torch.Generator().manual_seed(0))
    args = (torch.from_numpy(full.sparse[rows.numpy()]), torch.from_numpy(full.dense[rows.numpy()]), probs)
    want = memory._critic_weights(*args, rows)
    assert not torch.allclose(want, want[torch.randperm(len(rows))])  # the rows' own weights matter
    torch.testing.assert_close(streamed._critic_weights(*args, rows), want, rtol=0, atol=0)
    with pytest.raises(Exception, match="sessions"):  # folds of another train split are refused
        streamed.bind_parts(parts, full.num_sessions + 1)


def test_a_stream_without_transitions_for_a_critic_set_is_one_clear_error(shard_entries):
    """A stream too small to train a critic set fails before the first update (so, under
    torchrun, before any collective another process would wait in), naming the stream."""
    from dataclasses import replace

    from rmtl.agents.config import AgentConfig
    from rmtl.agents.rmtl_agent import ReplayPart, RMTLAgent
    from rmtl.envs import build_transitions
    from rmtl.errors import DataError

    four, _ = shard_entries
    full = load_log(four).split("train")
    first = replace(full, splits={"train": (0, 1), "rest": (1, full.num_sessions)}).split("train")  # one session
    agent = RMTLAgent(full.spec, AgentConfig(device="cpu", critic_hidden=[8], steps=4, batch_size=8), seed=0)
    part = ReplayPart(first, build_transitions(first, policy="random", seed=0), np.array([0]), stream=1)
    with pytest.raises(DataError, match="stream 1 of 2 has no transitions to train critic set"):
        agent.train_parts([part], streams=2, sharing=None, num_sessions=full.num_sessions)
    assert agent.steps_done == 0


def test_compare_reads_shards(shard_entries, tmp_path, capsys):
    """`rmtl compare data.shards=...`: every arm fine-tunes from the streamed shards; lam0
    (w = 1) is EW (up to float order: its loss is another sum of the same terms); the label arm's class means are summed over the streams; the
    bootstrap reads the gathered test rows."""
    _, one = shard_entries
    code = main(["compare", "-c", "quickstart", *TINY, "agent.ew_control=false", f"data.shards={one}", "--seeds", "1",
                 "--jobs", "1", "--arms", "lam0,label", "--bootstrap", "10", "--run-dir", str(tmp_path / "c")])
    capsys.readouterr()
    assert code == 0
    got = json.loads((tmp_path / "c" / "compare.json").read_text())["per_seed"][0]
    def gap(arm):  # largest metric difference to the EW arm
        a, b = got["arms"][arm]["finetuned_metrics"], got["arms"]["ew"]["finetuned_metrics"]
        return max(abs(a[t][m] - b[t][m]) for t in a for m in a[t])

    assert gap("lam0") < 1e-5  # w = 1: EW up to the loss's float order
    assert np.isfinite(got["arms"]["label"]["finetuned_metrics"]["ctr"]["auc"])
    assert set(got["bootstrap"]) == {"lam0", "label"}
    lo, hi = got["bootstrap"]["label"]["ctr"]["auc"]
    assert lo <= hi and np.isfinite([lo, hi]).all()
    assert "shard_streams: 1" in (tmp_path / "c" / "config.yaml").read_text()


def test_label_class_means_from_stream_parts_equal_the_whole_split(shard_entries):
    from rmtl.agents.config import AgentConfig
    from rmtl.agents.rmtl_agent import RMTLAgent, session_folds
    from rmtl.backbones import build
    from rmtl.data.shard_parts import train_part
    from rmtl.data.shard_stream import ShardSource
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    four, _ = shard_entries
    source = ShardSource.open(four)
    full = load_log(four).split("train")
    torch.manual_seed(0)
    model = build("mmoe", full.spec, embed_dim=8, num_experts=2, expert_dims=[16], tower_dims=[8])
    agent = RMTLAgent(full.spec, AgentConfig(device="cpu", critic_hidden=[8], lam=0.5), seed=1)
    agent.session_fold = session_folds(full.num_sessions, agent.num_sets, 1)
    memory = RMTLStrategy(full.spec.num_tasks, agent=agent, transform="label")
    streamed = RMTLStrategy(full.spec.num_tasks, agent=agent, transform="label")
    memory.bind_log(full, model)
    streamed.bind_parts([train_part(source, s, 2) for s in range(2)], full.num_sessions, model)
    assert not torch.allclose(memory._class_weights[0], memory._class_weights[1])
    torch.testing.assert_close(streamed._class_weights, memory._class_weights, rtol=1e-6, atol=0)
    uncounted = RMTLStrategy(full.spec.num_tasks, agent=agent, transform="label")
    uncounted.bind_parts([train_part(source, 0, 2)], full.num_sessions, model, counted=False)
    assert torch.equal(uncounted._class_weights, torch.zeros_like(memory._class_weights))  # counted by another
