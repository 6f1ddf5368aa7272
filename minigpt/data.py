"""Text -> token ids on disk -> batches for next-token prediction.

The token stream is written once as a numpy memmap (``tokens.bin``, uint16 when the vocabulary fits, else uint32)
beside ``meta.json``, which records the tokenizer and the source files. A second run with the same sources and
tokenizer reads them back instead of tokenising again; a run that asks for another tokenizer is refused.

Documents (files, or the built-in corpus's paragraphs) are joined with the end-of-text token. The last
``val_fraction`` of the stream is the validation split, as nanoGPT does, so validation losses compare.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write, read_text, write_json
from .tokenizer import get_tokenizer, tokenizer_from_dict


@dataclass
class TokenData:
    """The token stream of a prepared data directory, split into train and validation."""

    tokens: np.ndarray  # (N,) memmap of token ids
    tokenizer: object
    n_val: int
    source: str  # for error messages
    fingerprint: str = ""  # of the documents the tokens came from

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: len(self.tokens) - self.n_val]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[len(self.tokens) - self.n_val :]

    def check_length(self, block_size: int) -> None:
        """Both splits need at least block_size + 1 tokens (one window plus its shifted target)."""
        for split, arr in (("train", self.train), ("validation", self.val)):
            if len(arr) < block_size + 1:
                raise ValueError(
                    f"{self.source}: the {split} split has {len(arr)} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1} ({len(self.tokens)} tokens in all); give more text or a smaller --block-size"
                )


def read_texts(paths) -> list[str]:
    """The contents of each text file (UTF-8, a byte-order mark dropped); a missing, empty, binary or non-UTF-8 file,
    or a folder, is an error naming it."""
    texts = []
    for p in map(Path, paths):
        text = read_text(p, "data file")
        if not text.strip():
            raise ValueError(f"data file {str(p)!r} is empty")
        texts.append(text)
    return texts


def _fingerprint(documents: list[str]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def prepare(documents: list[str], data_dir, tokenizer_spec: str = "bpe", vocab_size: int = 512,
            val_fraction: float = 0.1, source: str = "text") -> TokenData:
    """Tokenise documents into data_dir (or reuse what an earlier run wrote there) and return the token data.

    tokenizer_spec: "char" or "bpe" (trained on the documents), a named tiktoken encoding, or a tokenizer file.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data_dir = Path(data_dir)
    meta_path, bin_path = data_dir / "meta.json", data_dir / "tokens.bin"
    fingerprint = _fingerprint(documents)
    wanted = {"spec": tokenizer_spec, "vocab_size": vocab_size if tokenizer_spec == "bpe" else None}
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["tokenizer_request"] != wanted:
            raise ValueError(
                f"{data_dir} holds tokens made with tokenizer {meta['tokenizer_request']}, not {wanted}; "
                f"use another data directory or delete this one"
            )
        if meta["fingerprint"] == fingerprint:
            tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
            return TokenData(tokens, tokenizer_from_dict(meta["tokenizer"]), int(len(tokens) * val_fraction), source,
                             fingerprint)

    text = "".join(documents)
    if not text.strip():
        raise ValueError(f"{source}: no text to train on")
    tokenizer = get_tokenizer(tokenizer_spec, text=text, vocab_size=vocab_size)
    ids = []
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(documents) if batch is not None else map(tokenizer.encode, documents)
    for doc_ids in encoded:
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_token_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(bin_path, lambda tmp: np.asarray(ids, dtype=dtype).tofile(tmp))
    meta = {
        "tokenizer_request": wanted,
        "tokenizer": tokenizer.to_dict(),
        "dtype": np.dtype(dtype).name,
        "n_tokens": len(ids),
        "fingerprint": fingerprint,
        "source": source,
    }
    write_json(meta_path, meta, indent=None)
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    return TokenData(tokens, tokenizer, int(len(tokens) * val_fraction), source, fingerprint)


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator):
    """batch_size windows at random offsets: inputs x (B, T) and targets y = x shifted by one (B, T)."""
    ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()  # i + T + 1 <= N
    return _windows(tokens, ix, block_size)


def fixed_windows(tokens: np.ndarray, n_windows: int, block_size: int) -> list[int]:
    """At most n_windows offsets spread evenly over the split: the same every evaluation, so losses compare.

    When n_windows windows of block_size would overlap, the split's non-overlapping windows 0, T, 2T, ... instead:
    they read every target token once, and windows beyond them would only read the same tokens again (at other
    positions in the context), a cost without a new token to measure the loss on."""
    n_fit = (len(tokens) - 1) // block_size  # windows (and their shifted targets) that fit side by side
    if n_windows >= n_fit:
        return list(range(0, n_fit * block_size, block_size))
    last = len(tokens) - block_size - 1
    return np.linspace(0, last, n_windows).round().astype(np.int64).tolist()


def _windows(tokens, offsets, block_size):
    x = torch.from_numpy(np.stack([tokens[i : i + block_size] for i in offsets]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1 : i + 1 + block_size] for i in offsets]).astype(np.int64))
    return x, y  # (B, T), (B, T)


def window_batches(tokens: np.ndarray, offsets: list[int], batch_size: int, block_size: int):
    """Batches (x, y) of the windows at the given offsets."""
    for start in range(0, len(offsets), batch_size):
        yield _windows(tokens, offsets[start : start + batch_size], block_size)


# -- right-padded batches of examples (SFT, reward-model and DPO pairs) ----------------------------------------

ROWS_PER_PASS = 8  # rows a forward pass takes on a CPU: the fastest of 6, 8, 11, 16, 24 in SFT and reward-model steps


def length_groups(lengths: torch.Tensor, rows_per_pass: int = ROWS_PER_PASS) -> list[torch.Tensor]:
    """Row indices (each a 1-D tensor) of a right-padded batch whose rows have these lengths (B,), in groups of
    about rows_per_pass rows of similar length, shortest first.

    A forward pass over one group needs only the columns up to its longest row: in a causal model a real token
    never attends to the padding on its right, so its logits do not change, and a loss summed over the groups is
    the batch's loss with less padding computed (the built-in SFT batches are a third padding). On a GPU, bound by
    kernel launches rather than arithmetic at these sizes, the batch stays one group in its own order."""
    n_groups = round(len(lengths) / rows_per_pass)
    if lengths.device.type != "cpu" or n_groups <= 1:
        return [torch.arange(len(lengths), device=lengths.device)]  # one group, in the batch's order
    return list(torch.argsort(lengths, stable=True).chunk(n_groups))


def by_length(fn, lengths: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """fn's per-row results (B, ...) on right-padded tensors (B, T, ...) whose rows have these lengths (B,), with fn
    called once per length group on the group's rows cut after its longest row, and the rows put back in the
    batch's order: the same as fn(*tensors) with less padding computed."""
    groups = length_groups(lengths)
    if len(groups) == 1:
        return fn(*tensors)
    parts = [fn(*(t[rows, : int(lengths[rows].max())] for t in tensors)) for rows in groups]
    return torch.cat(parts)[torch.argsort(torch.cat(groups))]


def labelled_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(B,) one past the last position of each row of labels (B, T) whose label is not -100: the columns a
    right-padded row needs."""
    positions = torch.arange(1, labels.size(1) + 1, device=labels.device)  # (T,)
    return ((labels != -100) * positions).amax(-1)  # (B,)
