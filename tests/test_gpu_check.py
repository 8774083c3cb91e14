"""benchmarks/gpu_check.py (``make gpu-check``): its comparisons, run on the CPU here."""

import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without CUDA")
def test_without_any_gpu_it_says_so_and_passes(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "nvidia_smi_gpus", lambda: [])
    assert gpu_check.main(["--no-write"]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot see")
def test_a_gpu_torch_cannot_see_fails_the_check(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "nvidia_smi_gpus", lambda: ["GPU 0: Tesla T4 (UUID: GPU-0)"])
    assert gpu_check.main(["--no-write"]) == 1
    err = capsys.readouterr().err
    assert "FAILED, nothing was checked" in err and "Tesla T4" in err


def test_short_runs_keep_timed_steps():
    for steps in (2, 5, 10, 11, 50, 200):
        warm = gpu_check.warmup_steps(steps)
        assert 0 <= warm < steps
    assert gpu_check.warmup_steps(200) == 20 and gpu_check.warmup_steps(50) == 10
    with pytest.raises(SystemExit):
        gpu_check.main(["--no-write", "--steps", "1"])


def test_bf16_is_native_on_the_cpu():
    assert gpu_check.native_bf16("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_bnb_comparison_on_the_cpu_finds_no_unexplained_difference(bnb, quant_type, dtype):
    for shape in [(33,), (64, 96), (3, 48)]:
        r = gpu_check.compare_bnb(quant_type, shape, dtype, device="cpu")
        assert r["absmax_identical"] and r["decode_identical"] and r["other"] == 0, r


def test_bf16_fidelity_rows_on_the_cpu():
    rows = gpu_check.bf16_fidelity(device="cpu")
    assert len(rows) == 9 and all(same >= gpu_check.FIDELITY for _, _, same in rows)
