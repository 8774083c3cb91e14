"""One training run, from a preset and a recipe: the engine behind ``python -m fp4lib.train``
and the study.

:func:`build_run` builds the model, applies the recipe and cuts the data;
:func:`run_training` trains it (the high-precision final stretch and the
high-precision evaluation of a recipe included) and returns the
:class:`~fp4lib.training.loop.TrainResult`.

Sizes (:data:`PRESETS`):


* ``ci`` -- the book's CPU run: GPT d=128, 4 layers, 4 heads, context 128, batch 32
  (0.84M parameters, 4,096 tokens per step), AdamW 3e-3, 400 steps, the first
  8 MiB of the standard-library corpus. About 0.25-0.5 s per step in FP32 on
  the book's 2-core machine (2-3 minutes per run); the compiled nvfp4 step is
  about 1.4-1.5x that (``benchmarks/RESULTS.md``).
* ``gpu`` -- about 10x larger (Colab or one GPU): d=384, 6 layers, 6 heads,
  context 256, batch 64 (10.8M parameters, 16,384 tokens per step), AdamW 1e-3,
  2,000 steps, the whole standard-library corpus: about 2.3e15 training FLOPs,
  estimated at 1-3 minutes on an A100/H100 and 10-20 on a Colab T4 in FP32
  (:data:`GPU_RUNTIME_NOTE`).
* ``tiny`` -- for tests and smoke runs: d=32, 2 layers, context 32, batch 8.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .data import TokenWindows, load_corpus, split_tokens, VAL_FRACTION
from .model import GPT, GPTConfig
from .apply import apply_recipe, quantization_disabled, set_quantization
from .recipes import Recipe, get_recipe, hp_switch_step
from .checkpoint import ResumeError, current_checkpoint
from .config import TrainConfig
from .loop import Trainer, TrainResult, default_loss

__all__ = ["Preset", "PRESETS", "GPU_RUNTIME_NOTE", "build_run", "run_training"]


@dataclass(frozen=True)
class Preset:
    """A named run size: the model (:class:`~fp4lib.training.model.GPTConfig`), the optimisation
    and bookkeeping settings (:class:`~fp4lib.training.config.TrainConfig`) and the corpus cut.

    The defaults of both configs are the book's ``ci`` size; the other presets say
    only where they differ. A run is a recipe, a preset and overrides
    (:meth:`train_config`).
    """

    name: str
    model: GPTConfig
    train: TrainConfig
    corpus_bytes: Optional[int]
    description: str

    def train_config(self, **overrides) -> TrainConfig:
        """This preset's :class:`~fp4lib.training.config.TrainConfig` with the overrides that are not ``None``."""
        return dataclasses.replace(self.train, **{k: v for k, v in overrides.items() if v is not None})


PRESETS = {
    "ci": Preset("ci", GPTConfig(), TrainConfig(), corpus_bytes=8 * 1024 * 1024,
                 description="CPU size for the book and CI: 0.84M parameters"),
    "gpu": Preset("gpu", GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
                  TrainConfig(batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100, steps=2000, eval_every=100,
                              eval_batches=16, ckpt_every=500),
                  corpus_bytes=None, description="about 10x the ci size, for Colab or one GPU: 10.8M parameters"),
    "tiny": Preset("tiny", GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
                   TrainConfig(batch_size=8, warmup_steps=5, steps=50, eval_every=10, eval_batches=2, ckpt_every=10),
                   corpus_bytes=256 * 1024, description="tests and smoke runs: 34k parameters"),
}

GPU_RUNTIME_NOTE = (
    "gpu preset, 2,000 steps of 64 x 256 tokens (32.8M tokens, about 2.3e15 training FLOPs). Estimated from the "
    "FLOPs, not measured: in BF16 on an A100 or H100 about 1-3 minutes (matmuls this small keep a GPU far below "
    "its peak); a Colab T4 has no BF16 tensor cores, so 'auto' precision trains in FP32 there (about 8 TFLOP/s "
    "peak): about 10-20 minutes. The simulated FP4 recipes add the fake-quantization passes (memory-bound "
    "elementwise kernels), typically 1.5-3x the BF16 step."
)


def _min_corpus_bytes(block_size: int) -> int:
    """Smallest corpus whose validation split (the last 10%) holds one window of block_size + 1."""
    return int(math.ceil((block_size + 1) / VAL_FRACTION)) + 1


