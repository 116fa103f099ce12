"""Backbones: shapes, parameter partition, shared cut, ESMM chain, learning, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rmtl.backbones import available, build, register
from rmtl.backbones.base import forward_with_shared, shared_parameters, task_parameters
from rmtl.backbones.esmm import chain_logits
from rmtl.backbones.layers import Experts, fast_dropout, relu_dropout
from rmtl.backbones.registry import accepted_options, resolve
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError

BUILTINS = ["singletask", "shared_bottom", "omoe", "mmoe", "ple", "esmm", "aitm", "stem"]
NEEDS_TWO = {"esmm", "aitm"}
CARD = 40

# Small widths so every model trains in well under a second; options a model does not
# take are dropped (via its signature).
SMALL = dict(embed_dim=8, expert_dims=(32,), bottom_dims=(32,), tower_dims=(16,), num_experts=3,
             shared_experts=2, specific_experts=1, levels=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(name: str, **extra) -> dict:
    accepted = accepted_options(resolve(name)) or []
    return {**{k: v for k, v in SMALL.items() if k in accepted}, **extra}


def make_spec(k: int = 2, fields: int = 3) -> FeatureSpec:
    return FeatureSpec("test", [f"f{i}" for i in range(fields)], [CARD] * fields, ["d0"],
                       ["ctr", "ctcvr", "third"][:k] if k <= 3 else [f"t{i}" for i in range(k)])


def batch(n: int = 24, fields: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CARD, (n, fields), generator=g), torch.randn(n, 1, generator=g)


def test_all_builtins_registered():
    assert set(BUILTINS) <= set(available())
    assert available() == sorted(available())


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("k", [2, 3])
def test_logits_shape_and_dtype(name, k):
    torch.manual_seed(0)
    model = build(name, make_spec(k), **small(name))
    sparse, dense = batch()
    logits = model(sparse, dense)
    assert logits.shape == (24, k) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    model.eval()
    same, cut = model.forward_with_shared(sparse, dense)
    assert torch.allclose(model(sparse, dense), same, atol=1e-6)
    if name != "singletask":
        assert cut is not None and cut.shape[0] == 24


@pytest.mark.parametrize("name", sorted(NEEDS_TWO))
def test_chain_models_need_two_tasks(name):
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        build(name, make_spec(1), **small(name))


@pytest.mark.parametrize("name", [n for n in BUILTINS if n not in NEEDS_TWO])
def test_single_task_spec_works(name):
    model = build(name, make_spec(1), **small(name))
    assert model(*batch()).shape == (24, 1)


def test_singletask_one_chosen_task():
    model = build("singletask", make_spec(3), task="ctcvr", **small("singletask"))
    assert model(*batch()).shape == (24, 1)
    assert model.tasks == ["ctcvr"] and model.task_columns == [1] and model.num_tasks == 1
    assert build("singletask", make_spec(3), task=2, **small("singletask")).task_columns == [2]
    with pytest.raises(ConfigError, match="task"):
        build("singletask", make_spec(3), task="nope")


@pytest.mark.parametrize("name", BUILTINS)
def test_parameter_partition(name):
    model = build(name, make_spec(3), **small(name))
    every = {id(p) for p in model.parameters()}
    shared = [id(p) for p in shared_parameters(model)]
    tasks = [[id(p) for p in task_parameters(model, k)] for k in range(model.num_tasks)]
    assert len(set(shared)) == len(shared)
    union = set(shared)
    for k, own in enumerate(tasks):
        assert own, f"task {k} owns no parameters"
        assert not union & set(own), f"task {k} overlaps shared or another task"
        union |= set(own)
    assert union == every


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "singletask"])
def test_shared_representation_is_a_cut(name):
    torch.manual_seed(1)
    model = build(name, make_spec(2), **small(name)).double()
    sparse, dense = batch()
    logits, cut = forward_with_shared(model, sparse, dense.double())
    shared = shared_parameters(model)
    y = torch.randint(0, 2, logits.shape).double()
    losses = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
    for k in range(2):
        g_cut = torch.autograd.grad(losses[k], cut, retain_graph=True)[0]
        via = torch.autograd.grad(cut, shared, grad_outputs=g_cut, retain_graph=True, allow_unused=True)
        direct = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
        for p, a, b in zip(shared, via, direct):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            assert torch.allclose(a, b, atol=1e-10), f"{name}: gradient through the cut differs for a shared parameter"
        assert any(b is not None and b.abs().sum() > 0 for b in direct)


@pytest.mark.parametrize("name", ["shared_bottom", "omoe", "mmoe", "ple", "stem"])
def test_task_losses_do_not_train_other_tasks(name):
    """Task modules are private: task k's loss leaves task j's parameters untouched
    (for STEM this is the stop-gradient on the other tasks' experts)."""
    model = build(name, make_spec(2), **small(name))
    logits = model(*batch())
    grads = torch.autograd.grad(logits[:, 0].sum(), task_parameters(model, 1), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    if name == "stem":  # without the stop-gradient, task 0 would train task 1's experts
        plain = build(name, make_spec(2), stop_gradient=False, **small(name))
        grads = torch.autograd.grad(plain(*batch())[:, 0].sum(), task_parameters(plain, 1), allow_unused=True)
        assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_esmm_probabilities_are_products():
    torch.manual_seed(2)
    model = build("esmm", make_spec(3), **small("esmm"))
    sparse, dense = batch()
    p = torch.sigmoid(model(sparse, dense).double())
    q = torch.sigmoid(model.conditional_logits(sparse, dense).double())
    assert torch.allclose(p[:, 0], q[:, 0], atol=1e-6)
    assert torch.allclose(p[:, 1], q[:, 0] * q[:, 1], atol=1e-6)
    assert torch.allclose(p[:, 2], q[:, 0] * q[:, 1] * q[:, 2], atol=1e-6)


def test_esmm_chain_is_stable_for_extreme_logits():
    a = torch.tensor([[60.0, 60.0], [-90.0, 30.0], [1e4, 1e4], [-1e4, -1e4], [1e4, -1e4], [30.0, -200.0],
                      [0.3, -1.2]], requires_grad=True)
    out = chain_logits(a)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(a.grad).all()
    # moderate values: the same number as log p - log1p(-p) in float64
    b = torch.tensor([[0.3, -1.2], [2.0, 1.0], [-3.0, 4.0]], dtype=torch.float64)
    log_p = F.logsigmoid(b).cumsum(1)
    assert torch.allclose(chain_logits(b).double(), log_p - torch.log1p(-log_p.exp()), atol=1e-5)
    # both towers certain: CTCVR logit is about a - log 2 (p = 1 - 2 e^-a), not inf
    assert out[2, 1].item() == pytest.approx(1e4 - np.log(2), rel=1e-6)


def test_aitm_calibration_loss():
    torch.manual_seed(3)
    model = build("aitm", make_spec(2), **small("aitm"))
    logits = model(*batch())
    aux = model.auxiliary_loss()
    p = torch.sigmoid(logits)
    assert aux.dim() == 0 and aux.item() >= 0
    assert aux.item() == pytest.approx(0.6 * torch.relu(p[:, 1] - p[:, 0]).mean().item(), rel=1e-5)
    assert aux.requires_grad
    off = build("aitm", make_spec(2), calibration_weight=0.0, **small("aitm"))
    off(*batch())
    assert off.auxiliary_loss().item() == 0.0


@pytest.mark.parametrize("name", ["omoe", "mmoe", "ple", "stem"])
def test_gate_usage_recorded(name):
    model = build(name, make_spec(2), **small(name))
    model(*batch())
    usage = model.last_gate_usage
    assert usage.shape[0] == 2 and not usage.requires_grad
    assert torch.allclose(usage.sum(1), torch.ones(2), atol=1e-5)


def test_experts_match_a_loop_over_experts():
    torch.manual_seed(4)
    experts = Experts(3, 5, (7, 4))
    x = torch.randn(6, 5)
    out = experts(x)  # [B, E, H]
    for e in range(3):
        h = x
        for w, b in zip(experts.weights, experts.biases):
            h = torch.relu(F.linear(h, w[e], b[e, :, 0]))
        assert torch.allclose(out[:, e], h, atol=1e-6)


def _fused_and_plain(depth: int, batch_major: bool, monkeypatch, bf16: bool = False):
    """(outputs and gradients, GEMM FLOPs counted) of the fused and the plain expert path,
    same weights, same input, same dropout masks (batch-major: every element kept)."""
    from rmtl.backbones import layers

    if batch_major:
        monkeypatch.setattr(layers, "_random_words", lambda n, device=None: torch.zeros(n, dtype=torch.int64))
    torch.manual_seed(7)
    experts = Experts(3, 9, (16, 12, 8)[:depth], dropout=0.3)
    x = torch.randn(40, 9)
    results, counted = [], []
    for fused in (True, False):
        monkeypatch.setattr(Experts, "_fused", lambda self, on=fused: on)
        torch.manual_seed(8)  # the same dropout masks on both paths
        xi = x.clone().requires_grad_()
        with FlopCounterMode(display=False) as flops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = experts(xi) if batch_major else experts.forward_t(xi)  # FLOPs: bench/backbones.py's % of peak
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
        results.append([out.detach().float(), xi.grad, *[p.grad for p in experts.parameters()]])
        counted.append(flops.get_total_flops())
        experts.zero_grad(set_to_none=True)
    assert (results[0][0] == 0).float().mean() > 0.3  # ReLU (and dropout) zeroed some outputs
    return results, counted


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("batch_major", [True, False])
@pytest.mark.parametrize("row_major_first", [True, False])
def test_fused_expert_training_path_equals_plain_autograd(depth, batch_major, row_major_first, monkeypatch):
    """The fused training path (its own GEMM layouts, bias + ReLU + dropout in place, scale
    folded into the backward GEMMs) gives the same outputs and gradients as plain mm / bmm
    + ReLU + dropout, with the first layer's backward in either layout (row-major outputs on
    AVX-512, transposed on AVX2: both are checked wherever the suite runs). Feature-major:
    with the same masks (same draw, same order). Batch-major draws the last mask in
    [B, E, H] order, so there every element is kept (scale still applied) and the test
    covers layouts, bias, scale and the backward."""
    from rmtl.backbones import layers

    monkeypatch.setattr(layers, "ROW_MAJOR_FIRST_BACKWARD", row_major_first)
    results, counted = _fused_and_plain(depth, batch_major, monkeypatch)
    assert counted[0] == counted[1] > 0
    for a, b in zip(*results):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("batch_major", [True, False])
def test_fused_expert_path_under_bf16_autocast_equals_plain_autograd(depth, batch_major, monkeypatch):
    """Under bf16 autocast the fused path casts its operands once, keeps them for backward
    and, batch-major, hands the last layer's gradient to the batched GEMMs as an [E, B, H]
    copy (oneDNN's bf16 kernels are slow on the permuted view). Against the fp32 result it
    is as close as plain autocast autograd is: outputs within 1 % (L2, relative; measured
    0.4 %), gradients within 12 % (measured 1-7 % for both paths at these tiny sizes: ReLU
    decisions flip on bf16-rounded near-zero inputs). A wrong layout or a lost scale gives
    errors near 100 %. Gradients arrive in the parameters' fp32."""
    reference, _ = _fused_and_plain(depth, batch_major, monkeypatch)
    results, counted = _fused_and_plain(depth, batch_major, monkeypatch, bf16=True)
    assert counted[0] == counted[1] > 0
    for path in results:  # fused, plain
        for i, (a, ref) in enumerate(zip(path, reference[1])):
            assert a.shape == ref.shape and a.dtype == ref.dtype == torch.float32
            assert (a - ref).norm() <= (0.01 if i == 0 else 0.12) * ref.norm()


def test_fast_dropout_rate_scale_and_seed():
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(5)
    y = fast_dropout(x, 0.2)
    kept = (y > 0).float().mean().item()
    assert kept == pytest.approx(0.8, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient is mask * scale
    torch.manual_seed(5)
    assert torch.equal(fast_dropout(x, 0.2), y)
    z = relu_dropout(torch.tensor([-1.0, 2.0]), 0.5, training=False)
    assert z.tolist() == [0.0, 2.0]


def planted_problem(n: int, seed: int, fields: int = 3):
    """Each id carries a hidden 2-d factor; label k is Bernoulli(sigmoid(sum of factors));
    task 1 is a funnel (only where task 0 fired), as CTCVR is to CTR."""
    factors = np.random.default_rng(99).normal(size=(fields, CARD, 2)) * 1.2
    g = np.random.default_rng(seed)
    sparse = g.integers(0, CARD, size=(n, fields))
    dense = g.normal(size=(n, 1)).astype(np.float32)
    z = factors[np.arange(fields), sparse].sum(1) + 0.5 * dense
    y0 = g.random(n) < 1 / (1 + np.exp(-z[:, 0]))
    y1 = y0 & (g.random(n) < 1 / (1 + np.exp(-(z[:, 1] + 1.0))))
    y = np.stack([y0, y1], 1).astype(np.float32)
    return torch.from_numpy(sparse), torch.from_numpy(dense), torch.from_numpy(y)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_backbone_learns(name):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(6)
    train, val = planted_problem(3000, 1), planted_problem(2000, 2)
    model = build(name, make_spec(2), dropout=0.1, **small(name))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(120):
        idx = torch.randint(0, 3000, (128,))
        logits = model(train[0][idx], train[1][idx])
        loss = F.binary_cross_entropy_with_logits(logits, train[2][idx])
        if hasattr(model, "auxiliary_loss"):
            loss = loss + model.auxiliary_loss()
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(val[0], val[1])).numpy()
    for k in range(2):
        auc = roc_auc_score(val[2][:, k].numpy(), probs[:, k])
        assert auc > 0.7, f"{name} task {k}: validation AUC {auc:.3f} (a constant predictor scores 0.5)"


def test_unknown_name_lists_known():
    with pytest.raises(ConfigError) as err:
        build("mmeo", make_spec())
    assert "mmeo" in str(err.value) and "mmoe" in str(err.value) and "esmm" in str(err.value)


def test_unknown_option_names_it_and_lists_accepted():
    with pytest.raises(ConfigError) as err:
        build("mmoe", make_spec(), num_expert=4)
    msg = str(err.value)
    assert "num_expert" in msg and "num_experts" in msg and "expert_dims" in msg


@pytest.mark.parametrize("option,value", [("dropout", 1.5), ("expert_dims", [0, 4]), ("activation", "swish"),
                                          ("num_experts", 0), ("embed_dim", "big")])
def test_bad_option_value_names_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        build("mmoe", make_spec(), **{option: value})


def test_omegaconf_options_are_accepted():
    from omegaconf import OmegaConf

    opts = OmegaConf.create({"expert_dims": [16, 8], "tower_dims": [4], "embed_dim": 4})
    model = build("mmoe", make_spec(), **opts)
    assert model(*batch()).shape == (24, 2)


class UserBackbone(nn.Module):
    """A user's own module: no MultiTaskBackbone, just (sparse, dense) -> logits [B, K]."""

    def __init__(self, spec: FeatureSpec, width: int = 8):
        super().__init__()
        self.emb = nn.EmbeddingBag(sum(spec.cardinalities), width)
        self.head = nn.Linear(width + spec.num_dense, spec.num_tasks)

    def forward(self, sparse, dense):
        return self.head(torch.cat([self.emb(sparse), dense], dim=1))


def test_user_module_plugs_in():
    register("user_test", UserBackbone)
    assert "user_test" in available()
    model = build("user_test", make_spec(), width=4)
    logits, cut = forward_with_shared(model, *batch())
    assert logits.shape == (24, 2) and cut is None
    assert len(shared_parameters(model)) == len(list(model.parameters()))
    assert task_parameters(model, 0) == []
    with pytest.raises(ConfigError, match="depth"):
        build("user_test", make_spec(), depth=3)
    register("user_test_str", "tests.test_backbones:UserBackbone")
    assert isinstance(resolve("user_test_str"), type)


@pytest.mark.parametrize("name", BUILTINS)
def test_bf16_autocast_step(name):
    """Training under CPU bf16 autocast (the loop's option) runs and gives finite gradients."""
    torch.manual_seed(7)
    model = build(name, make_spec(2), dropout=0.1, **small(name))
    sparse, dense = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(sparse, dense)
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.ones(24, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
