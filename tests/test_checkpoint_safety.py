"""Runs that never lose or mix data (fp4lib.training.checkpoint): all-or-nothing checkpoints under
fault injection (2 gloo processes), the output directory's lock and guard, what a
resume refuses, and one-line errors for bad input."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fp4lib import train
from fp4lib.training.checkpoint import (CHECKPOINT_FILE, FAULT_ENV, FAULT_EXIT, LOCK_FILE, MANIFEST_FILE, POINTER_FILE,
                               current_checkpoint)
from fp4lib.study.__main__ import main as study_main
from fp4lib.training.run import run_training

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--backend", "fused", "--no-progress", "--device", "cpu"]
WORKER = str(ROOT / "tests" / "ckpt_worker.py")
STEPS = 12  # the tiny preset checkpoints at step 10 and after the last step
gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is needed")


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _torchrun(args, env=None, nproc=2):
    from test_distributed import _port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", "--nnodes=1"] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=300, cwd=ROOT)


def cli(capsys, *args):
    """``python -m fp4lib.train`` in this process: (exit code, stdout, stderr)."""
    try:
        code = train.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> bool:
    """argparse's usage, then exactly one error line, last; no traceback."""
    lines = err.strip().splitlines()
    return (lines[-1].startswith("python -m fp4lib.train: error: ") and "Traceback" not in err
            and sum(l.startswith("python -m fp4lib.train: error:") for l in lines) == 1)


def plain(out, steps=2, **kw):
    return run_training(kw.pop("recipe", "bf16"), "tiny", steps=steps, seed=kw.pop("seed", 0), out=str(out),
                        backend="fused", device="cpu", progress=False, **kw)


