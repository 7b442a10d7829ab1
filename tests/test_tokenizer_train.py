"""Tests for ``train_tokenizer``: byte-level BPE that round-trips any string, and the character-level option.

The corpora are slices of the real texts in tests/data/text (English, Song lyrics, Lu Xun), copied into a
temporary folder; transformers' ``PreTrainedTokenizerFast`` is the oracle for the saved files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

import lmforge.corpus as corpus_module
from lmforge import LmforgeError, Tokenizer
from lmforge.tokenizer import train_tokenizer

from .conftest import TEST_DATA

TEXT = TEST_DATA / "text"
SLICE = 100_000  # characters per corpus: enough to learn merges, small enough to train in about a second

ROUND_TRIP = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京吃烤鸭 🦆, then fly home ✈️. Café naïve coöperate — “quotes” ‘x’",
    "😀👍🏽🇨🇳👨‍👩‍👧❤️🚀 emoji run",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם こんにちは世界 안녕하세요 नमस्ते",
    "  leading and trailing spaces  \t\ttabs\r\nCRLF\n\n\nnewlines \x00\x07 control \u200b zero-width",
    "digits 1234567890 3.14159 1e-9 0xFF",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "special tokens in text: <|endoftext|> and <|im_start|>user\nhi<|im_end|>",
    "",
    " ",
    "a",
]


def _slice(name: str, start: int = 0, size: int = SLICE) -> str:
    return (TEXT / f"{name}.txt").read_text(encoding="utf-8")[start : start + size]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("tinyshakespeare", "songci", "luxun"):
        (folder / f"{name}.txt").write_text(_slice(name), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def mixed(corpus: Path) -> Tokenizer:
    """BPE over English and Chinese, read from a folder."""
    return train_tokenizer(corpus, 3000, show_progress=False)


@pytest.fixture(scope="module")
def chinese(corpus: Path) -> Tokenizer:
    return train_tokenizer([corpus / "songci.txt", corpus / "luxun.txt"], 4000, show_progress=False)


# ------------------------------------------------------------------ byte-level BPE
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(mixed: Tokenizer, text: str) -> None:
    ids = mixed.encode(text)
    assert mixed.decode(ids) == text
    assert all(0 <= i < mixed.vocab_size for i in ids)


def test_round_trip_random_unicode(mixed: Tokenizer) -> None:
    rng = random.Random(0)
    # Every plane's assigned and unassigned code points alike, surrogates excepted (not encodable as UTF-8).
    pools = [(0x20, 0x7F), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000), (0, 0x20)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randrange(lo, hi)))
        text = "".join(chars)
        assert mixed.decode(mixed.encode(text)) == text, ascii(text)


def test_specials_and_roles(mixed: Tokenizer) -> None:
    assert mixed.eos_token == mixed.bos_token == mixed.pad_token == "<|endoftext|>"
    assert [mixed.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert mixed.special_ids == {0, 1, 2}
    assert mixed.vocab_size == 3000
    ids = mixed.encode("<|im_start|>hi<|endoftext|>")
    assert ids[0] == 1 and ids[-1] == 0
    assert mixed.decode(ids, skip_special_tokens=True) == "hi"
    # The byte-level alphabet is complete: no unknown token needed.
    assert mixed.unk_token is None


def test_chinese_compresses(chinese: Tokenizer, tmp_path: Path) -> None:
    # Held-out text: the part of each file after the training slice.
    for name in ("songci", "luxun"):
        held = tmp_path / f"{name}.txt"
        held.write_text(_slice(name, start=SLICE, size=10_000), encoding="utf-8")
        text = held.read_text(encoding="utf-8")
        ids = chinese.encode(text)
        assert chinese.decode(ids) == text
        assert len(text) / len(ids) > 1.0, name  # better than one token per character
        assert len(text.encode()) / len(ids) > 2.5, name  # and far better than bytes (3 per character)
    pieces = [chinese.decode([i]) for i in chinese.encode("我们今天去北京")]
    assert "我们" in pieces  # multi-character words are learnt, not cut into bytes


def test_saved_files_load_in_transformers(mixed: Tokenizer, tmp_path: Path) -> None:
    mixed.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ROUND_TRIP:
        ids = mixed.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == text
    again = Tokenizer.load(tmp_path)
    assert again.backend.to_str() == mixed.backend.to_str()
    assert (again.eos_token, again.bos_token, again.pad_token) == ("<|endoftext|>",) * 3
    assert again.encode(ROUND_TRIP[2]) == mixed.encode(ROUND_TRIP[2])


def test_pieces_train_like_whole_files(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long file is fed to the trainer in pieces cut where the pre-tokenizer splits anyway: same merges."""
    whole = train_tokenizer(corpus / "tinyshakespeare.txt", 600, show_progress=False)
    monkeypatch.setattr(corpus_module, "_PIECE_CHARS", 2000)
    assert sum(1 for _ in corpus_module.text_pieces(corpus / "tinyshakespeare.txt")) > 10
    pieces = train_tokenizer(corpus / "tinyshakespeare.txt", 600, show_progress=False)
    assert pieces.backend.to_str() == whole.backend.to_str()


def test_sources_jsonl_glob_iterator(corpus: Path, tmp_path: Path) -> None:
    docs = _slice("songci", size=20_000).split("\n\n")
    (tmp_path / "poems.jsonl").write_text(
        "".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
        encoding="utf-8",
    )
    (tmp_path / "poems.txt").write_text("\n\n".join(docs), encoding="utf-8")
    from_jsonl = train_tokenizer(tmp_path / "poems.jsonl", 800, text_field="body", show_progress=False)
    from_iter = train_tokenizer(iter(docs), 800, show_progress=False)
    from_glob = train_tokenizer(str(tmp_path / "*.jsonl"), 800, text_field="body", show_progress=False)
    from_paragraphs = train_tokenizer(tmp_path / "poems.txt", 800, split_paragraphs=True, show_progress=False)
    assert from_jsonl.backend.to_str() == from_iter.backend.to_str() == from_glob.backend.to_str()
    assert from_paragraphs.backend.to_str() == from_iter.backend.to_str()


