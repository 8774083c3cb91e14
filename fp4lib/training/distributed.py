"""Data-parallel FP4 training under ``torchrun``: the one module that knows about processes.

::

    torchrun --standalone --nproc_per_node=2 -m fp4lib.train --recipe nvfp4 --dist ddp
    torchrun --standalone --nproc_per_node=2 -m fp4lib.train --recipe nvfp4 --dist fsdp --amax-reduce

``--dist ddp`` wraps the model in ``DistributedDataParallel``; ``--dist fsdp`` shards
it with FSDP2 (``torch.distributed.fsdp.fully_shard`` on every transformer block,
then on the model). Processes talk over NCCL on CUDA and gloo on a CPU.

What stays as in one process, and what is per rank:

* **The global batch.** Each of the N ranks trains on ``batch_size / N`` sequences
  per step (``batch_size`` must divide evenly); the gradients are averaged over
  the ranks, so one step sees the single-process run's batch size and the loss
  curves compare. Validation uses the single-process run's batches, each rank
  taking its share, and averages the ranks' losses.
* **Seeds.** The initial weights are identical on every rank (built from the run's
  seed before any process-specific step). The data order and the stochastic
  rounding and Hadamard signs come from per-rank streams: rank 0 uses the run's
  seed, as a single process does, and rank r > 0 ``mix_seed(seed, r)``. A
  one-process ``torchrun`` run therefore reproduces the plain run.
* **Logging.** Rank 0 alone writes ``metrics.jsonl``, shows the progress bar and
  prints the summary; every logged loss is the mean over the ranks, so all ranks
  take the same decisions (the divergence guard stops all of them at one step).
* **Checkpoints.** All or nothing (:mod:`fp4lib.training.checkpoint`): into a fresh staging
  directory ``torch.distributed.checkpoint`` writes the model and optimizer
  (sharded under FSDP2) to ``dcp/``, each rank its data and RNG state to
  ``rank<r>.pt``; after a barrier rank 0 adds the step and history (``ckpt.pt``)
  and the manifest (every file's SHA-256, the world size, the mode,
  ``amax_reduce``, ``grad_comm`` and the run's facts), then makes the directory
  current with one atomic rename. Resuming verifies the manifest on every rank
  and needs the same number of processes and the same settings.
* **Stalls.** The process group is created with a timeout (``--collective-timeout``):
  a rank that waits longer than that in a collective stops the run with a message
  naming the rank(s) that did not answer (:func:`describe_timeout`).
* **Per-tensor amax.** By default each rank scales an operand by its own amax, as
  a single process does for its batch; ``amax_reduce=True`` takes the maximum
  over the ranks first (an all-reduce of one number per quantized operand), so
  that every rank quantizes with one per-tensor scale, as Transformer Engine's
  amax reduction group does.
* **Gradient traffic.** Under DDP a communication hook counts the bytes each rank
  sends for the gradient all-reduce (:class:`CommLog`); ``grad_comm="fp8"`` sends
  the gradients in FP8 instead (:func:`fp8_allreduce_hook`), a quarter of the bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from .checkpoint import CHECKPOINT_FILE, RunDirError
from ..numerics.reference import fp8_fake_quantize
from ..numerics.schemes import FP8_SCHEMES, scheme_info
from .operands import mix_seed, tensor_amax_reduction
from .layers import FP4Linear
from .config import TrainConfig
from .loop import Trainer, default_loss

__all__ = ["DIST_MODES", "World", "init_world", "RankShare", "DataParallelTrainer", "trainer_factory",
           "rank_seed", "DCP_DIR", "CommLog", "counting_allreduce_hook", "fp8_allreduce_hook",
           "gradient_comm_bytes", "weight_gather_bytes", "DEFAULT_COLLECTIVE_TIMEOUT", "is_timeout",
           "describe_timeout"]

DIST_MODES = ("ddp", "fsdp")
GRAD_COMM = ("fp32", "fp8")  # DDP's gradient all-reduce: as is, or FP8 with one scale per bucket
DCP_DIR = "dcp"  # inside a checkpoint directory
DEFAULT_COLLECTIVE_TIMEOUT = 600.0
"""Seconds a rank waits in a collective (a step's all-reduce, a checkpoint's barrier) before giving up."""
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place: rank, number of processes, local rank, device and mode."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mode: str
    timeout: float = DEFAULT_COLLECTIVE_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(mode: str, device: str = "auto", timeout: Optional[float] = None) -> World:
    """Join the process group that ``torchrun`` set up (NCCL on CUDA, gloo on a CPU).

    ``timeout``: seconds a collective may wait for the other ranks (default
    :data:`DEFAULT_COLLECTIVE_TIMEOUT`). Raises ``ValueError`` for an unknown
    ``mode``, a timeout that is not a positive number, or when the process was not
    started by ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are unset).
    """
    if mode not in DIST_MODES:
        raise ValueError(f"dist must be one of {DIST_MODES}, got {mode!r}")
    timeout = DEFAULT_COLLECTIVE_TIMEOUT if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"the collective timeout must be a positive number of seconds, got {timeout!r}")
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"--dist {mode} needs torchrun ({', '.join(missing)} unset): run "
                         f"torchrun --standalone --nproc_per_node=N -m fp4lib.train ... --dist {mode}")
    rank, world_size, local_rank = (int(os.environ[v]) for v in _TORCHRUN_VARS)
    cuda = _use_cuda(device, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return World(rank, world_size, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"), mode,
                 float(timeout))


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that gave up waiting for the other ranks."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_timeout(world: World) -> str:
    """One line for a collective that timed out on this rank, naming the rank(s) that
    did not answer: with two processes the other one; otherwise rank 0 asks the
    others to a ``monitored_barrier`` (gloo) and names those that do not come."""
    others = [r for r in range(world.world_size) if r != world.rank]
    silent = others if len(others) == 1 else None
    if silent is None and dist.is_initialized() and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=min(world.timeout, 10.0)),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            m = re.search(r"[Rr]anks? ([\d, ]+) failed", str(e))
            if m:
                silent = [int(x) for x in re.findall(r"\d+", m.group(1))] or None
    who = (f"rank {silent[0]}" if silent and len(silent) == 1 else
           f"ranks {', '.join(map(str, silent))}" if silent else "another rank")
    return (f"rank {world.rank}: a collective operation waited more than --collective-timeout {world.timeout:g} s; "
            f"{who} stalled or died")


def _use_cuda(device: str, local_world_size: int) -> bool:
    """``"auto"``: CUDA only when this machine has a GPU for each of its ranks; fewer GPUs
    than ranks (one GPU, two processes) would put two NCCL ranks on one GPU, which NCCL
    refuses, so the run takes the CPU and gloo, and says so. ``"cpu"``/``"cuda"``: as told."""
    if device == "cpu" or not torch.cuda.is_available():
        return False
    if device != "auto":
        return True
    gpus = torch.cuda.device_count()
    if gpus < local_world_size:
        logging.getLogger(__name__).warning(
            "%d processes on this machine but %d GPU(s): running on the CPU with gloo (pass --device cuda to "
            "insist on the GPUs)", local_world_size, gpus)
        return False
    return True


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s streams: ``seed`` on rank 0, ``mix_seed(seed, rank)`` elsewhere."""
    return seed if rank == 0 else mix_seed(seed, rank)


