"""Storing and checking the gradient-fidelity records (:mod:`fp4lib.study.gradients`).

``gradients.json`` holds the study (:data:`~fp4lib.study.gradients.FIDELITY`);
``gradients_check.json`` the small slice (:data:`~fp4lib.study.gradients.FIDELITY_CHECK`)
that ``python -m fp4lib.study check`` measures again, with one reference per numeric
environment, as the loss study's re-run run. Both are current while today's code
computes the stored behaviour digests (:mod:`fp4lib.study.behaviour`), with the same
torch release, study definition and corpus.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..training.data import load_corpus
from ..training.run import PRESETS
from .behaviour import canary_fingerprint, load_behaviour, numerics_digest, store_behaviour, training_digest
from .check import behaviour_problem, read_result, record_problem, write_result
from .gradients import FIDELITY, FIDELITY_CHECK, FidelityStudy, measure
from .provenance import code_hash, describe_environment, machine_info, numeric_fingerprint, same_environment

__all__ = ["FIDELITY_FILES", "CHECK_BACKEND", "CHECK_FACTOR", "CHECK_FLOOR", "make_record", "store_record", "stale_fidelity",
           "flat_numbers", "check_verdict", "add_reference"]

FIDELITY_FILES = {FIDELITY.name: FIDELITY, FIDELITY_CHECK.name: FIDELITY_CHECK}

CHECK_BACKEND = "fused"
"""The slice runs eagerly (the compiled path gives the same bits, and the loss study's
re-run check already exercises it): a minute of compiling saved in every check."""

CHECK_FACTOR = 2.0
CHECK_FLOOR = 1e-3
"""Tolerance mode of the slice's check. ``D`` is the largest relative difference
between any two stored environments' values of any one number,
``|a - b| / max((|a| + |b|) / 2, CHECK_FLOOR)``; a fresh number passes when it lies
within ``CHECK_FACTOR * D * max(|center|, CHECK_FLOOR)`` of the midrange of the
stored values. (The floor keeps numbers near zero, such as the look-ahead
differences of a few 1e-4 nats, from setting a relative scale of their own.)

Where it comes from: the slice stores three references, ATen's AVX512, AVX2 and
``default`` kernels on one CPU. Their numbers differ by up to ``D`` = 4.2% (a
look-ahead difference); taking each reference in turn as the fresh one and the
other two as stored, the farthest (``default``) lies 1.5 ``D`` from the others'
midrange, the others within 0.75 ``D``. A factor of 2 passes each of them. A
per-number band (each number's own spread between environments) does not work
here: numbers that happen to agree closely in two environments differ by 50 to
100 times that spread in the third."""


def make_record(study: FidelityStudy, backend: str = "auto", log: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """Measure ``study`` and return its record with provenance."""

    hash_before = code_hash()
    threads = torch.get_num_threads()
    if study.name == FIDELITY_CHECK.name:  # the slice: one thread and the eager fused path, wherever it runs
        torch.set_num_threads(1)
        backend = CHECK_BACKEND
    try:
        data = measure(study, backend, log, jobs=1 if study.name == FIDELITY_CHECK.name else jobs)
        fingerprint = numeric_fingerprint("cpu", "fp32")
        machine = machine_info()
    finally:
        torch.set_num_threads(threads)
    corpus = load_corpus(None, PRESETS[study.preset].corpus_bytes).info()
    return {
        "name": study.name, "definition": study.definition(), "data": data,
        "command": f"python -m fp4lib.study gradients --only {study.name}",
        "machine": machine, "code_hash": hash_before, "corpus": corpus, "torch": torch.__version__,
        "fingerprint": fingerprint, "backend": backend,
        "digests": [numerics_digest(), training_digest()], "canary": canary_fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def store_record(results_dir, record: dict) -> Path:
    """Write ``record`` (the slice's with its first reference) beside the loss study's results."""

    numerics, training = record.pop("digests")
    record["behaviour"] = store_behaviour(results_dir, numerics, record.pop("canary"), training)
    if record["name"] == FIDELITY_CHECK.name:
        record["references"] = [{"fingerprint": record["fingerprint"], "numbers": flat_numbers(record["data"])}]
    path = Path(results_dir) / f"{record['name']}.json"
    write_result(path, record)
    return path


def stale_fidelity(results_dir) -> Dict[str, str]:
    """Gradient-fidelity records that are missing or stale, with the reason (as the loss study's)."""
    results_dir = Path(results_dir)
    problem = behaviour_problem(results_dir)
    current_id = (load_behaviour(results_dir) or {}).get("id")
    corpus_sha: Dict[str, str] = {}
    out = {}
    for name, study in FIDELITY_FILES.items():
        why = record_problem(results_dir / f"{name}.json", study.definition(), study.preset, problem, current_id,
                             corpus_sha, what="study")
        if why:
            out[name] = why
    return out


def flat_numbers(data: dict) -> List[float]:
    """Every number of a record's cells and states, in a fixed order (the check compares these)."""
    out: List[float] = []

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k])
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))
    walk({"cells": data["cells"], "states": data["states"]})
    return out


