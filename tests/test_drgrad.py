"""DRGrad: the router on hand-made gradients, the updater, the split-tower backbone and
the strategy end to end on tiny random data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmtl.backbones.split_tower import SplitMMoE
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError
from rmtl.weighting.common import LossWeighting
from rmtl.weighting.drgrad import DRGradStrategy, MuUpdater, route, tower_parameters


# ----------------------------------------------------------------------------- helpers
def paper_router(g1d, g1s, g2, gamma=1.0, pairing="paper"):
    """The paper's two-task equations, written out literally (one vector at a time)."""
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    xi1, xi2 = cos(g1d, g2), cos(g1d, g1s)
    lam1 = min(float(g1d.norm() / g2.norm()), 1.0) ** gamma
    lam2 = min(float(g1d.norm() / g1s.norm()), 1.0) ** gamma
    first, second = (g1s, g2) if pairing == "paper" else (g2, g1s)
    g_r1 = (1 - (xi1 < 0) * xi1) * lam1 * first + (xi2 >= 0) * lam2 * second
    g_r2 = -(xi1 * xi2 < 0) * xi1 * xi2 * g1s
    return g_r1, g_r2


def route_main(g1d, g1s, g2, **kw):
    """Our router with task 0 as the paper's routed 'task 1' and task 1's shared tower as T2."""
    ded = torch.stack([g1d, torch.zeros_like(g1d)])
    sh = torch.stack([g1s, g2])
    return route(ded, sh, routed_tasks=torch.tensor([True, False]), **kw)


def tiny_spec(num_tasks=2, ids=True) -> FeatureSpec:
    tasks = ["ctr", "ctcvr", "third"][:num_tasks]
    if ids:
        return FeatureSpec("tiny", ["user", "item", "author", "cat"], [7, 9, 5, 4], ["d0", "d1"], tasks,
                           user_field="user", item_field="item", author_field="author")
    return FeatureSpec("census", ["a", "b"], [6, 5], ["d0"], tasks)


def tiny_batch(spec: FeatureSpec, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=g) for c in spec.cardinalities], dim=1)
    dense = torch.randn(n, spec.num_dense, generator=g)
    # labels that depend on the inputs so there is something to learn
    base = dense[:, 0] + (sparse[:, 0] % 2).float()
    labels = torch.stack([(base + 0.5 * k * dense[:, -1] > 0.5).float() for k in range(spec.num_tasks)], dim=1)
    return sparse, dense, labels


