"""The training CLI (python -m fp4lib.train): last line, resume, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp4lib import train
from fp4lib.training import run as training
from fp4lib.training.checkpoint import current_checkpoint
from fp4lib.training.recipes import RECIPES
from fp4lib.training.loop import TrainingDiverged


pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--backend", "fused", "--no-progress"]


def run_main(capsys, *args):
    code = train.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def final_loss(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final val_loss: "), last
    return float(last.split(": ", 1)[1])


def test_last_line_parses_and_resume_continues(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, stdout, _ = run_main(capsys, "--recipe", "nvfp4", "--steps", "3", "--seed", "1", "--out", out, *FAST)
    assert code == 0
    first = final_loss(stdout)
    assert 0 < first < 6 and "quantized linears: 4" in stdout
    assert (current_checkpoint(out) / "ckpt.pt").is_file() and (Path(out) / "metrics.jsonl").is_file()
    code, stdout, _ = run_main(capsys, "--recipe", "nvfp4", "--steps", "5", "--seed", "1", "--out", out, "--resume",
                               *FAST)
    assert code == 0 and final_loss(stdout) > 0
    steps = [json.loads(l).get("step") for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_named_recipe_trains_from_the_command_line(tmp_path, capsys, recipe):
    code, stdout, _ = run_main(capsys, "--recipe", recipe, "--steps", "2", "--out", str(tmp_path), *FAST)
    assert code == 0 and final_loss(stdout) > 0


def test_module_runs_as_a_script(tmp_path):
    """The real entry point, in a subprocess, as outside checks call it."""
    proc = subprocess.run(
        [sys.executable, "-m", "fp4lib.train", "--recipe", "bf16", "--steps", "2", "--out", str(tmp_path), *FAST],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert final_loss(proc.stdout) > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--recipe", "fp3"], "argument --recipe: invalid choice: 'fp3'"),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--steps", "-5"], "argument --steps: must be a positive integer"),
        (["--steps", "ten"], "argument --steps: must be a positive integer, got 'ten'"),
        (["--preset", "huge"], "argument --preset: invalid choice"),
        (["--corpus", "/no/such/file.txt"], "argument --corpus: '/no/such/file.txt' does not exist"),
        (["--hp-final-fraction", "1.5"], "argument --hp-final-fraction: must be a number in [0, 1)"),
    ],
)
def test_bad_arguments_give_clear_errors(capsys, args, words):
    with pytest.raises(SystemExit) as info:
        train.main(args + ["--no-progress"])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_too_short_corpus_is_a_clear_error(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 10)
    with pytest.raises(SystemExit) as info:
        train.main(["--corpus", str(short), "--out", str(tmp_path / "o"), *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --corpus" in err and "has 60 bytes" in err and "needs at least 331" in err


def test_custom_corpus_trains(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    code, stdout, _ = run_main(capsys, "--corpus", str(text), "--steps", "2", "--out", str(tmp_path / "o"), *FAST)
    assert code == 0 and "text.txt" in stdout and final_loss(stdout) > 0


def test_resume_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", "--out", str(tmp_path / "none"), *FAST])
    assert info.value.code == 2 and "argument --resume: no checkpoint in" in capsys.readouterr().err
    out = str(tmp_path / "r")
    assert train.main(["--recipe", "bf16", "--steps", "1", "--out", out, *FAST]) == 0
    with pytest.raises(SystemExit):
        train.main(["--recipe", "nvfp4", "--steps", "2", "--out", out, "--resume", *FAST])
    assert "made with recipe='bf16', not 'nvfp4'" in capsys.readouterr().err


def test_divergence_exits_nonzero_naming_the_step(tmp_path, capsys, monkeypatch):
    def diverge(self, resume=False, overwrite=False):
        raise TrainingDiverged("training diverged at step 7: the loss is not finite (loss nan)", step=7,
                               loss=float("nan"))

    monkeypatch.setattr(training.Trainer, "train", diverge)
    code, stdout, err = run_main(capsys, "--steps", "9", "--out", str(tmp_path), *FAST)
    assert code == 1 and "diverged at step 7" in err and "final val_loss" not in stdout
