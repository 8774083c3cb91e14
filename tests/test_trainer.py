"""The model-agnostic Trainer (fp4lib.training.loop): schedule, smoke run, resume, divergence guard."""

import json
import math

import pytest
import torch

from fp4lib.training.checkpoint import current_checkpoint
from fp4lib.training.data import TokenWindows
from fp4lib.training.model import GPT, GPTConfig
from fp4lib.training.apply import apply_recipe
from fp4lib.training.checkpoint import CHECKPOINT_FILE, METRICS_FILE
from fp4lib.training.config import TrainConfig, lr_at
from fp4lib.training.loop import (
    Trainer,
    TrainingDiverged,
    default_loss,
    resolve_device,
)


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def data():
    g = torch.Generator().manual_seed(0)
    # A learnable sequence: a repeated random "text" of 64 symbols.
    base = torch.randint(0, 64, (64,), generator=g, dtype=torch.uint8)
    return TokenWindows(base.repeat(40), CFG.block_size)


def make(recipe="bf16", **overrides):
    torch.manual_seed(0)
    model = GPT(CFG)
    apply_recipe(model, recipe, seed=0, backend="fused")
    kw = dict(steps=10, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=5, eval_batches=1,
              ckpt_every=5, progress=False)
    kw.update(overrides)
    return model, TrainConfig(**kw)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(1, 101)]
    assert lrs[:10] == pytest.approx([s / 10 for s in range(1, 11)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(1, TrainConfig(steps=5, warmup_steps=0, lr=2.0, min_lr=0.0)) > 1.5


def test_smoke_loss_falls_and_metrics_are_written(tmp_path):
    model, cfg = make("nvfp4", steps=12, out_dir=str(tmp_path))
    result = Trainer(model, data(), data(), cfg, run_info={"recipe": "nvfp4"}).train()
    assert len(result.train_losses) == 12 and len(result.step_ms) == 12
    assert sum(result.train_losses[-3:]) / 3 < result.train_losses[0] - 0.5
    assert [s for s, _ in result.val_losses] == [5, 10, 12]
    assert result.final_val_loss == result.val_losses[-1][1] < math.log(256)
    records = [json.loads(l) for l in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["run_info"] == {"recipe": "nvfp4"}
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"lr", "grad_norm", "step_ms", "tokens_per_s"} <= set(steps[0])
    assert [r["val_loss"] for r in records if "val_loss" in r] == [v for _, v in result.val_losses]
    assert (current_checkpoint(tmp_path) / CHECKPOINT_FILE).is_file()


@pytest.mark.parametrize("recipe", ["bf16", "nvfp4"])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, recipe):
    model, cfg = make(recipe, out_dir=str(tmp_path / "full"))
    full = Trainer(model, data(), data(), cfg).train()

    model, cfg = make(recipe, out_dir=str(tmp_path / "split"), steps=10)
    trainer = Trainer(model, data(), data(), cfg)

    def stop_after_5(t, step):  # simulate an interruption after the step-5 checkpoint
        if step == 6:
            raise KeyboardInterrupt

    trainer.hooks.append(stop_after_5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    model, cfg = make(recipe, out_dir=str(tmp_path / "split"), steps=10)  # a fresh process, in effect
    resumed = Trainer(model, data(), data(), cfg).train(resume=True)
    assert resumed.resumed_from == 5
    assert resumed.train_losses == full.train_losses  # exactly
    assert resumed.val_losses == full.val_losses
    lines = lambda d: [json.loads(l).get("loss") for l in (tmp_path / d / METRICS_FILE).read_text().splitlines()]
    assert [x for x in lines("split") if x is not None] == [x for x in lines("full") if x is not None]


def nan_at(step_to_fail, value=float("nan")):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = default_loss(model, batch)
        return loss * value if calls["n"] == step_to_fail else loss

    return loss_fn


def test_divergence_guard_fires_on_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    model, cfg = make(out_dir=str(tmp_path), ckpt_every=2, eval_every=0)
    trainer = Trainer(model, data(), data(), cfg, loss_fn=nan_at(5))
    with pytest.raises(TrainingDiverged, match="diverged at step 5: the loss is not finite") as info:
        trainer.train()
    assert info.value.step == 5 and math.isnan(info.value.loss)
    assert str(current_checkpoint(tmp_path) / CHECKPOINT_FILE) in str(info.value)
    ckpt = torch.load(current_checkpoint(tmp_path) / CHECKPOINT_FILE, weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["history"]["train_losses"]) == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_tensor(v))
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])["event"] == "diverged"


def test_divergence_guard_fires_on_a_loss_blowup(tmp_path):
    model, cfg = make(out_dir=str(tmp_path), ckpt_every=0, eval_every=0, blowup_factor=3.0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss exceeds 3.0 x the best") as info:
        Trainer(model, data(), data(), cfg, loss_fn=nan_at(3, 10.0)).train()
    assert "no checkpoint was written" in str(info.value)


def test_resume_without_checkpoint_and_bad_config():
    model, cfg = make(out_dir=None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(model, data(), data(), cfg).train(resume=True)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(TypeError, match="config"):
        Trainer(model, data(), data(), {"steps": 3})


def test_device_is_chosen_automatically():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    model, cfg = make(steps=1)
    assert Trainer(model, data(), data(), cfg).device.type == expected
