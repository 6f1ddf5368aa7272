"""Tokenizers: text <-> token ids.

- ``CharTokenizer``: one id per character seen in the training text (nanoGPT's shakespeare_char).
- ``BPETokenizer``: byte-level byte-pair encoding (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al.
  2019) trained from scratch here, then handed to ``tiktoken.Encoding`` so encoding runs at tiktoken's speed.
  ``encode_slow`` is the same algorithm in a few lines of Python, for reading and for the tests.
- ``TiktokenTokenizer``: a named tiktoken encoding (``gpt2``, ``cl100k_base``), when tiktoken can load it.

Every tokenizer has ``encode``, ``decode``, ``vocab_size``, ``eos_token_id``, ``pad_token_id`` and ``to_dict``;
``tokenizer_from_dict`` rebuilds one from what a checkpoint stored (plain lists and strings, no pickled code).
"""

from __future__ import annotations

import base64
import collections
import json
import os
from pathlib import Path

import regex
import tiktoken

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# GPT-2's pre-tokenisation pattern: contractions, letters, numbers, other symbols, each with an optional leading
# space, and runs of whitespace. BPE merges never cross the boundaries it draws.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One id per distinct character of the training text, then <|endoftext|> and <|pad|>."""

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eos_token_id = len(self.chars)
        self.pad_token_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2
        self.name = f"char:{self.vocab_size}"

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this CharTokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        specials = {self.eos_token_id: EOS, self.pad_token_id: PAD}
        return "".join(specials[i] if i in specials else self.chars[i] for i in map(int, ids))

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level BPE. ``ranks`` lists the token byte strings in merge order: the 256 single bytes, then one per
    learned merge. Special tokens follow: <|endoftext|> (eos) and <|pad|>; with pad_token=False there is no pad
    token and padding uses the eos id (as GPT-2's vocabulary, read by ``from_gpt2_files``, has no room for one)."""

    def __init__(self, ranks: list[bytes], pattern: str = GPT2_PATTERN, name: str = "bpe", pad_token: bool = True):
        self.ranks = list(ranks)
        self.pattern = pattern
        self.pad_token = pad_token
        self.rank_of = {token: i for i, token in enumerate(self.ranks)}
        if len(self.rank_of) != len(self.ranks):
            raise ValueError("BPE ranks must be distinct byte strings")
        self.eos_token_id = len(self.ranks)
        self.pad_token_id = len(self.ranks) + 1 if pad_token else self.eos_token_id
        self.vocab_size = len(self.ranks) + (2 if pad_token else 1)
        self.name = f"{name}:{self.vocab_size}"
        self._regex = regex.compile(pattern)
        specials = {EOS: self.eos_token_id} | ({PAD: self.pad_token_id} if pad_token else {})
        self.encoding = tiktoken.Encoding(name=self.name, pat_str=pattern, mergeable_ranks=self.rank_of,
                                          special_tokens=specials)

    @classmethod
    def from_gpt2_files(cls, folder) -> "BPETokenizer":
        """GPT-2's tokenizer from a Hugging Face folder's vocab.json (or tokenizer.json), offline. GPT-2 numbers its
        tokens in merge order (the 256 bytes, then one id per merge, <|endoftext|> last), so the ids are the ranks;
        merges.txt, when present, is checked to agree."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        elif (folder / "tokenizer.json").is_file():
            vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        else:
            raise FileNotFoundError(f"{folder} has no vocab.json or tokenizer.json: copy GPT-2's tokenizer files "
                                    f"(vocab.json, merges.txt) into it, or choose a tokenizer by name")
        byte_of = {c: b for b, c in gpt2_byte_encoder().items()}
        ranks = [None] * (len(vocab) - (EOS in vocab))
        for token, i in vocab.items():
            if token == EOS:
                if i != len(ranks):
                    raise ValueError(f"{folder}: <|endoftext|> has id {i}; expected the last id, {len(ranks)}")
                continue
            if not 0 <= i < len(ranks) or ranks[i] is not None:
                raise ValueError(f"{folder}: token ids must number the tokens 0..{len(ranks) - 1} once each")
            ranks[i] = bytes(byte_of[c] for c in token)
        if (folder / "merges.txt").is_file():
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merged = [vocab.get("".join(line.split(" "))) for line in lines if line and not line.startswith("#v")]
            if any(m is None for m in merged) or merged != sorted(merged):
                raise ValueError(f"{folder}: merges.txt does not number the merged tokens in merge order, so the "
                                 f"ids cannot serve as ranks; only GPT-2-style vocabularies are read")
        return cls(ranks, GPT2_PATTERN, name="gpt2-files", pad_token=False)

    # -- training --------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT2_PATTERN, verbose: bool = False) -> "BPETokenizer":
        """Learn merges until the vocabulary (256 bytes + merges + 2 specials) has vocab_size tokens.

        1. split the text with the pattern and count each distinct chunk ("word");
        2. count adjacent symbol pairs over the words, weighted by word count;
        3. merge the most frequent pair everywhere (ties: the pair whose bytes sort first), record it, repeat.
        Pair counts are updated only for the words that contain the merged pair, so training stays fast.
        """
        n_merges = vocab_size - 256 - 2
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
        word_counts = collections.Counter(regex.findall(pattern, text))
        words = [[bytes([b]) for b in w.encode("utf-8")] for w in word_counts]  # each word as a list of symbols
        counts = list(word_counts.values())
        pair_counts = collections.Counter()
        where = collections.defaultdict(set)  # pair -> indices of the words that contain it
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_counts[pair] += counts[i]
                where[pair].add(i)
        ranks = [bytes([b]) for b in range(256)]
        known = set(ranks)
        while len(ranks) < 256 + n_merges and pair_counts:
            top = max(pair_counts.values())
            best = min(p for p, c in pair_counts.items() if c == top)
            merged = best[0] + best[1]
            if merged not in known:  # another pair may already have produced these bytes
                ranks.append(merged)
                known.add(merged)
            for i in list(where[best]):
                old = words[i]
                new = _merge(old, best, merged)
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= counts[i]
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                    where[pair].discard(i)
                for pair in zip(new, new[1:]):
                    pair_counts[pair] += counts[i]
                    where[pair].add(i)
                words[i] = new
            if verbose and len(ranks) % 100 == 0:
                print(f"merge {len(ranks) - 256}: {merged!r}")
        return cls(ranks, pattern)

    # -- encoding --------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of text (special-token strings in the text are encoded as ordinary text)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def encode_slow(self, text: str) -> list[int]:
        """The same ids as ``encode``, in pure Python: within each chunk, repeatedly merge the adjacent pair whose
        concatenation has the lowest rank (leftmost first), until no adjacent pair is a known token."""
        ids = []
        for chunk in self._regex.findall(text):
            parts = [bytes([b]) for b in chunk.encode("utf-8")]
            while len(parts) > 1:
                pair_ranks = [self.rank_of.get(a + b) for a, b in zip(parts, parts[1:])]
                candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
                if not candidates:
                    break
                _, i = min(candidates)
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(self.rank_of[p] for p in parts)
        return ids

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    # -- saving ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "type": "bpe",
            "pattern": self.pattern,
            "ranks": [base64.b64encode(t).decode("ascii") for t in self.ranks],
            **({} if self.pad_token else {"pad_token": False}),
        }

    def save(self, path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        return tokenizer_from_dict(json.loads(Path(path).read_text()))


def gpt2_byte_encoder() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, as its vocab.json spells tokens: the printable Latin-1
    bytes stand for themselves, the other 68 bytes for the characters from chr(256) on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merge(symbols: list[bytes], pair: tuple[bytes, bytes], merged: bytes) -> list[bytes]:
    """Replace every non-overlapping occurrence of pair (left to right) with merged."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class TiktokenTokenizer:
    """A named tiktoken encoding such as ``gpt2`` or ``cl100k_base``.

    These encodings have no pad token of their own; ``pad_token_id`` is the eos id. That is safe here because this
    library marks padding with attention masks and -100 labels, never by comparing ids with the pad id.
    """

    def __init__(self, name: str):
        try:
            self.encoding = tiktoken.get_encoding(name)
        except ValueError:
            raise ValueError(f"unknown tiktoken encoding {name!r}; known: {tiktoken.list_encoding_names()}") from None
        except Exception as e:  # no network and no cached file
            raise RuntimeError(
                f"tiktoken could not load the {name!r} encoding ({type(e).__name__}: {e}). tiktoken downloads it "
                f"once and caches it; without network access, copy the cached file into a directory and point "
                f"TIKTOKEN_CACHE_DIR at it, or use the offline default tokenizer (--tokenizer bpe)."
            ) from e
        self.name = name
        self.eos_token_id = self.encoding.eot_token
        self.pad_token_id = self.eos_token_id
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def to_dict(self) -> dict:
        return {"type": "tiktoken", "name": self.name}


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from ``to_dict()`` output (as stored in checkpoints and tokenizer files)."""
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        return BPETokenizer([base64.b64decode(t) for t in d["ranks"]], d["pattern"], pad_token=d.get("pad_token", True))
    if kind == "tiktoken":
        return TiktokenTokenizer(d["name"])
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'char', 'bpe' or 'tiktoken'")


def get_tokenizer(spec: str, text: str | None = None, vocab_size: int = 512):
    """Build a tokenizer from a command-line spec.

    ``char``: trained on text; ``bpe``: trained on text with vocab_size tokens; ``gpt2`` / ``cl100k_base``:
    named tiktoken encodings; a path to a saved tokenizer file (.json).
    """
    if spec in ("char", "bpe"):
        if text is None:
            raise ValueError(f"the {spec!r} tokenizer is trained on the data; no text was given")
        return CharTokenizer.train(text) if spec == "char" else BPETokenizer.train(text, vocab_size)
    if spec.endswith(".json") or os.path.sep in spec:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"tokenizer file {spec!r} does not exist")
        return tokenizer_from_dict(json.loads(Path(spec).read_text()))
    return TiktokenTokenizer(spec)
