"""`rmtl agent`: the RMTL agent stage alone, for a backbone trained elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "agent", help="train the RMTL critics for a pretrained backbone and save them",
        description="Build transitions from the backbone's predictions on the train split, train the per-task "
                    "critics (TD3 machinery; optionally the actor with agent.actor_update=true) and save them. "
                    "Fine-tune afterwards with strategy.name=rmtl strategy.options.checkpoint=<saved file>.",
    )
    p.add_argument("-c", "--config", default="quickstart", metavar="CONFIG",
                   help="YAML file or packaged config name (default: quickstart); its data, model and agent "
                        "sections are used")
    p.add_argument("--backbone", required=True, metavar="CHECKPOINT",
                   help="a checkpoint of the backbone: best.pt / last.pt of `rmtl train` (the model is built "
                        "from the config's model section), a bare state_dict, or a whole saved nn.Module")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to save the critics (default: <run_dir>/agent/agent.pt)")
    p.add_argument("--run-dir", help="output folder (default: the config's run_dir); gets config.yaml and, "
                   "without --out, agent/agent.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. agent.steps=5000")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rmtl import distributed
    from rmtl.commands import started_run
    from rmtl.pipeline import load_backbone, train_agent
    from rmtl.train import load_everywhere, resolve_data_dir

    with started_run(args.config, args.overrides, args.run_dir, need_strategy=False, reads_shards=True,
                     pins_streams=True) as cfg:
        if cfg.data.shards:  # each process reads the train rows of its own streams (rmtl.pipeline.agent_parts)
            from rmtl.data.shard_stream import ShardSource

            with distributed.all_or_none("loading the shards"):
                log = ShardSource.open(resolve_data_dir(cfg.data.shards))
        else:
            log = load_everywhere(cfg, None)
        with distributed.all_or_none("loading the backbone"):
            backbone = load_backbone(args.backbone, cfg, log.spec)
        stage = train_agent(cfg, log, backbone, run_dir=cfg.run_dir, out_path=args.out, say=print)
    if not distributed.is_main():  # under torchrun: rank 0 reports
        return 0
    for step, td in zip(stage.history["step"][-1:], stage.history["td_loss"][-1:]):
        print(f"agent: {step} updates, final TD loss {td:.4f}, {stage.seconds:.0f}s")
    print(f"critics saved to {stage.path}")
    if cfg.agent.actor_update:
        print("the updated actor's weights are in the same file (key 'actor')")
    shards = f" data.shards={cfg.data.shards} data.shard_streams={cfg.data.shard_streams}" if cfg.data.shards else ""
    print(f"fine-tune with: rmtl train -c {args.config}{shards} strategy.name=rmtl "
          f"strategy.options.checkpoint={Path(stage.path)}")
    return 0
