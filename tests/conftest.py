"""Fixtures shared by the test files: a BPE tokenizer of the built-in corpus, tiny models, model folders on disk."""

import pytest
import torch

from minigpt import GPT, BPETokenizer, preset
from minigpt.corpus import build_corpus


@pytest.fixture(scope="session")
def bpe_tok():
    """A 320-token byte-level BPE trained on 60,000 characters of the built-in corpus."""
    return BPETokenizer.train(build_corpus(seed=0, n_chars=60_000), vocab_size=320)


def tiny_gpt(vocab_size: int, block_size: int = 64, seed: int = 0, **overrides) -> GPT:
    """The "tiny" preset (2 layers, 2 heads, 32 dims) with a fixed seed."""
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=vocab_size, block_size=block_size, **overrides))


def save_folder(folder, model, tok, stage="pretrain", template=None, base=None):
    """A model folder as a stage writes it (minigpt.checkpoint.save_model)."""
    from minigpt import checkpoint, tasks

    if template is True:
        template = tasks.TEMPLATE
    return checkpoint.save_model(folder, model, tok, stage, template=template, base=base)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two that other processes keep waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
