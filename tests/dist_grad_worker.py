"""One rank of the gradient-averaging test in ``test_distributed.py``; run under ``torchrun``.

    torchrun --nproc_per_node=2 tests/dist_grad_worker.py MODE OUT STEPS [--recipe R] [--break {no-average,sum}]

Trains the tiny preset through :func:`fp4lib.training.run.run_training` and the
data-parallel trainer. After step 1's backward, as the trainer is about to clip it,
every rank reads the gradient (DDP: the all-reduced gradient; FSDP2: this rank's
shard of the reduce-scattered gradient, gathered to full tensors) and the batch it
trained on. (Read before clipping: clipping to norm 1 would scale away a wrong
factor.) Rank 0 then computes the gradient of one process on the same global batch
(both ranks' batches, in rank order) from a copy of the initial model taken before
wrapping, and saves both to ``OUT/grads.pt``;
each rank saves its own view as ``OUT/grads_rank<r>.pt``. Rank 0 writes the final
validation loss to ``OUT/result0.json``.

``--break no-average`` (DDP) replaces the all-reduce with a hook that keeps each
rank's own gradient; ``--break sum`` scales each rank's loss by the number of
ranks, so that the ranks' gradients are in effect summed instead of averaged. Both are for showing that the test rejects such runs.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fp4lib.training import distributed
from fp4lib.training.loop import default_loss
from fp4lib.training.run import run_training


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _keep_local_gradient(comm):
    def hook(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    return hook


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--recipe", default="bf16")
    p.add_argument("--break", dest="broken", choices=["no-average", "sum"], default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = distributed.init_world(a.mode, "cpu")
    out = Path(a.out)
    state = {}

    if a.broken == "no-average":
        distributed.counting_allreduce_hook = _keep_local_gradient

    def loss_fn(model, batch):
        if model.training and "batch" not in state:
            state["batch"] = [t.detach().clone() for t in batch]
        loss = default_loss(model, batch)
        return loss * world.world_size if a.broken == "sum" else loss

    def make(model, train, val, cfg, **kwargs):
        state["initial"] = copy.deepcopy(model)  # before wrapping: the same on every rank
        kwargs["loss_fn"] = loss_fn
        state["trainer"] = distributed.trainer_factory(world)(model, train, val, cfg, **kwargs)
        return state["trainer"]

    clip = torch.nn.utils.clip_grad_norm_

    def read_then_clip(parameters, *args, **kwargs):
        """The trainer's clip right after step 1's backward: read the gradient first."""
        parameters = list(parameters)
        if "grads" not in state:
            model = state["trainer"].model
            prefix = "module." if a.mode == "ddp" else ""
            state["grads"] = {n[len(prefix):] if n.startswith(prefix) else n: _full(p.grad)
                              for n, p in model.named_parameters()}
            batches = [None] * world.world_size
            dist.all_gather_object(batches, state["batch"])
            state["batches"] = batches
        return clip(parameters, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = read_then_clip

    r = run_training(a.recipe, "tiny", steps=a.steps, seed=0, out=None, backend="fused", device="cpu",
                     progress=False, trainer_factory=make)
    torch.save({"grads": state["grads"], "batch": state["batch"]}, out / f"grads_rank{world.rank}.pt")
    if world.rank == 0:
        model = state["initial"]
        model.train()
        global_batch = [torch.cat(parts) for parts in zip(*state["batches"])]
        model.zero_grad(set_to_none=True)
        default_loss(model, global_batch).backward()
        single = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.save({"dist": state["grads"], "single": single, "global_batch": global_batch}, out / "grads.pt")
        (out / "result0.json").write_text(json.dumps({"final": r.final_val_loss, "train_losses": r.train_losses}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
