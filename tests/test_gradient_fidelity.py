"""The gradient-fidelity study: its estimators, its measurement on a tiny model, its record and check."""

import copy
import statistics
import subprocess
import sys

import pytest
import torch

from fp4lib.study import fidelity, mechanisms
from fp4lib.study.gradients import FIDELITY, FIDELITY_CHECK, FidelityStudy, Moments, measure
from fp4lib.study.stats import paired_difference


def test_moments_bias_estimate_is_unbiased_and_spread_is_the_draw_variance():
    # Draws exact + b + noise(sd s): E[bias2] = |b|^2 / |exact|^2, E[spread2] = n s^2 / |exact|^2.
    gen = torch.Generator().manual_seed(0)
    exact = torch.ones(50)
    b, s, k = 0.1, 0.5, 4
    bias2, spread2 = [], []
    for _ in range(400):
        m = Moments(exact)
        for _ in range(k):
            m.add(exact + b + s * torch.randn(50, generator=gen))
        out = m.summary()
        bias2.append(out["bias2"])
        spread2.append(out["spread2"])
    # The mean's 99.9% interval holds the truth (a plain |mean - truth| < 4 se test).
    for values, truth in ((bias2, b * b), (spread2, s * s)):
        p = paired_difference([v - truth for v in values], level=0.999)
        assert p.low < 0 < p.high, (truth, p.interval("{:.4f}"))
    # Without the correction the squared distance of the mean would be biased up by s^2 / k.
    assert min(bias2) < 0  # the unbiased estimate can go below zero


def test_moments_constant_draws_have_no_spread_and_bias_equals_error():
    m = Moments(torch.tensor([3.0, 4.0]))
    m.add(torch.tensor([3.0, 5.0]))
    m.add(torch.tensor([3.0, 5.0]))
    s = m.summary()
    assert m.constant and s["spread2"] == 0.0
    assert s["bias2"] == pytest.approx(s["error"] ** 2) == pytest.approx(1 / 25)


def test_moments_refuse_a_zero_exact_value():
    m = Moments(torch.zeros(3))
    m.add(torch.ones(3))
    with pytest.raises(ValueError, match="exact value is zero"):
        m.summary()


@pytest.mark.parametrize("kwargs, match", [
    (dict(recipes=("nvfp4", "no_such")), "no_such"),
    (dict(recipes=("nvfp4",), state_steps=(400,)), "state_steps"),
    (dict(recipes=("nvfp4",), draws=1), "draws"),
    (dict(recipes=("nvfp4",), preset="huge"), "preset"),
])
def test_study_definition_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FidelityStudy("bad", **kwargs)


TINY = FidelityStudy("tiny", recipes=("nvfp4", "nvfp4_no_tiles", "fp4_naive"), state_runs=("bf16",),
                     state_steps=(4,), run_steps=10, preset="tiny", batches=2, draws=3, lookahead_batches=1)


@pytest.fixture(scope="module")
def tiny_record():
    return {"data": measure(TINY, backend="fused", log=lambda s: None)}


def test_measure_on_a_tiny_model(tiny_record):
    data = tiny_record["data"]
    assert len(data["cells"]) == 2 and len(data["states"]) == 1
    layers = data["layers"]
    assert layers and all(".h.0." in n for n in layers)  # the tiny model's last block stays in high precision
    for cell in data["cells"]:
        for recipe, r in cell["recipes"].items():
            g = r["grad"]["model"]
            assert 0.5 < g["cosine"] <= 1.0 and g["error"] > 0
            for gemm in ("fprop", "dgrad", "wgrad"):
                assert len(r["gemm"][gemm]["error"]) == len(layers)
                assert all(e > 0 for e in r["gemm"][gemm]["error"])
        # fp4_naive has no random part: two equal draws, then it stops; nvfp4 draws three times.
        assert cell["recipes"]["fp4_naive"]["grad"]["model"]["draws"] == 2
        assert cell["recipes"]["fp4_naive"]["grad"]["model"]["spread2"] == 0.0
        assert cell["recipes"]["nvfp4"]["grad"]["model"]["draws"] == 3
        assert cell["recipes"]["nvfp4"]["grad"]["model"]["spread2"] > 0
        assert len(cell["recipes"]["nvfp4"]["grad"]["lookahead"]) == 3
        # The forward GEMM of nvfp4 rounds to nearest: no spread there.
        assert all(s == 0.0 for s in cell["recipes"]["nvfp4"]["gemm"]["fprop"]["spread2"])
    w = data["states"][0]["weights"]
    assert all(x == 0.0 for x in w["nvfp4"]["fwd_bwd_mismatch"])  # 16x16 tiles: one weight for both GEMMs
    assert all(x > 0.01 for x in w["nvfp4_no_tiles"]["fwd_bwd_mismatch"])
    assert all(a > b for a, b in zip(w["nvfp4"]["weight_error"], w["nvfp4_no_tiles"]["weight_error"]))