# ------------------------------------------------------------------ character level
def test_char_level_shakespeare(tmp_path: Path) -> None:
    # Every character of the whole play text must be seen: the excerpt lacks four ('$', '3', 'X', 'Z'), so the
    # four lines of the full text that first hold them are added (tests/data/SOURCES.md).
    files = ("tinyshakespeare.txt", "tinyshakespeare_rare_chars.txt")
    text = "".join((TEXT / name).read_text(encoding="utf-8") for name in files)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(tmp_path / "input.txt", kind="char", show_progress=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
    assert tok.vocab_size == 65 + len(specials)  # nanoGPT's 65 characters
    vocab = tok.backend.get_vocab()
    assert sorted(t for t in vocab if t not in specials) == sorted(set(text))
    assert [vocab[t] for t in specials] == [0, 1, 2, 3]
    sample = text[:5000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and tok.decode(ids) == sample
    assert tok.encode("a€b") == [vocab["a"], vocab["<|unk|>"], vocab["b"]]  # unseen characters map to unk
    assert tok.eos_token == "<|endoftext|>" and tok.unk_token == "<|unk|>"

    (tmp_path / "tok").mkdir()
    tok.save(tmp_path / "tok")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.encode(sample[:500], add_special_tokens=False) == ids[:500]
    assert Tokenizer.load(tmp_path / "tok").decode(ids) == sample


def test_char_level_vocab_size_is_a_bound(corpus: Path) -> None:
    tok = train_tokenizer(corpus / "tinyshakespeare.txt", 1000, kind="char", show_progress=False)
    assert tok.vocab_size < 1000
    with pytest.raises(LmforgeError, match="smaller than the alphabet") as e:
        train_tokenizer(corpus / "tinyshakespeare.txt", 20, kind="char", show_progress=False)
    assert "distinct characters" in str(e.value) and "vocab_size >=" in str(e.value)


# ------------------------------------------------------------------ errors
def test_error_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    for kind in ("bpe", "char"):
        with pytest.raises(LmforgeError, match="no text to train") as e:
            train_tokenizer(tmp_path / "empty.txt", 500, kind=kind, show_progress=False)  # type: ignore[arg-type]
        assert e.value.hint
    with pytest.raises(LmforgeError, match="no text to train"):
        train_tokenizer(iter(["", ""]), 500, show_progress=False)
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="no text to train") as e:
        train_tokenizer(tmp_path / "e.jsonl", 500, show_progress=False)
    assert "'text'" in str(e.value.hint)


def test_error_vocab_smaller_than_alphabet(corpus: Path) -> None:
    with pytest.raises(LmforgeError, match=r"vocab_size 200 is smaller than the alphabet.*259") as e:
        train_tokenizer(corpus, 200, show_progress=False)
    assert "vocab_size >= 259" in str(e.value)
    with pytest.raises(LmforgeError, match="vocab_size is required"):
        train_tokenizer(corpus, show_progress=False)


def test_error_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="nothere.txt: no such file") as e:
        train_tokenizer(tmp_path / "nothere.txt", 500, show_progress=False)
    assert "check the path" in str(e.value)
    # A list names files, so a list of texts is a missing-file error whose hint says how to pass texts.
    with pytest.raises(LmforgeError, match="no such file") as e:
        train_tokenizer(["To be, or not to be"], 500, show_progress=False)
    assert "iter(texts)" in str(e.value)
    with pytest.raises(LmforgeError, match="matches no files"):
        train_tokenizer(str(tmp_path / "*.jsonl"), 500, show_progress=False)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"sub: the folder has no \.txt or \.jsonl files"):
        train_tokenizer(tmp_path / "sub", 500, show_progress=False)


def test_error_bad_files_and_arguments(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: no 'text' field \(it has 'body'\)") as e:
        train_tokenizer(tmp_path / "bad.jsonl", 500, show_progress=False)
    assert "text_field=" in str(e.value)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"broken.jsonl:2: not valid JSON"):
        train_tokenizer(tmp_path / "broken.jsonl", 500, show_progress=False)
    (tmp_path / "gbk.txt").write_bytes("床前明月光".encode("gbk"))
    with pytest.raises(LmforgeError, match=r"gbk.txt: not UTF-8") as e:
        train_tokenizer(tmp_path / "gbk.txt", 500, show_progress=False)
    assert "iconv" in str(e.value)
    with pytest.raises(LmforgeError, match="corpus text 1 is a int"):
        train_tokenizer(iter(["a", 1]), 500, show_progress=False)  # type: ignore[list-item]
    with pytest.raises(LmforgeError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(iter(["a"]), 500, kind="wordpiece", show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(LmforgeError, match="special_tokens is empty"):
        train_tokenizer(iter(["a"]), 500, special_tokens=(), show_progress=False)


@pytest.mark.parametrize("text", ["床前龘𠮷光", "naïve 🦆 café"])
def test_token_bytes_rebuild_the_text_token_by_token(mixed: Tokenizer, text: str) -> None:
    """Each token's own bytes, also of tokens that are only part of a character (which decode alone to U+FFFD),
    join into the text's UTF-8: what streams, logprobs and explanations build characters from."""
    ids = mixed.encode(text, add_special_tokens=False)
    assert any("\ufffd" in mixed.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(mixed.token_bytes(i) for i in ids) == text.encode("utf-8")
