"""The hyperparameters of one training run (:class:`TrainConfig`) and its learning-rate
schedule (:func:`lr_at`: linear warmup, then cosine decay), which the loop of
:mod:`fp4lib.training.loop` follows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["TrainConfig", "lr_at", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (model and data sizes live elsewhere).

    Steps are numbered from 1; step ``s`` uses the learning rate :func:`lr_at`.
    ``precision``: ``"auto"`` (BF16 autocast on a GPU with BF16 tensor cores, else
    FP32), ``"fp32"`` or ``"bf16"``.
    ``eval_every`` / ``ckpt_every``: evaluate / checkpoint after every that many
    steps and after the last one (0: only after the last). ``out_dir=None``
    writes nothing (no metrics, no checkpoints).
    """

    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    seed: int = 0
    out_dir: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    blowup_factor: Optional[float] = 3.0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr!r}, min_lr={self.min_lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.blowup_factor is not None and not self.blowup_factor > 1:
            raise ValueError(f"blowup_factor must be > 1 or None, got {self.blowup_factor!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (1-based): linear warmup, then cosine from ``lr`` to ``min_lr``.

    Examples
    --------
    >>> cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10)
    >>> [round(lr_at(s, cfg), 3) for s in (1, 10, 55, 100)]
    [0.1, 1.0, 0.5, 0.0]
    """
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
