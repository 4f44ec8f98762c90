"""Data-parallel training under ``msrun`` (or ``mpirun``): one process per device.

``init_distributed(args)`` detects a launch by MindSpore's ``msrun`` (env
``MS_ROLE``/``MS_WORKER_NUM``), OpenMPI (``OMPI_COMM_WORLD_SIZE``) or an Ascend
rank table (``RANK_TABLE_FILE`` + ``RANK_SIZE``), calls
``mindspore.communication.init()`` (HCCL on Ascend, MCCL on CPU) and returns a
``DataParallel``; without a launcher it returns the single-process one
(rank 0 of 1) and every method below is the identity.

What changes with W processes, each with ``--train_batch_size`` B:

* Batches: every dataset is bucketed with batch size B*W (``global batches``,
  so a bucket is never split differently than one process with batch B*W
  would split it); the loader order (seeded) is the same on every rank, and
  rank r loads only images [r*B, (r+1)*B) of each global batch. A short last
  global batch of a bucket (n < B*W images) is padded on the ranks that get
  fewer than B images with copies of an image at loss weight 0, and the real
  images' loss weights are scaled by B*W/n, so the mean over ranks is the mean
  over the n real images. Per-rank input shapes never change.
* Random numbers: each rank draws the noise, timesteps and noise offsets of
  the whole global batch from the same seeded generator (identical on every
  rank) and keeps its own rows. So two ranks with batch 1 see exactly the
  numbers one process with batch 2 sees, and different ranks get different
  noise. Augmentation (flip, crops, caption shuffle/dropout) uses Python's
  ``random``, reseeded per (seed, epoch, batch, rank).
* The step: gradients are averaged across ranks inside the compiled step
  (``nn.DistributedGradReducer``; with gradient accumulation once per update,
  on the accumulated gradients), before clipping, as DDP does; the returned
  loss is the mean over ranks.
* The same initial LoRA weights: the seed (drawn by rank 0 when ``--seed`` is
  not given) is shared, and the trained parameters are broadcast from rank 0.
* Counting, as kohya with accelerate: steps per epoch are the global batches
  (kohya: per-process batches = batches / W), ``max_train_steps`` counts
  updates, and the LR scheduler is kohya's: built for ``max_train_steps * W``
  scheduler steps and advanced W steps per update (so an integer
  ``--lr_warmup_steps`` is reached after warmup / W updates, as in kohya).
* Files: only rank 0 writes into ``--output_dir`` / ``--logging_dir``; the
  other ranks' output paths are redirected to a private temporary folder that
  is removed at exit, so nothing they write can collide with rank 0's files.
* Failure: ``msrun --join=True`` kills every worker when one exits non-zero or
  is killed and exits non-zero itself (the scheduler notices a vanished
  worker after ``MS_NODE_TIMEOUT`` seconds).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import shutil
import tempfile

import numpy as np

logger = logging.getLogger(__name__)

ROWS_KEY = "dist_rows"  # (start, stop, n_global) of this rank's real images in a global batch


# ---------------------------------------------------------------------------------------------
# launch detection

def launcher(env=None) -> str | None:
    """Which launcher started this process: "msrun", "mpirun", "rank_table" or None."""
    env = os.environ if env is None else env
    if env.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED"):
        return "msrun"
    if env.get("OMPI_COMM_WORLD_SIZE"):
        return "mpirun"
    if env.get("RANK_TABLE_FILE") and env.get("RANK_SIZE"):
        return "rank_table"
    return None


def launched_world_size(env=None) -> int:
    env = os.environ if env is None else env
    kind = launcher(env)
    if kind == "msrun":
        return int(env.get("MS_WORKER_NUM", "1"))
    if kind == "mpirun":
        return int(env["OMPI_COMM_WORLD_SIZE"])
    if kind == "rank_table":
        return int(env["RANK_SIZE"])
    return 1


# ---------------------------------------------------------------------------------------------
# the context

class DataParallel:
    """Rank, world size and the data-parallel helpers; ``rank, world = dp`` unpacks."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_rank = int(local_rank)
        self._private_dir = None

    def __iter__(self):
        return iter((self.rank, self.world_size))

    def __repr__(self):
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (host side) ----------------------------------------------------------
    def broadcast_parameters(self, params):
        """Rank 0's values into ``params`` on every rank (the same initial LoRA weights)."""
        if not self.enabled or not params:
            return
        from mindspore import ops

        values = ops.Broadcast(0)(tuple(p.value() for p in params))
        for p, v in zip(params, values):
            p.set_data(v)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (0 <= value < 2**31)."""
        if not self.enabled:
            return int(value)
        import mindspore as ms
        from mindspore import ops

        out = ops.Broadcast(0)((ms.Tensor(np.array([int(value)], np.int32)),))
        return int(out[0].asnumpy()[0])

    def barrier(self):
        if not self.enabled:
            return
        import mindspore as ms
        from mindspore import ops

        ops.AllReduce()(ms.Tensor(np.zeros((1,), np.float32))).asnumpy()

    @contextlib.contextmanager
    def main_process_first(self, enabled: bool = True):
        """Rank 0 runs the block first (e.g. writes a disk cache), the others after it (and read it)."""
        if not (self.enabled and enabled):
            yield
            return
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # -- the step ---------------------------------------------------------------------------
    def step_reducer(self, params):
        """The cell the compiled step calls to average gradients and the loss across ranks, or None."""
        if not self.enabled:
            return None
        return _make_reducer(params, self.world_size)

    # -- data ------------------------------------------------------------------------------
    def shard_dataset_group(self, group):
        """Make ``group`` (built with batch size B * world, see ``batch_size_multiplier``) yield this
        rank's B images of each global batch. In place; a no-op for one process."""
        if not self.enabled:
            return group
        for d in group.datasets:
            if d.batch_size % self.world_size != 0:
                raise RuntimeError(f"dataset batch size {d.batch_size} is not a multiple of the world size "
                                   f"{self.world_size}: build the datasets with batch_size_multiplier")
        group._dp_rank = self.rank
        group._dp_world = self.world_size
        group.__class__ = _sharded_class(type(group))
        return group

    def global_rows(self, batch, x):
        """The global batch's rows of ``x`` (all ranks' real rows, gathered), so that the random draws
        sized by it are the draws of the whole global batch and batch-wide statistics (adaptive noise
        offset, multires noise's std) see every rank's rows (identity for one process)."""
        rows = batch.get(ROWS_KEY)
        if rows is None:
            return x
        n = rows[2]
        return np.ascontiguousarray(self._all_gather(np.ascontiguousarray(x))[:n])

    def _all_gather(self, x):
        """Concatenation over ranks (rank order) of each rank's ``x``; rank r's real rows are the
        first ones of its part and short parts only come last, so the first n rows are the global batch."""
        import mindspore as ms
        from mindspore import ops

        return ops.AllGather()(ms.Tensor(x)).asnumpy()

    @staticmethod
    def local_rows(batch, *arrays):
        """This rank's rows of global-batch arrays, padded to the local batch size with row ``lo``
        (or row 0) for the padding images, which have loss weight 0."""
        rows = batch.get(ROWS_KEY)
        if rows is None:
            return arrays
        lo, hi, n = rows
        b = len(batch["loss_weights"])
        pad_row = lo if hi > lo else 0
        picks = list(range(lo, hi)) + [pad_row] * (b - (hi - lo))
        return tuple(np.ascontiguousarray(np.asarray(a)[picks]) for a in arrays)

    # -- counting --------------------------------------------------------------------------
    def lr_schedule(self, schedule):
        """kohya's schedule with W processes: ``schedule`` built for ``max_train_steps * W`` steps
        (``create_lr_schedule(..., num_processes=W)``) is advanced W steps per update, as accelerate's
        AcceleratedScheduler does (identity for one process)."""
        if not self.enabled:
            return schedule
        return _StridedSchedule(schedule, self.world_size)

    # -- files -----------------------------------------------------------------------------
    def redirect_outputs(self, args):
        """Ranks other than 0 write into a private temporary folder (removed at exit)."""
        args._sample_output_dir = getattr(args, "output_dir", None)  # every rank saves its share of the samples
        if self.is_main:
            return
        self._private_dir = tempfile.mkdtemp(prefix=f"kohya_ms_rank{self.rank}_")
        atexit.register(shutil.rmtree, self._private_dir, True)
        if getattr(args, "output_dir", None) is not None:
            args.output_dir = os.path.join(self._private_dir, "output")
        if getattr(args, "logging_dir", None) is not None:
            args.logging_dir = os.path.join(self._private_dir, "logs")