class RankShare:
    """One rank's share of each batch drawn from ``windows`` (anything with
    ``sample(batch_size, generator)``).

    ``shared=False`` (training): ``batch_size / world_size`` windows from this rank's
    own generator. ``shared=True`` (validation): the same ``batch_size`` windows on
    every rank (the generator is seeded alike everywhere), of which this rank takes
    its contiguous slice.
    """

    def __init__(self, windows, world: World, shared: bool):
        self.windows, self.world, self.shared = windows, world, shared

    def sample(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
        n = self.world.world_size
        if batch_size % n:
            raise ValueError(f"the batch of {batch_size} sequences does not divide over {n} processes; "
                             f"choose a world size that divides it")
        per = batch_size // n
        if not self.shared:
            return self.windows.sample(per, generator)
        batch = self.windows.sample(batch_size, generator)
        lo = self.world.rank * per
        return tuple(t[lo:lo + per] for t in batch)


def _mean_over_ranks(loss_fn: Callable) -> Callable:
    """``loss_fn`` whose value is the mean over the ranks; its gradient stays the local one
    (the data-parallel wrapper averages gradients itself)."""

    def loss(model, batch):
        local = loss_fn(model, batch)
        mean = local.detach().clone()
        dist.all_reduce(mean)
        mean /= torch.full_like(mean, dist.get_world_size())  # a true division on every device
        return local + (mean - local.detach())

    return loss


def _wrap(model: nn.Module, world: World) -> nn.Module:
    model = model.to(world.device)
    if world.mode == "ddp":
        return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class DataParallelTrainer(Trainer):
    """:class:`~fp4lib.training.loop.Trainer` on one rank of a DDP or FSDP2 run (see the module docs)."""

    def __init__(self, model: nn.Module, train_data, val_data, config: TrainConfig, world: World, *,
                 loss_fn: Callable = default_loss, hooks: Sequence[Callable] = (), run_info: Optional[dict] = None,
                 amax_reduce: bool = False, grad_comm: str = "fp32"):
        if grad_comm not in GRAD_COMM:
            raise ValueError(f"grad_comm must be one of {GRAD_COMM}, got {grad_comm!r}")
        if grad_comm != "fp32" and world.mode != "ddp":
            raise ValueError(f"grad_comm={grad_comm!r} is a DDP communication hook; FSDP2 reduce-scatters its own")
        self.world = world
        self.amax_reduce = amax_reduce
        self.grad_comm = grad_comm
        self.comm = CommLog()
        self._fp4 = [m for m in model.modules() if isinstance(m, FP4Linear)]
        self._base_seeds = [m.seed for m in self._fp4]
        self._set_rank_seeds()
        config = dataclasses.replace(config, progress=config.progress and world.is_main, device=str(world.device))
        info = dict(run_info or {}, dist=world.mode, world_size=world.world_size, amax_reduce=amax_reduce,
                    grad_comm=grad_comm)
        wrapped = _wrap(model, world)
        if world.mode == "ddp":
            hook = fp8_allreduce_hook(self.comm) if grad_comm == "fp8" else counting_allreduce_hook(self.comm)
            wrapped.register_comm_hook(dist.group.WORLD, hook)
        super().__init__(wrapped, RankShare(train_data, world, shared=False),
                         RankShare(val_data, world, shared=True), config, loss_fn=_mean_over_ranks(loss_fn),
                         hooks=hooks, run_info=info)
        self.data_generator = torch.Generator().manual_seed(rank_seed(config.seed, world.rank))

    def _set_rank_seeds(self) -> None:
        for m, seed in zip(self._fp4, self._base_seeds):
            m.seed = rank_seed(seed, self.world.rank)

    @property
    def metrics_path(self) -> Optional[Path]:
        return super().metrics_path if self.world.is_main else None

    def _log(self, record: dict) -> None:
        if self.world.is_main:
            super()._log(record)

    @contextlib.contextmanager
    def _claim(self, resume: bool, overwrite: bool):
        """Rank 0 holds the output directory (lock, checks); every rank learns the outcome,
        so that all of them stop together when it is refused."""
        with contextlib.ExitStack() as stack:
            held, refusal = None, None
            if self.world.is_main:
                try:
                    held = stack.enter_context(super()._claim(resume, overwrite))
                except RunDirError as e:
                    refusal = (str(e), e.argument)
            box = [refusal]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise RunDirError(box[0][0], argument=box[0][1])
            yield held

    def manifest_fields(self) -> dict:
        return dict(super().manifest_fields(), kind="distributed", world_size=self.world.world_size,
                    dist=self.world.mode, amax_reduce=self.amax_reduce, grad_comm=self.grad_comm)

    def train(self, resume: bool = False, overwrite: bool = False):
        def group_max(amax: torch.Tensor) -> torch.Tensor:
            amax = amax.clone()
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
            return amax

        if self.amax_reduce:
            with tensor_amax_reduction(group_max):
                result = super().train(resume=resume, overwrite=overwrite)
        else:
            result = super().train(resume=resume, overwrite=overwrite)
        steps = result.steps - (result.resumed_from or 0)  # the steps this process ran (and counted)
        if self.world.mode == "ddp" and steps:
            per_step = {"payload": self.comm.payload / steps, "wire": self.comm.wire / steps}
            result.info["grad_comm_bytes_per_step"] = per_step
            self._log({"step": result.steps, "event": "grad_comm", "bytes_per_step": per_step})
        return result

    # ------------------------------------------------------------- checkpoints
    def _state_dicts(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.model, self.optimizer)

    def save_checkpoint(self) -> None:
        """Every rank's part of an all-or-nothing checkpoint (see the module docs)."""
        if self.out_dir is None:
            return
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state_dicts()
        rank = self.world.rank
        if self.world.is_main:
            checkpoint.stage(self.out_dir, self.step)
        dist.barrier()
        staging = checkpoint.stage(self.out_dir, self.step, clear=False)
        checkpoint.fault("before_rank_files", self.step, rank)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging / DCP_DIR))
        torch.save({"data_generator": self.data_generator.get_state(), "torch_rng": torch.get_rng_state()},
                   staging / f"rank{rank}.pt")
        dist.barrier()
        if self.world.is_main:
            checkpoint.fault("before_manifest", self.step, rank)
            state = {"step": self.step, "best_loss": self.best_loss, "world_size": self.world.world_size,
                     "history": self._history(), "config": dataclasses.asdict(self.config),
                     "run_info": self.run_info}
            torch.save(state, staging / CHECKPOINT_FILE)
            checkpoint.write_manifest(staging, self.step, self.manifest_fields(), self.run_id)
            checkpoint.commit(self.out_dir, staging, self.step, rank)
        dist.barrier()
        self._committed(checkpoint.current_checkpoint(self.out_dir))

    def load_checkpoint(self, path: Optional[str] = None) -> int:
        """Verify (on every rank) and restore this rank's part of the current checkpoint; returns its step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        ckpt_dir = self._find_checkpoint(path)
        manifest = checkpoint.verify(ckpt_dir, self.manifest_fields())
        state = checkpoint.torch_load(ckpt_dir / CHECKPOINT_FILE)
        model_sd, optim_sd = self._state_dicts()
        sd = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt_dir / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        self._set_rank_seeds()  # the stored extra state holds one rank's seeds
        mine = checkpoint.torch_load(ckpt_dir / f"rank{self.world.rank}.pt")
        self.data_generator.set_state(mine["data_generator"])
        torch.set_rng_state(mine["torch_rng"])
        self.step, self.best_loss = int(state["step"]), float(state["best_loss"])
        for name, values in state["history"].items():  # train_losses, val_losses, step_ms
            setattr(self, name, [tuple(v) if name == "val_losses" else v for v in values])
        self.run_id = manifest.get("run_id")
        self._checkpoint_dir = ckpt_dir
        return self.step


def trainer_factory(world: World, amax_reduce: bool = False, grad_comm: str = "fp32") -> Callable[..., DataParallelTrainer]:
    """A factory for :func:`fp4lib.training.run.run_training`: its trainer runs on this rank of ``world``."""

    def make(model, train_data, val_data, config, **kwargs) -> DataParallelTrainer:
        return DataParallelTrainer(model, train_data, val_data, config, world, amax_reduce=amax_reduce,
                                   grad_comm=grad_comm, **kwargs)

    return make


# ----------------------------------------------------------------------------
# Gradient communication: bytes moved, and a low-precision all-reduce
# ----------------------------------------------------------------------------
@dataclass
class CommLog:
    """Bytes a rank sends for gradient communication, summed over the hook's calls.

    ``payload``: the bytes of the buffers handed to the collective; ``wire``: what a
    ring algorithm sends per rank for them (all-reduce ``2 (n-1)/n`` of the buffer,
    all-gather ``(n-1)/n`` of the gathered total), the usual cost model.
    """

    payload: int = 0
    wire: float = 0.0
    calls: int = 0

    def add(self, payload: int, wire: float) -> None:
        self.payload += payload
        self.wire += wire
        self.calls += 1


def counting_allreduce_hook(log: CommLog) -> Callable:
    """A DDP communication hook: DDP's own all-reduce (average), with its bytes added to ``log``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        n = dist.get_world_size(state)
        size = buf.numel() * buf.element_size()
        log.add(size, 2 * (n - 1) / n * size)
        return allreduce_hook(state, bucket)

    return hook


