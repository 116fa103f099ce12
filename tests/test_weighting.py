"""Weighting strategies: hand-made gradients with known answers, and every strategy
training a few steps on a contract backbone, a plain user module and (when present) MMoE."""

from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from rmtl.backbones.base import MultiTaskBackbone
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError
from rmtl.weighting import available_strategies, build_strategy, register_strategy, strategy_class
from rmtl.weighting.base import Strategy
from rmtl.weighting.cagrad import cagrad_weights
from rmtl.weighting.gradients import task_gradients
from rmtl.weighting.mgda import min_norm_weights
from rmtl.weighting.nash_mtl import nash_bargaining_weights
from rmtl.weighting.pcgrad import random_orders

OURS = ["ew", "fixed", "uw", "dwa", "gradnorm", "rlw", "pcgrad", "gradvac", "cagrad", "mgda", "imtl", "nash_mtl"]
GRADIENT_METHODS = ["pcgrad", "gradvac", "cagrad", "mgda", "imtl", "nash_mtl"]
OPTIONS = {"fixed": {"weights": [0.7, 0.3]}}

SPEC = FeatureSpec(source="test", sparse_fields=["user", "item", "cat"], cardinalities=[20, 30, 5],
                   dense_fields=["price"], tasks=["ctr", "ctcvr"], user_field="user", item_field="item")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(name: str, num_tasks: int = 2, **options) -> Strategy:
    return build_strategy(name, num_tasks, **{**OPTIONS.get(name, {}), **options})


def combined(name: str, grads, **options):
    """(combined gradient, weights) of a gradient method for hand-made per-task gradients."""
    grads = torch.as_tensor(np.asarray(grads, dtype=np.float64))
    strategy = make(name, grads.shape[0], **options)
    d, w = strategy.combine(grads)
    return d, w, grads


# --------------------------------------------------------------------------- known answers

def test_pcgrad_projects_away_only_the_conflicting_component():
    d, w, g = combined("pcgrad", [[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    torch.testing.assert_close(d, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))  # d = 2 g1 + 1.5 g2
    g1_proj = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert abs(float(g1_proj @ g[1])) < 1e-12  # the projected g1 no longer conflicts with g2

    d, w, g = combined("pcgrad", [[1.0, 0.0], [1.0, 2.0]])  # no conflict: plain sum
    torch.testing.assert_close(d, g.sum(0))
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))


def test_pcgrad_three_tasks_matches_a_direct_projection_in_the_seeded_order():
    g = np.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [-0.2, -0.3, 1.0]])
    orders = random_orders(np.random.default_rng([3, 7]), 3)  # what seed 3 draws at step 7
    projected = g.copy()
    for i in range(3):
        for j in orders[i]:
            dot = projected[i] @ g[j]
            if dot < 0:
                projected[i] -= dot / (g[j] @ g[j]) * g[j]
    d, _ = make("pcgrad", 3, seed=3).combine(torch.from_numpy(g), context={"step": 7})
    np.testing.assert_allclose(d.numpy(), projected.sum(0), atol=1e-12)
    d_again, _ = make("pcgrad", 3, seed=3).combine(torch.from_numpy(g), context={"step": 7})
    torch.testing.assert_close(d, d_again)


def test_mgda_min_norm_point_of_two_vectors_is_the_closed_form():
    d, w, _ = combined("mgda", [[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(d, torch.tensor([0.5, 0.5], dtype=torch.float64))
    d, w, _ = combined("mgda", [[2.0, 0.0], [1.0, 1.0]])  # the nearest point of the segment is g2 itself
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0], dtype=torch.float64))
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=5), rng.normal(size=5)
    gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    d, _, _ = combined("mgda", [g1, g2])
    np.testing.assert_allclose(d.numpy(), gamma * g1 + (1 - gamma) * g2, atol=1e-10)
    grid = np.linspace(0, 1, 2001)[:, None]
    assert float(d @ d) <= ((grid * g1 + (1 - grid) * g2) ** 2).sum(1).min() + 1e-12