# ------------------------------------------------------------------ faults in a 2-process save
@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Three 2-process DDP runs that die during their step-12 save, one at each point, and a plain run.

    Between the rank files and the manifest, rank 0 stalls instead (through the CLI, with
    --collective-timeout 3): rank 1 gives up waiting, names rank 0 and ends the run."""
    root = tmp_path_factory.mktemp("faults")
    dirs = {}
    for point, rank in (("before_rank_files", 1), ("before_manifest", 0), ("before_commit", 0)):
        out = root / point
        if point == "before_manifest":
            proc = _torchrun(["-m", "fp4lib.train", "--recipe", "nvfp4", "--steps", STEPS, "--dist", "ddp",
                              "--collective-timeout", "3", "--out", out, *FAST],
                             env=_env(**{FAULT_ENV: f"{point}@{STEPS}@{rank}@stall"}))
            assert proc.returncode != 0 and "final val_loss" not in proc.stdout
            assert ("rank 1: a collective operation waited more than --collective-timeout 3 s; rank 0 stalled or "
                    "died" in proc.stderr), proc.stderr[-3000:]
        else:
            job = json.dumps({"out": str(out), "mode": "ddp", "steps": STEPS})
            proc = _torchrun([WORKER, root / f"{point}.json", job],
                             env=_env(**{FAULT_ENV: f"{point}@{STEPS}@{rank}"}))
            assert proc.returncode != 0 and not (root / f"{point}.json").exists(), proc.stderr[-2000:]
        dirs[point] = out
    plain(root / "plain")
    return root, dirs


@gloo
def test_a_save_killed_at_any_point_resumes_to_the_uninterrupted_losses_and_every_mismatch_is_refused(crashed):
    root, dirs = crashed
    for out in dirs.values():  # the step-10 checkpoint is current; the interrupted save left only leftovers
        assert current_checkpoint(out).name == "ckpt-00000010"
    whole = root / "whole"
    jobs = [{"out": str(whole), "mode": "ddp", "steps": STEPS}]
    jobs += [{"out": str(d), "mode": "ddp", "steps": STEPS, "resume": True} for d in dirs.values()]
    jobs += [{"out": str(whole), "mode": "fsdp", "steps": STEPS + 2, "resume": True},
             {"out": str(whole), "mode": "ddp", "steps": STEPS + 2, "resume": True, "amax_reduce": True},
             {"out": str(root / "plain"), "mode": "ddp", "steps": 4, "resume": True},
             {"out": str(whole), "mode": "ddp", "steps": 4}]
    proc = _torchrun([WORKER, root / "jobs.json"] + [json.dumps(j) for j in jobs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((root / "jobs.json").read_text())
    reference = res[0]
    assert len(reference["train_losses"]) == STEPS
    for r in res[1:4]:
        assert r.get("resumed_from") == 10, r
        assert r["train_losses"] == reference["train_losses"] and r["val_losses"] == reference["val_losses"]
        assert r["comm"] == reference["comm"]  # bytes per step: over the steps since the resume
    assert "was made with dist='ddp', not 'fsdp'" in res[4]["error"]
    assert "was made with amax_reduce=False, not True" in res[5]["error"]
    assert "written by a single-process run (no --dist); this run is a distributed run (--dist ddp" in res[6]["error"]
    assert "is not empty" in res[7]["error"] and "--overwrite" in res[7]["error"]
    for d in dirs.values():  # leftovers of the interrupted saves are gone; one checkpoint remains
        assert sorted(p.name for p in d.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-00000012"]
    # A distributed checkpoint resumed by a single process is refused, naming both kinds.
    with pytest.raises(ValueError, match=r"written by a distributed run \(--dist ddp, 2 process\(es\)\); this run "
                                         r"is a single-process run"):
        run_training("nvfp4", "tiny", steps=STEPS + 2, out=str(whole), resume=True, backend="fused", device="cpu",
                     progress=False)


class _Child:
    """``python -m fp4lib.train`` in a child process, the run :func:`plain` makes (bf16, tiny, seed 0,
    fused, CPU), under the fault hook ``fault``; ``join``, ``kill``, ``pid`` and ``exitcode``
    as a ``multiprocessing.Process`` has them. A new interpreter, not a fork: forking a process
    whose torch threads are running is unsafe (and fails on Python 3.12)."""

    def __init__(self, fault, out, steps):
        cmd = [sys.executable, "-m", "fp4lib.train", "--recipe", "bf16", "--steps", str(steps), "--seed", "0",
               "--out", str(out), "--threads", "1", *FAST]
        self.proc = subprocess.Popen(cmd, env=_env(**{FAULT_ENV: fault}), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def join(self, timeout=None):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self):
        self.proc.kill()

    @property
    def exitcode(self):
        return self.proc.poll()


def test_a_plain_save_killed_before_its_commit_keeps_the_previous_checkpoint(tmp_path, capsys):
    whole = plain(tmp_path / "whole", steps=STEPS)
    out = tmp_path / "crash"
    proc = _Child(f"before_commit@{STEPS}", out, steps=STEPS)
    proc.join(120)
    assert proc.exitcode == FAULT_EXIT
    assert current_checkpoint(out).name == "ckpt-00000010" and (out / LOCK_FILE).exists()  # the dead run's lock
    resumed = plain(out, steps=STEPS, resume=True)  # the stale lock is reclaimed
    assert resumed.resumed_from == 10 and resumed.train_losses == whole.train_losses
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, STEPS + 1))


# ------------------------------------------------------------------ the output directory
def test_a_second_live_run_on_one_directory_is_refused_naming_the_holder(tmp_path, capsys, caplog):
    out = tmp_path / "busy"
    first = _Child("stall@2", out, steps=5)  # holds the lock, then stalls
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # holds the lock, then stalls
            time.sleep(0.2)
        code, _, err = cli(capsys, "--steps", "2", "--out", str(out), "--overwrite", *FAST)
        assert code == 2 and f"argument --out: {out} is in use by another run (pid {first.pid} on host" in err
        assert one_error_line(err)
    finally:
        first.kill()
        first.join()
    # The dead run's lock is stale: reclaimed, with a warning.
    with caplog.at_level(logging.WARNING, logger="fp4lib.training.checkpoint"):
        code, stdout, err = cli(capsys, "--steps", "2", "--out", str(out), "--overwrite", *FAST)
    assert code == 0 and f"reclaimed a stale lock left by pid {first.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_a_fresh_run_needs_an_empty_directory_and_an_overwrite_keeps_the_old_run_until_its_first_checkpoint(
        tmp_path, capsys):
    out = tmp_path / "run"
    first = plain(out, steps=2)
    code, _, err = cli(capsys, "--steps", "2", "--out", str(out), *FAST)
    assert code == 2 and "argument --out:" in err and "is not empty" in err and "--resume" in err
    old_metrics = (out / "metrics.jsonl").read_text()
    old_ckpt = current_checkpoint(out)

    class Died(Exception):
        pass

    def die(trainer, step):
        if step == 2:
            raise Died

    with pytest.raises(Died):  # the new run dies before its first checkpoint
        plain(out, steps=12, overwrite=True, recipe="nvfp4", hooks=[die])
    assert current_checkpoint(out) == old_ckpt and (out / "metrics.jsonl").read_text() == old_metrics
    again = plain(out, steps=2, resume=True)  # the previous run is intact
    assert again.train_losses == first.train_losses
    plain(out, steps=10, overwrite=True, recipe="nvfp4")  # replaced at the new run's first checkpoint
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["run_info"]["recipe"] == "nvfp4" and not (out / "metrics.jsonl.new").exists()
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-00000010", POINTER_FILE, "metrics.jsonl"]


def test_a_partial_last_metrics_line_is_ignored_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    whole = plain(out, steps=4)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    with caplog.at_level(logging.WARNING, logger="fp4lib.training.checkpoint"):
        resumed = plain(out, steps=4, resume=True)
    assert resumed.train_losses == whole.train_losses
    assert "metrics.jsonl: ignoring its partial last line" in caplog.text
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


# ------------------------------------------------------------------ what a resume refuses
@pytest.fixture
def made(tmp_path):
    out = tmp_path / "made"
    plain(out, steps=2)
    return out


def _resume(capsys, out, *args):
    return cli(capsys, "--steps", "3", "--out", str(out), "--resume", *FAST, *args)


@pytest.mark.parametrize("args, words", [
    (["--seed", "1"], "was made with seed=0, not 1"),
    (["--recipe", "nvfp4"], "was made with recipe='bf16', not 'nvfp4'"),
    (["--hp-final-fraction", "0.5", "--recipe", "bf16"], "hp_final_fraction applies to a quantized recipe"),
])
def test_resume_refuses_another_run(made, capsys, args, words):
    code, _, err = _resume(capsys, made, *args)
    assert code == 2 and words in err and one_error_line(err)


def test_resume_refuses_another_corpus_and_torch(made, capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    code, _, err = _resume(capsys, made, "--corpus", str(text))
    assert code == 2 and "argument --resume:" in err and "was made with corpus_sha256=" in err
    manifest = current_checkpoint(made) / MANIFEST_FILE
    rec = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(rec, torch="1.0.0")))
    code, _, err = _resume(capsys, made)
    assert code == 2 and f"was made with torch='1.0.0', not {torch.__version__!r}" in err


@pytest.mark.parametrize("damage, words", [
    ("flip", "ckpt.pt is corrupt: its sha256 is"),
    ("truncate", "ckpt.pt is corrupt: its sha256 is"),
    ("empty", "ckpt.pt is corrupt: its sha256 is"),
    ("garbage", "ckpt.pt is corrupt: its sha256 is"),
    ("delete", "is missing ckpt.pt"),
    ("manifest", "manifest.json is unreadable"),
    ("pointer", "ckpt.current names 'nowhere', which is not a checkpoint directory"),
    ("legacy", "without a manifest, so it cannot be verified"),
])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(made, capsys, damage, words):
    ckpt = current_checkpoint(made)
    f = ckpt / CHECKPOINT_FILE
    data = f.read_bytes()
    if damage == "flip":
        i = len(data) // 2
        f.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
    elif damage == "truncate":
        f.write_bytes(data[:len(data) // 3])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "garbage":
        f.write_bytes(b"not a checkpoint" * 10)
    elif damage == "delete":
        f.unlink()
    elif damage == "manifest":
        (ckpt / MANIFEST_FILE).write_text('{"step": 2, "fil')
    elif damage == "pointer":
        (made / POINTER_FILE).write_text("nowhere\n")
    elif damage == "legacy":
        shutil.copy(f, made / CHECKPOINT_FILE)
        shutil.rmtree(ckpt)
        (made / POINTER_FILE).unlink()
    code, stdout, err = _resume(capsys, made)
    assert code == 2 and words in err and "final val_loss" not in stdout, err
    assert one_error_line(err)


# ------------------------------------------------------------------ bad input, before any work
@pytest.mark.parametrize("args, words", [
    (["--seed", "1e23"], "argument --seed: must be an integer in [0, 9223372036854775807], got '1e23'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0,"),
    (["--seed", str(2**70)], "argument --seed: must be an integer in [0,"),
    (["--threads", "100000"], "argument --threads: must be an integer from 1 to"),
    (["--threads", "0"], "argument --threads: must be an integer from 1 to"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'; allowed: auto, cpu"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with --resume"),
    (["--collective-timeout", "5"], "argument --collective-timeout: applies to a data-parallel run"),
    (["--collective-timeout", "0"], "argument --collective-timeout: must be a positive number of seconds"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, args, words):
    code, _, err = cli(capsys, "--out", str(tmp_path / "o"), *FAST, *args)
    assert code == 2 and words in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_refused(tmp_path, capsys):
    code, _, err = cli(capsys, "--out", str(tmp_path / "o"), "--preset", "tiny", "--device", "cuda")
    assert code == 2 and "argument --device: 'cuda' asked for, but CUDA is not available here" in err


def test_an_out_that_is_a_file_or_not_writable_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(capsys, "--out", str(f), *FAST)
    assert code == 2 and f"argument --out: {f} exists and is not a directory" in err
    code, _, err = cli(capsys, "--out", str(f / "sub"), *FAST)
    assert code == 2 and f"argument --out: {f / 'sub'} cannot be created: {f} is a file" in err
    code, _, err = cli(capsys, "--out", "/proc/fp4lib-run", "--steps", "1", *FAST)  # read-only even for root
    assert code == 2 and "argument --out: cannot write in /proc/fp4lib-run" in err


# ------------------------------------------------------------------ the study's check
@pytest.mark.parametrize("content, words", [
    ("", "empty; a stored result is a JSON object"),
    ('{"name": "x", ', "not valid JSON"),
    ("[1, 2]", "holds a JSON list, not the JSON object of a stored result"),
])
def test_study_check_names_an_unreadable_result(tmp_path, capsys, content, words):
    from fp4lib.study import definition

    results = tmp_path / "results"
    results.mkdir()
    name = definition.STUDY[0].name
    (results / f"{name}.json").write_text(content)
    code = study_main(["--results", str(results), "check", "--no-rerun"])
    err = capsys.readouterr().err
    assert code == 1 and f"{name}: unreadable: {results / (name + '.json')}: {words}" in err


def test_study_check_outside_the_repository_says_the_results_are_not_found(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        study_main(["check", "--no-rerun"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "the results directory 'experiments/results' was not found" in err
    assert "missing" not in err
