"""Ranks of the checkpoint-safety tests in ``test_checkpoint_safety.py``; run under ``torchrun``.

    torchrun --nproc_per_node=2 tests/ckpt_worker.py RESULT JOB [JOB ...]

Each JOB is a JSON object: ``out`` (directory), ``mode`` (ddp or fsdp), ``steps``, and
optionally ``resume``, ``overwrite``, ``amax_reduce``. The jobs run in order in one
process group (nvfp4, tiny preset, fused backend, CPU); rank 0 writes RESULT, a JSON
list with, per job, the losses or the ``ValueError`` that refused it. Crashes are
injected by the caller through ``FP4LIB_TEST_FAULT`` (see :mod:`fp4lib.training.checkpoint`).
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fp4lib.training import distributed
from fp4lib.training.run import run_training


def main() -> int:
    result_path, jobs = sys.argv[1], [json.loads(j) for j in sys.argv[2:]]
    torch.set_num_threads(1)
    base = distributed.init_world("ddp", "cpu")
    results = []
    for job in jobs:
        world = dataclasses.replace(base, mode=job.get("mode", "ddp"))
        make = distributed.trainer_factory(world, amax_reduce=job.get("amax_reduce", False))
        try:
            r = run_training("nvfp4", "tiny", steps=job["steps"], seed=0, out=job["out"],
                             resume=job.get("resume", False), overwrite=job.get("overwrite", False),
                             backend="fused", device="cpu", progress=False, trainer_factory=make)
            results.append({"train_losses": r.train_losses, "val_losses": [list(v) for v in r.val_losses],
                            "resumed_from": r.resumed_from, "comm": r.info.get("grad_comm_bytes_per_step")})
        except ValueError as e:
            results.append({"error": str(e)})
    if base.is_main:
        Path(result_path).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