def test_mgda_frank_wolfe_reaches_the_min_norm_point_for_three_vectors():
    w = min_norm_weights(np.eye(3))  # orthonormal vectors: the centroid
    np.testing.assert_allclose(w, np.full(3, 1 / 3), atol=1e-3)
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 4))
    gram = g @ g.T
    w = min_norm_weights(gram, max_iter=2000, tol=1e-12)
    assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all()
    # optimality on the simplex: (gram w)_k >= w' gram w, with equality on the support
    value, grad = w @ gram @ w, gram @ w
    assert (grad >= value - 1e-4).all()
    assert np.allclose(grad[w > 1e-3], value, atol=1e-3)


def test_cagrad_with_c_zero_is_the_mean_gradient():
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(3, 6))
    d, w, g = combined("cagrad", grads, c=0.0)
    torch.testing.assert_close(d, g.mean(0))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_cagrad_stays_in_the_ball_and_lifts_the_worst_task():
    grads = [[1.0, 0.2], [-0.8, 0.5]]  # conflicting
    d, _, g = combined("cagrad", grads, c=0.5, rescale=0)
    g0 = g.mean(0)
    # the update lies on the sphere |d - g0| = c |g0| (the dual's solution is on the boundary)
    assert abs(float((d - g0).norm()) - 0.5 * float(g0.norm())) < 1e-6
    assert float((g @ d).min()) > float((g @ g0).min())


def test_cagrad_dual_solution_is_at_least_as_good_as_a_dense_search_of_the_simplex():
    rng = np.random.default_rng(5)
    for _ in range(5):
        g = rng.normal(size=(3, 6)) * np.array([[1.0], [10.0], [0.1]])
        c, g0 = 0.6, g.mean(0)
        w_eff = cagrad_weights(g @ g.T, c, rescale=0)
        w = (w_eff - 1 / 3) / (w_eff - 1 / 3).sum()  # the dual's w, back from the effective weights

        def dual(weights):
            gw = weights @ g
            return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=-1)

        assert dual(w) <= dual(rng.dirichlet(np.full(3, 0.5), size=20000)).min() + 1e-6 * abs(dual(w))


def test_gradvac_with_zero_target_on_a_conflicting_pair_equals_pcgrad():
    grads = [[1.0, 0.0, 0.5], [-1.0, 1.0, 0.0]]
    d_pc, w_pc, _ = combined("pcgrad", grads)
    d_gv, w_gv, _ = combined("gradvac", grads, beta=0.0)  # targets start and stay at 0
    torch.testing.assert_close(d_gv, d_pc)
    torch.testing.assert_close(w_gv, w_pc)


def test_gradvac_targets_follow_the_observed_cosine():
    strategy = make("gradvac", beta=0.5)
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    strategy.combine(g, context={"step": 0})
    cos = 1 / math.sqrt(2)
    assert abs(float(strategy.targets[0, 1]) - 0.5 * cos) < 1e-9
    # with a positive target, a pair at cosine 0 is pulled together (it is not touched by PCGrad)
    strategy.targets.fill_(0.5)
    d, _ = strategy.combine(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), context={"step": 1})
    d_pc, _, _ = combined("pcgrad", [[1.0, 0.0], [0.0, 1.0]])
    assert float(d.norm()) > float(d_pc.norm())


