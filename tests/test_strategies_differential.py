"""Differential tests: every strategy against values solved independently in the test
(scipy.optimize on the same inputs) or computed by hand from the paper's formula.
No peer package is needed; scipy is in the `test` extra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rmtl.errors import ConfigError
from rmtl.weighting import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

optimize = pytest.importorskip("scipy.optimize", reason="scipy (the `test` extra) solves the reference problems")


def random_grads(k: int, d: int, scale: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, d)) * scale / math.sqrt(d)


def weights_of(name: str, grads: np.ndarray, **options) -> np.ndarray:
    strategy = build_strategy(name, grads.shape[0], **options)
    _, w = strategy.combine(torch.from_numpy(grads))
    return w.numpy()


def on_simplex(fun, k: int, x0=None) -> np.ndarray:
    """argmin of fun over the K-simplex by SLSQP (the independent solver)."""
    x0 = np.full(k, 1.0 / k) if x0 is None else x0
    res = optimize.minimize(fun, x0, method="SLSQP", bounds=[(0.0, 1.0)] * k, tol=1e-14,
                            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                            options={"maxiter": 1000, "ftol": 1e-15})
    assert res.success, res.message
    return res.x


# ----------------------------------------------------------------------------- Nash-MTL

def nash_reference(grads: np.ndarray) -> np.ndarray:
    """The reference's fixed point (G G^T a)_k = 1 / a_k on the RAW Gram matrix, by scipy's root finder
    (Powell hybrid) in log space (a = exp(z) > 0), started off the solution at a_k = 2 / |g_k|."""
    a_mat = grads @ grads.T
    z0 = np.log(2.0) - 0.5 * np.log(np.diag(a_mat))
    res = optimize.root(lambda z: (a_mat @ np.exp(z)) * np.exp(z) - 1.0, z0, method="hybr", options={"xtol": 1e-13})
    a = np.exp(res.x)
    assert np.abs(a * (a_mat @ a) - 1.0).max() < 1e-10, res.message  # solved, whatever scipy's flag says
    return a


@pytest.mark.parametrize("scale", [0.03, 1.0, 30.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_nash_mtl_default_matches_the_reference_at_every_gradient_scale(k, scale):
    grads = random_grads(k, 40, scale, seed=k)
    expected = nash_reference(grads)
    np.testing.assert_allclose(weights_of("nash_mtl", grads), expected, rtol=1e-7)
    # normalize=True is the documented non-reference variant: a times sqrt(||G G^T||_F)
    frob = np.linalg.norm(grads @ grads.T)
    np.testing.assert_allclose(weights_of("nash_mtl", grads, normalize=True), expected * math.sqrt(frob), rtol=1e-7)


def test_nash_mtl_task_with_a_vanished_gradient_keeps_its_previous_weight():
    grads = random_grads(3, 20, 1.0, seed=1)
    strategy = build_strategy("nash_mtl", 3)
    _, first = strategy.combine(torch.from_numpy(grads))
    dead = grads.copy()
    dead[1] = 0.0
    _, w = strategy.combine(torch.from_numpy(dead))
    assert float(w[1]) == pytest.approx(float(first[1]))  # kept, not ~1e4
    np.testing.assert_allclose(w.numpy()[[0, 2]], nash_reference(dead[[0, 2]]), rtol=1e-7)  # the others solved alone
    _, fresh = build_strategy("nash_mtl", 3).combine(torch.from_numpy(dead))
    assert float(fresh[1]) == 1.0  # unit weight before any solve


class TwoHeads(nn.Module):
    """Trunk + one head per task, declaring its shared parameters (so both modes apply)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def task_parameters(self, k):
        return list(self.heads[k].parameters())

    def forward_with_shared(self, x):
        cut = torch.tanh(self.trunk(x))
        return torch.cat([h(cut) for h in self.heads], 1), cut


@pytest.mark.parametrize("on", ["representation", "parameters"])
def test_nash_mtl_task_heads_get_weighted_gradients_on_solve_and_cheap_steps(on):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = (x[:, :2] > 0).float()
    model = TwoHeads()
    strategy = build_strategy("nash_mtl", 2, update_weights_every=2, on=on)
    for step in (0, 1):  # 0 solves, 1 reuses the weights
        model.zero_grad()
        logits, cut = model.forward_with_shared(x)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        w = strategy.backward(losses, model, shared=cut, context={"step": step})
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()  # the reference: backward of sum_k a_k L_k with the same a
        logits, _ = model.forward_with_shared(x)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        (w.detach() * losses.mean(0)).sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- MGDA, CAGrad, IMTL

@pytest.mark.parametrize("k", [2, 3, 4])
def test_mgda_is_the_min_norm_point_of_the_hull(k):
    grads = random_grads(k, 30, 1.0, seed=10 + k)
    a_mat = grads @ grads.T
    expected = on_simplex(lambda w: w @ a_mat @ w, k)
    got = weights_of("mgda", grads, tol=1e-12, max_iter=10000)
    assert got @ a_mat @ got <= expected @ a_mat @ expected * (1 + 1e-6) + 1e-12
    np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("c", [0.2, 0.6])