def small_model(spec, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(embed_dim=4, num_experts=2, expert_dims=[8], tower_dims=[6])
    opts.update(kw)
    return SplitMMoE(spec, **opts)


def train(model, strategy, steps=6, seed=0, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sparse, dense, labels = tiny_batch(model.spec, seed=seed)
    for step in range(steps):
        opt.zero_grad()
        losses = nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels, reduction="none")
        strategy.backward(losses, model, context={"step": step})
        opt.step()
    return losses.detach()


class PlainEW(LossWeighting):
    """Local stand-in for the EW strategy: sum_k mean_i loss (the documented convention)."""

    name = "ew"

    def combine(self, task_losses, context):
        weights = torch.ones_like(task_losses)
        return (task_losses * weights).sum(), weights


def ew_strategy(num_tasks):
    try:
        from rmtl.weighting import build_strategy
        return build_strategy("ew", num_tasks)
    except (ImportError, AttributeError, KeyError, ConfigError):
        return PlainEW(num_tasks)


# ------------------------------------------------------------------- router: sign table
V = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731

SIGN_CASES = {
    # name: (g1', g1'', g2) -> signs of (xi1 = cos(g1', g2), xi2 = cos(g1', g1''))
    "xi1+ xi2+": (V(1, 0, 0), V(2, 1, 0), V(1, 1, 0)),
    "xi1- xi2+": (V(1, 0, 0), V(2, 1, 0), V(-1, 1, 0)),
    "xi1+ xi2-": (V(1, 0, 0), V(-2, 1, 0), V(1, 1, 0)),
    "xi1- xi2-": (V(1, 0, 0), V(-2, 1, 0), V(-1, -1, 0)),
}


@pytest.mark.parametrize("pairing", ["paper", "g2"])
@pytest.mark.parametrize("case", list(SIGN_CASES))
def test_router_matches_the_paper_equations_in_every_sign_case(case, pairing):
    g1d, g1s, g2 = SIGN_CASES[case]
    r = route_main(g1d, g1s, g2, pairing=pairing)
    want1, want2 = paper_router(g1d, g1s, g2, pairing=pairing)
    torch.testing.assert_close(r.dedicated[0], want1)
    torch.testing.assert_close(r.shared[0], want2)
    # task 1 does not route here (the paper's set-up): its towers keep their plain gradients
    assert r.dedicated[1].abs().sum() == 0 and r.shared[1].abs().sum() == 0
    xi1_neg, xi2_neg = case.startswith("xi1-"), case.endswith("xi2-")
    assert (r.cos[0, 1] < 0) == xi1_neg and (r.cos[0, 0] < 0) == xi2_neg
    # the shared tower is amplified exactly when the two cosines disagree, never damped
    if xi1_neg != xi2_neg:
        assert float(r.shared[0] @ g1s) > 0
    else:
        assert r.shared[0].abs().sum() == 0
    # the g2 term of gR' (paper pairing) is dropped when g1' opposes g1''
    if pairing == "paper" and xi2_neg:
        torch.testing.assert_close(r.dedicated[0] @ V(0, 0, 1), torch.tensor(0.0, dtype=torch.float64))


def test_router_hand_computed_values():
    # g1' = (1,0), g1'' = (2,0), g2 = (1,1): xi1 = 1/sqrt2, lam1 = 1/sqrt2, xi2 = 1, lam2 = 1/2
    r = route_main(V(1, 0), V(2, 0), V(1, 1), pairing="paper")
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(r.dedicated[0], V(2 * s + 0.5, 0.5))
    torch.testing.assert_close(r.shared[0], V(0, 0))
    r = route_main(V(1, 0), V(2, 0), V(1, 1), pairing="g2")
    torch.testing.assert_close(r.dedicated[0], V(s + 1.0, s))
    # opposite signs: g2 = (-1, 1): xi1 = -1/sqrt2 -> factor (1 + 1/sqrt2) on the first term
    r = route_main(V(1, 0), V(2, 0), V(-1, 1), pairing="paper")
    torch.testing.assert_close(r.dedicated[0], V((1 + s) * s * 2 - 0.5, 0.5))
    torch.testing.assert_close(r.shared[0], V(2 * s * 1.0, 0.0))  # -xi1 * xi2 * g1'' = s * (2, 0)


def test_router_clips_norm_ratio_at_one_and_applies_gamma():
    g1d, g1s, g2 = V(10, 0), V(2, 1), V(1, 1)  # |g1'| far above both: ratios clip to 1
    r = route_main(g1d, g1s, g2, pairing="paper")
    assert r.lam[0, 1] == 1.0 and r.lam[0, 0] == 1.0
    torch.testing.assert_close(r.dedicated[0], g1s + g2)  # both cosines > 0, both lambdas 1
    small = V(0.5, 0)  # ratios below 1: gamma sharpens them
    for gamma in (0.0, 1.0, 2.0, 3.5):
        r = route_main(small, g1s, g2, gamma=gamma)
        want = [paper_router(small, g1s, g2, gamma=gamma)[0]]
        torch.testing.assert_close(r.dedicated[0], want[0])
        torch.testing.assert_close(r.lam[0, 1], torch.tensor((0.5 / math.sqrt(2)) ** gamma, dtype=torch.float64))
    assert route_main(small, g1s, g2, gamma=0.0).lam[0, 1] == 1.0


def test_router_zero_gradients_stay_finite():
    r = route(torch.zeros(2, 5), torch.zeros(2, 5))
    assert torch.isfinite(r.dedicated).all() and torch.isfinite(r.shared).all()
    assert r.dedicated.abs().sum() == 0


def test_symmetric_two_task_rule_is_the_paper_rule_for_each_task():
    g = torch.Generator().manual_seed(3)
    ded, sh = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    for pairing in ("paper", "g2"):
        r = route(ded, sh, pairing=pairing)
        for k, j in ((0, 1), (1, 0)):
            want1, want2 = paper_router(ded[k], sh[k], sh[j], pairing=pairing)
            torch.testing.assert_close(r.dedicated[k], want1)
            torch.testing.assert_close(r.shared[k], want2)


def test_k_task_rule_averages_the_pairwise_routes():
    g = torch.Generator().manual_seed(4)
    ded, sh = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    for pairing in ("paper", "g2"):
        r = route(ded, sh, pairing=pairing, gamma=2.0)
        for k in range(3):
            pairs = [paper_router(ded[k], sh[k], sh[j], gamma=2.0, pairing=pairing) for j in range(3) if j != k]
            torch.testing.assert_close(r.dedicated[k], sum(p[0] for p in pairs) / 2)
            torch.testing.assert_close(r.shared[k], sum(p[1] for p in pairs) / 2)


# ------------------------------------------------------------------------------ updater
def test_paper_updater_saturates_and_decay_updater_does_not():
    paper, guarded = MuUpdater(1, decay=1.0, normalize=False), MuUpdater(1, decay=0.9, normalize=True)
    big, small = torch.tensor([1.0]), torch.tensor([0.5])
    for _ in range(60):
        mu_paper, mu_guard = paper(big, small), guarded(big, small)
    assert mu_paper[0, 1] < 1e-9  # sigma' - sigma'' = 30: one-hot
    # guarded: sigma' = 2 sigma'', read relative to their mean -> softmax(4/3, 2/3)
    torch.testing.assert_close(mu_guard[0], torch.softmax(torch.tensor([4 / 3, 2 / 3]), 0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mu_guard.sum(1), torch.ones(1))
    # the gradients turn: the paper's mu stays stuck, the guarded one follows
    for _ in range(20):
        mu_paper, mu_guard = paper(small, big), guarded(small, big)
    assert mu_paper[0, 0] > 0.99  # still 20 ahead
    assert mu_guard[0, 0] < 0.4


def test_guarded_updater_is_scale_free_and_bounded():
    for scale in (1e-4, 1.0, 1e4):
        up = MuUpdater(2, decay=0.99, normalize=True)
        for _ in range(20):  # constant norms: the ratio of the sums is fixed from step 1
            mu = up(torch.tensor([1000.0, 1.0]) * scale, torch.tensor([1.0, 0.0]) * scale)
        bound = float(torch.sigmoid(torch.tensor(2.0)))
        assert float(mu[0, 0]) < bound + 1e-6 and float(mu[1, 0]) < bound + 1e-6
        assert float(mu[0, 0]) > 0.85  # still clearly prefers the tower with the larger gradients


def test_updater_writes_mu_into_the_model_and_logs_it():
    spec = tiny_spec()
    model = small_model(spec)
    strategy = DRGradStrategy(2, updater="paper")
    train(model, strategy, steps=3)
    assert not torch.allclose(model.mu, torch.full((2, 2), 0.5))
    torch.testing.assert_close(model.mu.sum(1), torch.ones(2))
    logs = strategy.last_logs()
    assert logs["drgrad/mu/ctr_ded"] == pytest.approx(float(model.mu[0, 0]))
    for key in ("drgrad/cos/ctr_ded~ctcvr_shared", "drgrad/cos/ctr_ded~ctr_shared", "drgrad/cos/ctr_shared~ctcvr_shared",
                "drgrad/routed_norm/ctcvr_ded", "drgrad/routed_norm/ctcvr_shared", "drgrad/conflict_share/ctcvr~ctr"):
        assert key in logs and math.isfinite(logs[key])
    assert 0.0 <= logs["drgrad/conflict_share/ctr~ctcvr"] <= 1.0
    frozen = small_model(spec)
    train(frozen, DRGradStrategy(2, updater="none"), steps=3)
    torch.testing.assert_close(frozen.mu, torch.full((2, 2), 0.5))


# ------------------------------------------------------------------ strategy end to end
def test_routing_off_reproduces_split_mmoe_under_ew_exactly():
    spec = tiny_spec()
    a, b = small_model(spec, seed=1), small_model(spec, seed=1)
    train(a, DRGradStrategy(2, routing=False), steps=5)
    train(b, ew_strategy(2), steps=5)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    routed = small_model(spec, seed=1)
    train(routed, DRGradStrategy(2), steps=5)
    assert not torch.equal(routed.dedicated_towers[0][0].weight, a.dedicated_towers[0][0].weight)


def test_strategy_writes_plain_shared_and_routed_tower_gradients():
    spec = tiny_spec()
    model = small_model(spec, seed=2)
    sparse, dense, labels = tiny_batch(spec, seed=2)
    losses = nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels, reduction="none")
    losses.mean(0).sum().backward(retain_graph=True)
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    strategy = DRGradStrategy(2, pairing="paper", updater="none")
    strategy.backward(losses, model)
    ded, sh = tower_parameters(model, 2)
    flat = lambda grads: torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads])  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    g_ded = flat([[plain[names[id(p)]] for p in row] for row in ded])
    g_sh = flat([[plain[names[id(p)]] for p in row] for row in sh])
    r = route(g_ded, g_sh, pairing="paper")
    torch.testing.assert_close(flat([[p.grad for p in row] for row in ded]), g_ded + r.dedicated)
    torch.testing.assert_close(flat([[p.grad for p in row] for row in sh]), g_sh + r.shared)
    tower_ids = {id(p) for row in ded + sh for p in row}
    for name, p in model.named_parameters():
        if id(p) not in tower_ids:
            assert torch.equal(p.grad, plain[name]), name  # shared parameters: plain summed gradient


