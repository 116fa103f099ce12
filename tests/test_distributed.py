"""Data-parallel training (rmtl.distributed): 2 gloo processes on CPU equal one process on
the same global batches (EW, PCGrad and GradNorm on the cut and on the parameters,
DRGrad), and a
2-process checkpoint resumes in one process.

One spawn of 2 processes runs every distributed case (a process costs seconds to start).
Tolerance: the per-step gradients after reduction match the single process's to rtol 1e-4
/ atol 1e-6 (float32 sums in another order: 2 shares x local means vs one global mean),
and the weights after the run to atol 1e-4. Dropout is 0: masks are drawn per process.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawned import exit_now  # noqa: E402
from test_train import UserBackbone, small_cfg, tiny_log  # noqa: E402

from rmtl import checkpoint as ckpt  # noqa: E402
from rmtl.backbones import build  # noqa: E402
from rmtl.distributed import predict_sharded  # noqa: E402
from rmtl.predict import predict  # noqa: E402
from rmtl.callbacks import Callback  # noqa: E402
from rmtl.train import fit  # noqa: E402

CASES = {
    "ew": ["strategy.name=ew"],
    "pcgrad": ["strategy.name=pcgrad"],
    "pcgrad_parameters": ["strategy.name=pcgrad", "strategy.options.on=parameters"],
    "drgrad": ["model.name=split_mmoe", "strategy.name=drgrad"],
    "gradnorm": ["strategy.name=gradnorm"],
    "gradnorm_parameters": ["strategy.name=gradnorm", "strategy.options.on=parameters"],
    "gradnorm_plain": ["strategy.name=gradnorm"],  # W found from the global batch's task gradients
}
PLAIN_MODELS = {"gradnorm_plain": UserBackbone}  # a user's nn.Module instead of the configured backbone
COMMON = ["model.options.dropout=0", "train.max_steps=4", "train.eval_every=2", "train.batch_size=60"]


class RecordGradients(Callback):
    """The (reduced) gradient of every step, densified and flattened."""

    name = "record_gradients"

    def __init__(self):
        self.steps = []

    def on_after_backward(self, trainer):
        grads = []
        for g in trainer.optimizer.param_groups:
            for p in g["params"]:
                grad = torch.zeros_like(p) if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad)
                grads.append(grad.reshape(-1).clone())
        self.steps.append(torch.cat(grads))


def run_case(name: str, root: Path, extra=()) -> dict:
    cfg = small_cfg(root, *COMMON, *CASES[name], *extra)
    recorder = RecordGradients()
    log = tiny_log()
    torch.manual_seed(0)
    model = PLAIN_MODELS[name](log.spec) if name in PLAIN_MODELS else None
    result = fit(cfg, prepared=log, model=model, run_dir=root / name, callbacks=[recorder])
    last = ckpt.load_user_file(root / name / "train" / "last.pt", "test")
    return {"grads": torch.stack(recorder.steps), "weights": last["model"], "steps": result.steps,
            "val": result.metrics["val"]}


# tiny_log has 920 train rows: with a global batch of 919 each epoch ends with a 1-row
# batch, so one of 2 processes has no rows in that step (share 0)
ONE_ROW_STEP = ["train.batch_size=919", "train.max_steps=null", "train.epochs=2", "train.eval_every=null"]


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out = {name: run_case(name, Path(root)) for name in CASES}
        out["one_row_step"] = run_case("ew", Path(root) / "one_row", ONE_ROW_STEP)
        torch.manual_seed(0)  # the same model on both ranks: sharded prediction = plain prediction
        log = tiny_log()
        model = build("mmoe", log.spec, embed_dim=8, num_experts=3, expert_dims=[32], tower_dims=[16])
        out["predict"] = (predict_sharded(model, log.split("val"), batch_size=64), predict(model, log.split("val")))
        if rank == 0:
            torch.save(out, Path(root) / "ddp.pt")
    finally:
        dist.destroy_process_group()
    exit_now()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(root / "init"), str(root)), nprocs=2, join=True)
    return root, torch.load(root / "ddp.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_on_the_same_global_batches(ddp_runs, tmp_path, name):
    root, ddp = ddp_runs
    single = run_case(name, tmp_path)
    assert ddp[name]["steps"] == single["steps"] == 4
    torch.testing.assert_close(ddp[name]["grads"], single["grads"], rtol=1e-4, atol=1e-6)
    for key, value in single["weights"].items():
        torch.testing.assert_close(ddp[name]["weights"][key], value, rtol=0, atol=1e-4, msg=key)
    for task, mets in single["val"].items():
        assert ddp[name]["val"][task]["auc"] == pytest.approx(mets["auc"], abs=1e-3)


def test_sharded_prediction_equals_one_process(ddp_runs):
    _, ddp = ddp_runs
    sharded, plain = ddp["predict"]
    assert sharded.shape == plain.shape and sharded.shape[0] > 2
    np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-6)


def test_resume_a_two_process_checkpoint_in_one_process(ddp_runs, tmp_path):
    """The 2-process EW run stopped at step 4; one process continues it to step 8 and ends
    where one process that ran all 8 steps ends."""
    root, _ = ddp_runs
    import shutil

    shutil.copytree(root / "ew", tmp_path / "ew")
    cfg = small_cfg(tmp_path, *COMMON, *CASES["ew"], "train.max_steps=8")
    resumed = fit(cfg, prepared=tiny_log(), run_dir=tmp_path / "ew", resume=True)
    straight = fit(cfg, prepared=tiny_log(), run_dir=tmp_path / "straight")
    assert resumed.steps == straight.steps == 8
    a = ckpt.load_user_file(tmp_path / "ew" / "train" / "last.pt", "test")["model"]
    b = ckpt.load_user_file(tmp_path / "straight" / "train" / "last.pt", "test")["model"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


def test_a_global_batch_with_fewer_rows_than_processes_is_a_step_of_both(ddp_runs, tmp_path):
    """The 1-row last batch of each epoch: the process without rows takes the step with
    share 0; 2 processes run one process's 4 steps and end at its weights (this run hung
    when the batch was skipped)."""
    _, ddp = ddp_runs
    assert tiny_log().split("train").num_rows % 919 == 1
    single = run_case("ew", tmp_path, ONE_ROW_STEP)
    assert ddp["one_row_step"]["steps"] == single["steps"] == 4
    torch.testing.assert_close(ddp["one_row_step"]["grads"], single["grads"], rtol=1e-4, atol=1e-6)
    for key, value in single["weights"].items():
        torch.testing.assert_close(ddp["one_row_step"]["weights"][key], value, rtol=0, atol=1e-4, msg=key)
