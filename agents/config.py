"""Options of the RMTL agent stage (critics, TD3 machinery, optional actor update).

These are the ``agent:`` section of a run config (rmtl.config.RunConfig.agent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from rmtl.errors import ConfigError


@dataclass
class AgentConfig:
    # TD3 machinery
    gamma: float = 0.9  # discount within a session
    tau: float = 0.005  # soft update of the target networks
    lr: float = 1e-3  # critic learning rate
    batch_size: int = 512  # transitions per critic update
    steps: int = 2000  # critic updates
    policy_noise: float = 0.1  # std of the noise added to the target action a'
    noise_clip: float = 0.2  # that noise is clipped to [-noise_clip, noise_clip]
    policy_delay: int = 2  # target (and actor) updates every this many critic updates
    # critics
    embed_dim: Optional[int] = None  # None = the backbone's embedding size (or 16 without a backbone)
    critic_hidden: List[int] = field(default_factory=lambda: [64, 32])
    init_from_backbone: bool = True  # start the critics' embeddings from the backbone's (when shapes match)
    ips: bool = False  # inverse-propensity weights in the TD loss, so rare positives count as much as negatives
    ips_clip: float = 10.0  # largest ratio between a positive's and a negative's IPS weight
    # leak-free weights: train sessions are dealt into `folds` folds; the critics that weight a
    # row were trained on the other folds only (cross-fitting). Critics trained on the rows they
    # weight memorise those rows' labels through the id fields (measured: docs/rmtl.md).
    cross_fit: bool = True  # false = one critic set trained on all train rows (the leaky reference behaviour)
    folds: int = 2
    drop_fields: List[str] = field(default_factory=list)  # sparse fields the critics read as "unknown" (e.g. ids)
    critic_dropout: float = 0.0
    critic_weight_decay: float = 0.0
    # early stopping of critic training on held-out TD error: a critic set evaluates every
    # critic_eval_every updates the mean TD error on critic_holdout of its own training
    # sessions (left out of its updates; never the fold it weights), keeps the best critics
    # and stops after critic_patience evaluations without a lower error. null = fixed steps
    critic_eval_every: Optional[int] = None
    critic_patience: int = 3
    critic_holdout: float = 0.1
    # session context in the critics' state (rmtl.envs.context): position, elapsed, gap, history, last
    context: List[str] = field(default_factory=lambda: ["position", "elapsed", "gap", "history", "last"])
    # optional TD3+BC actor update with the backbone as the actor
    actor_update: bool = False
    actor_lr: float = 1e-4
    bc_alpha: float = 1.0  # weight of the behaviour-cloning BCE next to the normalised Q term
    bc_target: str = "labels"  # labels | pretrained (the frozen pretrained backbone's predictions)
    # behaviour policy that fills the replay buffer
    behaviour: str = "noisy"  # noisy (pretrained predictions + Gaussian noise) | random (uniform, as the reference code)
    behaviour_noise: float = 0.1
    reward: str = "bce"  # bce | abs
    # loss weights w = 1 - lam * Q during fine-tuning
    lam: float = 0.7
    twin: str = "min"  # which twin critic gives Q for the weights: min (clipped double Q) | mean | first
    # fine-tuning with the critics' weights (rmtl pipeline): short and gentle, because the
    # pretrained backbone already sits at its best validation epoch; null = the train section's value
    finetune_epochs: Optional[int] = 2
    finetune_lr: Optional[float] = 1e-4
    # both fine-tuning arms validate every this many steps (null = once per epoch), stop after
    # finetune_patience evaluations without a better mean val AUC, and keep the best weights;
    # the pretrained weights compete too, so a fine-tune that only hurts on val is not kept
    finetune_eval_every: Optional[int] = 20
    finetune_patience: Optional[int] = 3
    ew_control: bool = True  # also fine-tune with EW for as long, so the table separates "more training" from the weights
    log_every: int = 50  # steps between TensorBoard scalars (histograms every 10x)
    device: str = "auto"  # auto | cpu | cuda
    # torch intra-op threads while the agent trains (restored after); null = unchanged. The
    # critics are small: one thread is about as fast on a quiet machine and much faster on a busy one
    num_threads: Optional[int] = 1

    def validate(self) -> "AgentConfig":
        checks = {
            "agent.gamma": 0.0 <= self.gamma < 1.0,
            "agent.tau": 0.0 < self.tau <= 1.0,
            "agent.lr": self.lr > 0,
            "agent.actor_lr": self.actor_lr > 0,
            "agent.batch_size": self.batch_size > 0,
            "agent.steps": self.steps >= 0,
            "agent.policy_noise": self.policy_noise >= 0,
            "agent.noise_clip": self.noise_clip >= 0,
            "agent.policy_delay": self.policy_delay >= 1,
            "agent.ips_clip": self.ips_clip >= 1,
            "agent.bc_alpha": self.bc_alpha >= 0,
            "agent.behaviour_noise": self.behaviour_noise >= 0,
            "agent.lam": self.lam >= 0,
            "agent.log_every": self.log_every > 0,
            "agent.critic_hidden": len(self.critic_hidden) > 0 and all(int(h) > 0 for h in self.critic_hidden),
            "agent.embed_dim": self.embed_dim is None or self.embed_dim > 0,
            "agent.num_threads": self.num_threads is None or self.num_threads > 0,
            "agent.finetune_epochs": self.finetune_epochs is None or self.finetune_epochs > 0,
            "agent.finetune_lr": self.finetune_lr is None or self.finetune_lr > 0,
            "agent.finetune_eval_every": self.finetune_eval_every is None or self.finetune_eval_every > 0,
            "agent.finetune_patience": self.finetune_patience is None or self.finetune_patience >= 0,
            "agent.folds": self.folds >= 2,
            "agent.critic_eval_every": self.critic_eval_every is None or self.critic_eval_every > 0,
            "agent.critic_patience": self.critic_patience >= 1,
            "agent.critic_holdout": 0.0 < self.critic_holdout < 1.0,
            "agent.critic_dropout": 0.0 <= self.critic_dropout < 1.0,
            "agent.critic_weight_decay": self.critic_weight_decay >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"value {getattr(self, key.split('.')[1])!r} is out of range", key=key)
        choices = {"agent.bc_target": ("labels", "pretrained"), "agent.behaviour": ("noisy", "random"),
                   "agent.reward": ("bce", "abs"), "agent.device": ("auto", "cpu", "cuda"),
                   "agent.twin": ("min", "mean", "first")}
        for key, allowed in choices.items():
            value = getattr(self, key.split(".")[1])
            if value not in allowed:
                raise ConfigError(f"expected one of {', '.join(allowed)}, got '{value}'", key=key)
        from rmtl.envs.context import check_context

        check_context(self.context)
        return self
