"""Reading stored results, and checking them: staleness and the re-run check's two modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import definition
from .definition import Run
from .provenance import code_hash, describe_environment
from .runner import REFERENCE_KEYS

__all__ = ["TOLERANCE_FACTOR", "TOLERANCE_FLOOR", "load_results", "read_result", "stale_results", "compare_losses",
           "tolerance_band", "rerun_verdict", "require_results_dir"]

TOLERANCE_FACTOR = 3.0
"""Tolerance mode allows this many times the largest difference measured between the
stored environments' runs (up to the same step)."""
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
    from ..data import load_corpus
    from ..training import PRESETS

    return load_corpus(None, PRESETS[preset].corpus_bytes).sha256


def stale_results(results_dir, runs: Optional[Sequence[Run]] = None) -> Dict[str, str]:
    """Runs whose stored result is missing or stale, with the reason (empty: all fresh).

    Stale means: made by other code (:func:`code_hash`, the re-run check's
    references included), with another torch version, with another run
    definition, or on another corpus.
    """
    runs = definition.STUDY if runs is None else runs
    current = code_hash()
    corpus_sha: Dict[str, str] = {}
    problems = {}
    for run in runs:
        path = Path(results_dir) / f"{run.name}.json"
        if not path.is_file():
            problems[run.name] = "missing"
            continue
        try:
            rec = read_result(path)
        except ValueError as e:
            problems[run.name] = f"unreadable: {e}"
            continue
        if rec.get("code_hash") != current:
            problems[run.name] = f"made by other code (code hash {str(rec.get('code_hash'))[:12]}, now {current[:12]})"
            continue
        old_refs = [r for r in rec.get("references", []) if r.get("code_hash") != current]
        if old_refs:
            problems[run.name] = f"{len(old_refs)} re-run reference(s) made by other code"
            continue
        if rec.get("torch") != torch.__version__:
            problems[run.name] = f"made with torch {rec.get('torch')}, here {torch.__version__}"
            continue
        if rec.get("definition") != run.definition():
            problems[run.name] = "the run's definition changed"
            continue
        if run.preset not in corpus_sha:
            corpus_sha[run.preset] = _current_corpus_sha(run.preset)
        if rec.get("corpus", {}).get("sha256") != corpus_sha[run.preset]:
            problems[run.name] = (f"made on another corpus ({rec.get('corpus', {}).get('name')}, sha256 "
                                  f"{str(rec.get('corpus', {}).get('sha256'))[:12]}; here {corpus_sha[run.preset][:12]})")
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


def tolerance_band(references: Sequence[dict], factor: float = TOLERANCE_FACTOR,
                   floor: float = TOLERANCE_FLOOR) -> Tuple[List[float], List[float]]:
    """``(center, tolerance)`` per loss point, from runs of one run in several environments.

    The center is the midrange of the references. The tolerance at step ``s`` is
    ``factor`` times the largest difference between any two references at any
    point up to step ``s`` (chaotic divergence only grows), plus ``floor``.
    Needs at least two references with the same points.

    Examples
    --------
    >>> refs = [{"train_losses": [5.0, 4.0], "val_losses": [[2, 4.1]]},
    ...         {"train_losses": [5.0, 4.02], "val_losses": [[2, 4.12]]}]
    >>> center, tol = tolerance_band(refs, factor=3, floor=0)
    >>> [round(c, 3) for c in center], [round(t, 3) for t in tol]
    ([5.0, 4.01, 4.11], [0.0, 0.06, 0.06])
    """
    if len(references) < 2:
        raise ValueError(f"a tolerance needs runs from at least two environments, got {len(references)}")
    curves = [_points(r) for r in references]
    steps = [s for s, _ in curves[0]]
    if any([s for s, _ in c] != steps for c in curves):
        raise ValueError("the references do not have the same loss points")
    values = [[v for _, v in c] for c in curves]
    spread = [max(col) - min(col) for col in zip(*values)]
    center = [(max(col) + min(col)) / 2 for col in zip(*values)]
    worst_up_to: Dict[int, float] = {}
    for step, d in sorted(zip(steps, spread)):
        worst_up_to[step] = max(d, max(worst_up_to.values(), default=0.0))
    return center, [factor * worst_up_to[s] + floor for s in steps]


def rerun_verdict(stored: dict, fresh: dict) -> Tuple[bool, str]:
    """Compare a fresh run with a stored record's references; ``(passed, message)``.

    **Exact mode** where a reference was made in the fresh run's numeric
    environment (equal :func:`numeric_fingerprint`): every loss must be identical.
    **Tolerance mode** elsewhere: every loss within :func:`tolerance_band` of the
    references from the other environments.
    """
    refs = stored.get("references") or [{k: stored[k] for k in REFERENCE_KEYS if k in stored}]
    fp = fresh["fingerprint"]
    same_env = [r for r in refs if r.get("fingerprint") == fp]
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
    center, tol = tolerance_band(refs)
    points = _points(fresh)
    if len(points) != len(center):
        return False, "the fresh run has other loss points than the stored references"
    excess = [(abs(v - c) / t, s, abs(v - c), t) for (s, v), c, t in zip(points, center, tol)]
    worst = max(excess)
    head = (f"mode tolerance (no stored reference for this environment: {describe_environment(fp)}; each loss must lie "
            f"within {TOLERANCE_FACTOR:g} x the largest difference between the {len(refs)} stored environments "
            f"up to its step): ")
    if worst[0] <= 1.0:
        return True, head + (f"passed; the closest call is step {worst[1]}, |diff| {worst[2]:.3g} of an allowed "
                             f"{worst[3]:.3g}; final val_loss {fresh['final_val_loss']:.6f}")
    return False, head + (f"FAILED at step {worst[1]}: |diff| {worst[2]:.3g}, allowed {worst[3]:.3g}; final "
                          f"val_loss {fresh['final_val_loss']:.6f}, stored center {center[-1]:.6f}")
