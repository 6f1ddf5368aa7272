"""Tokenizers: byte-level BPE trained here, tiktoken encoding it, the char tokenizer, named encodings offline."""

import pytest

from minigpt.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_from_dict

TEXT = (
    "Tom went to the garden. Tom found a red ball in the garden. Ann went to the market and bought three pears. "
    "3 + 4 = 7. 12 - 5 = 7. The words cat, sun, tree in reverse order are tree, sun, cat. "
) * 20

STRANGE = [
    "héllo wörld ñ ç",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "combining e\u0301 zero\u200bwidth \ufeffbom \x00nul \x7f",
    "<|endoftext|> is plain text here <|pad|>",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=300)


def test_first_merges_are_the_pairs_counted_by_hand():
    # "aaabdaaabac" is one chunk. Pair counts: aa 4, ab 2, bd 1, da 1, ba 1, ac 1 -> merge "aa".
    # Then (aa, a) 2 and (a, b) 2 tie; b"a" < b"aa" so (a, b) sorts first -> merge "ab".
    # Then (aa, ab) occurs twice, every other pair once -> merge "aaab".
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 2)
    assert tok.ranks[256:] == [b"aa", b"ab", b"aaab"]
    assert tok.vocab_size == 261 and tok.eos_token_id == 259 and tok.pad_token_id == 260


def test_merges_never_cross_pre_tokenisation_boundaries():
    tok = BPETokenizer.train("ab ab ab ab", vocab_size=256 + 2 + 2)
    # chunks: "ab", " ab" x3. Counts: (a,b) 4, (" ",a) 3 -> "ab" first, then (" ", "ab") 3
    assert tok.ranks[256:] == [b"ab", b" ab"]
    assert all(b"b " not in t for t in tok.ranks)


@pytest.mark.parametrize("s", STRANGE)
def test_bpe_round_trips_arbitrary_unicode(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s
    assert bpe.decode_bytes(bpe.encode(s)) == s.encode("utf-8")


@pytest.mark.parametrize("s", STRANGE + [TEXT[:500], "the gardens, the garden's ball!! 123456"])
def test_tiktoken_ids_equal_the_pure_python_encoder(bpe, s):
    assert bpe.encode(s) == bpe.encode_slow(s)


def test_bpe_compresses_its_training_text(bpe):
    assert len(bpe.encode(TEXT)) < 0.5 * len(TEXT.encode("utf-8"))


def test_bpe_save_and_load(tmp_path, bpe):
    path = tmp_path / "tok.json"
    bpe.save(path)
    again = BPETokenizer.load(path)
    assert again.ranks == bpe.ranks and again.encode(TEXT[:300]) == bpe.encode(TEXT[:300])
    assert get_tokenizer(str(path)).encode("Tom") == bpe.encode("Tom")


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 258"):
        BPETokenizer.train("abc", vocab_size=100)


def test_char_tokenizer():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == sorted(set("hello world"))
    ids = tok.encode("low")
    assert ids == [tok.chars.index(c) for c in "low"] and tok.decode(ids) == "low"
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"
    assert tok.vocab_size == 8 + 2 and tok.pad_token_id != tok.eos_token_id
    assert tokenizer_from_dict(tok.to_dict()).encode("hello") == tok.encode("hello")
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("zoo")


def test_named_encoding_offline_error_explains_the_fix(monkeypatch, tmp_path):
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded earlier in this process
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        TiktokenTokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        TiktokenTokenizer("no_such_encoding")
