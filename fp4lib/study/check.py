"""Reading stored results, and checking them: staleness and the re-run check's two modes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import definition
from .definition import Run
from .provenance import describe_environment, same_environment, torch_release
from .runner import REFERENCE_KEYS

__all__ = ["TOLERANCE_FACTOR", "TOLERANCE_FLOOR", "load_results", "read_result", "stale_results",
           "behaviour_problem", "record_problem", "write_result", "compare_losses", "tolerance_band", "rerun_verdict", "require_results_dir"]

TOLERANCE_FACTOR = 2.0
"""Tolerance mode allows this many times the largest difference measured between the
stored environments' validation losses (at any validation step), around their midrange.

Where it comes from: the record of the re-run check's run (``repro_nvfp4_hp_final_s0``,
60 steps, validation at steps 50 and 60) stores five references: ATen's AVX512,
``default`` and AVX2 kernels on a CPU with AMX, and AVX512 and ``default`` on one
without. Their validation losses lie within 0.030 nats of each other. Taking each
reference in turn as the fresh run and the other four as the stored ones, the
farthest one (the AVX2 kernels) lies 1.78 times the others' largest difference from
their midrange; the other four lie within 0.75 times. (The difference does not grow
between steps 50 and 60: 0.030, then 0.029. So one width serves every validation
step; measured at each step alone, the AVX2 run would lie 2.1 times away at step 50.) A factor of 2 passes every one of
them. A run whose losses are all 3% off (0.08 nats at a loss of 2.7) lies 2.2 to 3.3
times the five references' largest difference from their midrange, and fails.

Training losses are left out: one batch's loss is noisy, and environments differ by up
to 0.15 nats there (five times their validation difference), so a band built from them
let through a run whose validation losses were all 12% off."""
TOLERANCE_FLOOR = 1e-5


def require_results_dir(results_dir) -> Path:
    """``results_dir`` as a path if it is a directory; else a ``ValueError`` saying where it was looked for."""
    path = Path(results_dir)
    if not path.is_dir():
        raise ValueError(f"the results directory {str(path)!r} was not found (looked in {Path.cwd()}); run from the "
                         f"repository root or pass --results DIR")
    return path


def read_result(path) -> dict:
    """One stored result record; a ``ValueError`` naming the file if it is empty, not JSON or not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})")
    if not text.strip():
        raise ValueError(f"{path}: empty; a stored result is a JSON object")
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a stored result is a JSON object")
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: holds a JSON {type(rec).__name__}, not the JSON object of a stored result")
    return rec


