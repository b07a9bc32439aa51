"""A word-level vocabulary written as a real ``CLIPTokenizer`` folder.

CLIP's tokenizer is byte-pair encoding over characters with ``</w>`` marking
a word's end. To make every grammar word one token, the merges are learned
here by a tiny deterministic BPE trainer (most frequent pair first, ties by
lexical order), so the same words always give the same ids.
(``tokenizers``' BPE trainer does not: its ids change from run to run.)
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _symbols(word: str) -> tuple[str, ...]:
    return tuple(word[:-1]) + (word[-1] + "</w>",)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Deterministic BPE on ``words`` (each counted once) until every word is one symbol."""
    seqs = [list(_symbols(w)) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(words)
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_tokenizer(words: list[str], folder: str | Path, max_length: int) -> CLIPTokenizer:
    """Write a ``CLIPTokenizer`` folder for ``words`` and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, sort_keys=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length,
    )
    tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))