def test_imtl_gives_equal_projections_on_every_task_direction():
    rng = np.random.default_rng(3)
    d, w, g = combined("imtl", rng.normal(size=(3, 5)) * np.array([[1.0], [5.0], [0.2]]))
    units = g / g.norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(projections, projections[:1].expand(3), rtol=1e-8, atol=1e-10)
    assert abs(float(w.sum()) - 1) < 1e-9
    # orthogonal g1 = (3, 0), g2 = (0, 1): d = (3 a1, a2) with 3 a1 = a2 and a1 + a2 = 1
    d, w, _ = combined("imtl", [[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([0.75, 0.75], dtype=torch.float64))


def test_nash_solver_on_known_two_by_two_cases():
    # orthogonal gradients with norms 2 and 0.5: alpha_k = 1 / |g_k|
    np.testing.assert_allclose(nash_bargaining_weights(np.diag([4.0, 0.25])), [0.5, 2.0], rtol=1e-6)
    # [[1, c], [c, 1]]: by symmetry a (1 + c) = 1 / a, so a = 1 / sqrt(1 + c)
    for c in (0.5, -0.6):
        a = nash_bargaining_weights(np.array([[1.0, c], [c, 1.0]]))
        np.testing.assert_allclose(a, np.full(2, 1 / math.sqrt(1 + c)), rtol=1e-6)
    rng = np.random.default_rng(4)
    g = rng.normal(size=(3, 6))
    gram = g @ g.T
    a = nash_bargaining_weights(gram)
    assert (a > 0).all()
    np.testing.assert_allclose(gram @ a, 1 / a, rtol=1e-6)


def test_nash_mtl_on_orthogonal_gradients_weights_by_inverse_norm():
    _, w, _ = combined("nash_mtl", [[2.0, 0.0], [0.0, 0.5]], normalize=False)
    torch.testing.assert_close(w, torch.tensor([0.5, 2.0], dtype=torch.float64), rtol=1e-6, atol=1e-9)
    _, w_norm, _ = combined("nash_mtl", [[2.0, 0.0], [0.0, 0.5]])  # normalised: same direction, other scale
    torch.testing.assert_close(w_norm / w_norm.sum(), w / w.sum())


def test_uw_gradient_of_log_variance():
    strategy = make("uw")
    with torch.no_grad():
        strategy.log_vars.copy_(torch.tensor([0.3, -0.2]))
    losses = torch.tensor([[0.4, 1.0], [0.8, 2.0]], requires_grad=True)  # task means 0.6 and 1.5
    weights = strategy.backward(losses, nn.Linear(1, 1))
    s, mean = torch.tensor([0.3, -0.2]), torch.tensor([0.6, 1.5])
    torch.testing.assert_close(strategy.log_vars.grad, -torch.exp(-s) * mean + 0.5)
    torch.testing.assert_close(weights, torch.exp(-s))
    torch.testing.assert_close(losses.grad, torch.exp(-s).expand(2, 2) / 2)


def test_dwa_weights_from_loss_history():
    strategy = make("dwa", T=2.0)
    losses = torch.ones(4, 2, requires_grad=True)
    torch.testing.assert_close(strategy.backward(losses, nn.Linear(1, 1)), torch.ones(2))
    strategy.epoch_end(torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(strategy.current_weights().float(), torch.ones(2))  # one epoch: still 1
    strategy.epoch_end(torch.tensor([0.5, 0.9]))
    expected = 2 * torch.softmax(torch.tensor([0.5, 0.9]) / 2.0, 0)
    got = strategy.backward(torch.ones(4, 2, requires_grad=True), nn.Linear(1, 1))
    torch.testing.assert_close(got, expected)
    assert got[1] > got[0]  # the task whose loss fell less gets more weight
    # the history is state: a fresh strategy loaded from it gives the same weights
    clone = make("dwa", T=2.0)
    clone.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(clone.current_weights(), strategy.current_weights())
    with pytest.raises(ValueError, match="dwa"):
        strategy.epoch_end(torch.tensor([1.0, float("nan")]))


class TinyBackbone(MultiTaskBackbone):
    """Embedding + shared MLP (the cut) + two task heads."""

    def __init__(self, spec: FeatureSpec, hidden: int = 8):
        super().__init__(spec)
        self.embed = nn.Embedding(sum(spec.cardinalities), 4)
        self.register_buffer("offsets", torch.tensor(np.r_[0, np.cumsum(spec.cardinalities)[:-1]]))
        self.trunk = nn.Sequential(nn.Linear(4 * spec.num_sparse + spec.num_dense, hidden), nn.ReLU())
        self.task_modules = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 4), nn.ReLU(), nn.Linear(4, 1))
                                          for _ in spec.tasks)

    def forward_with_shared(self, sparse, dense):
        x = torch.cat([self.embed(sparse + self.offsets).flatten(1), dense], 1)
        cut = self.trunk(x)
        return torch.cat([head(cut) for head in self.task_modules], 1), cut