def load_results(results_dir, names: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """Stored results in ``results_dir`` by run name (the study's, or ``names``; missing ones are left out).

    The directory is always given: a pip-installed ``fp4lib`` holds no results
    (the book's are ``experiments/results`` in its repository).
    """
    results_dir = Path(results_dir)
    wanted = list(names) if names is not None else [r.name for r in definition.STUDY]
    out = {}
    for name in wanted:
        path = results_dir / f"{name}.json"
        if path.is_file():
            out[name] = read_result(path)
    return out


def _current_corpus_sha(preset: str) -> str:
    from ..training.data import load_corpus
    from ..training.run import PRESETS

    return load_corpus(None, PRESETS[preset].corpus_bytes).sha256


def behaviour_problem(results_dir, training: bool = False) -> Optional[str]:
    """Why the stored study's code and today's code compute other numbers, or ``None``.

    Compares :func:`~fp4lib.study.behaviour.numerics_digest` with the stored one,
    and with ``training`` also :func:`~fp4lib.study.behaviour.training_digest`
    where one was stored for this numeric environment.
    """
    from .behaviour import BEHAVIOUR_FILE, canary_fingerprint, load_behaviour, numerics_digest, training_digest, training_entry
    stored = load_behaviour(results_dir)
    if stored is None:
        return f"no {BEHAVIOUR_FILE} in {results_dir}: nothing says what the code that made the results computes"
    now = numerics_digest()
    if stored["numerics"] != now:
        return (f"the quantizers compute other numbers (numerics digest {stored['numerics'][:12]} stored, "
                f"{now[:12]} now)")
    if training:
        entry = training_entry(stored, canary_fingerprint())
        if entry is not None:
            digest = training_digest()
            if entry["digest"] != digest:
                return (f"training computes other numbers in this environment (training digest "
                        f"{entry['digest'][:12]} stored, {digest[:12]} now)")
    return None


def write_result(path, record: dict) -> None:
    """Write a stored record as JSON, whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def record_problem(path: Path, definition_now: dict, preset: str, problem: Optional[str], current_id: Optional[str],
                   corpus_sha: Dict[str, str], what: str = "run") -> Optional[str]:
    """Why the stored record at ``path`` is missing or stale, or ``None`` (see :func:`stale_results`).

    ``problem``: :func:`behaviour_problem`'s answer, computed once for every record;
    ``current_id``: the stored behaviour id; ``corpus_sha``: a cache, preset -> the
    current corpus's SHA-256; ``what``: what the definition defines, for the message.
    """
    if not path.is_file():
        return "missing"
    try:
        rec = read_result(path)
    except ValueError as e:
        return f"unreadable: {e}"
    if problem:
        return problem
    if (rec.get("behaviour") or {}).get("id") != current_id:
        return "made by code whose behaviour is not the stored study's (behaviour id differs)"
    if torch_release(rec.get("torch", "")) != torch_release(torch.__version__):
        return f"made with torch {rec.get('torch')}, here {torch.__version__}"
    if rec.get("definition") != definition_now:
        return f"the {what}'s definition changed"
    if preset not in corpus_sha:
        corpus_sha[preset] = _current_corpus_sha(preset)
    if rec.get("corpus", {}).get("sha256") != corpus_sha[preset]:
        return (f"made on another corpus ({rec.get('corpus', {}).get('name')}, sha256 "
                f"{str(rec.get('corpus', {}).get('sha256'))[:12]}; here {corpus_sha[preset][:12]})")
    return None


def stale_results(results_dir, runs: Optional[Sequence[Run]] = None, training: bool = False) -> Dict[str, str]:
    """Runs whose stored result is missing or stale, with the reason (empty: all fresh).

    Stale means: made by code that computes other numbers than today's
    (:func:`behaviour_problem`; ``training=True`` also runs the training canary,
    about half a minute), with another torch release, with another run
    definition, or on another corpus. Moving, renaming or documenting code leaves
    results current.
    """
    from .behaviour import load_behaviour

    runs = definition.STUDY if runs is None else runs
    results_dir = require_results_dir(results_dir)
    problem = behaviour_problem(results_dir, training)
    current_id = (load_behaviour(results_dir) or {}).get("id")
    corpus_sha: Dict[str, str] = {}
    problems = {}
    for run in runs:
        why = record_problem(results_dir / f"{run.name}.json", run.definition(), run.preset, problem, current_id,
                             corpus_sha)
        if why:
            problems[run.name] = why
    return problems


def _points(record: dict) -> List[Tuple[int, float]]:
    """A record's losses as ``(step, loss)``: every training loss, then every validation loss."""
    return ([(i + 1, v) for i, v in enumerate(record["train_losses"])]
            + [(int(s), v) for s, v in record["val_losses"]])


def compare_losses(stored: dict, fresh: dict) -> float:
    """Largest absolute difference of the training and validation losses of two records."""
    a, b = _points(stored), _points(fresh)
    if [s for s, _ in a] != [s for s, _ in b]:
        return float("inf")
    return max((abs(x - y) for (_, x), (_, y) in zip(a, b)), default=0.0)


def _val_points(record: dict) -> List[Tuple[int, float]]:
    """A record's validation losses as ``(step, loss)``."""
    return [(int(s), v) for s, v in record["val_losses"]]


def tolerance_band(references: Sequence[dict], factor: float = TOLERANCE_FACTOR,
                   floor: float = TOLERANCE_FLOOR) -> Tuple[List[int], List[float], List[float]]:
    """``(steps, center, tolerance)`` per validation loss, from one run made in several environments.

    Validation losses only (see :data:`TOLERANCE_FACTOR`). The center is the midrange
    of the references at each step. The tolerance is the same at every step:
    ``factor`` times the largest difference between any two references at any
    validation step, plus ``floor``. Needs at least two references
    with the same validation steps. The band is only as wide as the stored environments
    happen to differ: two environments that agree closely give a narrow one.

    Examples
    --------
    >>> refs = [{"train_losses": [5.0, 4.0], "val_losses": [[1, 4.5], [2, 4.1]]},
    ...         {"train_losses": [5.3, 4.4], "val_losses": [[1, 4.5], [2, 4.12]]}]
    >>> steps, center, tol = tolerance_band(refs, factor=2, floor=0)
    >>> steps, [round(c, 3) for c in center], [round(t, 3) for t in tol]
    ([1, 2], [4.5, 4.11], [0.04, 0.04])
    """
    if len(references) < 2:
        raise ValueError(f"a tolerance needs runs from at least two environments, got {len(references)}")
    curves = [_val_points(r) for r in references]
    steps = [s for s, _ in curves[0]]
    if not steps:
        raise ValueError("the references hold no validation losses")
    if any([s for s, _ in c] != steps for c in curves):
        raise ValueError("the references do not have the same validation steps")
    values = [[v for _, v in c] for c in curves]
    spread = max(max(col) - min(col) for col in zip(*values))
    center = [(max(col) + min(col)) / 2 for col in zip(*values)]
    return steps, center, [factor * spread + floor for _ in steps]


def rerun_verdict(stored: dict, fresh: dict) -> Tuple[bool, str]:
    """Compare a fresh run with a stored record's references; ``(passed, message)``.

    **Exact mode** where a reference was made in the fresh run's numeric
    environment (equal :func:`numeric_fingerprint`): every loss must be identical.
    **Tolerance mode** elsewhere: every validation loss within :func:`tolerance_band`
    of the references from the other environments.
    """
    refs = stored.get("references") or [{k: stored[k] for k in REFERENCE_KEYS if k in stored}]
    fp = fresh["fingerprint"]
    same_env = [r for r in refs if same_environment(r.get("fingerprint") or {}, fp)]
    if same_env:
        diff = compare_losses(same_env[0], fresh)
        if diff == 0:
            return True, (f"mode exact (a stored reference was made in this environment: {describe_environment(fp)}): "
                          f"the losses reproduce bit for bit; final val_loss {fresh['final_val_loss']:.6f}")
        return False, (f"mode exact (a stored reference was made in this environment: {describe_environment(fp)}): "
                       f"the losses differ from the stored ones by up to {diff:.3g}; stored final val_loss "
                       f"{same_env[0]['final_val_loss']:.6f}, now {fresh['final_val_loss']:.6f}")
    if len(refs) < 2:
        return False, (f"no stored reference for this environment ({describe_environment(fp)}) and too few references "
                       f"({len(refs)}) to derive a tolerance; add one with: python -m fp4lib.study reference")
    steps, center, tol = tolerance_band(refs)
    points = _val_points(fresh)
    if [s for s, _ in points] != steps:
        return False, "the fresh run has other validation steps than the stored references"
    excess = [(abs(v - c) / t, s, abs(v - c), t) for (s, v), c, t in zip(points, center, tol)]
    worst = max(excess)
    head = (f"mode tolerance (no stored reference for this environment: {describe_environment(fp)}; each validation "
            f"loss must lie within {TOLERANCE_FACTOR:g} x the largest difference between the {len(refs)} stored "
            f"environments' validation losses): ")
    if worst[0] <= 1.0:
        return True, head + (f"passed; the closest call is step {worst[1]}, |diff| {worst[2]:.3g} of an allowed "
                             f"{worst[3]:.3g}; final val_loss {fresh['final_val_loss']:.6f}")
    return False, head + (f"FAILED at step {worst[1]}: |diff| {worst[2]:.3g}, allowed {worst[3]:.3g}; final "
                          f"val_loss {fresh['final_val_loss']:.6f}, stored center {center[-1]:.6f}")
