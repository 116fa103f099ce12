import numpy as np
import pytest
import torch
from torch import nn

from rmtl.agents.config import AgentConfig
from rmtl.agents.rmtl_agent import RMTLAgent, ips_weights
from rmtl.data.batches import gather_batch
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.envs import build_transitions
from rmtl.envs.synthetic_log import random_session_log
from rmtl.errors import ConfigError, DataError
from rmtl.weighting import build_strategy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chain_log(sessions: int = 60, length: int = 4) -> SessionLog:
    """Fixed-length sessions; the only feature is the position in the session; every label is 1."""
    n = sessions * length
    pos = np.tile(np.arange(length), sessions)
    spec = FeatureSpec(source="toy", sparse_fields=["pos"], cardinalities=[length + 1], dense_fields=["d"],
                       tasks=["a", "b"])
    return SessionLog(spec=spec, session_ptr=np.arange(0, n + 1, length, dtype=np.int64),
                      user=np.repeat(np.arange(sessions), length), item=pos.astype(np.int64),
                      time=np.arange(n, dtype=np.int64), sparse=(pos + 1)[:, None].astype(np.int64),
                      dense=np.zeros((n, 1), np.float32), labels=np.ones((n, 2), np.float32),
                      splits={"train": (0, sessions)})


class ConstantActor(nn.Module):
    def __init__(self, p: float, tasks: int = 2):
        super().__init__()
        self.logit = nn.Parameter(torch.full((tasks,), float(np.log(p / (1 - p)))))

    def forward(self, sparse, dense):
        return self.logit.expand(sparse.shape[0], -1)


class TinyBackbone(nn.Module):
    def __init__(self, spec):
        super().__init__()
        from rmtl.backbones.layers import MLP, FeatureEmbedding

        self.features = FeatureEmbedding(spec, 8)
        self.head = MLP(self.features.output_dim, [16], out_dim=spec.num_tasks)

    def forward(self, sparse, dense):
        return self.head(self.features(sparse, dense))


def test_critic_learns_the_known_value_of_a_chain():
    length, gamma, p = 4, 0.9, 0.5
    log = chain_log(length=length)
    # behaviour: p plus noise, so the critic sees actions around the one it is evaluated at
    tr = build_transitions(log, np.full((log.num_rows, 2), p, np.float32), noise_std=0.2, seed=0)
    cfg = AgentConfig(gamma=gamma, steps=1000, batch_size=128, lr=3e-3, tau=0.1, policy_delay=1, policy_noise=0.0,
                      critic_hidden=[32, 32], embed_dim=8, device="cpu", cross_fit=False, context=[])
    agent = RMTLAgent(log.spec, cfg, ConstantActor(p), seed=0)
    rows = torch.arange(length)
    sparse, dense = torch.from_numpy(log.sparse[:length]), torch.from_numpy(log.dense[:length])
    actions = torch.full((length, 2), p)
    # each step earns log(p); Q(s_t, p) = log(p) * (1 - gamma^(L - t)) / (1 - gamma)
    truth = np.log(p) * (1 - gamma ** (length - rows.numpy())) / (1 - gamma)
    err_before = np.abs(agent.q_values(sparse, dense, actions).numpy() - truth[:, None]).max()
    history = agent.train(log, tr)
    q = agent.q_values(sparse, dense, actions).numpy()
    rel = np.abs(q - truth[:, None]) / np.abs(truth[:, None])
    assert rel.max() < 0.12, (q, truth)
    assert np.abs(q - truth[:, None]).max() < err_before / 3
    assert (q <= 0).all()
    assert history["td_loss"][-1] < history["td_loss"][0]


@pytest.fixture(scope="module")
def log():
    return random_session_log(60, seed=3)


