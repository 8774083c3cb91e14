"""The study (fp4lib.study): provenance, staleness, the re-run check's two modes, summaries."""

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fp4lib
from fp4lib import study as ex
from fp4lib.study import behaviour, definition
from fp4lib.study.__main__ import main as study_main
from fp4lib.study.runner import REFERENCE_KEYS
from fp4lib.training.recipes import RECIPES
from fp4lib.train import make_parser
from fp4lib.training.run import PRESETS


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = [ex.Run("tiny_nvfp4", "nvfp4", steps=3, preset="tiny", study="repro"),
        ex.Run("tiny_bf16", "bf16", steps=2, preset="tiny", study="main")]


@pytest.fixture
def tiny_study(monkeypatch, tmp_path):
    monkeypatch.setattr(definition, "STUDY", TINY)
    # the training canary (every recipe, half a minute) stands in as a fixed digest here;
    # test_training_digest_follows_training_numbers runs the real one
    monkeypatch.setattr(behaviour, "training_digest", lambda: "canary-of-these-tests")
    results = tmp_path / "results"
    for run in TINY:
        ex.run_experiment(run, results, tmp_path / "runs", backend="fused", progress=False)
    return results


def test_study_is_well_formed():
    names = [r.name for r in ex.STUDY]
    assert len(names) == len(set(names)) and ex.REPRO_RUN in names
    assert all(r.recipe in RECIPES and r.preset in PRESETS for r in ex.STUDY)
    seeds = {r.recipe: {x.seed for x in ex.STUDY if x.recipe == r.recipe and x.study == "main"} for r in ex.STUDY}
    assert all(len(seeds[k]) >= 2 for k in ("bf16", "fp4_naive", "mxfp4", "nvfp4"))
    for run in ex.STUDY:  # every stored command is a valid CLI call
        args = make_parser().parse_args(run.command().split()[3:])
        assert (args.recipe, args.steps, args.seed) == (run.recipe, run.steps, run.seed)


def _digest_in(package_root: Path, expr: str) -> str:
    """``expr`` evaluated in a fresh interpreter that imports fp4lib from ``package_root``."""
    code = f"import fp4lib.study.behaviour as b; print({expr})"
    out = subprocess.run([sys.executable, "-c", code], cwd=package_root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(package_root)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_numerics_digest_follows_numbers_not_files(tmp_path):
    pkg = Path(fp4lib.__file__).parent
    copy = tmp_path / "fp4lib"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = behaviour.numerics_digest()
    # a number-producing function moved to a module of its own, and its docs edited: still current
    scales = copy / "numerics" / "scales.py"
    text = scales.read_text()
    tree = ast.parse(text)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "nvfp4_block_scales")
    lines = text.splitlines(keepends=True)
    body = "".join(lines[fn.lineno - 1:fn.end_lineno])
    # the new module sees scales' names as the function did; scales imports it back at its end
    (copy / "numerics" / "moved.py").write_text(
        "from . import scales as _scales\n\n"
        "globals().update({k: v for k, v in vars(_scales).items() if k[:2] != '__'})\n\n\n"
        + body.replace('"""', '"""Moved here. ', 1))
    scales.write_text(text.replace(body, "") + "\nfrom .moved import nvfp4_block_scales  # noqa: E402\n")
    assert "def nvfp4_block_scales" not in scales.read_text()
    assert _digest_in(tmp_path, "b.numerics_digest()") == base
    # one constant changed: stale
    constants = copy / "numerics" / "constants.py"
    constants.write_text(constants.read_text().replace("NVFP4_4OVER6_SCALE_MAX = 256.0", "NVFP4_4OVER6_SCALE_MAX = 224.0"))
    assert _digest_in(tmp_path, "b.numerics_digest()") != base


