"""The training study behind chapter 5, its stored results, and the staleness check.

::

    python -m fp4lib.study list                  # the runs and whether their results are fresh
    python -m fp4lib.study run                   # every run (hours on the 2-core CPU)
    python -m fp4lib.study run --only nvfp4_s0   # some runs
    python -m fp4lib.study run --stale           # only missing or stale results
    python -m fp4lib.study check                 # used by `make test`
    python -m fp4lib.study reference             # store this environment's re-run references
    python -m fp4lib.study gradients --jobs 2    # the gradient-fidelity study (20 minutes on 2 cores)

Each run (:data:`STUDY`) trains the tiny GPT with one recipe and seed and writes
``experiments/results/<name>.json``: final validation loss, the loss and
validation curves, step times, and how it was made -- the equivalent CLI command,
the seed, the machine, the torch and Python versions, the corpus hash, a hash of
the code that made it (:func:`code_hash`) and the behaviour digests of that code
(:mod:`fp4lib.study.behaviour`). Chapter 5 plots these files
(:func:`load_results`, :func:`summary`) and trains one short comparison live.

Provenance follows behaviour, not files: ``check`` fails when today's code computes
other numbers than the code that made the stored results (the quantizer digest,
and the training digest where one was stored for this numeric environment), when
a result was made with another torch release or on another corpus, when its run
definition changed, or when it is missing, and names the command that refreshes
it. Moving, renaming or documenting code leaves the results current. It then
re-runs the cheap :data:`REPRO_RUN` and compares its losses with the stored ones,
in one of two modes, and says which:

* **exact**, where the stored record holds a reference run made in this numeric
  environment (:func:`numeric_fingerprint`: torch release, ATen's CPU kernel set,
  the processor's vector instructions, oneDNN/MKL, threads, device, precision):
  every loss must be identical, bit for bit;
* **tolerance**, elsewhere: every validation loss must lie within
  :data:`TOLERANCE_FACTOR` (2) times the largest difference measured between the
  stored environments' validation losses (:func:`tolerance_band`).
  Other CPU kernels round the last bits of floats differently, and NVFP4's
  non-power-of-two scales turn those bits into different rounding decisions, so
  runs in different environments drift apart.

``reference`` adds the current environment's run to the record (``make
experiments`` stores the ATen kernel sets ``default`` and ``avx2`` besides the
machine's own).

The studies (:data:`~fp4lib.study.definition.STUDIES`), all at the ci size:

* ``main`` -- bf16, fp8, nvfp4, mxfp4 and fp4_naive, 400 steps, seeds 0 to 3; every
  quantized recipe keeps the same layers in high precision (the last block);
* ``all_fp4`` -- nvfp4, mxfp4 and fp4_naive with every block quantized;
* ``ablation`` -- nvfp4 with one ingredient off: stochastic rounding, the random
  Hadamard transform, the 16x16 weight tiles;
* ``fwd_bwd`` -- where the gap comes from: FP4 in the forward GEMM only, or in the
  backward GEMMs only;
* ``final_hp`` -- nvfp4 with the last 10% of its steps in high precision (NVIDIA's
  remedy), and its control: nvfp4 trained in FP4 throughout and evaluated in high
  precision;
* ``beyond`` -- two ingredients from after NVIDIA's recipe: block scales rounded up
  so that stochastic rounding is unbiased at block maxima, and four-over-six;
* each of these with seeds 0 to 2;
* ``length`` -- bf16 and nvfp4_hp_final (NVIDIA's end-phase switch) at 1,600 steps (4x),
  seeds 0 and 1;
* ``underflow`` -- why naive fails: a bf16 run that captures the attention
  output-projection gradient dY at a few steps and measures the fraction of its
  entries that per-tensor and per-block FP4 scales send to zero;
* ``repro`` -- a 60-step nvfp4 run whose last 6 steps run in high precision
  (past the warm-up, into the cosine schedule and the final stretch) that
  ``check`` re-runs.

Beside the loss study, the **gradient-fidelity study** (:mod:`fp4lib.study.gradients`)
measures each recipe's GEMMs and gradients on states of the runs ``bf16_s0`` and
``nvfp4_s0`` against the exact float32 ones; :mod:`fp4lib.study.fidelity` stores and
checks it (``check`` measures a small slice again, exact or within a tolerance, as
above), and :mod:`fp4lib.study.mechanisms` turns it into intervals and verdicts.
"""

from pathlib import Path

DEFAULT_RESULTS = Path("experiments") / "results"
"""Where the CLI looks for stored results unless told (``--results``): relative to the
current directory, the repository root for the book's study."""
DEFAULT_RUNS = Path("experiments") / "runs"  # metrics and checkpoints (not committed)

from .check import TOLERANCE_FACTOR, compare_losses, load_results, rerun_verdict, stale_results, tolerance_band  # noqa: E402
from .definition import REPRO_RUN, STUDY, Run  # noqa: E402
from .provenance import CODE_FILES, code_hash, machine_info, numeric_fingerprint  # noqa: E402
from .runner import run_experiment  # noqa: E402
from .stats import (INGREDIENT_STUDIES, Paired, Ratio, holm, paired_difference, paired_gap,  # noqa: E402
                    ratio_of_means, recipe_losses, seeds_needed, summary, t_cdf, t_quantile, tost, val_gap_curve)
from .verdicts import (ALPHA, FP8_MARGIN, Comparison, Target, check_targets, closed_share, direction,  # noqa: E402
                       format_p, gap_before_switch, size_check, study_comparisons)

__all__ = ["DEFAULT_RESULTS", "DEFAULT_RUNS", "Run", "STUDY", "REPRO_RUN", "CODE_FILES", "code_hash",
           "numeric_fingerprint", "machine_info", "run_experiment", "load_results", "stale_results",
           "compare_losses", "tolerance_band", "rerun_verdict", "TOLERANCE_FACTOR", "summary", "val_gap_curve", "check_targets", "Target", "INGREDIENT_STUDIES", "recipe_losses", "paired_gap", "Paired",
           "paired_difference", "seeds_needed", "t_quantile", "t_cdf", "holm", "tost", "Ratio", "ratio_of_means",
           "ALPHA", "FP8_MARGIN", "Comparison", "study_comparisons", "closed_share", "gap_before_switch", "format_p",
           "direction", "size_check"]