def build_run(recipe: str | Recipe, preset: str = "ci", *, seed: int = 0, corpus: Optional[str] = None,
              backend: str = "auto", corpus_bytes: Optional[int] = -1):
    """Model, recipe, data and run facts for one run, without training.

    Returns ``(model, recipe, train_windows, val_windows, info)``. ``corpus_bytes=-1``
    uses the preset's cut (``None``: the whole file or library).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    cut = p.corpus_bytes if corpus_bytes == -1 else corpus_bytes
    if corpus is not None and not Path(corpus).is_file():
        raise ValueError(f"corpus {corpus!r} does not exist or is not a file")
    c = load_corpus(corpus, cut)
    need = _min_corpus_bytes(p.model.block_size)
    if len(c) < need:
        raise ValueError(
            f"corpus {c.source!r} has {len(c)} bytes; preset {preset!r} (block_size {p.model.block_size}) needs at "
            f"least {need} so that its 10% validation split holds one window"
        )
    train_tok, val_tok = split_tokens(c.tokens())
    train = TokenWindows(train_tok, p.model.block_size, "the training split")
    val = TokenWindows(val_tok, p.model.block_size, "the validation split")
    torch.manual_seed(seed)
    model = GPT(p.model)
    swapped = apply_recipe(model, rec, seed=seed, backend=backend)
    info = {
        "recipe": rec.name,
        "recipe_description": rec.description,
        "preset": preset,
        "seed": seed,
        "model": dataclasses.asdict(p.model),
        "n_params": model.num_params(),
        "corpus": c.info(),
        "train_tokens": len(train_tok),
        "val_tokens": len(val_tok),
        "quantized_layers": swapped,
        "hp_final_fraction": rec.hp_final_fraction,
        "hp_eval": rec.hp_eval,
        "backend": backend,
        "torch": torch.__version__,
    }
    return model, rec, train, val, info


def _hp_eval_loss(model, batch):
    """The default loss, computed in high precision when the model is in eval mode
    (the trainer's evaluation), as the recipe's FP4 loss otherwise."""
    if model.training:
        return default_loss(model, batch)
    with quantization_disabled(model):
        return default_loss(model, batch)


def run_training(recipe: str | Recipe = "bf16", preset: str = "ci", *, steps: Optional[int] = None, seed: int = 0,
                 out: Optional[str] = None, resume: bool = False, overwrite: bool = False,
                 corpus: Optional[str] = None,
                 backend: str = "auto", hp_final_fraction: Optional[float] = None, device: str = "auto",
                 eval_every: Optional[int] = None, progress: bool = True, hooks: Sequence[Callable] = (),
                 log: Callable[[str], None] = lambda s: None,
                 trainer_factory: Callable[..., Trainer] = Trainer) -> TrainResult:
    """Build the model for ``preset``, apply ``recipe`` and train; the CLI's engine.

    ``steps``: default the preset's. ``out``: directory for ``metrics.jsonl`` and
    checkpoints (``None``: write nothing; ``resume`` needs it). ``resume``
    continues the run in ``out`` after checking that its checkpoint is intact and
    was made with the same recipe, preset, seed, corpus, torch version and, under
    ``torchrun``, the same processes and settings (:mod:`fp4lib.training.checkpoint`);
    ``overwrite`` lets a fresh run replace the run in a directory that is not
    empty (the previous run stays until the new run's first checkpoint). Without
    either, a fresh run needs ``out`` new or empty. A ``ValueError``
    (:class:`~fp4lib.training.checkpoint.RunDirError`) says what is wrong.
    ``hp_final_fraction`` overrides the recipe's final high-precision stretch.
    ``log`` receives the human-readable summary lines. ``trainer_factory``: called
    like :class:`~fp4lib.training.loop.Trainer` (model, data, config, ``loss_fn``,
    ``hooks``, ``run_info``) to make the trainer; the data-parallel one under
    ``torchrun`` comes from :mod:`fp4lib.training.distributed`.
    """
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if resume and out is None:
        raise ValueError("resume needs out, the directory holding ckpt.pt")
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if hp_final_fraction is not None:
        if not rec.quantized:
            raise ValueError(f"hp_final_fraction applies to a quantized recipe, not {rec.name!r}")
        rec = rec.replace(hp_final_fraction=hp_final_fraction)
    model, rec, train, val, info = build_run(rec, preset, seed=seed, corpus=corpus, backend=backend)
    cfg = PRESETS[preset].train_config(steps=steps, seed=seed, out_dir=out, device=device, eval_every=eval_every,
                                       progress=progress)
    switch = hp_switch_step(rec, cfg.steps)
    all_hooks = list(hooks)
    if switch is not None:
        all_hooks.append(lambda trainer, step: set_quantization(trainer.model, step < switch))
    info.update(steps=cfg.steps, hp_switch_step=switch)
    if resume and current_checkpoint(out) is None:
        raise ResumeError(f"no checkpoint in {out} to resume from")
    trainer = trainer_factory(model, train, val, cfg, loss_fn=_hp_eval_loss if rec.hp_eval else default_loss,
                              hooks=all_hooks, run_info=info)
    m = PRESETS[preset].model
    log(f"recipe {rec.name}: {rec.description}")
    log(f"model: {info['n_params'] / 1e6:.2f}M parameters (d={m.n_embd}, {m.n_layer} layers, {m.n_head} heads, "
        f"context {m.block_size}); batch {cfg.batch_size}; {cfg.steps} steps; seed {seed}")
    c = info["corpus"]
    log(f"corpus: {c['name']}, {c['bytes']} bytes, sha256 {c['sha256'][:16]}; train {info['train_tokens']} / "
        f"val {info['val_tokens']} tokens")
    log(f"quantized linears: {len(info['quantized_layers'])}" + (f" (high precision from step {switch})" if switch else ""))
    log(f"device: {trainer.device} ({trainer.precision}), fake-quant backend {backend}")
    result = trainer.train(resume=resume, overwrite=overwrite)
    return result
