"""The training study behind chapter 5: its runs.

Each :class:`Run` trains the tiny GPT with one recipe, seed and length; :data:`STUDY`
lists them, grouped into the studies of :data:`STUDIES` and ``underflow`` and
``repro`` (see :mod:`fp4lib.study`).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

__all__ = ["Run", "STUDY", "STUDIES", "REPRO_RUN", "UNDERFLOW_MODULE", "MAIN_RECIPES", "LONG_STEPS"]

UNDERFLOW_MODULE = "transformer.h.{block}.attn.c_proj"


@dataclass(frozen=True)
class Run:
    """One training run of the study.

    ``capture_steps``: before these steps (1-based) record the underflow report of
    the attention output-projection gradient of every block.
    """

    name: str
    recipe: str
    seed: int = 0
    steps: int = 400
    preset: str = "ci"
    study: str = "main"
    hp_final_fraction: Optional[float] = None
    capture_steps: Tuple[int, ...] = ()

    def command(self, out: Optional[str] = None) -> str:
        """The equivalent ``python -m fp4lib.train`` command."""
        args = ["python", "-m", "fp4lib.train", "--recipe", self.recipe, "--preset", self.preset,
                "--steps", str(self.steps), "--seed", str(self.seed), "--out", out or f"experiments/runs/{self.name}"]
        if self.hp_final_fraction is not None:
            args += ["--hp-final-fraction", str(self.hp_final_fraction)]
        return shlex.join(args)

    def definition(self) -> dict:
        """The fields that define the run (compared with a stored result's)."""
        d = asdict(self)
        d["capture_steps"] = list(self.capture_steps)
        return d


MAIN_RECIPES = ("bf16", "fp8", "nvfp4", "mxfp4", "fp4_naive")
MAIN_SEEDS = (0, 1, 2, 3)
VARIANT_SEEDS = (0, 1, 2)
LONG_STEPS = 1600  # 4x the ci length
LONG_SEEDS = (0, 1)
STUDIES = {
    "main": MAIN_RECIPES,
    "all_fp4": ("nvfp4_all_fp4", "mxfp4_all_fp4", "fp4_naive_all_fp4"),
    "ablation": ("nvfp4_no_sr", "nvfp4_no_rht", "nvfp4_no_tiles"),
    "fwd_bwd": ("nvfp4_fwd_only", "nvfp4_bwd_only"),
    "final_hp": ("nvfp4_hp_final", "nvfp4_hp_eval"),
    "beyond": ("nvfp4_unbiased_sr", "nvfp4_4over6"),
    "length": ("bf16", "nvfp4_hp_final"),
}
"""Study -> its recipes. ``main``: the recipes side by side, every quantized one
with the same high-precision layers (the last block); ``all_fp4``: every block
quantized; ``ablation``: nvfp4 with one ingredient off; ``fwd_bwd``: FP4 in the
forward or the backward GEMMs only; ``final_hp``: the last 10% of steps in high
precision, and its control, FP4 training evaluated in high precision;
``beyond``: two ingredients from after NVIDIA's recipe; ``length``: 4x longer runs,
nvfp4 with NVIDIA's end-phase switch against the baseline."""


def _study() -> List[Run]:
    runs: List[Run] = []
    # The main recipes with four seeds, every variant with three, the long runs with
    # two: many hours on the 2-core CPU, with two runs side by side (`make experiments`).
    for study, recipes in STUDIES.items():
        if study == "length":
            continue
        seeds = MAIN_SEEDS if study == "main" else VARIANT_SEEDS
        runs += [Run(f"{recipe}_s{s}", recipe, seed=s, study=study) for recipe in recipes for s in seeds]
    runs += [Run(f"{recipe}_long_s{s}", recipe, seed=s, steps=LONG_STEPS, study="length")
             for recipe in STUDIES["length"] for s in LONG_SEEDS]
    runs.append(Run("underflow_bf16_s0", "bf16", study="underflow", capture_steps=(1, 50, 100, 200, 400)))
    # The re-run check's run: 60 steps go past the 40 warm-up steps into the cosine
    # schedule, and the last 6 run in high precision (the final stretch's switch).
    runs.append(Run("repro_nvfp4_hp_final_s0", "nvfp4_hp_final", steps=60, study="repro"))
    return runs


STUDY: List[Run] = _study()
REPRO_RUN = "repro_nvfp4_hp_final_s0"
"""The cheap run that ``check`` trains again to confirm the stored numbers reproduce."""
