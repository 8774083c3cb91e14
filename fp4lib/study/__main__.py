"""The study's command line: ``python -m fp4lib.study run|list|check|reference``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from . import DEFAULT_RESULTS, DEFAULT_RUNS, __doc__ as STUDY_DOC
from .check import load_results, require_results_dir, rerun_verdict, stale_results, write_result
from . import definition
from .definition import Run
from .behaviour import canary_fingerprint, load_behaviour, numerics_digest, store_behaviour, training_digest, training_entry
from .provenance import code_hash, describe_environment, same_environment
from .runner import REFERENCE_KEYS, run_experiment
from . import fidelity


def _select(names: Optional[Sequence[str]], study: Optional[str]) -> List[Run]:
    known = {r.name: r for r in definition.STUDY}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--only: unknown run(s) {unknown}; known runs: {sorted(known)}")
        runs = [known[n] for n in names]
    else:
        runs = list(definition.STUDY)
    if study:
        runs = [r for r in runs if r.study == study]
    return runs


def cmd_run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = _select(args.only, args.study)
    if args.stale:
        require_results_dir(args.results)
        stale = stale_results(args.results, runs, training=True)
        runs = [r for r in runs if r.name in stale]
    start_hash = code_hash()  # the code this process runs (imported at start)
    digests = (numerics_digest(), training_digest()) if runs else None
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}: {run.command()}", flush=True)
        rec = run_experiment(run, Path(args.results), Path(args.runs), backend=args.backend,
                             progress=not args.no_progress, code_hash_value=start_hash, digests=digests)
        print(f"  final val_loss {rec['final_val_loss']:.4f}, median step {rec['step_ms_median']:.0f} ms, "
              f"{rec['wall_s']:.0f} s", flush=True)
    if runs and numerics_digest() != digests[0]:
        print("warning: fp4lib's quantizers changed while the study ran; the results made before the change "
              "will show as stale", file=sys.stderr)
        return 1
    return 0


def cmd_list(args) -> int:
    require_results_dir(args.results)
    stale = stale_results(args.results, definition.STUDY)
    for run in definition.STUDY:
        status = stale.get(run.name, "fresh")
        print(f"{run.name:24s} {run.study:10s} {run.recipe:16s} seed {run.seed} steps {run.steps:4d}  {status}")
    return 0


def _rerun(name: str, results_dir, backend: str) -> Tuple[dict, dict]:
    """Train the stored run ``name`` again here, with its thread count; ``(stored, fresh)``."""
    import tempfile

    run = {r.name: r for r in definition.STUDY}[name]
    stored = load_results(results_dir, [run.name]).get(run.name)
    if stored is None:
        raise ValueError(f"no stored result for {run.name}; make it with: python -m fp4lib.study run --only {run.name}")
    threads = stored.get("machine", {}).get("torch_threads")
    if threads and threads != torch.get_num_threads():
        print(f"using {threads} torch thread(s), as the stored run did")
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = run_experiment(run, Path(tmp), Path(tmp), backend=backend, progress=False, write=False)
    return stored, fresh


def cmd_check(args) -> int:
    require_results_dir(args.results)
    stale = stale_results(args.results, definition.STUDY, training=True)
    if stale:
        print(f"study check FAILED: {len(stale)} stored result(s) are missing or stale for the current code:",
              file=sys.stderr)
        for name, why in stale.items():
            print(f"  {name}: {why}", file=sys.stderr)
        only = " ".join(sorted(stale))
        print(f"refresh with:  python -m fp4lib.study run --stale   (or: make experiments)\n"
              f"  or only these: python -m fp4lib.study run --only {only}", file=sys.stderr)
        return 1
    behaviour = load_behaviour(args.results)
    here = training_entry(behaviour, canary_fingerprint())
    print(f"all {len(definition.STUDY)} stored results are current: today's quantizers compute the stored numerics "
          f"digest {behaviour['numerics'][:12]}, " + (
              f"and the training canary reproduces the digest stored for this environment ({here['digest'][:12]})"
              if here else "and no training digest was stored for this environment (the re-run below checks training)")
          + f"; torch {torch.__version__}")
    if not args.no_rerun:
        stored, fresh = _rerun(args.rerun, args.results, args.backend)
        ok, message = rerun_verdict(stored, fresh)
        if not ok:
            print(f"study check FAILED: re-running {args.rerun}: {message}", file=sys.stderr)
            return 1
        print(f"re-ran {args.rerun}: {message}")
    return 0 if args.runs_only else _check_gradients(args)


def cmd_reference(args) -> int:
    """Add (or replace) this environment's run of the re-run check's run to its stored record."""
    name = args.rerun
    require_results_dir(args.results)
    stale = stale_results(args.results, [r for r in definition.STUDY if r.name == name])
    if stale:
        raise ValueError(f"{name} is not current ({stale[name]}); run it first: python -m fp4lib.study run --only {name}")
    stored, fresh = _rerun(name, args.results, args.backend)
    store_behaviour(args.results, numerics_digest(), canary_fingerprint(), training_digest())
    entry = {k: fresh[k] for k in REFERENCE_KEYS}
    refs = [r for r in stored.get("references", [])
            if not same_environment(r.get("fingerprint") or {}, entry["fingerprint"])] + [entry]
    stored["references"] = refs
    write_result(Path(args.results) / f"{name}.json", stored)
    print(f"{name}: stored the reference for {describe_environment(entry['fingerprint'])}; "
          f"{len(refs)} environment(s) now; final val_loss {entry['final_val_loss']:.6f}")
    stale = fidelity.stale_fidelity(args.results)
    if fidelity.FIDELITY_CHECK.name in stale:
        raise ValueError(f"{fidelity.FIDELITY_CHECK.name} is not current ({stale[fidelity.FIDELITY_CHECK.name]}); "
                         f"run first: python -m fp4lib.study gradients --only {fidelity.FIDELITY_CHECK.name}")
    fresh = fidelity.make_record(fidelity.FIDELITY_CHECK, args.backend, log=lambda s: None)
    n = fidelity.add_reference(args.results, fresh)
    print(f"{fidelity.FIDELITY_CHECK.name}: stored the reference for {describe_environment(fresh['fingerprint'])}; "
          f"{n} environment(s) now")
    return 0


def cmd_gradients(args) -> int:
    """Measure and store the gradient-fidelity study and its check slice."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or list(fidelity.FIDELITY_FILES)
    unknown = [n for n in names if n not in fidelity.FIDELITY_FILES]
    if unknown:
        raise ValueError(f"--only: unknown record(s) {unknown}; known: {sorted(fidelity.FIDELITY_FILES)}")
    if args.stale:
        stale = fidelity.stale_fidelity(require_results_dir(args.results))
        names = [n for n in names if n in stale]
    for name in names:
        print(f"{name}: measuring", flush=True)
        record = fidelity.make_record(fidelity.FIDELITY_FILES[name], args.backend, jobs=args.jobs)
        path = fidelity.store_record(args.results, record)
        print(f"  stored {path} ({record['data']['wall_s']:.0f} s)", flush=True)
    return 0