def test_three_tasks_train_and_route_every_pair():
    spec = tiny_spec(num_tasks=3)
    model = small_model(spec, seed=3, dedicated_experts=1)
    strategy = DRGradStrategy(3, gamma=2.0)
    sparse, dense, labels = tiny_batch(spec, seed=3)
    before = nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels, reduction="none").mean(0)
    after = train(model, strategy, steps=15, seed=3).mean(0)
    assert torch.isfinite(after).all() and (after < before).all()
    logs = strategy.last_logs()
    assert sum(k.startswith("drgrad/conflict_share/") for k in logs) == 6  # every ordered pair
    assert torch.isfinite(model.mu).all()


def test_main_task_routes_one_task_only():
    spec = tiny_spec(num_tasks=3)
    model = small_model(spec, seed=4)
    strategy = DRGradStrategy(3, main_task=1)
    train(model, strategy, steps=2)
    logs = strategy.last_logs()
    assert logs["drgrad/routed_norm/ctr_ded"] == 0 and logs["drgrad/routed_norm/third_ded"] == 0
    assert logs["drgrad/routed_norm/ctcvr_ded"] > 0
    assert {k for k in logs if k.startswith("drgrad/conflict_share/")} == {
        "drgrad/conflict_share/ctcvr~ctr", "drgrad/conflict_share/ctcvr~third"}


