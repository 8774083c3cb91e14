"""Train the tiny GPT with an FP4 recipe: ``python -m fp4lib.train``.

::

    python -m fp4lib.train --recipe nvfp4 --preset ci --steps 400 --seed 0 --out runs/nvfp4
    python -m fp4lib.train --recipe nvfp4 --out runs/nvfp4 --resume      # continue from its checkpoint
    python -m fp4lib.train --recipe nvfp4 --out runs/nvfp4 --overwrite   # start that run again
    python -m fp4lib.train --recipe bf16 --corpus mybook.txt              # any text file
    torchrun --standalone --nproc_per_node=2 -m fp4lib.train --recipe nvfp4 --dist ddp   # or --dist fsdp

The last line printed is ``final val_loss: <number>`` (nats per byte); outside
checks read it. Errors (unknown recipe, a missing or too short corpus, steps <= 0,
a seed, thread count or device out of bounds, ``--dist`` outside ``torchrun``, a
batch that does not divide over the processes, an ``--out`` that is a file, not
writable, in use by another run, or not empty without ``--resume`` or
``--overwrite``, a checkpoint that is corrupt or was made by another run) exit
with status 2 and one line naming the argument or file; a diverged run, and a
collective that timed out (``--collective-timeout``), exit with status 1 and a
message naming the step or the rank. Under ``torchrun`` with ``--dist`` the run is
data-parallel (:mod:`fp4lib.training.distributed`); rank 0 alone prints. Checkpoints and the
output directory's guard: :mod:`fp4lib.training.checkpoint`.

Sizes: :data:`fp4lib.training.run.PRESETS`. The engine is :mod:`fp4lib.training.run`;
this module is its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from .training import checkpoint, distributed
from .training.checkpoint import RunDirError
from .numerics.schemes import Backend
from .training.recipes import RECIPES
from .training.loop import TrainingDiverged
from .training.run import PRESETS, run_training

__all__ = ["main", "make_parser", "FINAL_LINE_PREFIX"]

FINAL_LINE_PREFIX = "final val_loss: "
SEED_MAX = 2**63 - 1  # torch's generators take 64-bit seeds; mix_seed hashes them


def _number_in(convert: Callable[[str], Any], ok: Callable[[Any], bool], allowed: str, quote_text: bool = False):
    """An argparse type: ``convert(text)``, accepted when ``ok`` of it holds; ``allowed`` says what is
    accepted in the error message, which quotes the text as given when it does not convert (and, with
    ``quote_text``, also when its value is out of bounds; else it shows the value)."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}" if quote_text
                                             else f"must be {allowed}, got {v}")
        return v

    return parse


def _int_in(low: int, high: int, allowed: str):
    """An argparse type: an integer in ``[low, high]``; ``allowed`` says so in the error message."""
    return _number_in(int, lambda v: low <= v <= high, allowed)


