"""A small, model-agnostic training loop (in the spirit of minGPT's ``trainer.py``).

:class:`Trainer` knows nothing about the model: it calls a loss function on
batches drawn from a data object, and takes care of the rest --

* seeding, and the device (CUDA when available, else the CPU) and precision
  (BF16 autocast on GPUs with BF16 tensor cores, else FP32: the CPU, a Colab T4);
* AdamW (weight decay on tensors of two or more dimensions), linear warmup then
  cosine decay of the learning rate, gradient-norm clipping;
* periodic validation loss on fixed batches (the same for every run, so runs can
  be compared pairwise);
* a tqdm progress bar with the loss and tokens/s, and metrics as JSON lines
  (``metrics.jsonl``);
* checkpoints (``ckpt.pt``: model, optimizer, data-sampler and RNG states, loss
  history) and resume: a resumed run reproduces the uninterrupted run's losses.
  Each checkpoint is a directory made current by one atomic rename, with a
  manifest that a resume checks (:mod:`fp4lib.training.checkpoint`); a run holds its
  output directory's lock, and a fresh run refuses a directory that is not empty
  unless told to overwrite it;
* a divergence guard: a NaN/Inf loss or gradient norm, or a loss above
  ``blowup_factor`` times the best loss so far, stops training with
  :class:`TrainingDiverged` naming the step, before the optimizer step and
  without overwriting the last good checkpoint.

Chapter 5 of the book uses it through :mod:`fp4lib.train`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import checkpoint
from .checkpoint import CHECKPOINT_FILE, METRICS_FILE, MANIFEST_FILE
from .config import TrainConfig, lr_at

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "default_loss", "make_optimizer", "resolve_device"]

EVAL_SEED = 1234  # the validation batches are the same in every run


class TrainingDiverged(RuntimeError):
    """Training stopped by the divergence guard. ``step`` and ``loss`` say where."""

    def __init__(self, message: str, step: int, loss: float, checkpoint: Optional[str] = None):
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.checkpoint = checkpoint


def default_loss(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(*batch)`` returning ``(logits, loss)``: the loss."""
    return model(*batch)[1]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device = torch.device("cpu")):
    """The trainer's AdamW: weight decay on the tensors of two or more dimensions only, the
    config's learning rate and betas, PyTorch's fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), **({"fused": True} if device.type == "cuda" else {}))


def _native_bf16(device: torch.device) -> bool:
    """True on CUDA GPUs with BF16 tensor cores (compute capability 8.0+: A100, H100, L4...).

    A Colab T4 (7.5) has none, so "auto" precision trains in FP32 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainResult:
    """What a run produced. ``train_losses[i]`` is the loss of step ``i + 1``;
    ``val_losses`` holds ``(step, loss)`` pairs; ``step_ms`` the wall time of each
    step (milliseconds, evaluation excluded; on a GPU, from the step's start to the
    queuing of its optimizer step, whose GPU work ends within the next step's one
    host sync, so that the median is the steady step time)."""

    final_val_loss: float
    train_losses: List[float]
    val_losses: List[Tuple[int, float]]
    step_ms: List[float]
    steps: int
    out_dir: Optional[str] = None
    resumed_from: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Train ``model`` on batches from ``train_data``; validate on ``val_data``.

    Parameters
    ----------
    model:
        Any ``nn.Module``; moved to the chosen device.
    train_data, val_data:
        Objects with ``sample(batch_size, generator) -> tuple of tensors`` (e.g.
        :class:`fp4lib.training.data.TokenWindows`).
    config:
        :class:`TrainConfig`.
    loss_fn:
        ``loss_fn(model, batch) -> 0-d loss tensor``; default :func:`default_loss`.
    hooks:
        Callables ``hook(trainer, step)`` run before each training step (e.g. the
        switch to high precision for the final stretch). They must depend only on
        the step, so that resuming replays them.
    run_info:
        JSON-serialisable facts about the run (recipe, model size, corpus hash),
        written to the metrics file and the checkpoint.

    Examples
    --------
    >>> import torch
    >>> from fp4lib.training.data import TokenWindows
    >>> from fp4lib.training.model import GPT, GPTConfig
    >>> torch.manual_seed(0) and None
    >>> data = TokenWindows(torch.randint(0, 8, (2000,), dtype=torch.uint8), block_size=16)
    >>> model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    >>> cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, eval_batches=1,
    ...                   progress=False)
    >>> result = Trainer(model, data, data, cfg).train()
    >>> result.train_losses[-1] < result.train_losses[0]
    True
    """

    def __init__(self, model: nn.Module, train_data, val_data, config: TrainConfig,
                 loss_fn: Callable = default_loss, hooks: Sequence[Callable] = (), run_info: Optional[dict] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.loss_fn = loss_fn
        self.hooks = list(hooks)
        self.run_info = dict(run_info or {})
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if _native_bf16(self.device) else "fp32"
        self.precision = precision
        torch.manual_seed(config.seed)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = make_optimizer(model, config, self.device)
        self.step = 0
        self.best_loss = math.inf
        self.train_losses: List[float] = []
        self.val_losses: List[Tuple[int, float]] = []
        self.step_ms: List[float] = []
        self._val_batches = None
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.run_id: Optional[str] = None  # ties the checkpoints of one run to its metrics
        self._metrics_file: Optional[Path] = None  # where records go (staged while replacing a previous run)
        self._checkpoint_dir: Optional[Path] = None  # the checkpoint this run wrote or resumed

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    @property
    def checkpoint_path(self) -> Optional[Path]:
        """``ckpt.pt`` of the checkpoint this trainer last wrote or resumed (``None`` before either)."""
        return self._checkpoint_dir / CHECKPOINT_FILE if self._checkpoint_dir else None

    @property
    def metrics_path(self) -> Optional[Path]:
        return self.out_dir / METRICS_FILE if self.out_dir else None

    def _log(self, record: dict) -> None:
        """Append one record to the metrics file, as one line, flushed."""
        if self.metrics_path is not None:
            with open(self._metrics_file or self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def manifest_fields(self) -> dict:
        """What a resume of this trainer's checkpoints must match
        (:data:`fp4lib.training.checkpoint.MANIFEST_FIELDS`)."""
        info = self.run_info
        corpus = info.get("corpus")
        return {"kind": "plain", "world_size": 1, "dist": None, "amax_reduce": False, "grad_comm": "fp32",
                "recipe": info.get("recipe"), "preset": info.get("preset"), "seed": self.config.seed,
                "corpus_sha256": corpus.get("sha256") if isinstance(corpus, dict) else None,
                "hp_final_fraction": info.get("hp_final_fraction"), "torch": torch.__version__}

    def _find_checkpoint(self, path=None) -> Path:
        """The checkpoint directory to resume: ``path`` (a checkpoint or an output
        directory), else the output directory's current one."""
        where = Path(path) if path else self.out_dir
        if where is None:
            raise FileNotFoundError("no checkpoint to resume from: the trainer has no output directory")
        if (where / MANIFEST_FILE).is_file():
            return where
        found = checkpoint.current_checkpoint(where)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {where}")
        return found

    def _history(self) -> dict:
        return {"train_losses": self.train_losses, "val_losses": self.val_losses, "step_ms": self.step_ms}

    def _committed(self, ckpt_dir: Optional[Path]) -> None:
        """After a checkpoint became current: the metrics are no longer staged."""
        self._checkpoint_dir = ckpt_dir
        self._metrics_file = self.metrics_path

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``eval_batches`` fixed validation batches (model in eval mode)."""
        if self._val_batches is None:
            g = torch.Generator().manual_seed(EVAL_SEED)
            self._val_batches = [self.val_data.sample(self.config.batch_size, g)
                                 for _ in range(self.config.eval_batches)]
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            losses = [self.loss_fn(self.model, self._to_device(batch)).detach().float() for batch in self._val_batches]
        self.model.train(was_training)
        total = 0.0
        for v in torch.stack(losses).tolist():  # one host sync for all batches
            total += v
        return total / len(self._val_batches)

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step, all or nothing: ``ckpt.pt`` and the
        manifest into a staging directory, made current by one atomic rename
        (:func:`fp4lib.training.checkpoint.commit`). Does nothing without an output directory."""
        if self.out_dir is None:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_generator": self.data_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best_loss": self.best_loss,
            "history": self._history(),
            "config": dataclasses.asdict(self.config),
            "run_info": self.run_info,
        }
        staging = checkpoint.stage(self.out_dir, self.step)
        checkpoint.fault("before_rank_files", self.step)
        torch.save(state, staging / CHECKPOINT_FILE)
        checkpoint.fault("before_manifest", self.step)
        checkpoint.write_manifest(staging, self.step, self.manifest_fields(), self.run_id)
        self._committed(checkpoint.commit(self.out_dir, staging, self.step))

    def load_checkpoint(self, path: Optional[str] = None) -> int:
        """Restore everything from a checkpoint; returns its step.

        ``path``: a checkpoint directory or an output directory (default this
        trainer's). Raises ``FileNotFoundError`` when there is none, and
        :class:`fp4lib.training.checkpoint.ResumeError` (a ``ValueError``) when a file is
        corrupt or the checkpoint was made by a run this one does not continue.
        """
        ckpt_dir = self._find_checkpoint(path)
        manifest = checkpoint.verify(ckpt_dir, self.manifest_fields())
        state = checkpoint.torch_load(ckpt_dir / CHECKPOINT_FILE, map_location=self.device)
        self.run_id = manifest.get("run_id")
        self._checkpoint_dir = ckpt_dir
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.best_loss = float(state["best_loss"])
        hist = state["history"]
        self.train_losses = list(hist["train_losses"])
        self.val_losses = [tuple(v) for v in hist["val_losses"]]
        self.step_ms = list(hist["step_ms"])
        return self.step

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics lines written after ``step`` (by a run that went on past its
        checkpoint) and a partial last line (with a warning); rewritten atomically."""
        if self.metrics_path is None or not self.metrics_path.exists():
            return
        keep = [rec for rec in checkpoint.read_metrics(self.metrics_path) if rec.get("step", 0) <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        os.replace(tmp, self.metrics_path)

    def _diverged(self, step: int, loss: float, reason: str) -> TrainingDiverged:
        ckpt = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.exists() else None
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written"
        msg = f"training diverged at step {step}: {reason} (loss {loss}); {where}"
        self._log({"step": step, "event": "diverged", "loss": loss if math.isfinite(loss) else str(loss),
                   "reason": reason})
        return TrainingDiverged(msg, step=step, loss=loss, checkpoint=str(ckpt) if ckpt else None)

    # ------------------------------------------------------------------ training
    def _claim(self, resume: bool, overwrite: bool):
        """Hold the output directory for this run (:func:`fp4lib.training.checkpoint.claim`)."""
        return checkpoint.claim(self.out_dir, resume=resume, overwrite=overwrite)

    def train(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Run (or, with ``resume=True``, continue) training to ``config.steps``.

        With an output directory the run holds its lock throughout. A fresh run
        needs the directory empty, or ``overwrite=True``: the previous run's
        checkpoint and metrics then stay until this run's first checkpoint
        replaces them. Raises :class:`TrainingDiverged` from the divergence guard,
        ``FileNotFoundError`` when ``resume`` finds no checkpoint, and
        :class:`fp4lib.training.checkpoint.RunDirError` (a ``ValueError``) for a directory
        that is in use, not empty, not writable, or holds a checkpoint this run
        does not continue.
        """
        if self.out_dir is None:
            return self._train(resume, None)
        with self._claim(resume, overwrite) as held:
            return self._train(resume, held)

    def _train(self, resume: bool, held) -> TrainResult:
        cfg = self.config
        resumed_from = self._open_metrics(resume, held)
        self.model.train()
        tokens_per_step = None
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                loss_value, grad_norm, lr, ms, tokens = self._train_step(step)
                if tokens_per_step is None:
                    tokens_per_step = tokens
                self._end_step(step, loss_value, grad_norm, lr, ms, tokens_per_step, bar)
        finally:
            if bar is not None:
                bar.close()
        if not self.val_losses or self.val_losses[-1][0] != self.step:
            val = self.evaluate()  # resumed at the end, or a run of zero new steps
            self.val_losses.append((self.step, val))
        return TrainResult(
            final_val_loss=self.val_losses[-1][1],
            train_losses=list(self.train_losses),
            val_losses=list(self.val_losses),
            step_ms=list(self.step_ms),
            steps=self.step,
            out_dir=str(self.out_dir) if self.out_dir else None,
            resumed_from=resumed_from,
            info=dict(self.run_info, device=str(self.device), precision=self.precision),
        )

    def _open_metrics(self, resume: bool, held) -> Optional[int]:
        """Restore a resumed run (returning its checkpoint's step) or start a fresh run's
        metrics file (staged while ``held`` replaces a previous run); log either event."""
        if resume:
            resumed_from = self.load_checkpoint()
            self._metrics_file = self.metrics_path
            self._truncate_metrics(resumed_from)
            self._log({"step": resumed_from, "event": "resume"})
            return resumed_from
        if self.metrics_path is not None:
            self.run_id = checkpoint.new_run_id()
            staged = held is not None and held.stage_metrics
            self._metrics_file = (self.metrics_path.with_name(METRICS_FILE + checkpoint.STAGED_SUFFIX) if staged
                                  else self.metrics_path)
            self._metrics_file.write_text("")
            self._log({"step": 0, "event": "start", "run_id": self.run_id, "config": dataclasses.asdict(self.config),
                       "run_info": self.run_info, "device": str(self.device), "precision": self.precision})
        return None

    def _progress_bar(self):
        """A tqdm bar from the current step to ``config.steps`` (disabled without ``progress``)."""
        cfg = self.config
        try:
            from tqdm.auto import tqdm
            return tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, file=sys.stderr,
                        dynamic_ncols=True, desc=self.run_info.get("recipe", "train"))
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return None

    def _train_step(self, step: int) -> Tuple[float, float, float, float, int]:
        """Hooks, forward, backward, clipping, the divergence guard and the optimizer step of ``step``.

        Returns the loss, the gradient norm, the learning rate, the step's wall time
        (milliseconds) and the tokens in its batch."""
        cfg = self.config
        checkpoint.fault("stall", step, getattr(getattr(self, "world", None), "rank", 0))
        for hook in self.hooks:
            hook(self, step)
        t0 = time.perf_counter()
        batch = self._to_device(self.train_data.sample(cfg.batch_size, self.data_generator))
        with self._autocast():
            loss = self.loss_fn(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm_t = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm_t, "full_tensor"):  # a DTensor (FSDP2): its value on every rank
            grad_norm_t = grad_norm_t.full_tensor()
        # The step's one host sync: the loss and the gradient norm read together, before
        # the optimizer step, so that the divergence guard can still stop it.
        loss_value, grad_norm = torch.stack([loss.detach().float(), grad_norm_t.float()]).tolist()
        self._guard(step, loss_value, grad_norm)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        # No synchronisation for the clock: on a GPU the optimizer step queued here
        # finishes inside the next step's read, so the median is the steady step time.
        ms = (time.perf_counter() - t0) * 1e3
        return loss_value, grad_norm, lr, ms, batch[0].numel()

    def _guard(self, step: int, loss_value: float, grad_norm: float) -> None:
        """The divergence guard: raise :class:`TrainingDiverged` for a non-finite loss or
        gradient norm, or a loss above ``blowup_factor`` times the best loss so far."""
        cfg = self.config
        if not math.isfinite(loss_value):
            raise self._diverged(step, loss_value, "the loss is not finite")
        if cfg.blowup_factor is not None and loss_value > cfg.blowup_factor * self.best_loss:
            raise self._diverged(step, loss_value,
                                 f"the loss exceeds {cfg.blowup_factor} x the best loss so far ({self.best_loss:.4f})")
        if not math.isfinite(grad_norm):
            raise self._diverged(step, loss_value, "the gradient norm is not finite")

    def _end_step(self, step: int, loss_value: float, grad_norm: float, lr: float, ms: float, tokens_per_step: int,
                  bar) -> None:
        """Record a finished step: history, metrics line, validation, progress bar and checkpoint when due."""
        cfg = self.config
        self.step = step
        self.best_loss = min(self.best_loss, loss_value)
        self.train_losses.append(loss_value)
        self.step_ms.append(ms)
        tok_s = tokens_per_step / (ms / 1e3)
        self._log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "step_ms": ms,
                   "tokens_per_s": tok_s})
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            val = self.evaluate()
            self.val_losses.append((step, val))
            self._log({"step": step, "val_loss": val})
        if bar is not None:
            post = {"loss": f"{loss_value:.4f}", "tok/s": f"{tok_s:,.0f}"}
            if self.val_losses:
                post["val"] = f"{self.val_losses[-1][1]:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            self.save_checkpoint()
