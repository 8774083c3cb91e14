"""The training study behind chapter 5: its runs.

Each :class:`Run` trains the tiny GPT with one recipe, seed and length; :data:`STUDY`
lists them, grouped into studies (``main``, ``ablation``, ``fwd_bwd``, ``length``,
``underflow``, ``repro``; see :mod:`fp4lib.study`).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

__all__ = ["Run", "STUDY", "REPRO_RUN", "UNDERFLOW_MODULE"]

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


def _study() -> List[Run]:
    runs: List[Run] = []
    # Two seeds of each main recipe, three ablations and the forward/backward split:
    # about 60 minutes of the 2-core CI machine with two runs side by side. The
    # gap-over-length study reads the validation curves of the main runs and adds
    # NVIDIA's remedy (the last 10% of steps in high precision) at the same length.
    seeds = {"bf16": (0, 1), "fp4_naive": (0, 1), "mxfp4": (0, 1), "nvfp4": (0, 1)}
    for recipe, ss in seeds.items():
        runs += [Run(f"{recipe}_s{s}", recipe, seed=s) for s in ss]
    for recipe in ("nvfp4_all_fp4", "nvfp4_no_sr", "nvfp4_no_rht"):
        runs.append(Run(f"{recipe}_s0", recipe, study="ablation"))
    for recipe in ("nvfp4_fwd_only", "nvfp4_bwd_only"):
        runs.append(Run(f"{recipe}_s0", recipe, study="fwd_bwd"))
    runs.append(Run("nvfp4_hp_final_s0", "nvfp4_hp_final", study="length"))
    runs.append(Run("underflow_bf16_s0", "bf16", study="underflow", capture_steps=(1, 50, 100, 200, 400)))
    # The re-run check's run: 60 steps go past the 40 warm-up steps into the cosine
    # schedule, and the last 6 run in high precision (the final stretch's switch).
    runs.append(Run("repro_nvfp4_hp_final_s0", "nvfp4_hp_final", steps=60, study="repro"))
    return runs


STUDY: List[Run] = _study()
REPRO_RUN = "repro_nvfp4_hp_final_s0"
"""The cheap run that ``check`` trains again to confirm the stored numbers reproduce."""