def test_cagrad_update_solves_the_papers_dual(k, c):
    grads = random_grads(k, 30, 1.0, seed=20 + k)
    g0 = grads.mean(0)
    phi = c * np.linalg.norm(g0)

    def dual(w):
        gw = w @ grads
        return gw @ g0 + phi * np.linalg.norm(gw)

    w = on_simplex(dual, k)
    gw = w @ grads
    expected = (g0 + phi / np.linalg.norm(gw) * gw) / (1 + c**2)  # the paper's update, rescale=1
    strategy = build_strategy("cagrad", k, c=c)
    d, _ = strategy.combine(torch.from_numpy(grads))
    np.testing.assert_allclose(d.numpy(), expected, atol=1e-5 * np.linalg.norm(expected))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_imtl_update_has_equal_projections_on_the_unit_gradients(k):
    grads = random_grads(k, 30, 1.0, seed=30 + k) * np.arange(1, k + 1)[:, None]
    w = weights_of("imtl", grads)
    d = w @ grads
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(units @ d, np.full(k, (units @ d).mean()), rtol=1e-8)


def test_pcgrad_and_gradvac_without_conflict_are_the_plain_sum():
    grads = np.abs(random_grads(3, 10, 1.0, seed=5))  # all pairwise dot products > 0
    np.testing.assert_allclose(weights_of("pcgrad", grads), np.ones(3))
    np.testing.assert_allclose(weights_of("gradvac", grads, beta=0.0), np.ones(3))


# ----------------------------------------------------------------------------- loss-level, by hand

def test_uw_dwa_rlw_ew_by_hand():
    losses = torch.tensor([[0.5, 2.0], [1.5, 4.0]], requires_grad=True)  # per-task means 1.0 and 3.0
    model = nn.Linear(1, 1)
    uw = build_strategy("uw", 2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.4, -0.3]))
    w = uw.backward(losses, model)
    np.testing.assert_allclose(w.numpy(), np.exp([-0.4, 0.3]), rtol=1e-6)
    np.testing.assert_allclose(uw.log_vars.grad.numpy(), 0.5 - np.exp([-0.4, 0.3]) * [1.0, 3.0], rtol=1e-6)

    dwa = build_strategy("dwa", 2, T=2.0)
    dwa.epoch_end(torch.tensor([2.0, 1.0]))
    dwa.epoch_end(torch.tensor([1.0, 0.9]))
    r = np.array([1.0 / 2.0, 0.9 / 1.0])
    expected = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(dwa.backward(losses, model, context={"step": 0}).numpy(), expected, rtol=1e-6)

    assert build_strategy("ew", 2).backward(losses, model).tolist() == [1.0, 1.0]
    w = build_strategy("rlw", 2, seed=0).backward(losses, model, context={"step": 3})
    assert float(w.sum()) == pytest.approx(1.0) and (w > 0).all()


# ----------------------------------------------------------------------------- GradNorm ownership

class PlainThreeTasks(nn.Module):
    """A user's module without shared_parameters(): trunk, then one [3, 8] output layer holding every head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.trunk(self.embed(x)))


def test_gradnorm_on_a_plain_module_measures_the_last_truly_shared_layer():
    model = PlainThreeTasks()
    x = torch.arange(10)
    y = torch.stack([x % 2, x % 3 == 0, x > 4], 1).float()
    strategy = build_strategy("gradnorm", 3)
    losses = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")
    strategy.backward(losses, model)
    assert strategy.found_layer == "trunk.2.weight"  # not out.weight: each of its rows is one task's head
    # the measured norms are |dL_k / d trunk.2.weight|, computed here directly
    losses = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").mean(0)
    direct = [float(torch.autograd.grad(losses[k], model.trunk[2].weight, retain_graph=True)[0].norm())
              for k in range(3)]
    np.testing.assert_allclose([strategy.last_logs()[f"grad_norm/task{k}"] for k in range(3)], direct, rtol=1e-5)


class Separate(nn.Module):
    """Two tasks with nothing in common."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_gradnorm_refuses_a_model_without_a_shared_layer():
    model = Separate()
    losses = model(torch.randn(4, 3)).pow(2)
    with pytest.raises(ConfigError, match="shared_parameters"):
        build_strategy("gradnorm", 2).backward(losses, model)


# ----------------------------------------------------------------------------- sparse embeddings

class EmbedModel(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 4, sparse=sparse)
        self.heads = nn.Linear(4, 2)

    def forward(self, x):
        return self.heads(self.embed(x).mean(1))


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "imtl", "nash_mtl", "gradvac"])
def test_sparse_embedding_gets_the_same_gradient_as_a_dense_one(name):
    x = torch.randint(0, 50, (32, 3), generator=torch.Generator().manual_seed(2))
    y = (x[:, :2] % 2).float()
    grads = []
    for sparse in (False, True):
        model = EmbedModel(sparse)
        losses = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")
        build_strategy(name, 2, on="parameters").backward(losses, model, context={"step": 0})
        g = model.embed.weight.grad
        assert g.is_sparse == sparse
        grads.append(g.to_dense())
        if sparse:  # a sparse optimizer takes it
            torch.optim.SparseAdam(list(model.embed.parameters())).step()
    torch.testing.assert_close(grads[0], grads[1])
