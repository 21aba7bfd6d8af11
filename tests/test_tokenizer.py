"""The offline CLIP tokenizer: known words are single tokens, unknown text falls back to characters."""

from __future__ import annotations

from pathlib import Path

from t2iadapter.tokenizer import build_clip_tokenizer, clip_vocab_and_merges

WORDS = ["a", "large", "small", "red", "blue", "star", "circle", "left", "of", "above", "aaa", "aa", "ring", "rings"]


def test_known_words_are_single_tokens(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(WORDS, tmp_path)
    caption = "a large red star left of a small blue circle"
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(caption.split()) + 2
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in caption.split()]
    assert tok.decode(ids, skip_special_tokens=True) == caption
    for word in WORDS:
        assert len(tok(word).input_ids) == 3, word


def test_unknown_word_splits_into_characters(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(WORDS, tmp_path)
    tokens = tok.convert_ids_to_tokens(tok("zebra").input_ids[1:-1])
    assert "".join(tokens) == "zebra</w>" and len(tokens) >= 3
    assert tok.unk_token_id not in tok("zebra").input_ids[1:-1]


def test_padding_and_special_tokens(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(WORDS, tmp_path, model_max_length=16)
    assert tok.model_max_length == 16
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    batch = tok(["red", ""], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert tuple(batch.input_ids.shape) == (2, 16)
    assert int(batch.input_ids[0, -1]) == tok.pad_token_id


def test_vocab_is_deterministic(tmp_path: Path) -> None:
    v1, m1 = clip_vocab_and_merges(WORDS)
    v2, m2 = clip_vocab_and_merges(list(reversed(WORDS)))
    assert v1 == v2 and m1 == m2
    assert list(v1)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    build_clip_tokenizer(WORDS, tmp_path / "a")
    build_clip_tokenizer(WORDS, tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_tiny_base_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    """Loading the `tiny` base builds its tokenizer in a temporary folder and removes it again (issue 14.10)."""
    import tempfile

    from t2iadapter.bases import load_base

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    base = load_base("tiny")
    assert [p.name for p in scratch.iterdir() if p.name.startswith("t2i_")] == []  # (torch may add its own caches)
    ids = base.tokenizer("a red circle").input_ids
    assert base.tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]
    base.tokenizer.save_pretrained(tmp_path / "saved")  # still complete without the folder it was read from
    assert build_clip_tokenizer(["x"], tmp_path / "kept") and (tmp_path / "kept" / "vocab.json").is_file()
