"""Row-sparse embedding updates (rmtl.optim) and the precision choice (rmtl.device)."""

import copy

import pytest
import torch

from rmtl.backbones import build
from rmtl.config import TrainConfig
from rmtl.data.spec import FeatureSpec
from rmtl.device import choose_bf16, cpu_instruction_set, keep_freed_memory
from rmtl.optim import (RowSparseAdam, clip_grad_norm_, make_optimizer, row_sparse_gradients, row_sparse_tables,
                        sparse_rows)
from rmtl.weighting.gradients import task_gradients

SPEC = FeatureSpec("t", ["a", "b", "c"], [40, 30, 20], ["d0"], ["ctr", "ctcvr"])


def batch(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=g) for c in (40, 30, 20)], 1)
    return sparse, torch.randn(n, 1, generator=g), (torch.rand(n, 2, generator=g) < 0.3).float()


def test_sparse_rows_gradient_equals_dense_embedding_gradient():
    weight = torch.randn(50, 4, requires_grad=True)
    ids = torch.tensor([[3, 7, 3], [49, 0, 7]])
    grad_out = torch.randn(2, 3, 4)
    sparse_rows(ids, weight).backward(grad_out)
    g = weight.grad
    assert g.is_sparse and g._nnz() == 4 and g.coalesce().indices()[0].tolist() == [0, 3, 7, 49]  # a row per id
    dense = weight.detach().clone().requires_grad_(True)
    torch.nn.functional.embedding(ids, dense).backward(grad_out)
    torch.testing.assert_close(g.to_dense(), dense.grad, rtol=0, atol=1e-6)


def test_row_sparse_adam_equals_torch_sparse_adam_and_takes_dense_gradients():
    """Lazy Adam: the same rows and values as torch.optim.SparseAdam; a dense gradient
    updates exactly its nonzero rows, to the same values."""
    torch.manual_seed(0)
    ours, ref, from_dense = (torch.nn.Parameter(torch.randn(30, 5)) for _ in range(3))
    with torch.no_grad():
        ref.copy_(ours)
        from_dense.copy_(ours)
    opt_ours, opt_ref = RowSparseAdam([ours], lr=0.05), torch.optim.SparseAdam([ref], lr=0.05)
    opt_dense = RowSparseAdam([from_dense], lr=0.05)
    initial = ours.detach().clone()
    for step in range(5):
        ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(step))
        grad_out = torch.randn(4, 3, 5)
        for p, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            sparse_rows(ids, p).backward(grad_out)
            opt.step()
        opt_dense.zero_grad()
        torch.nn.functional.embedding(ids, from_dense).backward(grad_out)
        opt_dense.step()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # float rounding order only
    torch.testing.assert_close(from_dense, ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[20:], initial[20:])  # rows never in a batch (ids < 20) keep their values
    assert not torch.equal(ours[:20], initial[:20])
    state = copy.deepcopy(opt_ours.state_dict())
    fresh = RowSparseAdam([torch.nn.Parameter(ours.detach().clone())], lr=0.05)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_make_optimizer_splits_tables_and_round_trips_state():
    torch.manual_seed(0)
    model = build("mmoe", SPEC, embed_dim=4, num_experts=2, expert_dims=[8], tower_dims=[4])
    opt = make_optimizer(TrainConfig(lr=0.01), model, torch.nn.Module())
    tables = row_sparse_tables(model)
    assert [t.shape for t in tables] == [model.features.table.weight.shape]
    assert len(opt.optimizers) == 2 and isinstance(opt.optimizers[1], RowSparseAdam)
    sparse, dense, labels = batch(0)
    opt.zero_grad()
    with row_sparse_gradients(model):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels)
        loss.backward()
    assert model.features.table.weight.grad.is_sparse and not model.features.sparse_grad  # reset after
    opt.step()
    other = make_optimizer(TrainConfig(lr=0.01), copy.deepcopy(model), torch.nn.Module())
    other.load_state_dict(opt.state_dict())
    # weight decay needs every row every step: plain dense Adam, no row-sparse table
    model_wd = build("mmoe", SPEC, embed_dim=4, num_experts=2, expert_dims=[8], tower_dims=[4])
    opt_wd = make_optimizer(TrainConfig(lr=0.01, weight_decay=0.01, optimizer="adamw"), model_wd, torch.nn.Module())
    assert len(opt_wd.optimizers) == 1
    with pytest.raises(ValueError, match="parts"):
        opt_wd.load_state_dict(opt.state_dict())


def test_per_task_parameter_gradients_are_the_same_with_sparse_tables():
    """A gradient strategy on the parameters densifies the table's sparse gradient."""
    torch.manual_seed(0)
    model = build("mmoe", SPEC, embed_dim=4, num_experts=2, expert_dims=[8], tower_dims=[4])
    sparse, dense, labels = batch(1)
    out = {}
    for on in (False, True):
        with row_sparse_gradients(model, on):
            losses = torch.nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels,
                                                                          reduction="none").mean(0)
            out[on] = task_gradients(losses, model, None, on="parameters").grads
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_with_sparse_gradients_matches_dense():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(4))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ids = torch.tensor([1, 1, 5])
    (sparse_rows(ids, a).sum() * 3 + (b * 2).sum()).backward()
    (torch.nn.functional.embedding(ids, a2).sum() * 3 + (b2 * 2).sum()).backward()
    n1, n2 = clip_grad_norm_([a, b], 1.0), torch.nn.utils.clip_grad_norm_([a2, b2], 1.0)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(a.grad.to_dense(), a2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert choose_bf16(True, cpu)[0] is True and choose_bf16(False, cpu)[0] is False
    auto, reason = choose_bf16(None, cpu)
    assert reason.startswith("auto: ")
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert auto == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert cpu_instruction_set().startswith(torch.backends.cpu.get_cpu_capability())


def test_keep_freed_memory_reuses_large_blocks():
    """After keep_freed_memory (glibc), the large blocks a step allocates and frees are
    reused by the next step instead of being page-faulted in again."""
    import resource

    reason = keep_freed_memory()
    assert keep_freed_memory() == reason  # once per process
    if not reason.startswith("glibc"):
        pytest.skip(f"not glibc here: {reason}")

    def faults_of_one_step() -> int:  # like a training step: large temporaries of a few sizes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.empty(12 * 2**20).fill_(1.0)  # 48 MiB, above glibc's largest mmap threshold
        b = torch.empty(6 * 2**20).fill_(1.0)
        del a
        c = torch.empty(12 * 2**20).fill_(1.0)
        del b, c
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    for _ in range(3):  # the heap settles
        faults_of_one_step()
    # with fresh mmaps every step would take ~30,000 faults (120 MiB in 4 KiB pages)
    assert max(faults_of_one_step() for _ in range(3)) < 1000