class PlainModule(nn.Module):
    """A user's module with nothing but forward(sparse, dense) -> logits [B, 2]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 4)
        self.net = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, sparse, dense):
        return self.net(torch.cat([self.embed(sparse).flatten(1), dense], 1))


def toy_batch(n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in SPEC.cardinalities], 1)
    dense = torch.randn(n, 1, generator=gen)
    ctr = (sparse[:, 2] % 2 == 0).float()
    labels = torch.stack([ctr, ctr * (dense[:, 0] > 0).float()], 1)
    return sparse, dense, labels


def forward(model, sparse, dense):
    if hasattr(model, "forward_with_shared"):
        return model.forward_with_shared(sparse, dense)
    return model(sparse, dense), None


def train_steps(model: nn.Module, strategy: Strategy, steps: int = 4):
    """A few training steps the way rmtl.train drives a strategy; returns (weights, first/last loss)."""
    optimizer = torch.optim.Adam(list(model.parameters()) + list(strategy.parameters()), lr=0.01)
    sparse, dense, labels = toy_batch()
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits, shared = forward(model, sparse, dense)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        weights = strategy.backward(losses, model, shared=shared,
                                    context={"step": step, "epoch": 0, "batch": None, "logits": logits.detach()})
        assert torch.isfinite(weights).all() and weights.shape in ((2,), (losses.shape[0], 2))
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{strategy.name}: no gradient for {name}"
            assert torch.isfinite(p.grad).all(), f"{strategy.name}: non-finite gradient for {name}"
        optimizer.step()
        if step == 1:
            strategy.epoch_end(losses.detach().mean(0))
        history.append(float(losses.detach().mean()))
    return weights, history


@pytest.mark.parametrize("name", OURS)
def test_every_strategy_trains_a_contract_backbone_and_a_plain_module(name):
    torch.manual_seed(0)
    _, history = train_steps(TinyBackbone(SPEC), make(name))
    assert all(math.isfinite(v) for v in history)
    torch.manual_seed(0)
    strategy = make(name)
    train_steps(PlainModule(), strategy)
    if name in GRADIENT_METHODS:
        assert strategy.last_mode == "parameters"
        assert "cos/ctr~ctcvr" not in strategy.last_logs()  # a plain module has no spec: generic names
        assert "cos/task0~task1" in strategy.last_logs()


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_every_strategy_handles_one_and_three_tasks(num_tasks):
    spec = FeatureSpec(source="test", sparse_fields=SPEC.sparse_fields, cardinalities=SPEC.cardinalities,
                       dense_fields=SPEC.dense_fields, tasks=["a", "b", "c"][:num_tasks])
    sparse, dense, labels = toy_batch()
    labels = torch.cat([labels, labels[:, :1]], 1)[:, :num_tasks]
    for name in OURS:
        torch.manual_seed(0)
        model = TinyBackbone(spec)
        options = {"weights": [1.0] * num_tasks} if name == "fixed" else {}
        strategy = build_strategy(name, num_tasks, **options)
        for step in range(2):
            model.zero_grad(set_to_none=True)
            logits, shared = model.forward_with_shared(sparse, dense)
            losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            weights = strategy.backward(losses, model, shared=shared, context={"step": step})
            assert weights.shape == (num_tasks,) and torch.isfinite(weights).all(), name
            assert all(torch.isfinite(p.grad).all() for p in model.parameters()), name
        if name in GRADIENT_METHODS and num_tasks == 3:
            assert {"cos/a~b", "cos/a~c", "cos/b~c"} <= set(strategy.last_logs())


def test_gradient_methods_stop_clearly_on_non_finite_gradients():
    with pytest.raises(FloatingPointError, match="task\\(s\\) task1 is not finite"):
        make("cagrad").combine(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("on", ["representation", "parameters"])
def test_gradient_methods_in_both_modes_log_cosines_and_weights(name, on):
    torch.manual_seed(0)
    strategy = make(name, on=on)
    train_steps(TinyBackbone(SPEC), strategy, steps=3)
    assert strategy.last_mode == on
    logs = strategy.last_logs()
    assert -1.0 <= logs["cos/ctr~ctcvr"] <= 1.0
    assert {"weight/ctr", "weight/ctcvr", "grad_norm/ctr"} <= set(logs)


@pytest.mark.parametrize("on", ["representation", "parameters"])
def test_per_task_gradients_with_unit_weights_reproduce_the_plain_backward(on):
    torch.manual_seed(0)
    model = TinyBackbone(SPEC)
    sparse, dense, labels = toy_batch()

    def losses_and_shared():
        logits, shared = model.forward_with_shared(sparse, dense)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0), shared

    task_losses, _ = losses_and_shared()
    task_losses.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    task_losses, shared = losses_and_shared()
    tg = task_gradients(task_losses, model, shared, on)
    assert tg.mode == on and tg.grads.shape[0] == 2
    tg.apply(tg.grads.sum(0))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=f"{on}: {n}")


@pytest.mark.parametrize("name", OURS)
def test_a_strategy_restored_from_its_state_dict_continues_identically(name):
    """What a resumed run relies on: all state is in state_dict, draws depend on the step."""
    sparse, dense, labels = toy_batch()

    def run(model, strategy, optimizer, steps):
        out = []
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            logits, shared = model.forward_with_shared(sparse, dense)
            losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            out.append(strategy.backward(losses, model, shared=shared, context={"step": step}))
            optimizer.step()
            if step == 1:
                strategy.epoch_end(losses.detach().mean(0) * (step + 1))
            if step == 2:
                strategy.epoch_end(losses.detach().mean(0))
        return out

    def fresh():
        torch.manual_seed(0)
        model, strategy = TinyBackbone(SPEC), make(name)
        return model, strategy, torch.optim.Adam([*model.parameters(), *strategy.parameters()], lr=0.01)

    model, strategy, optimizer = fresh()
    run(model, strategy, optimizer, range(3))
    saved = [copy.deepcopy(m.state_dict()) for m in (model, strategy, optimizer)]  # a checkpoint
    expected = run(model, strategy, optimizer, range(3, 6))
    model2, strategy2, optimizer2 = fresh()
    for target, state in zip((model2, strategy2, optimizer2), saved):
        target.load_state_dict(state)
    got = run(model2, strategy2, optimizer2, range(3, 6))
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)


def test_every_registered_backbone_cut_gives_the_plain_backward_in_both_modes():
    """The representation mode is only right if the backbone's shared tensor is a true cut."""
    import rmtl.backbones as backbones

    sparse, dense, labels = toy_batch()
    checked = 0
    for name in backbones.available():
        model = backbones.build(name, SPEC).eval()  # eval: no dropout, so two passes are identical
        for on in ("representation", "parameters"):
            logits, shared = forward(model, sparse, dense)
            if shared is None and on == "representation":
                continue
            task_losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
            task_losses.sum().backward()
            expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            logits, shared = forward(model, sparse, dense)
            task_losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
            tg = task_gradients(task_losses, model, shared, on)
            tg.apply(tg.grads.sum(0))
            got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert got.keys() == expected.keys(), f"{name}/{on}: parameters with and without gradients differ"
            for n in expected:
                torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5, msg=f"{name}/{on}: {n}")
            model.zero_grad(set_to_none=True)
            checked += 1
    assert checked >= 2