_seed = _int_in(0, SEED_MAX, f"an integer in [0, {SEED_MAX}]")
_threads = _int_in(1, os.cpu_count() or 1, f"an integer from 1 to {os.cpu_count() or 1} (this machine's CPUs)")
_seconds = _number_in(float, lambda v: 0 < v < float("inf"), "a positive number of seconds", quote_text=True)
_positive_int = _number_in(int, lambda v: v > 0, "a positive integer")
_fraction = _number_in(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def check_device(device: str) -> str:
    """``device`` if this machine has it (``auto``, ``cpu``, ``cuda`` or ``cuda:N``); else ``ValueError``
    saying what is allowed here."""
    cuda = torch.cuda.is_available()
    allowed = "auto, cpu" + (", cuda or cuda:N (N < %d)" % torch.cuda.device_count() if cuda else "")
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device in ("auto", "cpu"):
        return device
    if m is None:
        raise ValueError(f"unknown device {device!r}; allowed: {allowed}")
    if not cuda:
        raise ValueError(f"{device!r} asked for, but CUDA is not available here (torch {torch.__version__}); "
                         f"allowed: {allowed}")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"{device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"allowed: {allowed}")
    return device


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fp4lib.train",
        description="Pretrain the tiny GPT with simulated FP4 GEMMs. The last line printed is "
                    "'final val_loss: <number>'.",
    )
    p.add_argument("--recipe", default="bf16", choices=sorted(RECIPES), help="training recipe (default bf16)")
    p.add_argument("--preset", default="ci", choices=sorted(PRESETS), help="model/run size (default ci)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--seed", type=_seed, default=0,
                   help=f"seed of initialisation, data order and rounding noise (0 to {SEED_MAX})")
    p.add_argument("--out", default=None, help="output directory (default runs/<recipe>-<preset>-s<seed>); "
                                                 "a new or empty one unless --resume or --overwrite")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its current checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (kept until the new run's first checkpoint)")
    p.add_argument("--corpus", default=None, metavar="PATH",
                   help="a text file to train on (default: the Python standard library's source)")
    p.add_argument("--hp-final-fraction", dest="hp_final_fraction", type=_fraction,
                   default=None, help="run the last FRACTION of the steps in high precision (NVIDIA's remedy)")
    p.add_argument("--backend", default="auto", choices=[b.value for b in Backend],
                   help="fake-quant implementation (all give identical numbers; auto = compiled if possible)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--eval-every", type=_positive_int, default=None, help="steps between validation losses")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for torch (default: torch's choice); results can depend on it in the last bits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist", default=None, choices=distributed.DIST_MODES,
                   help="data-parallel under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)")
    p.add_argument("--amax-reduce", dest="amax_reduce", action="store_true",
                   help="with --dist: per-tensor scales from the maximum amax over the processes")
    p.add_argument("--grad-comm", dest="grad_comm", default="fp32", choices=distributed.GRAD_COMM,
                   help="with --dist ddp: send gradients as they are (fp32) or in FP8 with one scale per bucket")
    p.add_argument("--collective-timeout", dest="collective_timeout", type=_seconds, default=None, metavar="SECONDS",
                   help=f"with --dist: how long a rank waits for the others in a collective before the run stops "
                        f"(default {distributed.DEFAULT_COLLECTIVE_TIMEOUT:g})")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    out = _check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not logging.getLogger().handlers:  # the checkpoint module's warnings (a partial metrics line, a stale lock)
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    world, extra = _join_world(parser, args)
    main_rank = world is None or world.is_main
    result = _run(parser, args, out, world, main_rank, extra)
    if result is None:
        return 1
    if not main_rank:
        return 0
    _report(result, out)
    return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The arguments' problems that show before any work (through ``parser.error``); returns the output directory."""
    if args.corpus is not None and not Path(args.corpus).is_file():
        parser.error(f"argument --corpus: {args.corpus!r} does not exist or is not a file")
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(f"argument --device: {e}")
    out = args.out or f"runs/{args.recipe}-{args.preset}-s{args.seed}"
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume (one continues the run in --out, the other "
                     "replaces it)")
    try:
        _precheck_out(Path(out), args.resume, args.overwrite)
    except RunDirError as e:
        parser.error(f"argument {e.argument}: {e}")
    if args.amax_reduce and not args.dist:
        parser.error("argument --amax-reduce: applies to a data-parallel run (--dist ddp or --dist fsdp)")
    if args.grad_comm != "fp32" and args.dist != "ddp":
        parser.error("argument --grad-comm: applies to --dist ddp (a DDP communication hook)")
    if args.collective_timeout is not None and not args.dist:
        parser.error("argument --collective-timeout: applies to a data-parallel run (--dist ddp or --dist fsdp)")
    return out


def _join_world(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """With ``--dist``: the process group (:func:`fp4lib.training.distributed.init_world`) and the
    data-parallel trainer factory for :func:`run_training`. Without: ``(None, {})``."""
    if not args.dist:
        return None, {}
    try:
        world = distributed.init_world(args.dist, args.device, timeout=args.collective_timeout)
    except ValueError as e:
        parser.error(f"argument --dist: {e}")
    batch = PRESETS[args.preset].train.batch_size
    if batch % world.world_size:
        parser.error(f"argument --dist: the {args.preset} preset's batch of {batch} sequences does not divide "
                     f"over {world.world_size} processes")
    factory = distributed.trainer_factory(world, amax_reduce=args.amax_reduce, grad_comm=args.grad_comm)
    return world, {"trainer_factory": factory}


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, out: str, world, main_rank: bool, extra: dict):
    """Train (:func:`run_training`); the result, or ``None`` after a diverged run or a collective that timed
    out (with its message on stderr). Argument and output-directory errors go through ``parser.error``;
    the process group ends here."""
    try:
        return run_training(args.recipe, args.preset, steps=args.steps, seed=args.seed, out=out,
                            resume=args.resume, overwrite=args.overwrite, corpus=args.corpus, backend=args.backend,
                            hp_final_fraction=args.hp_final_fraction, device=args.device,
                            eval_every=args.eval_every, progress=not args.no_progress,
                            log=print if main_rank else (lambda s: None), **extra)
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return None
    except RunDirError as e:
        parser.error(f"argument {e.argument}: {e}")
    except RuntimeError as e:
        if world is None or not distributed.is_timeout(e):
            raise
        print(f"error: {distributed.describe_timeout(world)}", file=sys.stderr)
        return None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("corpus "):
            parser.error(f"argument --corpus: {msg}")
        parser.error(msg)
    finally:
        if args.dist and dist.is_initialized():
            dist.destroy_process_group()


def _report(result, out: str) -> None:
    """The closing lines: the gradient traffic of a DDP run, the metrics file and median step, the final loss."""
    med = sorted(result.step_ms)[len(result.step_ms) // 2] if result.step_ms else float("nan")
    comm = result.info.get("grad_comm_bytes_per_step")
    if comm:
        print(f"gradient all-reduce: {comm['payload']:,.0f} bytes per step and rank handed over, "
              f"{comm['wire']:,.0f} sent (ring model)")
    print(f"metrics: {Path(out) / 'metrics.jsonl'}; median step {med:.0f} ms")
    print(f"{FINAL_LINE_PREFIX}{result.final_val_loss:.6f}")


def _precheck_out(out: Path, resume: bool, overwrite: bool) -> None:
    """The output directory's problems that show before any work: a file, a
    directory that is not empty for a fresh run, no checkpoint to resume. (The run
    itself takes the lock and checks again: :func:`fp4lib.training.checkpoint.claim`.)"""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory; --out needs a directory (new or a run's)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{out} cannot be created: {parent} is a file, not a directory")
            break
    if resume:
        if checkpoint.current_checkpoint(out) is None:
            raise checkpoint.ResumeError(f"no checkpoint in {out} to resume from")
    elif not overwrite and out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if p.name != checkpoint.LOCK_FILE)
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise RunDirError(f"{out} is not empty (it holds {shown}); add --resume to continue the run in it or "
                              f"--overwrite to replace it (the previous run stays until the new one's first "
                              f"checkpoint)")


if __name__ == "__main__":
    sys.exit(main())
