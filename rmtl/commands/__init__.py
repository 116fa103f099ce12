"""The subcommands of ``rmtl``, one module each (``register(subparsers)``), and what the
commands that make a run share: ``start_run`` / ``started_run``."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def start_run(config: str, overrides: list[str], run_dir: str | None = None, *, need_strategy: bool = True,
              reads_shards: bool = False, pins_streams: bool = False):
    """The validated RunConfig of ``config`` + ``overrides`` (``run_dir`` replaces the config's),
    with unknown model / strategy names rejected and ``data.shards`` checked (a sharded entry
    when the command ``reads_shards``, else refused), then ``<run_dir>/config.yaml`` written and
    its "run dir:" line printed: a run that fails validation leaves no folder behind.
    ``pins_streams``: a sharded run's stream count (data.shard_streams, default the process
    count) is written into config.yaml, so a resumed run cuts the train rows the same way in
    every stage (the pipeline's agent has no last.pt to keep it in)."""
    cfg, _ = _start(config, overrides, run_dir, need_strategy, reads_shards, pins_streams)
    return cfg


@contextmanager
def started_run(config: str, overrides: list[str], run_dir: str | None = None, *,
                need_strategy: bool = True, reads_shards: bool = False, pins_streams: bool = False) -> Iterator:
    """``start_run`` for the body of a command: when the body fails before any checkpoint
    was written (bad data folder, bad backbone option ...), the config.yaml and the folders
    this call created are removed again, so a failed start leaves nothing behind. A run that
    got as far as a checkpoint stays (it is resumable)."""
    cfg, created = _start(config, overrides, run_dir, need_strategy, reads_shards, pins_streams)
    try:
        yield cfg
    except BaseException:
        _remove_if_unused(Path(cfg.run_dir), created)
        raise


def resume_config(run_dir: str | None) -> str | None:
    """RUN_DIR/config.yaml when it exists (what ``--resume --run-dir DIR`` runs without -c)."""
    path = Path(run_dir) / "config.yaml" if run_dir else None
    return str(path) if path is not None and path.exists() else None


def _start(config, overrides, run_dir, need_strategy, reads_shards, pins_streams=False):
    from rmtl import distributed
    from rmtl.config import load_config, save_config
    from rmtl.device import resolve_device
    from rmtl.train import check_names, check_shards

    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    cfg = load_config(config, overrides)  # every key, type and numeric range checked
    check_names(cfg, need_model=True, need_strategy=need_strategy)
    if distributed.requested():  # under torchrun: rank 0's run_dir (its ${now:...}) for every process
        distributed.init(resolve_device(cfg.train.device))
        cfg.run_dir = distributed.from_rank0(cfg.run_dir)
    with distributed.all_or_none("checking data.shards"):  # every process: each reads its own shards
        check_shards(cfg, reads_shards=reads_shards)
    if pins_streams and cfg.data.shards and cfg.data.shard_streams is None:
        cfg.data.shard_streams = distributed.world_size()
    if not distributed.is_main():
        return cfg, []
    path = Path(cfg.run_dir) / "config.yaml"
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    save_config(cfg, path)  # before the run: a killed run resumes from it
    print(f"run dir: {cfg.run_dir}")
    return cfg, created


def _remove_if_unused(run_dir: Path, created: list[Path]) -> None:
    if not created:  # nothing of this call's (under torchrun: every rank but 0, while rank 0 removes its own)
        return
    if any(run_dir.rglob("*.pt")):
        return
    if run_dir in created:  # all of it is this call's (config.yaml, maybe train/ with events)
        shutil.rmtree(run_dir, ignore_errors=True)
    for p in created:
        try:
            if p.is_file():
                p.unlink()
            elif p.is_dir():
                p.rmdir()  # only an empty folder
        except OSError:
            break