def test_gradnorm_weights_sum_to_k_and_shrink_the_dominant_task():
    torch.manual_seed(0)
    model = TinyBackbone(SPEC)
    strategy = make("gradnorm", alpha=0.0)
    optimizer = torch.optim.SGD(strategy.parameters(), lr=0.05)  # only the weights move
    sparse, dense, labels = toy_batch()
    for step in range(6):
        optimizer.zero_grad()
        model.zero_grad()
        logits, shared = model.forward_with_shared(sparse, dense)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        losses = losses * torch.tensor([10.0, 1.0])  # task 0's gradients are 10x larger
        weights = strategy.backward(losses, model, shared=shared, context={"step": step})
        assert abs(float(weights.sum()) - 2.0) < 1e-5
        optimizer.step()
    assert weights[0] < 1.0 < weights[1]


def test_rlw_is_seeded_by_step():
    losses = torch.ones(3, 2, requires_grad=True)
    a = make("rlw", seed=1).backward(losses, nn.Linear(1, 1), context={"step": 5})
    b = make("rlw", seed=1).backward(torch.ones(3, 2, requires_grad=True), nn.Linear(1, 1), context={"step": 5})
    c = make("rlw", seed=1).backward(torch.ones(3, 2, requires_grad=True), nn.Linear(1, 1), context={"step": 6})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert abs(float(a.sum()) - 1) < 1e-6


