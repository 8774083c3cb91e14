"""What FP4 training saves in memory: an account of every stored tensor of a training step.

:func:`memory_account` lists, for a GPT shape (:class:`~fp4lib.training.model.GPTConfig`),
a batch and a recipe, the tensors that training keeps in memory, each with its
element count and the bits per element it would be stored with on hardware that
runs the recipe's GEMMs natively (scales included):

* ``weights`` -- the FP32 master weights (what the optimizer updates);
* ``weight copies`` -- the copy each GEMM reads: BF16 for high-precision layers,
  the quantized weight for FP4/FP8 layers (one copy when Fprop and Dgrad quantize
  it identically, as with 16x16 tiles or one scale per tensor; two when the
  blocks run along different axes);
* ``gradients`` -- FP32 weight gradients;
* ``optimizer`` -- AdamW's two FP32 moments;
* ``activations`` -- what the forward pass saves for the backward pass. The input
  of a quantized linear is saved as its Wgrad operand (``wgrad_x``: blocks along
  the tokens), since that is the only use left for it; everything else (norm and
  attention inputs, the attention output, the GELU input, the embeddings'
  indices, the loss's log-softmax) stays in BF16, with FP32 norm statistics and
  attention log-sum-exps. (Where a layer stays in high precision, the attention
  output is also its output projection's saved input: one tensor.)

The activation inventory follows :class:`~fp4lib.training.model.GPT` op by op (PyTorch's
flash-style attention saves q, k, v, its output and the log-sum-exp, not the
attention matrix); ``tests/test_memory.py`` checks it against the tensors a real
forward pass saves, and the quantized sizes against :func:`fp4lib.quantize`'s
packed codes and scales.

Examples
--------
>>> from fp4lib.training.model import GPTConfig
>>> acct = memory_account(GPTConfig(), "nvfp4", batch_size=32)
>>> round(total_bytes(acct) / 2**20, 1), round(total_bytes(memory_account(GPTConfig(), "bf16", 32)) / 2**20, 1)
(70.0, 83.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

from ..numerics.constants import FP32_BITS, NVFP4_TILE, SCALE8_BITS
from ..numerics.schemes import scheme_info
from .model import MLP_EXPANSION, GPTConfig
from .recipes import Recipe, get_recipe
from .run import PRESETS
from .specs import QuantSpec

__all__ = ["StoredTensor", "KINDS", "PRESET_SHAPES", "stored_bits_per_element", "memory_account",
           "total_bytes", "bytes_by_kind", "memory_table"]

KINDS = ("weights", "weight copies", "gradients", "optimizer", "activations")
HP_BITS = 16  # BF16: the high-precision storage of activations and weight copies
INDEX_BITS = 64  # int64 token ids

PRESET_SHAPES: Dict[str, tuple] = {
    **{name: (PRESETS[name].model, PRESETS[name].train.batch_size) for name in ("ci", "gpu")},
    "7B": (GPTConfig(block_size=2048, vocab_size=50304, n_layer=32, n_head=32, n_embd=4096), 8),
}
"""Shape -> (model, sequences per batch): the book's two presets (their model and batch in
:data:`fp4lib.training.run.PRESETS`), and a 7B-shaped GPT (GPT-3 6.7B's layers, width and
context, GPT-2's vocabulary padded to 50304) with a micro-batch of 8 sequences."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor (or a group of equal ones) kept in memory during training."""

    kind: str
    name: str
    elements: int
    bits: float  # per element, scales included

    @property
    def bytes(self) -> float:
        return self.elements * self.bits / 8


def stored_bits_per_element(spec: Optional[QuantSpec], numel: int, hp_bits: int = HP_BITS) -> float:
    """Storage bits per element of a ``numel``-element operand quantized with ``spec``.

    E2M1 codes take 4 bits; MXFP4 adds an 8-bit E8M0 scale per 32, NVFP4 an 8-bit
    E4M3 scale per 16 (per 256 with 16x16 tiles) and one FP32 scale per tensor;
    the per-tensor E2M1 and FP8 schemes add one FP32 scale. ``None`` or a disabled
    spec: ``hp_bits``.

    Examples
    --------
    >>> stored_bits_per_element(QuantSpec("nvfp4"), 1 << 20)
    4.500030517578125
    >>> stored_bits_per_element(QuantSpec("mxfp4"), 1 << 20)
    4.25
    """
    if spec is None or not spec.enabled:
        return float(hp_bits)
    info = scheme_info(spec.scheme)
    bits = float(info.element_bits)
    if info.block_size:  # one scale per block, or per 16x16 tile
        scale_bits = FP32_BITS if info.scale_format == "fp32" else SCALE8_BITS
        bits += scale_bits / (info.block_size * (NVFP4_TILE if spec.tile else 1))
    if info.tensor_scale:
        bits += FP32_BITS / numel
    return bits


def _quantized_blocks(recipe: Recipe, n_layer: int) -> List[bool]:
    last = n_layer - recipe.hp_last_blocks
    return [recipe.quantized and recipe.hp_first_blocks <= b < last for b in range(n_layer)]


def memory_account(config: GPTConfig, recipe: Union[str, Recipe], batch_size: int,
                   tokens: Optional[int] = None, act_bits: int = HP_BITS) -> List[StoredTensor]:
    """Every tensor a training step of ``config`` under ``recipe`` keeps, with its storage bits.

    ``batch_size`` sequences of ``tokens`` tokens (default: the context length).
    ``act_bits``: the bits of high-precision activations (16 for BF16; 32 for an
    FP32 run, as on this book's CPU). Master weights, gradients and optimizer state
    are FP32 in every recipe, as in the FP4 papers.
    """
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    T = tokens or config.block_size
    if T > config.block_size:
        raise ValueError(f"tokens={T} exceeds the model's context length {config.block_size}")
    N = batch_size * T  # tokens in the batch
    H = MLP_EXPANSION * C
    nh = config.n_head
    bias = config.bias
    acct: List[StoredTensor] = []

    def param(name: str, n: int, copy_bits: float):
        acct.append(StoredTensor("weights", name, n, FP32_BITS))
        acct.append(StoredTensor("gradients", name, n, FP32_BITS))
        acct.append(StoredTensor("optimizer", name, 2 * n, FP32_BITS))
        acct.append(StoredTensor("weight copies", name, n, copy_bits))

    def act(name: str, n: int, bits: float = act_bits):
        acct.append(StoredTensor("activations", name, n, bits))

    # Embeddings (wte is tied with the output head), positions, final norm: high precision.
    param("wte (= lm_head)", V * C, HP_BITS)
    param("wpe", config.block_size * C, HP_BITS)
    norm_params = 2 * C if bias else C
    linears = (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, H), ("mlp.c_proj", H, C))
    for b, quantized in enumerate(_quantized_blocks(rec, L)):
        spec = rec.linear if quantized else None
        for ln in ("ln_1", "ln_2"):
            param(f"h.{b}.{ln}", norm_params, HP_BITS)
        for name, fan_in, fan_out in linears:
            w = fan_in * fan_out
            if spec is None:
                param(f"h.{b}.{name}.weight", w, HP_BITS)
            else:
                fprop, dgrad = spec.fprop_w, spec.dgrad_w
                same = fprop == dgrad and (fprop.tile or fprop.block_size == 0)
                copies = stored_bits_per_element(fprop, w) + (0 if same else stored_bits_per_element(dgrad, w))
                param(f"h.{b}.{name}.weight", w, copies)
            if bias:
                param(f"h.{b}.{name}.bias", fan_out, HP_BITS)
        def x_in(width: int) -> float:
            return stored_bits_per_element(spec.wgrad_x, N * width, act_bits) if spec else act_bits

        # Activations saved for the backward pass, op by op.
        act(f"h.{b}.ln_1 input", N * C)
        act(f"h.{b}.ln_1 mean, rstd", 2 * N, FP32_BITS)
        act(f"h.{b}.attn.c_attn input", N * C, x_in(C))
        act(f"h.{b}.attention q, k, v", N * 3 * C)
        # The attention output is what the output projection reads: one tensor in high
        # precision; a quantized projection saves its own Wgrad copy beside it.
        act(f"h.{b}.attention output", N * C)
        act(f"h.{b}.attention log-sum-exp", batch_size * nh * T, FP32_BITS)
        if spec is not None:
            act(f"h.{b}.attn.c_proj input", N * C, x_in(C))
        act(f"h.{b}.ln_2 input", N * C)
        act(f"h.{b}.ln_2 mean, rstd", 2 * N, FP32_BITS)
        act(f"h.{b}.mlp.c_fc input", N * C, x_in(C))
        act(f"h.{b}.gelu input", N * H)
        act(f"h.{b}.mlp.c_proj input", N * H, x_in(H))
    param("ln_f", norm_params, HP_BITS)
    act("token ids", N, INDEX_BITS)
    act("positions", T, INDEX_BITS)
    act("ln_f input", N * C)
    act("ln_f mean, rstd", 2 * N, FP32_BITS)
    act("lm_head input", N * C)
    act("log-softmax of the logits", N * V)
    act("targets", N, INDEX_BITS)
    act("loss normaliser", 1, FP32_BITS)
    return acct


def total_bytes(acct: Sequence[StoredTensor]) -> float:
    """Bytes of the whole account."""
    return sum(t.bytes for t in acct)


def bytes_by_kind(acct: Sequence[StoredTensor]) -> Dict[str, float]:
    """Bytes per kind, in :data:`KINDS` order."""
    out = {k: 0.0 for k in KINDS}
    for t in acct:
        out[t.kind] += t.bytes
    return out


def memory_table(shapes: Sequence[str] = tuple(PRESET_SHAPES),
                 recipes: Sequence[str] = ("bf16", "fp8", "nvfp4", "mxfp4", "fp4_naive", "nvfp4_all_fp4")
                 ) -> List[dict]:
    """One row per shape and recipe: bytes per kind, total, and the total relative to bf16."""
    rows = []
    for shape in shapes:
        config, batch = PRESET_SHAPES[shape]
        base = total_bytes(memory_account(config, "bf16", batch))
        for name in recipes:
            acct = memory_account(config, name, batch)
            rows.append({"shape": shape, "recipe": name, **bytes_by_kind(acct), "total": total_bytes(acct),
                         "vs bf16": total_bytes(acct) / base})
    return rows
