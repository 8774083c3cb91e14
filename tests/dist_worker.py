"""One rank of the data-parallel tests in ``test_distributed.py``; run under ``torchrun``.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py MODE OUT STEPS [--crash-at N] [--resume]
        [--nan-rank R --nan-step N] [--amax-reduce]

Trains the tiny preset with nvfp4 through :func:`fp4lib.training.run.run_training` and the
data-parallel trainer; rank 0 writes ``result.json`` (losses, or the divergence) to OUT.
``--crash-at N`` stops every rank before step N (after the step-10 checkpoint);
``--nan-rank R --nan-step N`` poisons rank R's loss at step N.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from fp4lib.training import distributed
from fp4lib.training.loop import TrainingDiverged, default_loss
from fp4lib.training.run import run_training


class Crash(Exception):
    pass


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--crash-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--nan-rank", type=int, default=None)
    p.add_argument("--nan-step", type=int, default=None)
    p.add_argument("--amax-reduce", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = distributed.init_world(a.mode, "cpu")
    hooks = []
    if a.crash_at:
        def crash(trainer, step):
            if step == a.crash_at:
                raise Crash(step)
        hooks.append(crash)
    make = distributed.trainer_factory(world, amax_reduce=a.amax_reduce)
    if a.nan_rank is not None:
        state = {"step": 0}

        def poisoned(model, batch):
            loss = default_loss(model, batch)
            if model.training:
                state["step"] += 1
                if world.rank == a.nan_rank and state["step"] == a.nan_step:
                    return loss * math.nan
            return loss

        def make_poisoned(*args, **kwargs):
            kwargs["loss_fn"] = poisoned
            return distributed.trainer_factory(world, amax_reduce=a.amax_reduce)(*args, **kwargs)
        make = make_poisoned
    result = {"rank": world.rank}
    try:
        r = run_training("nvfp4", "tiny", steps=a.steps, seed=a.seed, out=a.out, resume=a.resume, backend="fused",
                         device="cpu", progress=False, hooks=hooks, trainer_factory=make)
        result.update(train_losses=r.train_losses, val_losses=r.val_losses, final=r.final_val_loss)
    except Crash as e:
        result.update(crashed=int(str(e)))
    except TrainingDiverged as e:
        result.update(diverged=e.step, message=str(e), checkpoint=e.checkpoint)
    if world.rank == 0 or a.nan_rank is not None:
        (Path(a.out) / f"result{world.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