def test_nash_mtl_reuses_weights_between_updates():
    torch.manual_seed(0)
    strategy = make("nash_mtl", update_weights_every=2)
    model = TinyBackbone(SPEC)
    sparse, dense, labels = toy_batch()
    seen = []
    for step in range(3):
        model.zero_grad()
        logits, shared = model.forward_with_shared(sparse, dense)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        seen.append(strategy.backward(losses, model, shared=shared, context={"step": step}))
    torch.testing.assert_close(seen[0], seen[1])  # step 1 reuses step 0's bargaining weights


def test_mmoe_from_the_backbone_registry_with_every_strategy():
    import rmtl.backbones as backbones

    small = dict(embed_dim=4, num_experts=2, expert_dims=(8,), tower_dims=(4,))
    for name in OURS:
        torch.manual_seed(0)
        strategy = make(name)
        train_steps(backbones.build("mmoe", SPEC, **small), strategy, steps=2)
        if name in GRADIENT_METHODS:
            assert strategy.last_mode == "representation"  # MMoE gives a cut: the cheap default
            assert "cos/ctr~ctcvr" in strategy.last_logs()
    strategy = make("pcgrad", on="parameters")
    train_steps(backbones.build("mmoe", SPEC, **small), strategy, steps=2)
    assert strategy.last_mode == "parameters"


# --------------------------------------------------------------------------- registry and errors

def test_registry_lists_every_strategy_and_rejects_unknown_names_and_options():
    assert set(OURS) | {"rmtl", "drgrad"} <= set(available_strategies())
    with pytest.raises(ConfigError, match="unknown strategy 'pcgard'.*pcgrad"):
        build_strategy("pcgard", 2)
    with pytest.raises(ConfigError, match="no option 'tau'.*accepted options: T, task_names") as info:
        build_strategy("dwa", 2, tau=1.0)
    assert info.value.key == "strategy.options.tau"
    with pytest.raises(ConfigError, match="strategy.options.weights"):
        build_strategy("fixed", 2, weights=[1.0])
    with pytest.raises(ConfigError, match="strategy.options.on"):
        build_strategy("pcgrad", 2, on="rep")
    with pytest.raises(ConfigError, match="strategy.options.c"):
        build_strategy("cagrad", 2, c=-1)


def test_explicit_representation_mode_needs_a_cut():
    strategy = make("mgda", on="representation")
    with pytest.raises(ConfigError, match="on='representation' is not possible"):
        train_steps(PlainModule(), strategy, steps=1)


@pytest.mark.parametrize("name, module", [("rmtl", "rmtl.weighting.rmtl_critic"), ("drgrad", "rmtl.weighting.drgrad")])
def test_strategies_of_other_parts_resolve_or_fail_clearly(name, module):
    assert importlib.util.find_spec(module) is not None
    assert issubclass(strategy_class(name), Strategy)


def test_a_registered_module_that_does_not_exist_fails_clearly():
    register_strategy("ghost", "rmtl.weighting.no_such_module:Ghost")
    try:
        with pytest.raises(ConfigError, match="module 'rmtl.weighting.no_such_module' does not exist"):
            build_strategy("ghost", 2)
    finally:
        from rmtl.weighting import registry
        registry._REGISTRY.pop("ghost", None)


def test_register_strategy_adds_a_user_class():
    class Half(Strategy):
        name = "half"

        def backward(self, losses, model, *, shared=None, context=None):
            (0.5 * losses.mean(0)).sum().backward()
            return torch.full((self.num_tasks,), 0.5)

    register_strategy("test_half", Half)
    try:
        assert isinstance(build_strategy("test_half", 2), Half)
        with pytest.raises(ConfigError, match="already registered"):
            register_strategy("test_half", Half)
        with pytest.raises(ConfigError, match="module:Class"):
            register_strategy("test_bad", "no_colon_here", replace=True)
    finally:
        from rmtl.weighting import registry
        registry._REGISTRY.pop("test_half", None)