def test_numerics_digest_is_the_same_under_other_cpu_kernels(tmp_path):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = subprocess.run([sys.executable, "-c", "import fp4lib.study.behaviour as b; print(b.numerics_digest())"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == behaviour.numerics_digest()


def test_training_digest_follows_training_numbers(monkeypatch):
    from fp4lib.training import run as training

    base = behaviour.training_digest(recipes=("nvfp4_hp_final",))
    assert behaviour.training_digest(recipes=("nvfp4_hp_final",)) == base
    tiny = training.PRESETS["tiny"]
    monkeypatch.setitem(training.PRESETS, "tiny", dataclasses.replace(tiny, train=dataclasses.replace(
        tiny.train, lr=tiny.train.lr * (1 + 2 ** -20))))
    assert behaviour.training_digest(recipes=("nvfp4_hp_final",)) != base


def test_stored_study_is_current_by_behaviour():
    """The stored results carry the digests of the code that made them, and today's code computes them."""
    stored = behaviour.load_behaviour(ex.DEFAULT_RESULTS if ex.DEFAULT_RESULTS.is_dir() else
                                      Path(__file__).parents[1] / "experiments" / "results")
    assert stored["numerics"] == behaviour.numerics_digest()


def test_result_records_provenance(tiny_study):
    rec = json.loads((tiny_study / "tiny_nvfp4.json").read_text())
    assert rec["definition"] == TINY[0].definition()
    assert len(rec["train_losses"]) == 3 and rec["val_losses"][-1][0] == 3
    assert rec["final_val_loss"] == rec["val_losses"][-1][1]
    assert rec["code_hash"] == ex.code_hash() and len(rec["corpus"]["sha256"]) == 64
    assert rec["behaviour"]["numerics"] == behaviour.numerics_digest()
    stored = behaviour.load_behaviour(tiny_study)
    assert rec["behaviour"]["id"] == stored["id"] and stored["training"][0]["digest"] == "canary-of-these-tests"
    assert rec["command"].startswith("python -m fp4lib.train --recipe nvfp4 --preset tiny --steps 3 --seed 0")
    assert {"cpu", "cores", "torch_threads", "python", "torch"} <= set(rec["machine"])
    assert rec["seed"] == 0 and rec["torch"] == torch.__version__


def test_results_of_another_torch_version_are_stale(tiny_study):
    path = tiny_study / "tiny_bf16.json"
    rec = json.loads(path.read_text())
    rec["torch"] = "2.0.0"
    path.write_text(json.dumps(rec))
    assert ex.stale_results(tiny_study, TINY) == {"tiny_bf16": f"made with torch 2.0.0, here {torch.__version__}"}
    rec["torch"] = torch.__version__.split("+")[0] + "+someotherbuild"  # a build tag is not another release
    path.write_text(json.dumps(rec))
    assert ex.stale_results(tiny_study, TINY) == {}


def test_repro_record_carries_its_environment_as_a_reference(tiny_study):
    rec = json.loads((tiny_study / "tiny_nvfp4.json").read_text())
    assert rec["fingerprint"] == ex.numeric_fingerprint("cpu", "fp32") | {"threads": 1}
    assert [r["fingerprint"] for r in rec["references"]] == [rec["fingerprint"]]
    assert rec["references"][0]["train_losses"] == rec["train_losses"]


def _foreign(rec, shift):
    """A reference as if made in another environment, its losses drifting by `shift` per step."""
    other = json.loads(json.dumps({k: rec[k] for k in REFERENCE_KEYS}))
    other["fingerprint"]["aten_cpu_capability"] = "ELSEWHERE"
    other["train_losses"] = [v + shift * (i + 1) for i, v in enumerate(other["train_losses"])]
    other["val_losses"] = [[s, v + shift * s] for s, v in other["val_losses"]]
    return other


def test_tolerance_mode_elsewhere_passes_within_the_band_and_fails_outside(tiny_study, monkeypatch, capsys):
    path = tiny_study / "tiny_nvfp4.json"
    rec = json.loads(path.read_text())
    here = rec["references"][0]
    # two environments, neither of them this one: the band comes from their difference
    rec["references"] = [_foreign(here, 1e-3), _foreign(here, -1e-3)]
    path.write_text(json.dumps(rec))
    args = ["--results", str(tiny_study), "check", "--rerun", "tiny_nvfp4", "--backend", "fused", "--runs-only"]
    assert study_main(args) == 0
    assert "mode tolerance" in capsys.readouterr().out
    # a run whose numbers are wrong (another seed: other weights, other batches) fails
    monkeypatch.setattr(definition, "STUDY", [ex.Run("tiny_nvfp4", "nvfp4", seed=1, steps=3, preset="tiny", study="repro"),
                                      TINY[1]])
    rec["definition"] = definition.STUDY[0].definition()
    path.write_text(json.dumps(rec))
    assert study_main(args) == 1
    err = capsys.readouterr().err
    assert "mode tolerance" in err and "FAILED at step" in err


def _repro_record() -> dict:
    """The stored record of the re-run check's run, with its references from several environments."""
    results = Path(__file__).parents[1] / "experiments" / "results"
    return json.loads((results / f"{definition.REPRO_RUN}.json").read_text())


def _elsewhere(ref: dict, scale: float = 1.0, train_too: bool = True) -> dict:
    """``ref`` as a fresh run from an environment none of the references was made in,
    every validation loss (and with ``train_too`` every training loss) multiplied by ``scale``."""
    fresh = json.loads(json.dumps({k: ref[k] for k in REFERENCE_KEYS}))
    fresh["fingerprint"]["aten_cpu_capability"] = "ELSEWHERE"
    if train_too:
        fresh["train_losses"] = [v * scale for v in fresh["train_losses"]]
    fresh["val_losses"] = [[s, v * scale] for s, v in fresh["val_losses"]]
    fresh["final_val_loss"] = fresh["val_losses"][-1][1]
    return fresh


def test_stored_cross_environment_references_pass_tolerance_mode():
    """Each stored reference, as the fresh run of an unknown environment, against the band
    of the other stored references (leave one out), and against all of them."""
    rec = _repro_record()
    refs = rec["references"]
    assert len({json.dumps(r["fingerprint"], sort_keys=True) for r in refs}) == len(refs) >= 3
    for i, ref in enumerate(refs):
        others = dict(rec, references=[r for j, r in enumerate(refs) if j != i])
        ok, message = ex.rerun_verdict(others, _elsewhere(ref))
        assert ok and "mode tolerance" in message, (i, message)
        ok, message = ex.rerun_verdict(rec, _elsewhere(ref))
        assert ok and "mode tolerance" in message, (i, message)


@pytest.mark.parametrize("train_too", [True, False], ids=["all-losses", "val-losses"])
@pytest.mark.parametrize("scale", [1.03, 0.97, 1.12])
def test_tolerance_mode_fails_a_run_with_its_losses_a_few_percent_off(scale, train_too):
    """Any stored reference with its losses 3% (or 12%) off fails against the stored references:
    every loss, or only the validation losses (a run that starts right and drifts)."""
    rec = _repro_record()
    for i, ref in enumerate(rec["references"]):
        ok, message = ex.rerun_verdict(rec, _elsewhere(ref, scale, train_too))
        assert not ok and "mode tolerance" in message and "FAILED at step" in message, (i, message)


def test_tolerance_band_is_built_from_validation_losses():
    refs = [{"train_losses": [5.0, 4.0, 3.0], "val_losses": [[2, 4.0], [3, 3.5]]},
            {"train_losses": [5.0, 4.5, 2.0], "val_losses": [[2, 4.01], [3, 3.5]]}]
    steps, center, tol = ex.tolerance_band(refs, factor=2.0, floor=0.0)
    assert steps == [2, 3] and center == pytest.approx([4.005, 3.5])
    assert tol == pytest.approx([0.02, 0.02])  # the largest difference, twice; noisy training losses ignored
    with pytest.raises(ValueError, match="validation steps"):
        ex.tolerance_band([refs[0], dict(refs[1], val_losses=[[2, 4.0]])])


def test_tolerance_band_needs_two_environments():
    with pytest.raises(ValueError, match="at least two environments"):
        ex.tolerance_band([{"train_losses": [1.0], "val_losses": []}])


def test_stale_results_are_named(tiny_study, monkeypatch):
    assert ex.stale_results(tiny_study, TINY) == {}
    path = tiny_study / "tiny_bf16.json"
    rec = json.loads(path.read_text())
    rec["code_hash"] = "0" * 64  # where the code came from is information, not a verdict
    path.write_text(json.dumps(rec))
    assert ex.stale_results(tiny_study, TINY, training=True) == {}
    rec["behaviour"]["id"] = "0" * 16
    path.write_text(json.dumps(rec))
    (tiny_study / "tiny_nvfp4.json").unlink()
    stale = ex.stale_results(tiny_study, TINY)
    assert stale["tiny_nvfp4"] == "missing" and "behaviour id differs" in stale["tiny_bf16"]
    # today's training steps compute other numbers than the stored ones, here: every result is stale
    monkeypatch.setattr(behaviour, "training_digest", lambda: "another-canary")
    assert "training computes other numbers" in ex.stale_results(tiny_study, TINY[1:], training=True)["tiny_bf16"]
    assert ex.stale_results(tiny_study, TINY[1:]) != {}


def test_results_dir_missing_is_named(tmp_path):
    with pytest.raises(ValueError, match="results directory .* not found"):
        ex.stale_results(tmp_path / "nowhere")


def test_check_passes_when_fresh_and_reproduced(tiny_study, capsys):
    code = study_main(["--results", str(tiny_study), "check", "--rerun", "tiny_nvfp4", "--backend", "fused",
                       "--runs-only"])
    out = capsys.readouterr().out
    assert code == 0 and "re-ran tiny_nvfp4: mode exact" in out and "reproduce bit for bit" in out
    # Without --runs-only the gradient-fidelity records belong to the study too: missing here, so it fails.
    code = study_main(["--results", str(tiny_study), "check", "--no-rerun"])
    captured = capsys.readouterr()
    assert code == 1 and "gradient-fidelity record(s) missing or stale: gradients: missing" in captured.err


def test_check_fails_on_stale_or_changed_results(tiny_study, capsys):
    path = tiny_study / "tiny_nvfp4.json"
    rec = json.loads(path.read_text())
    rec["references"][0]["train_losses"][1] += 1e-3  # the stored run of this environment
    path.write_text(json.dumps(rec))
    assert study_main(["--results", str(tiny_study), "check", "--rerun", "tiny_nvfp4", "--backend", "fused"]) == 1
    err = capsys.readouterr().err
    assert "mode exact" in err and "differ from the stored ones by up to 0.001" in err
    rec["behaviour"]["numerics"] = "f" * 64
    rec["behaviour"]["id"] = "f" * 16
    path.write_text(json.dumps(rec))
    assert study_main(["--results", str(tiny_study), "check"]) == 1
    err = capsys.readouterr().err
    assert "tiny_nvfp4: made by code whose behaviour" in err and "python -m fp4lib.study run --only tiny_nvfp4" in err


def test_summary_and_targets():
    def rec(recipe, seed, loss, study="main"):
        return {"definition": {"recipe": recipe, "seed": seed, "study": study, "steps": 400}, "final_val_loss": loss}

    main = {"bf16": (2.0, 2.02, 2.01, 2.03), "fp8": (2.004, 2.026, 2.012, 2.036), "nvfp4": (2.04, 2.05, 2.05, 2.07),
            "mxfp4": (2.09, 2.1, 2.11, 2.12), "fp4_naive": (3.0, 3.1, 3.05, 3.02)}
    results = {f"{r}_{s}": rec(r, s, v) for r, vals in main.items() for s, v in enumerate(vals)}
    rows = {r["recipe"]: r for r in ex.summary(results)}
    assert rows["nvfp4"]["gap_pct"][:2] == pytest.approx([2.0, 100 * (2.05 / 2.02 - 1)])
    assert rows["bf16"]["sd"] == pytest.approx(0.01291, abs=1e-4)
    targets = {t.name: t for t in ex.check_targets(results)}
    assert all(t.met for name, t in targets.items() if "ingredient" not in name), targets
    assert targets["at least one ingredient resolved against nvfp4"].met is None  # no variant runs
    results.update({f"nvfp4_no_sr_{s}": rec("nvfp4_no_sr", s, v, "ablation") for s, v in enumerate((2.0, 2.01, 2.0))})
    assert "nvfp4_no_sr" in {t.name: t for t in ex.check_targets(results)}[
        "at least one ingredient resolved against nvfp4"].detail
    results["nvfp4_0"]["final_val_loss"] = 2.3  # one seed far off: the ordering is no longer resolved
    targets = {t.name: t for t in ex.check_targets(results)}
    assert not targets["ordering bf16 <= fp8 < nvfp4 < mxfp4 < naive"].met
    del results["fp8_0"], results["fp8_1"], results["fp8_2"], results["fp8_3"]
    assert {t.name: t for t in ex.check_targets(results)}["fp8 within 1% of bf16 and below nvfp4"].met is None


def test_only_nvfp4_ingredients_count_and_pairs_have_the_same_length():
    def rec(recipe, seed, loss, study="main", steps=400):
        return {"definition": {"recipe": recipe, "seed": seed, "study": study, "steps": steps}, "final_val_loss": loss}

    results = {f"{r}_{s}": rec(r, s, 2.0 + 0.01 * s + (0.05 if r == "nvfp4" else 0))
               for r in ("bf16", "nvfp4") for s in range(3)}
    # another format quantizing every block, and the evaluation control: resolved against nvfp4, yet no ingredient
    results.update({f"naive_all_{s}": rec("fp4_naive_all_fp4", s, 3.0 + 0.01 * s, "all_fp4") for s in range(3)})
    results.update({f"hp_eval_{s}": rec("nvfp4_hp_eval", s, 2.03 + 0.0101 * s, "final_hp") for s in range(3)})
    target = {t.name: t for t in ex.check_targets(results)}["at least one ingredient resolved against nvfp4"]
    assert target.met is False and target.detail == "none resolved at this scale"
    assert ex.paired_gap(results, "nvfp4_hp_eval", "nvfp4", ("final_hp",)).resolved
    # a long run is paired with the baseline's long run, not with the main study's shorter one
    results.update({f"bf16_long_{s}": rec("bf16", s, 1.4 + 0.01 * s, "length", 1600) for s in range(2)})
    results.update({f"nv_long_{s}": rec("nvfp4_hp_final", s, 1.45 + 0.012 * s, "length", 1600) for s in range(2)})
    p = ex.paired_gap(results, "nvfp4_hp_final", "bf16", ("length",))
    assert p.diffs == pytest.approx([100 * (1.45 / 1.4 - 1), 100 * (1.462 / 1.41 - 1)])


def test_unknown_run_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        study_main(["run", "--only", "nope"])
    assert "--only: unknown run(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("p,df,expected", [(0.975, 2, 4.303), (0.975, 10, 2.228), (0.8, 5, 0.920), (0.995, 4, 4.604)])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert abs(ex.t_quantile(p, df) - expected) < 5e-4


def test_paired_intervals_verdicts_and_power():
    # F2 as the first stored study had it: differences of 0.55 and 1.33 points over 2 seeds
    two = ex.paired_difference([0.55, 1.33])
    assert two.low < 0 < two.high and two.verdict() == "not resolved at this scale"
    assert ex.paired_difference([0.5]).verdict().startswith("not resolved at this scale (one seed")
    clear = ex.paired_difference([2.0, 2.1, 1.9, 2.05])
    assert clear.resolved and clear.verdict("worse", "better") == "worse"
    assert ex.paired_difference([-2.0, -2.1, -1.9]).verdict("worse", "better") == "better"
    # more noise, or a smaller effect, needs more seeds
    assert ex.seeds_needed(1.0, 0.5) < ex.seeds_needed(1.0, 1.0) < ex.seeds_needed(0.5, 1.0)
    with pytest.raises(ValueError, match="empty"):
        ex.paired_difference([])


def test_results_md_reports_the_stored_study():
    """benchmarks/RESULTS.md's study section is what study_report writes from the stored results."""
    import importlib.util
    import re

    root = Path(fp4lib.__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("study_report", root / "benchmarks" / "study_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    stored = re.search(r"<!-- study:start -->\n(.*?)\n<!-- study:end -->",
                       (root / "benchmarks" / "RESULTS.md").read_text(), re.S)
    assert stored, "RESULTS.md has no study section"
    assert stored.group(1) == report.report().rstrip(), "run: python benchmarks/study_report.py"