def test_deterministic_under_a_seed():
    spec = tiny_spec()
    a, b = small_model(spec, seed=5), small_model(spec, seed=5)
    train(a, DRGradStrategy(2), steps=4)
    train(b, DRGradStrategy(2), steps=4)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


class NoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def forward(self, sparse, dense):
        return self.net(dense)


class UnequalTowers(NoTowers):
    def __init__(self):
        super().__init__()
        self.dedicated_towers = nn.ModuleList([nn.Linear(2, 1), nn.Linear(2, 1)])
        self.shared_towers = nn.ModuleList([nn.Linear(2, 1), nn.Linear(3, 1)])


def test_backbone_without_equal_towers_gets_one_clear_error():
    losses = torch.rand(4, 2, requires_grad=True)
    with pytest.raises(ConfigError, match="dedicated_towers.*split_mmoe.*NoTowers does not expose"):
        DRGradStrategy(2).backward(losses, NoTowers())
    with pytest.raises(ConfigError, match="differ in parameter shapes"):
        DRGradStrategy(2).backward(losses, UnequalTowers())


class UserTowers(nn.Module):
    """A user's own module with equal towers and no mu: works with updater 'none'."""

    def __init__(self):
        super().__init__()
        self.bottom = nn.Linear(2, 3)
        self.dedicated_towers = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
        self.shared_towers = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])

    def forward(self, sparse, dense):
        h = torch.relu(self.bottom(dense))
        return torch.cat([d(h) + s(h) for d, s in zip(self.dedicated_towers, self.shared_towers)], dim=1)