def test_save_load_roundtrip_and_weights(tmp_path, log):
    cfg = AgentConfig(steps=30, batch_size=64, device="cpu", critic_hidden=[16])
    agent = RMTLAgent(log.spec, cfg, TinyBackbone(log.spec), seed=1)
    assert agent.initialised_from_backbone
    agent.train(log, build_transitions(log, seed=0))
    path = agent.save(tmp_path / "agent.pt")
    again = RMTLAgent.load(path)
    b = gather_batch(log, np.arange(50))
    probs = torch.rand(50, 2)
    ctx = torch.from_numpy(agent.context_of(log)[:50])
    fold = torch.from_numpy(agent.fold_of_rows(log)[:50])
    torch.testing.assert_close(agent.q_values(b.sparse, b.dense, probs, context=ctx, fold=fold),
                               again.q_values(b.sparse, b.dense, probs, context=ctx, fold=fold))
    np.testing.assert_array_equal(again.session_fold, agent.session_fold)
    w = again.loss_weights(b.sparse, b.dense, probs, context=ctx, fold=fold)
    assert torch.isfinite(w).all() and (w >= 1).all() and w.shape == (50, 2)
    assert not list(tmp_path.glob(".agent.pt.*"))  # no temporary left behind
    with pytest.raises(DataError, match="missing.pt"):
        RMTLAgent.load(tmp_path / "missing.pt")


def test_training_is_deterministic_under_a_seed(log):
    tr = build_transitions(log, seed=0)
    cfg = AgentConfig(steps=20, batch_size=32, device="cpu", critic_hidden=[8])
    a = RMTLAgent(log.spec, cfg, seed=4)
    b = RMTLAgent(log.spec, cfg, seed=4)
    assert a.train(log, tr)["td_loss"] == b.train(log, tr)["td_loss"]


def test_frozen_actor_probs_come_from_the_shared_predict_loop_in_eval_mode(log):
    from rmtl.predict import predict

    class DropoutBackbone(TinyBackbone):
        def forward(self, sparse, dense):
            return nn.functional.dropout(super().forward(sparse, dense), 0.5, self.training)

    actor = DropoutBackbone(log.spec).train()  # left in train mode by its caller
    agent = RMTLAgent(log.spec, AgentConfig(steps=2, batch_size=16, device="cpu", critic_hidden=[8]), actor, seed=0)
    agent.train(log, build_transitions(log, seed=0))
    want = predict(actor, log)  # eval mode: deterministic, no dropout
    np.testing.assert_array_equal(agent._frozen_probs.numpy(), want)
    np.testing.assert_array_equal(predict(actor, log), want)


def test_actor_update_moves_the_backbone_and_logs_bc(log, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    actor = TinyBackbone(log.spec)
    before = [p.detach().clone() for p in actor.parameters()]
    cfg = AgentConfig(steps=20, batch_size=64, device="cpu", critic_hidden=[8], actor_update=True,
                      bc_target="pretrained", ips=True, log_every=10)
    agent = RMTLAgent(log.spec, cfg, actor, seed=0)
    with SummaryWriter(str(tmp_path)) as writer:
        agent.train(log, build_transitions(log, seed=0), writer=writer)
    assert any(not torch.equal(a, p) for a, p in zip(before, actor.parameters()))
    assert list(tmp_path.glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="actor_update"):
        RMTLAgent(log.spec, cfg, None)


def test_ips_weights_balance_classes():
    labels = np.zeros((100, 2), np.float32)
    labels[:10, 0] = 1
    labels[:2, 1] = 1
    w = ips_weights(labels, clip=10.0)
    rate = labels.mean(0)
    np.testing.assert_allclose(w[0] * (1 - rate) + w[1] * rate, 1.0, rtol=1e-5)  # mean weight 1
    assert (w[1] > w[0]).all()
    assert w[1, 1] / w[0, 1] <= 10.0 + 1e-4  # clipped


def test_rmtl_strategy_weights_the_losses(log):
    cfg = AgentConfig(steps=10, batch_size=32, device="cpu", critic_hidden=[8], lam=0.7)
    agent = RMTLAgent(log.spec, cfg, seed=0)
    agent.train(log, build_transitions(log, seed=0))
    strategy = build_strategy("rmtl", 2, agent=agent, lam=0.7)
    strategy.bind_log(log)
    assert list(strategy.parameters()) == []  # frozen critics stay out of the optimizer
    model = TinyBackbone(log.spec)
    batch = gather_batch(log, np.arange(40))
    logits = model(batch.sparse, batch.dense)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    w = strategy.backward(losses, model, context={"step": 0, "batch": batch, "logits": logits})
    assert w.shape == (40, 2) and torch.isfinite(w).all() and (w >= 1).all()
    q = agent.q_values(batch.sparse, batch.dense, torch.sigmoid(logits.detach()),
                       fold=torch.from_numpy(agent.fold_of_rows(log)[:40]),
                       context=torch.from_numpy(agent.context_of(log)[:40]))
    torch.testing.assert_close(w, 1 - 0.7 * q)
    assert all(p.grad is not None for p in model.parameters())
    # the gradient is that of mean_k mean_i w_ik * BCE_ik
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch.sparse, batch.dense)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    (losses * w).mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(ConfigError, match="checkpoint"):
        build_strategy("rmtl", 2)
    # critics trained on another feature layout are refused with one clear error
    from rmtl import backbones

    other = random_session_log(10, cardinalities=(7, 7, 7), seed=0)
    foreign = backbones.build("shared_bottom", other.spec)
    b2 = gather_batch(other, np.arange(8))
    logits = foreign(b2.sparse, b2.dense)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, b2.labels, reduction="none")
    with pytest.raises(ConfigError, match="feature layout"):
        build_strategy("rmtl", 2, agent=agent).backward(losses, foreign, context={"batch": b2, "logits": logits})
    with pytest.raises(ValueError, match="bind_log"):  # an unbound strategy cannot pick leak-free critics
        build_strategy("rmtl", 2, agent=agent).backward(losses.detach(), model, context={"batch": batch, "logits": logits})


