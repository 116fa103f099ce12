"""Data-parallel training with torch.distributed (launched by ``torchrun``).

    torchrun --nproc_per_node 2 -m rmtl train -c configs/quickstart.yaml
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m rmtl train -c my.yaml

Every process runs the same ``fit``; this module holds all that differs under N processes:

- ``init()``: the process group from torchrun's environment (gloo on CPU, NCCL on GPU).
- ``ShardedBatchIterator``: the SAME global batches as one process (same seed, same
  permutation, same ``train.batch_size``); rank r takes the r-th of N contiguous slices of
  every global batch. So a run means the same thing for any process count, and a
  checkpoint (steps count global batches) resumes with another count.
- ``GradientReducer`` (the first Trainer callback): after the strategy's backward, every
  gradient becomes the global-batch gradient: sum over ranks of (local rows / global
  rows) x local gradient, in one all-reduce. Row-sparse embedding gradients (rmtl.optim)
  travel as their touched rows (all-gather), so the lazy-Adam rows are exactly the global
  batch's and a table costs its batch's rows, not its size. ``RankSync`` (the last callback) broadcasts rank 0's stop decision and, at the
  end, rank 0's restored best weights; files are written by rank 0 only (rmtl.callbacks).
- ``reduce_task_gradients``: gradient strategies that combine per-task gradients
  non-linearly (PCGrad, CAGrad, MGDA, Nash-MTL, GradVac, IMTL) must see the GLOBAL
  batch's task gradients. On the representation cut every rank holds the gradients of its
  own rows, so the global Gram matrix is the share-weighted sum of the local ones
  (sum_r s_r^2 G_r G_r^T, s_r = local rows / global rows): one all-reduce of K x K
  numbers; the combination weights are then identical on every rank, each rank sends
  w @ G_r down its trunk, and the reducer sums the share-weighted results. On the
  parameters the per-task gradients themselves are all-reduced (share-weighted) before
  the Gram matrix is taken. Task losses given to the rule are global means too.

DRGrad routes the gradient of the summed loss per tower: it all-reduces that gradient
(``all_reduce_gradients``) before routing, so its routing sees the global batch. GradNorm
takes global task losses (``share_weighted_sum``) and global per-task gradient norms: on
the cut the squared norms are summed with share^2, on a parameter the per-task gradients
are all-reduced first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.distributed as dist

from rmtl.callbacks import Callback
from rmtl.data.batches import BatchIterator, gather_batch
from rmtl.errors import ConfigError, RmtlError

if TYPE_CHECKING:
    from rmtl.trainer import Trainer

def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def from_rank0(value):
    """Rank 0's value of a picklable object, on every rank (itself without torch.distributed)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class OtherRankFailed(RmtlError):
    """Raised on every rank when another rank's step inside ``all_or_none`` failed: its
    message, reported once by rank 0 (the CLI prints nothing else for it)."""


@contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """A step every rank must pass before any goes on (loading data, building the model):
    a collective at the end tells every rank whether any failed, and then every rank raises:
    rank 0 its own error or OtherRankFailed with the first failing rank's line (printed once,
    by rank 0), the other ranks OtherRankFailed (the CLI keeps them quiet). So no rank is
    left waiting in a collective a failed rank never joins, and rank 0's clean-up
    (rmtl.commands.started_run) runs. A bug (not a user-facing error) keeps its traceback on
    the rank where it happened. In one process: plain."""
    try:
        yield
        error = None
    except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
        error = err
    if not active():
        if error is not None:
            raise error
        return
    lines = [None] * world_size()
    dist.all_gather_object(lines, None if error is None else _error_line(error))
    failed = [(r, line) for r, line in enumerate(lines) if line is not None]
    if not failed:
        return
    if error is not None and (rank() == 0 or not isinstance(error, _REPORTED)):
        raise error  # rank 0's own error is the line; a bug keeps its traceback wherever it happened
    first, line = failed[0]
    raise OtherRankFailed(line if first == 0 else f"{what} failed on process {first}: {line}")


_REPORTED = (RmtlError, OSError)  # what the CLI turns into one line (rmtl.cli.main)


