"""Train the tiny GPT with an FP4 recipe: ``python -m fp4lib.train``.

::

    python -m fp4lib.train --recipe nvfp4 --preset ci --steps 400 --seed 0 --out runs/nvfp4
    python -m fp4lib.train --recipe nvfp4 --out runs/nvfp4 --resume      # continue from ckpt.pt
    python -m fp4lib.train --recipe bf16 --corpus mybook.txt              # any text file
    torchrun --standalone --nproc_per_node=2 -m fp4lib.train --recipe nvfp4 --dist ddp   # or --dist fsdp

The last line printed is ``final val_loss: <number>`` (nats per byte); outside
checks read it. Errors (unknown recipe, a missing or too short corpus, steps <= 0,
``--dist`` outside ``torchrun``, a batch that does not divide over the processes)
exit with status 2 and a message naming the argument; a diverged run exits with
status 1 and a message naming the step. Under ``torchrun`` with ``--dist`` the run is
data-parallel (:mod:`fp4lib.distributed`); rank 0 alone prints.

Sizes: :data:`fp4lib.training.PRESETS`. The engine is :mod:`fp4lib.training`;
this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import distributed
from .fake_quant import BACKEND_CHOICES
from .recipes import RECIPES
from .trainer import CHECKPOINT_FILE, TrainingDiverged
from .training import GPU_RUNTIME_NOTE, PRESETS, Preset, build_run, run_training

__all__ = ["Preset", "PRESETS", "GPU_RUNTIME_NOTE", "build_run", "run_training", "main", "make_parser",
           "FINAL_LINE_PREFIX"]

FINAL_LINE_PREFIX = "final val_loss: "


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {v}")
    return v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fp4lib.train",
        description="Pretrain the tiny GPT with simulated FP4 GEMMs. The last line printed is "
                    "'final val_loss: <number>'.",
    )
    p.add_argument("--recipe", default="bf16", choices=sorted(RECIPES), help="training recipe (default bf16)")
    p.add_argument("--preset", default="ci", choices=sorted(PRESETS), help="model/run size (default ci)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and rounding noise")
    p.add_argument("--out", default=None, help="output directory (default runs/<recipe>-<preset>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--corpus", default=None, metavar="PATH",
                   help="a text file to train on (default: the Python standard library's source)")
    p.add_argument("--hp-final-fraction", dest="hp_final_fraction", type=_fraction,
                   default=None, help="run the last FRACTION of the steps in high precision (NVIDIA's remedy)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="fake-quant implementation (all give identical numbers; auto = compiled if possible)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--eval-every", type=_positive_int, default=None, help="steps between validation losses")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice); results can depend on it in the last bits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist", default=None, choices=distributed.DIST_MODES,
                   help="data-parallel under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)")
    p.add_argument("--amax-reduce", dest="amax_reduce", action="store_true",
                   help="with --dist: per-tensor scales from the maximum amax over the processes")
    p.add_argument("--grad-comm", dest="grad_comm", default="fp32", choices=distributed.GRAD_COMM,
                   help="with --dist ddp: send gradients as they are (fp32) or in FP8 with one scale per bucket")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.corpus is not None and not Path(args.corpus).is_file():
        parser.error(f"argument --corpus: {args.corpus!r} does not exist or is not a file")
    out = args.out or f"runs/{args.recipe}-{args.preset}-s{args.seed}"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and not (Path(out) / CHECKPOINT_FILE).is_file():
        parser.error(f"argument --resume: no checkpoint at {Path(out) / CHECKPOINT_FILE}")
    if args.amax_reduce and not args.dist:
        parser.error("argument --amax-reduce: applies to a data-parallel run (--dist ddp or --dist fsdp)")
    if args.grad_comm != "fp32" and args.dist != "ddp":
        parser.error("argument --grad-comm: applies to --dist ddp (a DDP communication hook)")
    extra = {}
    main_rank = True
    if args.dist:
        try:
            world = distributed.init_world(args.dist, args.device)
        except ValueError as e:
            parser.error(f"argument --dist: {e}")
        batch = PRESETS[args.preset].train.batch_size
        if batch % world.world_size:
            parser.error(f"argument --dist: the {args.preset} preset's batch of {batch} sequences does not divide "
                         f"over {world.world_size} processes")
        main_rank = world.is_main
        extra["trainer_factory"] = distributed.trainer_factory(world, amax_reduce=args.amax_reduce,
                                                               grad_comm=args.grad_comm)
    try:
        result = run_training(args.recipe, args.preset, steps=args.steps, seed=args.seed, out=out,
                              resume=args.resume, corpus=args.corpus, backend=args.backend,
                              hp_final_fraction=args.hp_final_fraction, device=args.device,
                              eval_every=args.eval_every, progress=not args.no_progress,
                              log=print if main_rank else (lambda s: None), **extra)
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        msg = str(e)
        if msg.startswith("corpus "):
            parser.error(f"argument --corpus: {msg}")
        parser.error(msg)
    finally:
        if args.dist:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if not main_rank:
        return 0
    med = sorted(result.step_ms)[len(result.step_ms) // 2] if result.step_ms else float("nan")
    comm = result.info.get("grad_comm_bytes_per_step")
    if comm:
        print(f"gradient all-reduce: {comm['payload']:,.0f} bytes per step and rank handed over, "
              f"{comm['wire']:,.0f} sent (ring model)")
    print(f"metrics: {Path(out) / 'metrics.jsonl'}; median step {med:.0f} ms")
    print(f"{FINAL_LINE_PREFIX}{result.final_val_loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