def fp8_allreduce_hook(log: Optional[CommLog] = None, scheme: str = "fp8_e4m3") -> Callable:
    """A DDP communication hook that sends gradients in FP8: each rank scales its bucket
    by its own amax (one FP32 scale per bucket, current scaling), casts it to
    ``scheme``'s FP8 format, all-gathers the bytes and the scales, and averages the
    dequantized buckets. A quarter of FP32's payload, plus 4 bytes per bucket and rank.
    """
    dtype = scheme_info(scheme).dtype
    if dtype is None:
        raise ValueError(f"scheme must be one of {FP8_SCHEMES}, got {scheme!r}")

    def hook(state, bucket):
        buf = bucket.buffer()
        group = state
        n = dist.get_world_size(group)
        values, s_dec = fp8_fake_quantize(buf, scheme)
        codes = values.to(dtype).view(torch.uint8)
        gathered = [torch.empty_like(codes) for _ in range(n)]
        scales = [torch.empty_like(s_dec.reshape(1)) for _ in range(n)]
        dist.all_gather(gathered, codes, group=group)
        dist.all_gather(scales, s_dec.reshape(1), group=group)
        total = sum(g.view(dtype).to(torch.float32) * s for g, s in zip(gathered, scales))
        mean = total / torch.full_like(total, n)  # a true division on every device
        if log is not None:
            size = codes.numel() + 4
            log.add(size, (n - 1) * size)
        buf.copy_(mean.to(buf.dtype))
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook


def gradient_comm_bytes(n_params: int, world_size: int, bits: float = 32) -> float:
    """Bytes one rank sends per step to all-reduce ``n_params`` gradients of ``bits`` bits
    with a ring (DDP), or to reduce-scatter them (FSDP2 sends half as much)."""
    return 2 * (world_size - 1) / world_size * n_params * bits / 8


def weight_gather_bytes(n_params: int, world_size: int, bits: float, gathers_per_step: int = 2) -> float:
    """Bytes one rank sends per step to all-gather ``n_params`` weights of ``bits`` bits
    (FSDP2: once for the forward pass and, resharded after it, once more for the backward)."""
    return gathers_per_step * (world_size - 1) / world_size * n_params * bits / 8
