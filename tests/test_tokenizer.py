"""Tokenizers: byte-level BPE trained here, tiktoken encoding it, the char tokenizer, named encodings offline."""

import json
import re

import pytest
import regex

from minigpt.tokenizer import (
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    get_tokenizer,
    gpt2_byte_encoder,
    tokenizer_from_dict,
)

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


def test_pair_counts_are_weighted_by_how_often_each_word_occurs():
    """Pairs are counted over distinct words times each word's count, at the start and after every merge."""
    # chunks "ab", ".", "cd", ".", "cd": (c, d) occurs twice, (a, b) once -> "cd" first, although (a, b) sorts first
    assert BPETokenizer.train("ab.cd.cd", vocab_size=256 + 2 + 2).ranks[256:] == [b"cd", b"ab"]
    # "abc" x3, "de" x2: (a, b) 3 and (b, c) 3 tie -> "ab"; then (ab, c) 3 beats (d, e) 2 -> "abc", then "de"
    assert BPETokenizer.train("abc.abc.abc.de.de", vocab_size=256 + 3 + 2).ranks[256:] == [b"ab", b"abc", b"de"]


def test_overlapping_pairs_merge_leftmost_first():
    """In "aaa" the pair (a, a) occurs twice, overlapping: the left one is merged (as GPT-2 and tiktoken do)."""
    tok = BPETokenizer.train("aaaa", vocab_size=256 + 1 + 2)
    assert tok.ranks[256:] == [b"aa"]
    for s, ids in {"aaa": [256, 97], "aaaaa": [256, 256, 97]}.items():
        assert tok.encode(s) == tok.encode_slow(s) == ids


def test_gpt2_pattern_splits_text_as_gpt2_does():
    """Pre-tokenisation: a word keeps its one leading space, and a run of spaces before a word leaves it that space;
    letters and digits are separate chunks, so no merge joins them (in encode and in encode_slow alike)."""
    assert regex.findall(GPT2_PATTERN, "Hello  world") == ["Hello", " ", " world"]
    assert regex.findall(GPT2_PATTERN, "I'm 12 years   old") == ["I", "'m", " 12", " years", "  ", " old"]
    tok = BPETokenizer([bytes([b]) for b in range(256)] + [b"a1", b"  "])  # tokens no trained merge would make
    for s, ids in {"a1": [97, 49], "x  y": [120, 32, 32, 121]}.items():
        assert tok.encode(s) == tok.encode_slow(s) == ids


def test_decode_replaces_an_incomplete_character():
    """The id of a single byte is the byte's value; a cut UTF-8 sequence decodes to U+FFFD, not to nothing."""
    tok = BPETokenizer.train("aaaa", vocab_size=256 + 1 + 2)
    assert tok.decode([0xC3, 0xA9]) == "é" and tok.decode([0xC3]) == "\ufffd" and tok.decode([97, 0xC3]) == "a\ufffd"
    assert tok.decode_bytes([0xC3]) == b"\xc3"


def test_encode_batch_is_encode_of_each_text(bpe):
    """encode_batch encodes every text as encode does, special-token strings as ordinary text."""
    assert bpe.encode_batch(STRANGE) == [bpe.encode_slow(s) for s in STRANGE]
    assert bpe.eos_token_id not in bpe.encode_batch(["<|endoftext|>"])[0]


def test_char_tokenizer_decodes_both_special_tokens():
    tok = CharTokenizer.train("ab")
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 3)
    assert tok.decode([0, tok.eos_token_id, 1, tok.pad_token_id]) == "a<|endoftext|>b<|pad|>"


def test_get_tokenizer_trains_bpe_to_the_vocab_size_asked():
    assert get_tokenizer("bpe", TEXT, vocab_size=270).vocab_size == 270
    assert get_tokenizer("char", "hello").vocab_size == 4 + 2
    with pytest.raises(ValueError, match="no text was given"):
        get_tokenizer("bpe")


def test_gpt2_byte_encoder_is_gpt2s_table():
    """GPT-2's bytes_to_unicode: "!".."~", "¡".."¬" and "®".."ÿ" stand for themselves; the other 68 bytes, in byte
    order, for chr(256) on: so a space is "Ġ", a newline "Ċ", DEL "ġ" and the soft hyphen (0xAD) "Ń"."""
    enc = gpt2_byte_encoder()
    assert len(enc) == 256 and len(set(enc.values())) == 256
    assert {b: enc[b] for b in (0, 10, 32, 33, 126, 127, 160, 161, 172, 173, 174, 255)} == {
        0: "Ā", 10: "Ċ", 32: "Ġ", 33: "!", 126: "~", 127: "ġ", 160: "ł", 161: "¡", 172: "¬", 173: "Ń", 174: "®",
        255: "ÿ"}


def gpt2_vocab(ids=None):
    """A GPT-2-style vocab.json by hand: the 256 bytes spelled as GPT-2 spells them, "ab" 256, "abc" 257, eos 258."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    spell = {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}
    return {spell[b]: b for b in range(256)} | {"ab": 256, "abc": 257, "<|endoftext|>": 258} | (ids or {})


def write_gpt2_files(folder, vocab, merges=None, name="vocab.json"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(vocab if name == "vocab.json" else {"model": {"vocab": vocab}}))
    if merges is not None:
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def test_gpt2_files_are_read_with_ids_as_ranks_and_no_pad_token(tmp_path):
    """vocab.json (or tokenizer.json) with merges.txt: the ids are the ranks, <|endoftext|> is eos and pads too,
    and saving and loading keeps it without a pad token."""
    for name in ("vocab.json", "tokenizer.json"):
        tok = BPETokenizer.from_gpt2_files(write_gpt2_files(tmp_path / name, gpt2_vocab(), ["a b", "ab c"], name))
        assert tok.ranks[:256] == [bytes([b]) for b in range(256)] and tok.ranks[256:] == [b"ab", b"abc"]
        assert tok.eos_token_id == tok.pad_token_id == 258 and tok.vocab_size == 259
        # "abc" is one chunk -> the token "abc"; " abd" -> " ", "ab", "d" (" a" and "abd" are no tokens)
        assert tok.encode("abc abd") == tok.encode_slow("abc abd") == [257, 32, 256, 100]
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert (again.eos_token_id, again.pad_token_id, again.vocab_size) == (258, 258, 259)


def test_gpt2_files_that_cannot_serve_as_ranks_are_refused(tmp_path):
    """merges.txt out of id order, <|endoftext|> not last, or two tokens with one id: each refused, saying which."""
    with pytest.raises(ValueError, match="merge order"):
        BPETokenizer.from_gpt2_files(write_gpt2_files(tmp_path / "a", gpt2_vocab(), ["ab c", "a b"]))
    eos_first = {"<|endoftext|>": 0} | gpt2_vocab({"Ā": 258, "<|endoftext|>": 0})  # read before the token at 258
    with pytest.raises(ValueError, match=re.escape("<|endoftext|> has id 0; expected the last id, 258")):
        BPETokenizer.from_gpt2_files(write_gpt2_files(tmp_path / "b", eos_first))
    with pytest.raises(ValueError, match="once each"):  # "ab" and "abc" both 256 (no merges.txt to catch it)
        BPETokenizer.from_gpt2_files(write_gpt2_files(tmp_path / "c", gpt2_vocab({"abc": 256, "<|endoftext|>": 257})))
    with pytest.raises(FileNotFoundError, match="no vocab.json or tokenizer.json"):
        BPETokenizer.from_gpt2_files(tmp_path)
