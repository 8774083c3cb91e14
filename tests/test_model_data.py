"""The tiny GPT (fp4lib.training.model) and the offline corpus (fp4lib.training.data)."""

import gzip
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fp4lib.training import data
from fp4lib.training.data import (
    DEFAULT_MAX_BYTES,
    STDLIB_EXCLUDED_DIRS,
    TokenWindows,
    load_corpus,
    split_tokens,
    stdlib_corpus,
    stdlib_files,
    text_corpus,
)
from fp4lib.training.model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def test_ci_model_has_the_prototypes_size():
    assert GPT(GPTConfig()).num_params() == 836_736  # 0.84M, the ci preset the book trains


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256) and loss.shape == ()
    assert abs(loss.item() - math.log(256)) < 0.2
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, 256) and loss is None


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256
    la, lb = model(a)[0], model(b)[0]
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6) and not torch.allclose(la[0, 10:], lb[0, 10:])


def test_model_rejects_long_input_and_bad_config():
    with pytest.raises(ValueError, match="block_size 16"):
        GPT(SMALL)(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_generate_appends_tokens():
    torch.manual_seed(0)
    out = GPT(SMALL).generate(torch.zeros(1, 3, dtype=torch.long), 4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 7)


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------
def test_stdlib_files_are_sorted_and_skip_tests_and_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(f.endswith(".py") for f in rel)
    assert not any(set(r.split("/")[:-1]) & set(STDLIB_EXCLUDED_DIRS) for r in rel)


def test_stdlib_corpus_is_deterministic_and_cut():
    a, b = stdlib_corpus(50_000), stdlib_corpus.__wrapped__(50_000)  # cached and rebuilt
    assert a.data == b.data and a.sha256 == b.sha256 and len(a) == 50_000
    first = stdlib_files()[0]
    assert a.data.startswith(b"# ==== " + first.name.encode())
    assert a.name.startswith("python-stdlib-") and a.info()["sha256"] == a.sha256
    assert DEFAULT_MAX_BYTES == 8 * 1024 * 1024


def test_bundled_corpus_is_the_default_everywhere():
    """The shipped bytes, whatever the interpreter: the study's corpus (its SHA-256 is in every stored run)."""
    full = data.bundled_corpus(None)
    assert full.sha256 == data.BUNDLED_SHA256 and len(full) == 12_142_937 and full.n_files == 734
    ci = load_corpus(None, DEFAULT_MAX_BYTES)
    assert ci.sha256 == "e25e71053e0281fd82f3b5143f668e005925372487b5cfcc8761ac91b45e9192" and ci.n_files == 571
    assert full.data.startswith(ci.data) and (data.BUNDLED_CORPUS.parent / "LICENSE-python.txt").is_file()
    if sys.version_info[:3] == (3, 11, 7):  # the interpreter it was made from rebuilds the same bytes
        assert stdlib_corpus(None).sha256 == data.BUNDLED_SHA256


def test_a_damaged_bundled_corpus_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "corpus.txt.gz"
    bad.write_bytes(gzip.compress(b"not the corpus"))
    monkeypatch.setattr(data, "BUNDLED_CORPUS", bad)
    data._bundled_bytes.cache_clear()
    try:
        with pytest.raises(ValueError, match="has SHA-256 .* not the expected"):
            load_corpus(None)
        bad.write_bytes(b"garbage")
        with pytest.raises(ValueError, match="cannot be read"):
            data._bundled_bytes.__wrapped__()
        monkeypatch.setattr(data, "BUNDLED_CORPUS", tmp_path / "absent.gz")
        with pytest.raises(ValueError, match="is missing"):
            data._bundled_bytes.__wrapped__()
    finally:
        data._bundled_bytes.cache_clear()


def test_text_corpus_and_load_corpus(tmp_path):
    p = tmp_path / "book.txt"
    p.write_bytes(b"hello world\n" * 100)
    c = load_corpus(str(p))
    assert c.data == b"hello world\n" * 100 and c.n_files == 1 and len(c.sha256) == 64
    assert text_corpus(str(p), max_bytes=5).data == b"hello"
    assert c.tokens().dtype == torch.uint8 and c.tokens()[0] == ord("h")
    with pytest.raises(ValueError, match="corpus path"):
        text_corpus(str(tmp_path / "missing.txt"))


def test_split_is_last_ten_percent():
    train, val = split_tokens(torch.arange(1000))
    assert len(val) == 100 and int(val[0]) == 900 and len(train) == 900
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(torch.arange(10), 1.0)


def test_token_windows_are_next_token_pairs_and_replayable():
    tokens = torch.arange(200, dtype=torch.int64) % 256
    w = TokenWindows(tokens, block_size=8)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x, y = w.sample(4, g)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.is_contiguous() and y.is_contiguous()
    g.set_state(state)
    assert torch.equal(w.sample(4, g)[0], x)
    with pytest.raises(ValueError, match="validation split has 8 tokens; at least block_size \\+ 1 = 9"):
        TokenWindows(torch.arange(8), 8, name="the validation split")
