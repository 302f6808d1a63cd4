"""Corpus loading, bad input, deterministic batches."""

import pytest
import torch

from normlab.study.config import StudyConfig, StudyConfigError, check_or_write_config, parse_variant, parse_variants
from normlab.study.data import BUILTIN, load_corpus, read_text_file


def test_builtin_corpus_split_and_roundtrip():
    c = load_corpus()
    assert c.source == BUILTIN and len(c.text) > 400_000
    assert len(c.train) == int(0.9 * len(c.text)) and len(c.train) + len(c.val) == len(c.text)
    assert c.decode(c.encode("Python help")) == "Python help"
    assert c.vocab_size == len(set(c.text))


def test_batches_depend_only_on_seed_and_index_and_split_across_ranks():
    c = load_corpus()
    x, y = c.batch("train", 5, 8, 16, seed=1)
    x2, _ = c.batch("train", 5, 8, 16, seed=1)
    assert torch.equal(x, x2) and torch.equal(y[:, :-1], x[:, 1:])
    assert not torch.equal(x, c.batch("train", 6, 8, 16, seed=1)[0])
    halves = [c.batch("train", 5, 8, 16, seed=1, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        c.batch("train", 0, 7, 16, seed=1, world=2)


def test_data_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_text_file(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_text_file(tmp_path / "blank.txt")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="binary"):
        read_text_file(tmp_path / "bin.dat")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="directory"):
        read_text_file(tmp_path)
    (tmp_path / "short.txt").write_text("tiny text")
    with pytest.raises(ValueError, match="too short for context 64"):
        load_corpus(tmp_path / "short.txt").check_block_size(64)
    (tmp_path / "ok.txt").write_text("héllo wörld ✓ " * 100)
    c = load_corpus(tmp_path / "ok.txt")
    assert "✓" in c.chars and c.source.endswith("ok.txt")


def test_variant_names():
    assert parse_variant("RMSNorm-pre") == ("rmsnorm", "pre")
    assert parse_variants("rmsnorm-pre, batchnorm-post") == ["rmsnorm-pre", "batchnorm-post"]
    for bad in ("rmsnorm", "foonorm-pre", "layernorm-middle", ""):
        with pytest.raises(StudyConfigError, match="variant"):
            parse_variants(bad)
    with pytest.raises(StudyConfigError, match="duplicate"):
        parse_variants("dyt-pre,dyt-pre")
    with pytest.raises(StudyConfigError, match="experiments"):
        StudyConfig(experiments=[99])


def test_config_mismatch_is_an_error_and_touches_nothing(tmp_path):
    check_or_write_config(tmp_path / "run", {"steps": 10, "lr": 1e-3})
    check_or_write_config(tmp_path / "run", {"steps": 10, "lr": 1e-3})  # same: fine
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(StudyConfigError, match=r"another configuration \(steps: 10 there vs 20 now\)"):
        check_or_write_config(tmp_path / "run", {"steps": 20, "lr": 1e-3})
    assert (tmp_path / "run" / "config.json").read_text() == before