def _check_gradients(args) -> int:
    """The gradient-fidelity records' staleness, then the slice measured again."""
    stale = fidelity.stale_fidelity(args.results)
    if stale:
        print("study check FAILED: gradient-fidelity record(s) missing or stale: "
              + "; ".join(f"{k}: {v}" for k, v in stale.items())
              + "\nrefresh with:  python -m fp4lib.study gradients --stale", file=sys.stderr)
        return 1
    if args.no_rerun:
        return 0
    stored = fidelity.load_fidelity(args.results, fidelity.FIDELITY_CHECK.name)
    fresh = fidelity.make_record(fidelity.FIDELITY_CHECK, args.backend, log=lambda s: None)
    ok, message = fidelity.check_verdict(stored, fresh)
    print(f"gradient-fidelity records current; re-measured {fidelity.FIDELITY_CHECK.name}: {message}",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _threads(text: str) -> int:
    cpus = os.cpu_count() or 1
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 1 <= v <= cpus:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {cpus} (this machine's CPUs), got {text!r}")
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp4lib.study", description=STUDY_DOC.split("\n\n")[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help=f"directory of the stored results (default {DEFAULT_RESULTS}, from the current directory)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train runs and store their results")
    r.add_argument("--only", nargs="+", metavar="NAME", help="run only these")
    r.add_argument("--study", choices=sorted({x.study for x in definition.STUDY}), help="run only this study")
    r.add_argument("--stale", action="store_true", help="only runs whose result is missing or stale")
    r.add_argument("--runs", default=str(DEFAULT_RUNS), help="directory for metrics and checkpoints")
    r.add_argument("--backend", default="auto", help="fake-quant backend (identical numbers)")
    r.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (recorded with each result)")
    r.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list the runs and the state of their results")
    c = sub.add_parser("check", help="fail on stale results; re-run one cheap run and compare (exact or tolerance mode)")
    c.add_argument("--rerun", default=definition.REPRO_RUN, choices=[x.name for x in definition.STUDY], help="the run to re-run")
    c.add_argument("--no-rerun", action="store_true", help="only compare hashes")
    c.add_argument("--runs-only", action="store_true",
                   help="check the training runs only, not the gradient-fidelity records (a results directory of runs)")
    c.add_argument("--backend", default="auto")
    f = sub.add_parser("reference", help="store this environment's run of the re-run check's run")
    f.add_argument("--rerun", default=definition.REPRO_RUN, choices=[x.name for x in definition.STUDY], help="the run")
    f.add_argument("--backend", default="auto")
    g = sub.add_parser("gradients", help="measure and store the gradient-fidelity study and its check slice")
    g.add_argument("--only", nargs="+", metavar="NAME", help=f"only these of {sorted(fidelity.FIDELITY_FILES)}")
    g.add_argument("--stale", action="store_true", help="only records that are missing or stale")
    g.add_argument("--backend", default="auto", help="fake-quant backend (identical numbers)")
    g.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (per process)")
    g.add_argument("--jobs", type=_threads, default=1, help="processes, one per training run's states (same numbers)")
    args = p.parse_args(argv)
    try:
        return {"run": cmd_run, "list": cmd_list, "check": cmd_check, "reference": cmd_reference,
                "gradients": cmd_gradients}[args.command](args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