class _StridedSchedule:
    def __init__(self, inner, stride):
        self.inner = inner
        self.stride = int(stride)
        self.base_lrs = getattr(inner, "base_lrs", None)

    def lrs(self, step: int):
        return self.inner.lrs(int(step) * self.stride)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _make_reducer(params, world_size):
    import mindspore as ms
    from mindspore import nn, ops

    class DataParallelReducer(nn.Cell):
        """``grads(g)``: mean of the gradients over ranks; ``loss(x)``: mean of a scalar over ranks."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.grads = nn.DistributedGradReducer(params, mean=True, degree=world_size)
            self.loss = _ScalarMean()

    class _ScalarMean(nn.Cell):
        def __init__(self):
            super().__init__()
            self.all_reduce = ops.AllReduce()
            self.scale = ms.Tensor(1.0 / world_size, ms.float32)

        def construct(self, x):
            return self.all_reduce(x) * self.scale.astype(x.dtype)

    return DataParallelReducer()


# ---------------------------------------------------------------------------------------------
# dataset sharding

_SHARDED = {}


def _sharded_class(base):
    if base.__name__.startswith("Sharded"):
        return base
    if base not in _SHARDED:
        _SHARDED[base] = type("Sharded" + base.__name__, (base,), {"__getitem__": _sharded_getitem,
                                                                  "__module__": __name__})
        globals()[_SHARDED[base].__name__] = _SHARDED[base]  # picklable by name
    return _SHARDED[base]


def shard_keys(keys, rank, world, local_batch):
    """(this rank's ``local_batch`` keys, padded with a copy, number of real ones, first real index)."""
    lo = min(rank * local_batch, len(keys))
    mine = list(keys[lo:lo + local_batch])
    real = len(mine)
    pad_key = mine[0] if mine else keys[0]
    return mine + [pad_key] * (local_batch - real), real, lo


def _sharded_getitem(self, index):
    di, local = self.locate(index)
    dataset = self.datasets[di]
    rank, world = self._dp_rank, self._dp_world
    local_batch = dataset.batch_size // world
    global_keys = type(dataset).batch_image_keys(dataset, local)
    mine, real, lo = shard_keys(global_keys, rank, world, local_batch)
    # per-rank augmentation, reproducible whatever process (loader worker) fetches the batch
    random.seed(f"dp/{dataset.seed}/{dataset.current_epoch}/{index}/{rank}")
    dataset.batch_image_keys = lambda _i: mine
    try:
        example = dataset[local]
    finally:
        del dataset.batch_image_keys
    n = len(global_keys)
    weights = np.asarray(example["loss_weights"], np.float32).copy()
    weights[:real] *= (local_batch * world) / n
    weights[real:] = 0.0
    example["loss_weights"] = weights
    example[ROWS_KEY] = (lo, lo + real, n)
    return example


# ---------------------------------------------------------------------------------------------
# init

def init_distributed(args=None) -> DataParallel:
    """Join the job when a launcher started this process; -> ``DataParallel`` (``rank, world = ...``).

    Sets the device (``DEVICE_ID`` from msrun/OpenMPI selects the card), calls
    ``mindspore.communication.init()``, agrees on ``args.seed`` (rank 0's
    draw when None), keeps logging and progress bars to rank 0, and redirects
    the other ranks' outputs (see ``DataParallel.redirect_outputs``)."""
    kind = launcher()
    if kind is None:
        return DataParallel()
    if args is not None:
        from library.device_utils import UserError, setup_device_from_args

        if getattr(args, "pynative", False):
            raise UserError(f"--pynative is not supported with {kind} (data parallelism runs in graph mode)")
        setup_device_from_args(args)
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init

    init()  # the msrun scheduler process runs its role here and exits
    rank, world = get_rank(), get_group_size()
    try:
        local_rank = get_local_rank()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        local_rank = int(os.environ.get("DEVICE_ID", 0))
    dp = DataParallel(rank, world, local_rank)
    if args is not None and world > 1:
        if getattr(args, "seed", None) is None:
            args.seed = dp.broadcast_int(random.randint(0, 2 ** 31 - 2))
        dp.redirect_outputs(args)
    logger.info("data parallel (%s): rank %d of %d, local rank %d", kind, rank, world, local_rank)
    if not dp.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # the job's log is rank 0's
    return dp
