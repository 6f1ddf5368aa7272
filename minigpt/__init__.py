"""minigpt: a GPT written out for reading, and everything to train it."""

from .config import PRESETS, GPTConfig, preset
from .engine import KVCache, sample_next_token
from .model import GPT
from .tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_from_dict

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "PRESETS",
    "preset",
    "sample_next_token",
    "BPETokenizer",
    "CharTokenizer",
    "TiktokenTokenizer",
    "get_tokenizer",
    "tokenizer_from_dict",
]