def test_rmtl_strategy_with_every_builtin_backbone(log):
    from rmtl import backbones

    cfg = AgentConfig(steps=5, batch_size=32, device="cpu", critic_hidden=[8])
    agent = RMTLAgent(log.spec, cfg, seed=0)
    agent.train(log, build_transitions(log, seed=0))
    strategy = build_strategy("rmtl", 2, agent=agent)
    strategy.bind_log(log)
    batch = gather_batch(log, np.arange(32))
    for name in backbones.available():
        torch.manual_seed(0)
        model = backbones.build(name, log.spec)
        logits = model(batch.sparse, batch.dense)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        w = strategy.backward(losses, model, context={"step": 0, "batch": batch, "logits": logits})
        assert torch.isfinite(w).all() and (w >= 1).all(), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), name


def test_critic_early_stop_stops_and_keeps_the_best_critics(log):
    """With a learning rate that makes held-out TD error climb, each critic set stops
    `patience` evaluations after its best one, and the critics it keeps are that best ones."""
    tr = build_transitions(log, seed=0)
    cfg = AgentConfig(steps=400, batch_size=32, device="cpu", critic_hidden=[8], lr=0.05,
                      critic_eval_every=5, critic_patience=2, critic_holdout=0.3)
    agent = RMTLAgent(log.spec, cfg, seed=0)
    h = agent.train(log, tr)
    held = agent._heldout_sessions(log.num_sessions)[log.session_of_row()]
    fold = agent.fold_of_rows(log)
    ips = None
    from rmtl.agents.replay import RowReplay

    buffer = RowReplay(log, build_transitions(log, seed=0, context=cfg.context))
    for k in range(agent.num_sets):
        mine = [i for i, s in enumerate(h["heldout/set"]) if s == k]
        tds = [h["heldout/td"][i] for i in mine]
        best = int(np.argmin(tds))
        assert h["stopped_at"][k] < 200  # stopped before its budget of 400 / 2 updates
        assert h["stopped_at"][k] == h["heldout/step"][mine[best]] + 2 * 5
        agent._set = k
        rows = torch.from_numpy(np.flatnonzero(held & (fold != k)))
        assert agent._heldout_td([buffer], [rows], ips) == pytest.approx(tds[best], rel=1e-5)
    # the held-out sessions were never trained on by the set that judged them
    for k in range(agent.num_sets):
        assert not (agent.trained_rows[k] & held & (fold != k)).any()
    agent._set = 0
    # off by default: the fixed budget, no held-out rows
    plain = RMTLAgent(log.spec, AgentConfig(steps=40, batch_size=32, device="cpu", critic_hidden=[8]), seed=0)
    assert plain.train(log, tr)["stopped_at"] == [20, 20] and plain._heldout_sessions(log.num_sessions) is None