def test_user_backbone_with_towers_works_and_mu_is_required_for_the_updater():
    torch.manual_seed(0)
    model = UserTowers()
    dense, labels = torch.randn(16, 2), (torch.rand(16, 2) > 0.5).float()
    losses = nn.functional.binary_cross_entropy_with_logits(model(None, dense), labels, reduction="none")
    with pytest.raises(ConfigError, match="'mu' buffer"):
        DRGradStrategy(2).backward(losses, model)
    DRGradStrategy(2, updater="none").backward(losses, model)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("options, key", [
    (dict(pairing="g1"), "pairing"), (dict(updater="grow"), "updater"), (dict(gamma=-1), "gamma"),
    (dict(decay=1.5), "decay"), (dict(main_task=2), "main_task"), (dict(routing="yes"), "routing"),
    (dict(temperature=0), "temperature"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        DRGradStrategy(2, **options)


# ----------------------------------------------------------------------------- backbone
def test_split_mmoe_towers_mu_and_personalized_gate():
    spec = tiny_spec()
    model = small_model(spec)
    assert len(model.dedicated_towers) == len(model.shared_towers) == 2
    assert model.id_fields == ["user", "item", "author"] and model.personal_gate is not None
    assert small_model(tiny_spec(ids=False)).personal_gate is None  # "auto": off without id fields
    assert small_model(spec, personalized_gate=False).personal_gate is None
    with pytest.raises(ConfigError, match="personalized_gate"):
        small_model(tiny_spec(ids=False), personalized_gate=True)
    sparse, dense, _ = tiny_batch(spec)
    # the gate starts as the identity: same logits as the model without it
    off = small_model(spec, personalized_gate=False)
    off.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("personal_gate")})
    torch.testing.assert_close(model(sparse, dense), off(sparse, dense))
    # output = mu' T'(v_k) + mu'' T''(v_s): with mu = (1, 0) only the dedicated towers count
    model.mu.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    before = model(sparse, dense)
    with torch.no_grad():
        for tower in model.shared_towers:
            tower[-1].bias.add_(5.0)
    torch.testing.assert_close(model(sparse, dense), before)


def test_split_mmoe_cut_carries_every_shared_gradient():
    spec = tiny_spec()
    model = small_model(spec, dedicated_experts=1)
    sparse, dense, labels = tiny_batch(spec)
    logits, cut = model.forward_with_shared(sparse, dense)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    shared = model.shared_parameters()
    direct = torch.autograd.grad(loss, shared, retain_graph=True)
    (g_cut,) = torch.autograd.grad(loss, cut, retain_graph=True)
    via_cut = torch.autograd.grad(cut, shared, grad_outputs=g_cut)
    for a, b in zip(direct, via_cut):
        torch.testing.assert_close(a, b)
    tower_ids = {id(p) for k in range(2) for p in model.task_parameters(k)}
    assert {id(p) for t in model.dedicated_towers for p in t.parameters()} <= tower_ids


def test_registered_by_name():
    from rmtl.backbones import available, build
    assert "split_mmoe" in available()
    model = build("split_mmoe", tiny_spec(), embed_dim=4, tower_dims=[4])
    assert isinstance(model, SplitMMoE)
    from rmtl.weighting import build_strategy
    strategy = build_strategy("drgrad", 2, pairing="paper", updater="paper")
    assert isinstance(strategy, DRGradStrategy) and strategy.pairing == "paper"


@pytest.mark.parametrize("options, key", [
    (dict(num_experts=0), "num_experts"), (dict(tower_dims="wide"), "tower_dims"), (dict(mu_init=1.5), "mu_init"),
    (dict(dedicated_experts=-1), "dedicated_experts"), (dict(personalized_gate="yes"), "personalized_gate"),
])
def test_split_mmoe_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        small_model(tiny_spec(), **options)


def test_strategy_state_resumes_exactly():
    spec = tiny_spec()
    a = small_model(spec, seed=6)
    sa = DRGradStrategy(2)
    train(a, sa, steps=3)
    b = small_model(spec, seed=0)
    sb = DRGradStrategy(2)
    b.load_state_dict(a.state_dict())
    sb.load_state_dict(sa.state_dict())
    assert torch.equal(sb.updater.sigma, sa.updater.sigma) and torch.equal(sb.conflict_steps, sa.conflict_steps)
    train(a, sa, steps=2, seed=1)
    train(b, sb, steps=2, seed=1)
    torch.testing.assert_close(a.mu, b.mu, rtol=0, atol=0)
    assert sa.last_logs() == sb.last_logs()
