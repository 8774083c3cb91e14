"""Data-parallel training under torchrun: 2 processes on gloo, DDP and FSDP2 (fp4lib.training.distributed)."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp4lib.training.checkpoint import current_checkpoint
from fp4lib.training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WORKER = str(ROOT / "tests" / "dist_worker.py")
GRAD_WORKER = str(ROOT / "tests" / "dist_grad_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def torchrun(nproc: int, args, check=True):
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={_port()}",
                      "--nnodes=1"] + [str(a) for a in args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


def worker(tmp_path, name, mode, steps, *extra, nproc=2, rank=0):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    torchrun(nproc, [WORKER, mode, out, steps, *extra])
    return json.loads((out / f"result{rank}.json").read_text())


def single(steps, seed, out=None):
    torch.set_num_threads(1)
    return run_training("nvfp4", "tiny", steps=steps, seed=seed, out=out, backend="fused", device="cpu",
                        progress=False)


def step_one_gradients(tmp_path, mode, *extra):
    """The data-parallel gradient of step 1 and one process's gradient on the same global
    batch (tests/dist_grad_worker.py, recipe bf16: FP32 on the CPU, nothing quantized)."""
    out = tmp_path / f"grad-{mode}"
    out.mkdir()
    torchrun(2, [GRAD_WORKER, mode, out, 1, *extra])
    ranks = [torch.load(out / f"grads_rank{r}.pt") for r in (0, 1)]
    return torch.load(out / "grads.pt"), ranks


def gradients_match(dist_grads, single_grads) -> bool:
    """Equal to float32 rounding. The two differ only in how the per-token terms are
    grouped and summed (two means over 4 sequences, averaged, against one mean over 8):
    a few units in the last place of gradients of size up to ~0.5, measured at most
    3e-8 apart. atol 1e-7 is one float32 ulp at 1 and covers entries near 0; rtol 1e-5
    allows ~100 ulps on large entries. A run that does not average (each rank keeps its
    half-batch gradient) is off by ~80% of the gradient's norm, a summing one by 100%."""
    return dist_grads.keys() == single_grads.keys() and all(
        torch.allclose(dist_grads[n], g, rtol=1e-5, atol=1e-7) for n, g in single_grads.items())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_step_one_gradient_is_the_single_process_gradient_of_the_global_batch(tmp_path, mode):
    """The gradient a data-parallel step applies (DDP: all-reduced; FSDP2: reduce-scattered,
    gathered here) equals one process's gradient on the union of the ranks' batches."""
    both, ranks = step_one_gradients(tmp_path, mode)
    assert both["global_batch"][0].shape == (8, 32)  # the tiny preset's batch, 4 sequences per rank
    assert not torch.equal(ranks[0]["batch"][0], ranks[1]["batch"][0])  # the ranks saw different data
    for name, g in both["single"].items():
        torch.testing.assert_close(both["dist"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert gradients_match(both["dist"], both["single"])
    for name, g in ranks[0]["grads"].items():
        assert torch.equal(ranks[1]["grads"][name], g), name  # every rank holds the same gradient


def test_step_one_gradient_check_rejects_a_run_that_does_not_average(tmp_path):
    """The same comparison with DDP's all-reduce replaced by a hook that keeps each rank's own
    half-batch gradient: rejected. (A band of three seed standard deviations around the final loss
    of single-process runs accepts such a run: 40 nvfp4 steps end 0.043 from the seeds' mean, inside
    its 0.046.)"""
    both, _ = step_one_gradients(tmp_path, "ddp", "--break", "no-average")
    assert not gradients_match(both["dist"], both["single"])


def test_one_process_under_torchrun_reproduces_the_plain_run(tmp_path):
    one = worker(tmp_path, "one", "ddp", 12, nproc=1)
    plain = single(12, 0)
    assert one["train_losses"] == plain.train_losses
    assert one["final"] == plain.final_val_loss


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resuming_with_the_same_world_size_reproduces_the_uninterrupted_losses(tmp_path, mode):
    whole = worker(tmp_path, "whole", mode, 14)
    crashed = worker(tmp_path, "resumed", mode, 14, "--crash-at", 13)
    assert crashed["crashed"] == 13
    resumed = worker(tmp_path, "resumed", mode, 14, "--resume")
    assert resumed["train_losses"] == whole["train_losses"]
    assert resumed["val_losses"] == [list(v) for v in whole["val_losses"]] or resumed["val_losses"] == whole["val_losses"]
    # A different number of processes is refused, naming both.
    out = torchrun(1, [WORKER, mode, tmp_path / "resumed", 14, "--resume"], check=False)
    assert out.returncode != 0 and "written by 2 process(es)" in out.stderr


def test_a_diverging_rank_stops_every_rank_at_one_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    out.mkdir()
    torchrun(2, [WORKER, "ddp", out, 14, "--nan-rank", 1, "--nan-step", 12])
    r0, r1 = (json.loads((out / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["diverged"] == r1["diverged"] == 12
    assert "the loss is not finite" in r0["message"] and r0["checkpoint"].endswith("ckpt.pt")
    ckpt = current_checkpoint(out)
    assert r0["checkpoint"] == str(ckpt / "ckpt.pt") and (ckpt / "dcp").is_dir() and (ckpt / "rank1.pt").is_file()


def test_amax_reduction_changes_the_per_tensor_scales_and_runs(tmp_path):
    own = worker(tmp_path, "own", "ddp", 6)
    group = worker(tmp_path, "group", "ddp", 6, "--amax-reduce")
    assert group["train_losses"] != own["train_losses"]
    assert abs(group["final"] - own["final"]) < 0.05


def test_cli_errors_name_the_problem(tmp_path):
    def cli(*args, dist_run=None):
        cmd = (TORCHRUN + [f"--nproc_per_node={dist_run}", "--master_addr=127.0.0.1", f"--master_port={_port()}",
                           "-m"] if dist_run else [sys.executable, "-m"])
        return subprocess.run(cmd + ["fp4lib.train", "--preset", "tiny", "--steps", "2", "--backend", "fused",
                                     "--device", "cpu",
                                     "--out", str(tmp_path / "cli"), "--no-progress", *args],
                              capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)

    out = cli("--dist", "ddp")
    assert out.returncode == 2 and "needs torchrun" in out.stderr
    out = cli("--dist", "horovod")
    assert out.returncode == 2 and "invalid choice: 'horovod'" in out.stderr
    out = cli("--amax-reduce")
    assert out.returncode == 2 and "applies to a data-parallel run" in out.stderr
    out = cli("--dist", "ddp", dist_run=3)
    assert out.returncode != 0 and "does not divide over 3 processes" in out.stderr
    out = cli("--recipe", "nvfp4", "--dist", "fsdp", dist_run=2)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("final val_loss: ") and sum(l.startswith("final val_loss") for l in lines) == 1


def test_fp8_gradient_allreduce_sends_a_quarter_of_the_bytes_and_trains_alike(tmp_path):
    runs = {}
    for gc in ("fp32", "fp8"):
        out = torchrun(2, ["-m", "fp4lib.train", "--recipe", "nvfp4", "--preset", "tiny", "--steps", "6", "--dist", "ddp",
                           "--grad-comm", gc, "--backend", "fused", "--device", "cpu", "--out", tmp_path / gc,
                           "--no-progress"])
        lines = out.stdout.strip().splitlines()
        comm = next(l for l in lines if l.startswith("gradient all-reduce:"))
        runs[gc] = (int(comm.split()[2].replace(",", "")), float(lines[-1].split(": ")[1]))
    (b32, loss32), (b8, loss8) = runs["fp32"], runs["fp8"]
    n_params = b32 // 4  # FP32 gradients, one bucket at this size
    assert b8 == n_params + 4  # one byte per gradient, one FP32 scale
    assert abs(loss8 - loss32) < 0.01


def test_auto_device_takes_the_cpu_with_fewer_gpus_than_ranks(monkeypatch, caplog):
    from fp4lib.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="fp4lib.training.distributed"):
        assert not distributed._use_cuda("auto", 2)
    assert "2 processes on this machine but 1 GPU" in caplog.text
    assert distributed._use_cuda("auto", 1)
    assert distributed._use_cuda("cuda", 2)  # told: as told
    assert not distributed._use_cuda("cpu", 1)


def test_communication_formulas():
    from fp4lib.training.distributed import gradient_comm_bytes, weight_gather_bytes

    assert gradient_comm_bytes(1000, 2) == 4000  # ring all-reduce: 2 (n-1)/n of 4 kB
    assert gradient_comm_bytes(1000, 8, bits=16) == 2 * 7 / 8 * 2000
    assert weight_gather_bytes(1024, 4, bits=4.5) == 2 * 3 / 4 * 1024 * 4.5 / 8


def test_grad_comm_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fp4lib.train", "--preset", "tiny", "--grad-comm", "fp8"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "applies to --dist ddp" in out.stderr
