"""The subcommands of ``rmtl``, one module each (``register(subparsers)``), and what the
commands that make a run share: ``start_run``."""

from __future__ import annotations

from pathlib import Path


def start_run(config: str, overrides: list[str], run_dir: str | None = None, *, need_strategy: bool = True):
    """The validated RunConfig of ``config`` + ``overrides`` (``run_dir`` replaces the config's),
    with unknown model / strategy names rejected, then ``<run_dir>/config.yaml`` written: a run
    that fails validation leaves no folder behind."""
    from rmtl.config import load_config, save_config
    from rmtl.train import check_names

    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    cfg = load_config(config, overrides)
    check_names(cfg, need_model=True, need_strategy=need_strategy)
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    print(f"run dir: {cfg.run_dir}")
    return cfg
