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


@pytest.mark.parametrize("scheme", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_bits_are_one_byte_per_element_plus_a_scale(scheme):
    x = torch.randn(64, 64)
    stored = x.numel() * torch.empty(0, dtype=torch.float8_e4m3fn).element_size() + 4
    assert stored * 8 == pytest.approx(stored_bits_per_element(QuantSpec(scheme), x.numel()) * x.numel())


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
