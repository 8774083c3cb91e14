"""fp4lib: FP4 formats, block scaling and FP4 training, as used by the book
*Pretraining LLMs in FP4*.

The public names::

    from fp4lib import E2M1, BNB_FP4, NF4             # element formats (chapter 1)
    from fp4lib import quantize, fake_quantize         # block scaling (chapter 2)
    from fp4lib import QuantizedTensor
    from fp4lib import FP4Linear, apply_recipe, GPT, Trainer   # FP4 training (chapters 4-5)

Bit 0 is the least significant bit of a code throughout.
"""

from .numerics.formats import BNB_FP4, E2M1, FORMATS, NF4, CodeFields, ElementFormat
from .numerics.hadamard import block_hadamard, hadamard_matrix, inverse_block_hadamard, random_signs
from .numerics.packing import pack_nibbles, unpack_nibbles
from .numerics.quantize import fake_quantize, quantize
from .numerics.schemes import SCHEMES
from .numerics.tensor import NestedAbsmax, QuantizedTensor
from .training.specs import LinearSpec, QuantSpec
from .training.layers import FP4Linear
from .training.apply import apply_recipe
from .training.recipes import RECIPES, get_recipe, mxfp4_recipe, naive_recipe, nvfp4_recipe
from .training.model import GPT, GPTConfig
from .training.loop import Trainer, TrainConfig, TrainingDiverged

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
    "block_hadamard",
    "inverse_block_hadamard",
    "hadamard_matrix",
    "random_signs",
    "FP4Linear",
    "LinearSpec",
    "QuantSpec",
    "RECIPES",
    "apply_recipe",
    "get_recipe",
    "nvfp4_recipe",
    "mxfp4_recipe",
    "naive_recipe",
    "GPT",
    "GPTConfig",
    "Trainer",
    "TrainConfig",
    "TrainingDiverged",
]