def test_measure_is_deterministic(tiny_record):
    again = measure(TINY, backend="reference", log=lambda s: None)
    assert fidelity.flat_numbers(again) == fidelity.flat_numbers(tiny_record["data"])


def test_mechanism_quantities_and_summary(tiny_record):
    v = mechanisms.cell_values(tiny_record, "nvfp4", "cosine")
    assert len(v) == 2 and all(0 < x <= 1 for x in v)
    assert mechanisms.unit_values(tiny_record, "nvfp4", "cosine") == [pytest.approx(statistics.fmean(v))]
    assert mechanisms.cell_values(tiny_record, "nvfp4", "mismatch") == [0.0]
    rows = mechanisms.recipe_summary(tiny_record)
    assert [r["recipe"] for r in rows] == ["nvfp4", "nvfp4_no_tiles", "fp4_naive"]
    with pytest.raises(ValueError, match="not 'mxfp4'"):
        mechanisms.cell_values(tiny_record, "mxfp4", "cosine")
    with pytest.raises(ValueError, match="quantity must be one of"):
        mechanisms.cell_values(tiny_record, "nvfp4", "nonsense")


def _fake_study_record(seed=0):
    """A record with every ingredient's recipes, built from random numbers (for the statistics)."""
    gen = torch.Generator().manual_seed(seed)
    recipes = {i.on for i in mechanisms.INGREDIENTS} | {i.off for i in mechanisms.INGREDIENTS}

    def recipe_entry(shift):
        u = lambda: float(torch.rand((), generator=gen)) * 0.01
        gemm = {g: {"error": [0.1 + shift + u()] * 2, "bias2": [0.01 + shift + u()] * 2,
                    "spread2": [0.001 + u()] * 2} for g in ("fprop", "dgrad", "wgrad")}
        return {"gemm": gemm, "grad": {"model": {"cosine": 0.9 - shift + u(), "error": 0.2 + shift + u(),
                                                 "bias2": 0.04 + shift + u(), "spread2": 0.003 + u()},
                                       "lookahead": [0.01 + shift + u(), 0.01 + shift + u()]}}
    cells = [{"state": f"s{k // 2}", "recipes": {r: recipe_entry(0.05 if r == "nvfp4_no_rht" else 0.0)
                                                  for r in sorted(recipes)}} for k in range(16)]
    states = [{"weights": {r: {"fwd_bwd_mismatch": [0.0 if r != "nvfp4_no_tiles" else 0.13 + 0.01 * k] * 2,
                               "weight_error": [0.1] * 2} for r in recipes}} for k in range(3)]
    return {"data": {"cells": cells, "states": states}}


def test_ingredient_effects_resolve_a_planted_effect_and_adjust_within_families():
    rec = _fake_study_record()
    effects = mechanisms.ingredient_effects(rec)
    assert set(effects) == set(mechanisms.FAMILIES)
    rht = {e.family: e for fam in effects.values() for e in fam if e.ingredient.off == "nvfp4_no_rht"}
    assert rht["mechanism"].resolved and rht["mechanism"].paired.mean == pytest.approx(-0.05, abs=0.01)
    assert rht["mechanism"].verdict() == "lowers it"
    for fam in effects.values():
        for e in fam:
            if e.p is not None:
                assert e.p_adj == min(1.0, 5 * e.p)
                # Bonferroni: the verdict and the widened interval agree.
                assert e.resolved == (e.corrected.low > 0 or e.corrected.high < 0)
                assert e.corrected.high - e.corrected.low > e.paired.high - e.paired.low
    tiles = next(e for e in effects["mechanism"] if e.ingredient.off == "nvfp4_no_tiles")
    assert tiles.paired.n == 3 and tiles.paired.mean < -0.1 and tiles.resolved