def _error_line(error: BaseException) -> str:
    from rmtl.cli import os_error_line

    if isinstance(error, OSError):
        return os_error_line(error)
    return str(error) if isinstance(error, RmtlError) else f"{type(error).__name__}: {error}"


def quiet_here(err: BaseException) -> bool:
    """True when rank 0 reports ``err`` (an all_or_none failure, seen here on another rank)."""
    return isinstance(err, OtherRankFailed) and rank() != 0


def requested() -> bool:
    """torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> bool:
    """Joins the process group torchrun describes (env://); True when running distributed."""
    if not requested():
        return active()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return active()


def local_device(device: torch.device) -> torch.device:
    """cuda -> this process's GPU (LOCAL_RANK); anything else unchanged."""
    if device.type == "cuda" and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ----------------------------------------------------------------------------- data

_share = 1.0  # local rows / global rows of the batch being trained on (set by the iterator)


def current_share() -> float:
    return _share


def set_share(share: float) -> None:
    """Called by an iterator before it yields a batch: this rank's rows / the step's rows."""
    global _share
    _share = float(share)


def check_global_batch(batch_size: int, key: str, world: int | None = None) -> None:
    """Every process needs rows of every global batch."""
    world = world_size() if world is None else world
    if batch_size < world:
        raise ConfigError(f"{key} {batch_size} is smaller than the {world} processes; "
                          "every process needs rows of every global batch", key=key)


def part_slice(n: int, index: int, count: int) -> slice:
    """Part ``index`` of ``count`` near-equal contiguous parts of ``n`` rows, in order: the one
    rule by which processes split rows they share (a global batch, a shared stream's batch)."""
    bounds = np.linspace(0, int(n), int(count) + 1).astype(np.int64)
    return slice(int(bounds[index]), int(bounds[index + 1]))


def my_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` global rows (rank r of N: ``part_slice(n, r, N)``):
    how a global batch is split, by the trainer and by the agent alike."""
    if not active():
        return slice(0, int(n))
    return part_slice(n, rank(), world_size())


class ShardedBatchIterator(BatchIterator):
    """The single-process global batches; this rank yields its contiguous slice of each.

    A global batch with fewer rows than processes (only the last one of an epoch, when
    ``rows % batch_size < world size``) leaves some ranks without rows: they still take the
    step with an empty batch and share 0 (their part of every all-reduce is zeroed), so the
    steps are one process's. (Skipping that batch instead left the trainer's epoch without
    its last step, and its loop waiting for it forever.)
    """

    def __init__(self, log, batch_size: int, *, world_size: int, **kwargs):
        check_global_batch(batch_size, "train.batch_size", world_size)
        super().__init__(log, batch_size, **kwargs)
        self.world = int(world_size)

    def __iter__(self):
        global _share
        n = self.log.num_rows
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                 else np.arange(n, dtype=np.int64))
        for b in range(len(self)):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            mine = rows[my_slice(len(rows))]
            _share = len(mine) / len(rows)
            batch = gather_batch(self.log, mine, self._session_of_row)
            yield batch if self.device.type == "cpu" else batch.to(self.device)


# ----------------------------------------------------------------------------- gradients

def comm_device() -> torch.device:
    """Where small messages live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (gloo has no bool / int16 sums: callers send floats)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_task_gradients(tg, task_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global Gram matrix [K, K] float64, global task losses [K]) of the local TaskGradients
    ``tg``; in parameters mode ``tg.grads`` itself becomes the global per-task gradient.
    Without torch.distributed: the local ones, untouched."""
    from rmtl.weighting.gradients import gram

    if not active():
        return gram(tg.grads), task_losses
    s = current_share()
    losses = task_losses.detach().double().reshape(-1)
    if tg.mode == "representation":
        local = _scaled(gram(tg.grads), s * s)
        packed = all_reduce_(torch.cat([local.reshape(-1), _scaled(losses.to(local.device), s)]).to(comm_device()))
        k = local.shape[0]
        return packed[:k * k].view(k, k).to(local.device), packed[k * k:].to(task_losses)
    grads = tg.grads.mul_(s) if s else tg.grads.zero_()
    flat = torch.cat([grads.reshape(-1).double(), _scaled(losses.to(grads.device), s)]).to(comm_device())
    all_reduce_(flat)
    n = grads.numel()
    tg.grads.copy_(flat[:n].view_as(grads))
    return gram(tg.grads), flat[n:].to(task_losses)


def _scaled(values: torch.Tensor, share: float) -> torch.Tensor:
    """``values`` x ``share``, exactly 0 for share 0: a rank with no rows in a step (a shard
    stream's short last batch split over more ranks than rows) may hold NaN (a mean over
    no rows) and must add nothing."""
    return values * share if share else torch.zeros_like(values)


def share_weighted_sum(values: torch.Tensor, power: int = 1, share: float | None = None) -> torch.Tensor:
    """sum over ranks of share^power x ``values`` (a small tensor): power 1 turns local batch
    means into global ones; power 2 turns squared norms of gradients w.r.t. this rank's rows
    of the cut into the global squared norm. ``share``: this rank's (default: the trainer
    iterator's current batch). Without torch.distributed: ``values``."""
    if not active():
        return values
    s = (current_share() if share is None else share) ** power
    return all_reduce_(_scaled(values.detach().double().to(comm_device()), s)).to(values)


def all_reduce_gradients(grads, params, share: float | None = None) -> list[torch.Tensor | None]:
    """The global-batch gradients: sum over ranks of (local rows / global rows) x ``grads``
    (one per parameter, None = no gradient here). Dense ones in ONE all-reduce of a flat
    buffer; sparse (row-sparse table) ones by gathering every rank's touched rows, so a
    table costs its batch's rows, not its size, and the result holds exactly the rows of
    the global batch. None stays None only if no rank had a gradient. ``share``: this
    rank's rows / global rows (default: the trainer iterator's current batch). Without
    torch.distributed: unchanged."""
    grads = list(grads)
    if not active():
        return grads
    s = current_share() if share is None else share
    parts, kinds = [], []
    for p, g in zip(params, grads):
        if g is not None and g.is_sparse:
            kinds.append("sparse")  # the same code path, hence the same kind, on every rank
        elif g is None:  # another rank may have one (e.g. a task head its rows never reached)
            parts.append(torch.zeros(p.numel(), dtype=torch.float32, device=p.device))
            kinds.append("none")
        else:
            parts.append(_scaled(g.float().reshape(-1), s))
            kinds.append("dense")
    flat = all_reduce_(torch.cat(parts)) if parts else None
    out: list[torch.Tensor | None] = []
    offset = 0
    for kind, p, g in zip(kinds, params, grads):
        if kind == "sparse":
            out.append(_gather_rows(g, s))
            continue
        n = p.numel()
        dense = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
        out.append(dense.clone() if kind == "dense" or bool(dense.ne(0).any()) else None)
    return out


def _gather_rows(grad: torch.Tensor, share: float) -> torch.Tensor:
    """sum_r share_r x grad_r of a row-sparse gradient: every rank's (rows, values) gathered
    (padded to the longest), summed per row by coalescing."""
    g = grad.coalesce()
    rows, values = g.indices()[0], _scaled(g.values(), share)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device))
    longest = int(max(int(x) for x in sizes))
    pad = longest - rows.numel()
    rows_p = torch.cat([rows, rows.new_zeros(pad)])
    values_p = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
    all_rows = [torch.empty_like(rows_p) for _ in range(world)]
    all_values = [torch.empty_like(values_p) for _ in range(world)]
    dist.all_gather(all_rows, rows_p)
    dist.all_gather(all_values, values_p)
    keep = [slice(0, int(n)) for n in sizes]
    rows_all = torch.cat([r[k] for r, k in zip(all_rows, keep)])
    values_all = torch.cat([v[k] for v, k in zip(all_values, keep)])
    return torch.sparse_coo_tensor(rows_all.unsqueeze(0), values_all, g.shape, check_invariants=False).coalesce()


class GradientReducer(Callback):
    """The global-batch gradient on every rank (see the module docstring). Runs first among
    the callbacks, so clipping and every later hook see the reduced gradients."""

    name = "distributed_gradients"

    def on_fit_start(self, trainer):
        broadcast_module(trainer.model)  # the same start everywhere, whatever each rank's RNG did
        broadcast_module(trainer.strategy)

    def on_after_backward(self, trainer):
        reduce_gradients_([p for g in trainer.optimizer.param_groups for p in g["params"]])


def reduce_gradients_(params, share: float | None = None) -> None:
    """Each ``p.grad`` becomes the global batch's (all_reduce_gradients), in place."""
    params = list(params)
    for p, g in zip(params, all_reduce_gradients([p.grad for p in params], params, share)):
        p.grad = g


class RankSync(Callback):
    """Runs last: rank 0's stop decision for all, a barrier once rank 0 has written last.pt,
    and rank 0's restored best weights broadcast (other nodes may not see best.pt)."""

    name = "distributed_sync"

    def on_step_end(self, trainer, step):
        flag = torch.tensor([float(trainer.should_stop), float(trainer.state.stopped_early)], device=comm_device())
        dist.broadcast(flag, src=0)
        trainer.should_stop, trainer.state.stopped_early = bool(flag[0]), bool(flag[1])
        if trainer.should_stop:
            dist.barrier()

    def on_train_end(self, trainer):
        broadcast_module(trainer.model)


def broadcast_module(module: torch.nn.Module) -> None:
    """Every parameter and buffer as on rank 0."""
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.data
        if data.device.type == "cpu" and data.dtype == torch.bool:
            tmp = data.float()
            dist.broadcast(tmp, src=0)
            data.copy_(tmp.bool())
        else:
            dist.broadcast(data, src=0)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each number summed over all ranks (float64, one all-reduce); unchanged in one process."""
    if not active():
        return list(values)
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=comm_device())).tolist()


def all_reduce_epoch(loss_sums: list[float], rows: int) -> tuple[list[float], int]:
    """Per-task loss sums and rows over all ranks (the trainer's per-step epoch sums, for
    strategy.epoch_end)."""
    summed = sum_over_ranks([*loss_sums, float(rows)])
    return summed[:-1], int(summed[-1])


def predict_sharded(model: torch.nn.Module, log_split, batch_size: int = 8192) -> np.ndarray:
    """rmtl.predict.predict with the rows split over the processes: rank r predicts its
    contiguous share, and the shares are gathered (padded to the longest) in row order,
    so every process gets all N rows' probabilities at 1/N of the cost."""
    from rmtl.predict import predict, predict_arrays, task_columns

    if not active():
        return predict(model, log_split, batch_size)
    n, world, me = log_split.num_rows, world_size(), rank()
    bounds = np.linspace(0, n, world + 1).astype(np.int64)
    lo, hi = int(bounds[me]), int(bounds[me + 1])
    k = len(task_columns(model, log_split.spec.num_tasks))
    local = predict_arrays(model, log_split.sparse[lo:hi], log_split.dense[lo:hi], batch_size)
    local = local if len(local) else np.zeros((0, k), dtype=np.float32)
    longest = int(np.diff(bounds).max())
    dev = comm_device()
    mine = torch.zeros(longest, k, dtype=torch.float32, device=dev)
    mine[:hi - lo] = torch.from_numpy(local).to(dev)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat([p[:int(b - a)] for p, a, b in zip(parts, bounds[:-1], bounds[1:])]).cpu().numpy()


def setup(trainer: "Trainer") -> None:
    """Makes a Trainer data-parallel when torch.distributed is running (no-op otherwise):
    the sharded iterator, sharded val / test prediction, the gradient reducer."""
    if not active():
        return
    tc = trainer.tc
    trainer.iterator = ShardedBatchIterator(trainer.train_log, tc.batch_size, world_size=world_size(),
                                            shuffle=True, seed=trainer.iterator.seed, device=trainer.device)
    trainer.predictor = predict_sharded
    add_callbacks(trainer)


def add_callbacks(trainer: "Trainer") -> None:
    """The gradient reducer (first) and the rank sync (last), when torch.distributed is running."""
    if not active():
        return
    trainer.callbacks.callbacks.insert(0, GradientReducer())
    trainer.callbacks.callbacks.append(RankSync())


def gather_objects(value, dst: int = 0) -> list | None:
    """Every rank's picklable ``value`` in rank order on rank ``dst``, None on the others
    ([value] in one process)."""
    if not active():
        return [value]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(value, out, dst=dst)
    return out


def all_gather_objects(value) -> list:
    """Every rank's picklable ``value``, in rank order ([value] in one process)."""
    if not active():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
