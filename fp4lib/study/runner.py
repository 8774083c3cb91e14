"""Train one run of the study and make its result record."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .definition import UNDERFLOW_MODULE, Run
from .provenance import code_hash, machine_info, numeric_fingerprint

__all__ = ["REFERENCE_KEYS", "run_experiment"]

REFERENCE_KEYS = ("fingerprint", "code_hash", "final_val_loss", "train_losses", "val_losses", "created")
"""What a re-run reference keeps of a record."""


def run_experiment(run: Run, results_dir: Path, runs_dir: Path, backend: str = "auto",
                   progress: bool = True, write: bool = True, code_hash_value: Optional[str] = None,
                   digests: Optional[Tuple[str, str]] = None) -> dict:
    """Train ``run`` and return (and, with ``write``, store) its result record.

    ``code_hash_value``: the :func:`code_hash` of the code that runs (default:
    computed now, before training). ``digests``: its ``(numerics, training)``
    digests (:mod:`fp4lib.study.behaviour`; default: computed now, with ``write``),
    stored in ``behaviour.json`` beside the result.
    """
    from ..training.run import PRESETS, run_training
    from .behaviour import canary_fingerprint, numerics_digest, store_behaviour, training_digest

    code_hash_value = code_hash_value or code_hash()
    if write and digests is None:
        digests = (numerics_digest(), training_digest())

    captured: Dict[str, dict] = {}
    hooks = []
    if run.capture_steps:
        from ..training.run import build_run

        from ..training.diagnostics import underflow_capture_hook

        _, _, _, val, _ = build_run("bf16", run.preset)
        batch = val.sample(32, torch.Generator().manual_seed(0))
        hooks.append(underflow_capture_hook(run.capture_steps, captured, batch, PRESETS[run.preset].model.n_layer,
                                            UNDERFLOW_MODULE))
    out = Path(runs_dir) / run.name
    t0 = time.time()
    result = run_training(run.recipe, run.preset, steps=run.steps, seed=run.seed, out=str(out), overwrite=True, backend=backend,
                          hp_final_fraction=run.hp_final_fraction, progress=progress, hooks=hooks)
    ms = sorted(result.step_ms)
    record = {
        "name": run.name,
        "definition": run.definition(),
        "final_val_loss": result.final_val_loss,
        "train_losses": result.train_losses,
        "val_losses": [list(v) for v in result.val_losses],
        "step_ms_median": ms[len(ms) // 2],
        "step_ms": [round(t, 3) for t in result.step_ms],
        "wall_s": round(time.time() - t0, 1),
        "underflow": captured or None,
        "command": run.command(),
        "runner_command": f"python -m fp4lib.study run --only {run.name}",
        "seed": run.seed,
        "machine": machine_info(),
        "code_hash": code_hash_value,
        "corpus": result.info["corpus"],
        "torch": torch.__version__,
        "fingerprint": numeric_fingerprint(str(result.info.get("device")), str(result.info.get("precision"))),
        "backend": backend,
        "device": result.info.get("device"),
        "run_info": {k: v for k, v in result.info.items() if k not in ("corpus",)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if run.study == "repro":  # the re-run check's references: one per numeric environment
        record["references"] = [{k: record[k] for k in REFERENCE_KEYS}]
    if write:
        record["behaviour"] = store_behaviour(results_dir, digests[0], canary_fingerprint(), digests[1])
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{run.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    return record
