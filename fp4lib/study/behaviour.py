"""What the study's code computes, as two digests: provenance that follows behaviour, not files.

A stored result goes stale when a number it depends on can change. Hashing source
files would also mark it stale when a function merely moves or is renamed, so the
study pins the *bits* instead, with two canaries:

* :func:`numerics_digest` -- every public quantizer (:func:`fp4lib.quantize` and
  :func:`fp4lib.fake_quantize`) for every scheme, scale rule, tile choice and rounding
  mode, with and without a group amax, on fixed tensors (float32, bfloat16 and
  float16; Gaussian-like, heavy-tailed, zeros and signed zeros, near the float32
  limits). The inputs are built from integers with exact arithmetic, and the
  quantizers are elementwise, so this digest is the same on every CPU and under
  every ATen kernel set. (The one exception, left out: bitsandbytes' double
  quantization decodes its absmax through an 8-bit table that ``torch.linspace``
  builds, whose last bits depend on the kernel set.)
* :func:`training_digest` -- ten steps of every named recipe on the ``tiny``
  preset, the high-precision final stretch and evaluation included, and the
  underflow capture of the study's ``underflow`` run: the data pipeline, the model,
  the FP4 layers' three GEMMs, the Hadamard transforms, the optimizer and the
  schedule. Matrix products round differently under other CPU kernels, so this
  digest belongs to one numeric environment
  (:func:`~fp4lib.study.provenance.numeric_fingerprint`) and is stored per
  environment.

The study stores both next to its results (``behaviour.json``); ``python -m
fp4lib.study check`` computes them again and calls every result stale when either
differs. Moving code, renaming it or editing its documentation changes neither
digest; changing a constant, a formula or the order of two roundings changes one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

__all__ = ["canary_tensors", "numerics_digest", "training_digest", "TRAINING_CANARY_STEPS", "BEHAVIOUR_FILE",
           "load_behaviour", "canary_fingerprint", "training_entry", "store_behaviour"]

TRAINING_CANARY_STEPS = 10
"""Steps per recipe in :func:`training_digest`: past the tiny preset's 5 warm-up
steps, with the final 10% (the last step) in high precision for ``nvfp4_hp_final``."""


class _Digest:
    """SHA-256 over labelled tensors and values, in call order."""

    def __init__(self):
        self._h = hashlib.sha256()

    def tensor(self, label: str, t: torch.Tensor) -> None:
        shape = tuple(t.shape)
        t = t.detach().cpu().contiguous().reshape(-1)
        head = f"{label}|{t.dtype}|{shape}|".encode()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._h.update(head + hashlib.sha256(data).digest())

    def value(self, label: str, v) -> None:
        self._h.update(f"{label}|{json.dumps(v, sort_keys=True, default=_float_hex)}|".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _float_hex(v):
    return float(v).hex()


def _lcg_ints(n: int, seed: int) -> List[int]:
    """``n`` integers in [0, 2**32) from a 64-bit linear congruential generator (Knuth's MMIX constants)."""
    out, s = [], (seed * 0x9E3779B97F4A7C15 + 1) % (1 << 64)
    for _ in range(n):
        s = (6364136223846793005 * s + 1442695040888963407) % (1 << 64)
        out.append(s >> 32)
    return out


def _ints(shape, seed: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return torch.tensor(_lcg_ints(n, seed), dtype=torch.int64).reshape(shape)


def canary_tensors() -> dict:
    """The fixed inputs of :func:`numerics_digest`, by name (float tensors, exact from integers).

    ``gauss``: sums of four uniforms, centred (bell-shaped, about unit scale);
    ``heavy``: those times powers of two from 2**-12 to 2**12; ``zeros``: blocks of
    +0.0, -0.0 and one lone value; ``huge`` and ``tiny``: ``gauss`` near 2**100 and
    2**-100; ``bf16`` and ``fp16``: ``gauss`` and ``heavy`` in half precision;
    ``odd``: 7 elements (a partial bitsandbytes block); ``uniforms``: stochastic
    rounding draws for each (multiples of 2**-24 in [0, 1)).
    """
    g = sum((_ints((64, 128), s) & 0xFFFF) for s in range(4)).to(torch.float64)
    gauss = ((g - 2 * 0xFFFF) * 2.0 ** -15).float()  # exact: integers times a power of two
    exps = (_ints((64, 128), 11) % 25 - 12).to(torch.float64)
    heavy = (gauss.double() * torch.pow(2.0, exps)).float()
    zeros = torch.zeros(32, 64)
    zeros[1::2] = -0.0
    zeros[5, 7] = 3.0
    zeros[9, 40:48] = -0.0
    out = {
        "gauss": gauss,
        "heavy": heavy,
        "zeros": zeros,
        "huge": gauss[:32] * 2.0 ** 100,
        "tiny": gauss[:32] * 2.0 ** -100,
        "bf16": torch.cat([gauss[:32], heavy[:32]]).bfloat16(),
        "fp16": gauss[:32].half(),
        "odd": gauss[0, :7].clone(),
    }
    uniforms = {}
    for i, (name, t) in enumerate(out.items()):
        u = (_ints(tuple(t.shape), 100 + i) >> 8).to(torch.float64) * 2.0 ** -24
        uniforms[name] = u.float()
    out["uniforms"] = uniforms
    return out


def _quantize_cases() -> Iterator[tuple]:
    """``(scheme, keyword arguments)`` for every path of :func:`fp4lib.quantize` the study can reach."""
    from ..numerics.schemes import scheme_info

    for scheme in ("bnb_fp4", "nf4"):
        for block_size in (64, 256):
            for double_quant in (False, True):
                yield scheme, dict(block_size=block_size, double_quant=double_quant)
    for rule in (r.value for r in scheme_info("mxfp4").scale_rules):
        for rounding in ("nearest", "stochastic"):
            yield "mxfp4", dict(scale_rule=rule, rounding=rounding)
    for rule in (r.value for r in scheme_info("nvfp4").scale_rules):
        for tile in (False, True):
            for rounding in ("nearest", "stochastic"):
                yield "nvfp4", dict(scale_rule=rule, tile=tile, rounding=rounding)
    for rounding in ("nearest", "stochastic"):
        yield "e2m1_per_tensor", dict(rounding=rounding)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def numerics_digest() -> str:
    """SHA-256 (hex) of what every public quantizer makes of :func:`canary_tensors`.

    For each scheme and option (:func:`_quantize_cases`) and each input, with the
    reference backend: the packed codes, the scales and the dequantized tensor;
    then the fake quantization of the GEMM operands (along either axis, factored,
    with a group amax, FP8 included) and the handling of non-finite input. A case
    the library refuses contributes the name of the exception it raised.
    Independent of the CPU kernel set.

    Examples
    --------
    >>> d = numerics_digest()
    >>> len(d), d == numerics_digest()
    (64, True)
    """
    from .. import fake_quantize, quantize

    inputs = canary_tensors()
    uniforms = inputs.pop("uniforms")
    d = _Digest()
    with _threads(1):
        for scheme, kwargs in _quantize_cases():
            for name, x in inputs.items():
                label = f"quantize|{scheme}|{sorted(kwargs.items())}|{name}"
                kw = dict(kwargs, backend="reference")
                if kw.get("rounding") == "stochastic":
                    kw["uniforms"] = uniforms[name]
                try:
                    q = quantize(x, scheme, **kw)
                except (ValueError, TypeError) as e:
                    d.value(label, type(e).__name__)
                    continue
                d.tensor(label + "|packed", q.packed)
                d.tensor(label + "|scale", q.scale)
                if kwargs.get("double_quant"):
                    # The 8-bit table the nested codes index is built with torch.linspace, as
                    # bitsandbytes builds it, and its last bits follow the CPU kernel set; the
                    # codes, group absmax and offset do not.
                    for part in ("codes", "absmax2", "offset"):
                        d.tensor(f"{label}|nested_{part}", getattr(q.nested, part))
                else:
                    d.tensor(label + "|dequantized", q.dequantize())
        operand = inputs["heavy"][:, :64]
        amax = operand.abs().amax() * 2  # a group maximum above the operand's own
        for scheme in ("mxfp4", "nvfp4", "e2m1_per_tensor", "fp8_e4m3", "fp8_e5m2"):
            for axis in (0, 1):
                label = f"fake_quantize|{scheme}|axis{axis}"
                values, scale = fake_quantize(operand, scheme, axis=axis, factored=True)
                d.tensor(label + "|values", values)
                d.tensor(label + "|tensor_scale", scale if scale is not None else torch.empty(0))
                if scheme != "mxfp4":
                    d.tensor(label + "|group_amax", fake_quantize(operand, scheme, axis=axis, tensor_amax=amax))
        bad = inputs["gauss"][:4, :32].clone()
        bad[0, 3], bad[2, 17] = float("inf"), float("nan")
        for scheme in ("mxfp4", "nvfp4", "nf4"):
            d.tensor(f"nonfinite|{scheme}", quantize(bad, scheme, nonfinite="zero", backend="reference").dequantize())
    return d.hexdigest()


def training_digest(recipes: Optional[Sequence[str]] = None) -> str:
    """SHA-256 (hex) of :data:`TRAINING_CANARY_STEPS` steps of every named recipe on the
    ``tiny`` preset (seed 0, one thread, the fused fake-quantization backend that the
    compiled one is checked against), every training and validation loss included,
    and of the underflow capture the study's ``underflow`` run makes.

    The same code gives the same digest in one numeric environment; other CPU
    kernels give another (see the module docs). ``recipes``: only these, and no
    underflow capture (for tests; the stored digest is of every recipe).
    """
    from ..training.diagnostics import underflow_capture_hook
    from ..training.recipes import RECIPES
    from ..training.run import PRESETS, build_run, run_training
    from .definition import UNDERFLOW_MODULE

    d = _Digest()
    with _threads(1):
        for name in sorted(RECIPES) if recipes is None else recipes:
            r = run_training(name, "tiny", steps=TRAINING_CANARY_STEPS, seed=0, backend="fused", progress=False,
                             eval_every=5, device="cpu")
            d.value(f"train|{name}", [r.train_losses, [list(v) for v in r.val_losses], r.final_val_loss])
        if recipes is not None:
            return d.hexdigest()
        captured: dict = {}
        _, _, _, val, _ = build_run("bf16", "tiny")
        batch = val.sample(8, torch.Generator().manual_seed(0))
        hook = underflow_capture_hook((2,), captured, batch, PRESETS["tiny"].model.n_layer, UNDERFLOW_MODULE)
        run_training("bf16", "tiny", steps=3, seed=1, backend="fused", progress=False, device="cpu", hooks=[hook])
        d.value("underflow", captured)
    return d.hexdigest()



# --- The stored digests ----------------------------------------------------------------

BEHAVIOUR_FILE = "behaviour.json"
"""Beside the results: the digests of the code that made them (see :func:`load_behaviour`)."""


def _training_id(entry: dict) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def load_behaviour(results_dir) -> Optional[dict]:
    """The stored digests, or ``None`` where there is no ``behaviour.json``.

    ``{"numerics": digest, "training": [{"fingerprint": ..., "digest": ...}, ...],
    "id": ...}``: the :func:`numerics_digest` of the code that made the stored
    results, its :func:`training_digest` in each numeric environment where it was
    measured, and the id that every result made with that code carries
    (``record["behaviour"]["id"]``).
    """
    path = Path(results_dir) / BEHAVIOUR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict) or not {"numerics", "training", "id"} <= set(data):
        raise ValueError(f"{path}: expected an object with 'numerics', 'training' and 'id'")
    return data


def canary_fingerprint() -> dict:
    """The numeric environment of :func:`training_digest`: this one's, at the one thread the canary uses."""
    from .provenance import numeric_fingerprint

    return dict(numeric_fingerprint(), threads=1)


def training_entry(behaviour: Optional[dict], fingerprint: dict) -> Optional[dict]:
    """The stored training digest for ``fingerprint``'s environment, if one was measured there."""
    from .provenance import same_environment

    for entry in (behaviour or {}).get("training", []):
        if same_environment(entry.get("fingerprint", {}), fingerprint):
            return entry
    return None


def store_behaviour(results_dir, numerics: str, fingerprint: dict, training: str) -> dict:
    """Add this environment's digests to ``behaviour.json``, and return the record's ``behaviour`` field.

    Where the stored digests disagree with these (the code now computes other
    numbers), the file starts again with these alone, under a new id, so that every
    result made before shows as stale.
    """
    results_dir = Path(results_dir)
    stored = load_behaviour(results_dir)
    entry = {"fingerprint": fingerprint, "digest": training}
    old = training_entry(stored, fingerprint)
    if stored is None or stored["numerics"] != numerics or (old is not None and old["digest"] != training):
        stored = {"numerics": numerics, "id": _training_id(entry), "training": [entry]}
    elif old is None:
        stored["training"].append(entry)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / BEHAVIOUR_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1) + "\n")
    os.replace(tmp, path)
    return {"numerics": numerics, "id": stored["id"]}