def test_sr_crossover():
    rec = _fake_study_record()
    for k, c in enumerate(rec["data"]["cells"]):  # two cells per state, the same values
        k //= 2
        c["recipes"]["nvfp4"]["grad"]["model"].update(bias2=0.01, spread2=0.05 + 0.001 * k)
        c["recipes"]["nvfp4_no_sr"]["grad"]["model"].update(bias2=0.02 + 0.0001 * k, spread2=0.03)
    out = mechanisms.sr_crossover(rec, "grad")
    assert out["bias_gain"].n == 8
    assert out["ratio"].estimate == pytest.approx(statistics.fmean([0.02 + 0.001 * k for k in range(8)])
                                                  / statistics.fmean([0.01 + 0.0001 * k for k in range(8)]))
    assert out["bias_gain"].resolved and out["spread_gain"].resolved
    for c in rec["data"]["cells"]:
        c["recipes"]["nvfp4_no_sr"]["grad"]["model"].update(bias2=0.005)
    assert mechanisms.sr_crossover(rec, "grad")["ratio"] is None
    with pytest.raises(ValueError, match="level"):
        mechanisms.sr_crossover(rec, "layer")


def _slice_record(tiny_record, threads=1):
    fp = {"torch": "2.13.0", "aten_cpu_capability": "AVX512", "cpu_vector_isa": ["avx512f"], "mkldnn": True,
          "mkl": True, "env": {}, "threads": threads, "device": "cpu", "precision": "fp32"}
    return {"fingerprint": fp, "data": tiny_record["data"]}


def test_check_verdict_exact_and_tolerance(tiny_record):
    fresh = _slice_record(tiny_record)
    stored = {"references": [{"fingerprint": fresh["fingerprint"], "numbers": fidelity.flat_numbers(fresh["data"])}]}
    ok, msg = fidelity.check_verdict(stored, fresh)
    assert ok and "mode exact" in msg
    moved = copy.deepcopy(fresh)
    moved["data"]["cells"][0]["recipes"]["nvfp4"]["grad"]["model"]["cosine"] += 1e-6
    ok, msg = fidelity.check_verdict(stored, moved)
    assert not ok and "differ" in msg
    # Elsewhere: a band from two stored environments.
    other = _slice_record(tiny_record, threads=2)
    numbers = fidelity.flat_numbers(fresh["data"])
    stored = {"references": [{"fingerprint": fresh["fingerprint"], "numbers": numbers},
                             {"fingerprint": other["fingerprint"], "numbers": [x * (1 + 1e-3) for x in numbers]}]}
    third = _slice_record(tiny_record, threads=3)
    ok, msg = fidelity.check_verdict(stored, third)
    assert ok and "mode tolerance" in msg
    far = copy.deepcopy(third)
    far["data"]["cells"][0]["recipes"]["nvfp4"]["grad"]["model"]["error"] *= 1.05
    ok, msg = fidelity.check_verdict(stored, far)
    assert not ok and "FAILED" in msg
    ok, msg = fidelity.check_verdict({"references": stored["references"][:1]}, third)
    assert not ok and "too few" in msg


def test_stale_fidelity_names_missing_and_changed_records(tmp_path):
    stale = fidelity.stale_fidelity(tmp_path)
    assert set(stale) == {FIDELITY.name, FIDELITY_CHECK.name} and set(stale.values()) == {"missing"}
    (tmp_path / f"{FIDELITY.name}.json").write_text("[1, 2]")
    assert "JSON list" in fidelity.stale_fidelity(tmp_path)[FIDELITY.name]


def test_stored_records_are_current_and_definitions_match():
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "experiments" / "results"
    assert fidelity.stale_fidelity(results) == {}
    rec = fidelity.load_fidelity(results)
    assert rec["definition"] == FIDELITY.definition()
    assert len(rec["data"]["cells"]) == len(FIDELITY.state_runs) * len(FIDELITY.state_steps) * FIDELITY.batches


def test_cli_refuses_an_unknown_record(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fp4lib.study", "--results", str(tmp_path), "gradients", "--only", "nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown record(s) ['nope']" in p.stderr


def test_measure_in_parallel_processes_gives_the_same_numbers():
    study = FidelityStudy("two", recipes=("nvfp4",), state_runs=("bf16", "nvfp4"), state_steps=(3,), run_steps=10,
                          preset="tiny", batches=1, draws=2)
    one = measure(study, backend="fused", log=lambda s: None)
    two = measure(study, backend="fused", log=lambda s: None, jobs=2)
    assert fidelity.flat_numbers(one) == fidelity.flat_numbers(two)
    assert [s["name"] for s in two["states"]] == ["bf16@3", "nvfp4@3"]
