"""The memory account (:mod:`fp4lib.training.memory`) against real tensors."""

import pytest
import torch

from fp4lib import quantize
from fp4lib.training.memory import (PRESET_SHAPES, bytes_by_kind, memory_account, memory_table,
                                    stored_bits_per_element)
from fp4lib.training.model import GPT, GPTConfig
from fp4lib.training.recipes import get_recipe
from fp4lib.training.specs import QuantSpec

CFG = GPTConfig(block_size=32, vocab_size=256, n_layer=3, n_head=2, n_embd=48)


def saved_activation_bytes(model, batch_size):
    """Bytes of the distinct storages a real forward pass saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.randint(0, CFG.vocab_size, (batch_size, CFG.block_size), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, torch.roll(idx, -1, 1))
    return sum(storages.values())


def test_activation_inventory_matches_what_a_forward_pass_saves():
    torch.manual_seed(0)
    model = GPT(CFG)
    for batch in (1, 3):
        acct = memory_account(CFG, "bf16", batch, act_bits=32)  # this CPU run keeps activations in FP32
        assert bytes_by_kind(acct)["activations"] == saved_activation_bytes(model, batch)


def test_weights_count_every_parameter_once():
    for config, _ in PRESET_SHAPES.values():
        if config.n_layer > 8:
            continue
        model = GPT(config)
        acct = memory_account(config, "nvfp4", 1)
        assert sum(t.elements for t in acct if t.kind == "weights") == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", [QuantSpec("nvfp4"), QuantSpec("nvfp4", tile=True), QuantSpec("mxfp4"),
                                  QuantSpec("e2m1_per_tensor")], ids=QuantSpec.short)
def test_stored_bits_per_element_are_the_bytes_of_real_quantized_tensors(spec):
    x = torch.randn(192, 256)
    q = quantize(x, spec.scheme, tile=spec.tile, backend="reference")
    stored = q.packed.numel() + q.scale.numel() * q.scale.element_size()
    stored += 4 if q.global_scale is not None else 0
    assert stored * 8 == pytest.approx(stored_bits_per_element(spec, x.numel()) * x.numel())


FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def fp8_stored_bytes(t: torch.Tensor, scheme: str) -> int:
    """Bytes of ``t`` stored as FP8 training keeps it, built as real tensors: the codes in
    the FP8 dtype and one FP32 decode scale (amax / the format's largest value)."""
    dtype = FP8_DTYPES[scheme]
    scale = (t.detach().abs().amax().float() / torch.finfo(dtype).max).reshape(())
    codes = (t.detach().float() / scale).to(dtype)
    return codes.nbytes + scale.nbytes


@pytest.mark.parametrize("scheme", list(FP8_DTYPES))
def test_fp8_bits_are_the_bytes_of_real_fp8_tensors(scheme):
    for shape in ((64, 64), (3, 48), (1,)):
        x = torch.randn(shape)
        stored = fp8_stored_bytes(x, scheme)
        assert stored * 8 == pytest.approx(stored_bits_per_element(QuantSpec(scheme), x.numel()) * x.numel())


def test_fp8_account_equals_the_bytes_of_real_tensors_of_a_two_block_model():
    """The FP8 recipe (block 0 in FP8, the last block in BF16) on a tiny GPT, counted from
    real tensors: each weight's copy (one FP8 E4M3 tensor and its scale for block 0's linears,
    BF16 elsewhere) and the inputs that block 0's linears save for Wgrad (FP8 E4M3 and a
    scale), captured from a forward pass."""
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    batch = 3
    torch.manual_seed(0)
    model = GPT(cfg)
    acct = memory_account(cfg, "fp8", batch)
    quantized = {f"transformer.h.0.{name}": name for name in QUANTIZED_LINEARS}

    copies = 0
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        copies += fp8_stored_bytes(p, "fp8_e4m3") if module in quantized else p.detach().bfloat16().nbytes
    assert bytes_by_kind(acct)["weight copies"] == copies

    inputs = {}
    modules = dict(model.named_modules())
    for full, short in quantized.items():
        modules[full].register_forward_hook(lambda m, args, out, short=short: inputs.__setitem__(short, args[0]))
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(0))
    model(idx, torch.roll(idx, -1, 1))
    assert set(inputs) == set(QUANTIZED_LINEARS)
    entries = {t.name: t.bytes for t in acct if t.kind == "activations"}
    for short, x in inputs.items():
        assert entries[f"h.0.{short} input"] == fp8_stored_bytes(x, "fp8_e4m3"), short
    # The high-precision block saves no separate input for its output projection.
    assert "h.1.attn.c_proj input" not in entries


def test_fp4_saves_memory_in_weight_copies_and_activations_only():
    for row in memory_table():
        base = next(r for r in memory_table(shapes=(row["shape"],), recipes=("bf16",)))
        for kind in ("weights", "gradients", "optimizer"):
            assert row[kind] == base[kind]
        if row["recipe"] != "bf16":
            assert row["weight copies"] < base["weight copies"] and row["activations"] < base["activations"]
    nv = memory_account(PRESET_SHAPES["7B"][0], get_recipe("nvfp4"), 8)
    assert bytes_by_kind(nv)["weight copies"] < bytes_by_kind(memory_account(PRESET_SHAPES["7B"][0], "fp8", 8))[
        "weight copies"]