def check_verdict(stored: dict, fresh: dict) -> Tuple[bool, str]:
    """The slice measured again against the stored references: exact or tolerance mode."""
    refs = stored.get("references") or []
    fp = fresh["fingerprint"]
    numbers = flat_numbers(fresh["data"])
    same = [r for r in refs if same_environment(r["fingerprint"], fp)]
    if same:
        ref = same[0]["numbers"]
        if len(ref) == len(numbers) and ref == numbers:
            return True, f"mode exact ({describe_environment(fp)}): all {len(numbers)} numbers reproduce"
        diff = max((abs(a - b) for a, b in zip(ref, numbers)), default=math.inf) if len(ref) == len(numbers) else math.inf
        return False, f"mode exact ({describe_environment(fp)}): the numbers differ from the stored ones by up to {diff:.3g}"
    if len(refs) < 2:
        return False, (f"no stored reference for this environment ({describe_environment(fp)}) and too few "
                       f"({len(refs)}) for a tolerance; add one with: python -m fp4lib.study reference")
    cols = list(zip(*[r["numbers"] for r in refs]))
    if len(cols) != len(numbers) or any(len(r["numbers"]) != len(numbers) for r in refs):
        return False, "the slice holds other quantities than the stored references"
    scale = lambda a, b: max((abs(a) + abs(b)) / 2, CHECK_FLOOR)
    spread = max(abs(a - b) / scale(a, b) for col in cols for a in col for b in col)
    worst = (0.0, 0, 0.0, 0.0)
    for i, (v, col) in enumerate(zip(numbers, cols)):
        center = (max(col) + min(col)) / 2
        allowed = CHECK_FACTOR * spread * max(abs(center), CHECK_FLOOR)
        excess = abs(v - center) / allowed if allowed else (math.inf if v != center else 0.0)
        worst = max(worst, (excess, i, abs(v - center), allowed))
    head = (f"mode tolerance ({describe_environment(fp)}; each number within {CHECK_FACTOR:g} x the largest relative "
            f"difference between the {len(refs)} stored environments, {spread:.2%}): ")
    if worst[0] <= 1.0:
        return True, head + f"passed; closest call number {worst[1]}, |diff| {worst[2]:.3g} of an allowed {worst[3]:.3g}"
    return False, head + f"FAILED at number {worst[1]}: |diff| {worst[2]:.3g}, allowed {worst[3]:.3g}"


def add_reference(results_dir, fresh: dict) -> int:
    """Add (or replace) this environment's reference in the stored slice; the number of environments."""
    path = Path(results_dir) / f"{FIDELITY_CHECK.name}.json"

    stored = read_result(path)
    entry = {"fingerprint": fresh["fingerprint"], "numbers": flat_numbers(fresh["data"])}
    refs = [r for r in stored.get("references", []) if not same_environment(r["fingerprint"], entry["fingerprint"])]
    stored["references"] = refs + [entry]
    write_result(path, stored)
    return len(stored["references"])


def load_fidelity(results_dir, name: str = FIDELITY.name) -> Optional[dict]:
    """The stored record ``name`` (default the study), or ``None``."""

    path = Path(results_dir) / f"{name}.json"
    return read_result(path) if path.is_file() else None
