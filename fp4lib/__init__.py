"""fp4lib: FP4 formats, block scaling and FP4 training, as used by the book
*Pretraining LLMs in FP4*.

The public names::

    from fp4lib import E2M1, BNB_FP4, NF4             # element formats (chapter 1)
    from fp4lib import quantize, fake_quantize         # block scaling (chapter 2)
    from fp4lib import QuantizedTensor, NestedAbsmax, SCHEMES
    from fp4lib import pack_nibbles, unpack_nibbles     # two FP4 codes per byte (chapter 2)
    from fp4lib import FP4Linear, LinearSpec, QuantSpec  # FP4 training (chapter 4)
    from fp4lib import Recipe, RECIPES, get_recipe, apply_recipe, nvfp4_recipe, mxfp4_recipe, naive_recipe, fp8_recipe
    from fp4lib import GPT, GPTConfig, Trainer, TrainConfig, TrainingDiverged, run_training   # chapter 5

The rest lives in the subpackages: :mod:`fp4lib.numerics` (formats, scales,
quantizers, Hadamard transforms, kernels, error metrics), :mod:`fp4lib.training`
(specs, FP4 layers, recipes, model, data, training loop, checkpoints,
distributed runs, memory), :mod:`fp4lib.engines` (bitsandbytes and torchao),
:mod:`fp4lib.display` (figure style, notebook output) and :mod:`fp4lib.study`.

Bit 0 is the least significant bit of a code throughout.
"""

from .numerics.formats import BNB_FP4, E2M1, FORMATS, NF4, CodeFields, ElementFormat
from .numerics.packing import pack_nibbles, unpack_nibbles
from .numerics.quantize import fake_quantize, quantize
from .numerics.schemes import SCHEMES
from .numerics.tensor import NestedAbsmax, QuantizedTensor
from .training.specs import LinearSpec, QuantSpec
from .training.layers import FP4Linear
from .training.apply import apply_recipe
from .training.recipes import RECIPES, Recipe, fp8_recipe, get_recipe, mxfp4_recipe, naive_recipe, nvfp4_recipe
from .training.model import GPT, GPTConfig
from .training.config import TrainConfig
from .training.loop import Trainer, TrainingDiverged
from .training.run import run_training

from ._version import __version__

__all__ = [
    "E2M1",
    "BNB_FP4",
    "NF4",
    "FORMATS",
    "CodeFields",
    "ElementFormat",
    "SCHEMES",
    "QuantizedTensor",
    "NestedAbsmax",
    "quantize",
    "fake_quantize",
    "pack_nibbles",
    "unpack_nibbles",
    "FP4Linear",
    "LinearSpec",
    "QuantSpec",
    "Recipe",
    "RECIPES",
    "apply_recipe",
    "get_recipe",
    "nvfp4_recipe",
    "mxfp4_recipe",
    "naive_recipe",
    "fp8_recipe",
    "GPT",
    "GPTConfig",
    "Trainer",
    "TrainConfig",
    "TrainingDiverged",
    "run_training",
    "__version__",
]
