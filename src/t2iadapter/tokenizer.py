"""A real CLIP BPE tokenizer built offline from a word list (the embedded demo's text side)."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# The pieces CLIP's pre-tokenizer splits text into (letters runs, single digits, punctuation runs).
_PIECE_RE = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+", re.UNICODE)


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte → printable unicode map (256 base symbols)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _symbols(piece: str, byte_map: dict[int, str]) -> list[str]:
    """A pre-tokenized piece as byte-level symbols, the last one carrying `</w>`."""
    symbols = [byte_map[b] for b in piece.encode("utf-8")]
    symbols[-1] = symbols[-1] + END_OF_WORD
    return symbols


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as `tokenizers` runs it: repeatedly merge the leftmost lowest-rank adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format vocab and merges in which every given word encodes as the single token `word</w>`.

    Words are lower-cased and split like CLIP's pre-tokenizer; each piece is assembled left to
    right. A merge is appended only when the merges so far leave a piece in several tokens, and an
    appended merge has the lowest priority, so it never changes how an earlier piece encodes.
    """
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    vocab_list = base + [s + END_OF_WORD for s in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab_list)
    pieces = sorted({p for w in words for p in _PIECE_RE.findall(w.lower().strip())})
    for piece in pieces:
        symbols = _apply_merges(_symbols(piece, byte_map), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            token = pair[0] + pair[1]
            if token not in known:
                known.add(token)
                vocab_list.append(token)
            symbols = _apply_merges(symbols, ranks)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(
    words: Iterable[str], out_dir: str | Path | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for `words` (CLIP BPE format) to `out_dir` (default: a temporary folder,
    removed again) and load it as a CLIPTokenizer.

    Unknown words still tokenise: they fall back to byte-level characters and partial merges.
    """
    from transformers import CLIPTokenizer

    if out_dir is None:  # the tokenizer holds vocab and merges in memory once loaded: leave no folder behind
        with tempfile.TemporaryDirectory(prefix="t2i_tokenizer_") as tmp:
            return build_clip_tokenizer(words, tmp, model_max_length)
    vocab, merges = clip_vocab_and_merges(words)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    logger.info("CLIP tokenizer: %d tokens, %d merges written to %s", len(vocab), len(merges), out)
    return CLIPTokenizer.from_pretrained(str(out), model_max_length=model_max_length)
