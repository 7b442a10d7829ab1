"""Tests for token shards: ``prepare_corpus`` writes what the tokenizer says, deterministically, and
``TokenShards`` samples reproducible windows from it.

The oracle for the shards is the tokenizer itself: the ids of every document followed by eos, in order.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import lmforge.corpus as corpus_module
import lmforge.data.text as data_text
from lmforge import LmforgeError, Tokenizer
from lmforge.data import TokenShards, iter_documents, prepare_corpus, tokenizer_sha256
from lmforge.tokenizer import train_tokenizer

from .conftest import TEST_DATA

TEXT = TEST_DATA / "text"


def _slice(name: str, size: int) -> str:
    return (TEXT / f"{name}.txt").read_text(encoding="utf-8")[:size]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder mixing the three input kinds: a whole .txt, a paragraph .txt and a .jsonl of poems."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a_shakespeare.txt").write_text(_slice("tinyshakespeare", 40_000), encoding="utf-8")
    poems = _slice("songci", 30_000).split("\n\n")
    lines = [json.dumps({"text": p, "n": i}, ensure_ascii=False) for i, p in enumerate(poems)]
    (folder / "b_songci.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "c_luxun.txt").write_text(_slice("luxun", 20_000), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok(corpus: Path) -> Tokenizer:
    return train_tokenizer(corpus, 1000, show_progress=False)


def _stream(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in meta["shards"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def _split_docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(stream == eos)
    return [stream[a + 1 : b].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts, strict=True)]


# ------------------------------------------------------------------ prepare
def test_shards_hold_every_document_then_eos(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    docs = list(iter_documents(corpus))
    expected = [tok.encode(d) for d in docs]
    meta = prepare_corpus(corpus, tok, tmp_path, val_fraction=0.05, seed=1, show_progress=False)
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["documents"] == len(docs) == 2 + sum(1 for _ in open(corpus / "b_songci.jsonl"))
    assert sum(meta["tokens"].values()) == sum(len(ids) + 1 for ids in expected)
    for split in ("train", "val"):
        assert meta["tokens"][split] == sum(s["tokens"] for s in meta["shards"][split])
    assert meta["eos_id"] == tok.eos_id and meta["dtype"] == "uint16" and meta["vocab_size"] == 1000
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok)
    assert [Path(s).name for s in meta["sources"]] == ["a_shakespeare.txt", "b_songci.jsonl", "c_luxun.txt"]

    # Whole documents go to val; train and val interleave back into the corpus order.
    train = _split_docs(_stream(tmp_path, "train"), tok.eos_id)
    val = _split_docs(_stream(tmp_path, "val"), tok.eos_id)
    assert len(val) == meta["val_documents"] > 0 and len(train) + len(val) == len(docs)
    it_train, it_val = iter(train), iter(val)
    nxt_train, nxt_val = next(it_train, None), next(it_val, None)
    for ids in expected:
        if ids == nxt_train:
            nxt_train = next(it_train, None)
        else:
            assert ids == nxt_val
            nxt_val = next(it_val, None)
    # The tokenizer is saved with the shards, and loads with the same fingerprint.
    assert tokenizer_sha256(TokenShards(tmp_path).tokenizer()) == meta["tokenizer_sha256"]


def test_single_document_val_is_the_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file, one document (nanoGPT's Shakespeare): val is the last val_fraction of the token stream, and
    the piecewise encoding of the long document equals encoding it whole."""
    text = _slice("tinyshakespeare", 50_000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(tmp_path / "input.txt", kind="char", show_progress=False)
    monkeypatch.setattr(corpus_module, "_PIECE_CHARS", 1000)
    monkeypatch.setattr(data_text, "_MOVE_TOKENS", 777)  # several blocks and shards when moving the tail
    meta = prepare_corpus(
        tmp_path / "input.txt",
        tok,
        tmp_path / "out",
        val_fraction=0.1,
        shard_tokens=2000,
        show_progress=False,
    )
    whole = tok.encode(text) + [tok.eos_id]
    assert meta["documents"] == 1 and meta["val_documents"] == 0
    assert meta["tokens"] == {"train": 45_000, "val": 5_001}
    stream = np.concatenate([_stream(tmp_path / "out", "train"), _stream(tmp_path / "out", "val")])
    assert stream.tolist() == whole
    assert [s["tokens"] for s in meta["shards"]["train"]] == [2000] * 22 + [1000]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == sorted(
        s["file"] for split in ("train", "val") for s in meta["shards"][split]
    )


def test_paragraphs_and_literal_special_tokens(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(
        "first poem\nline two\n\n\n  second poem, indented\r\n\r\nthird <|endoftext|> stays text\n",
        encoding="utf-8",
    )
    docs = list(iter_documents(tmp_path / "p.txt", split_paragraphs=True))
    assert docs == ["first poem\nline two", "  second poem, indented", "third <|endoftext|> stays text"]
    meta = prepare_corpus(
        tmp_path / "p.txt", tok, tmp_path / "out", split_paragraphs=True, val_fraction=0, show_progress=False
    )
    stream = _stream(tmp_path / "out", "train")
    assert meta["documents"] == 3 and meta["tokens"]["val"] == 0
    # Exactly one eos per document: the literal "<|endoftext|>" in the text is encoded as text.
    assert (stream == tok.eos_id).sum() == 3 and stream[-1] == tok.eos_id
    assert tok.decode(stream.tolist()) == "<|endoftext|>".join(docs) + "<|endoftext|>"
    whole = list(iter_documents(tmp_path / "p.txt"))
    with open(tmp_path / "p.txt", encoding="utf-8", newline="") as f:
        assert whole == [f.read()]  # one document, "\r\n" kept as written


def test_workers_give_identical_output(
    corpus: Path, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_text, "_BATCH_CHARS", 3000)  # many tasks in flight, so order really is tested
    monkeypatch.setattr(corpus_module, "_PIECE_CHARS", 5000)
    kwargs = dict(val_fraction=0.02, seed=3, shard_tokens=4096, show_progress=False)
    one = prepare_corpus(corpus, tok, tmp_path / "w1", workers=1, **kwargs)
    two = prepare_corpus(corpus, tok, tmp_path / "w2", workers=2, **kwargs)
    assert one == two and len(one["shards"]["train"]) > 3
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_dtype_follows_vocab_size(tok: Tokenizer, tmp_path: Path) -> None:
    meta = prepare_corpus(
        iter(["hello world"] * 3), tok, tmp_path / "small", val_fraction=0, show_progress=False
    )
    assert meta["dtype"] == "uint16"
    assert (tmp_path / "small" / "train_000.bin").stat().st_size == 2 * meta["tokens"]["train"]

    # A word-level vocabulary of 70 000: ids above 65535 need four bytes.
    vocab = {"<|endoftext|>": 0} | {f"w{i}": i for i in range(1, 70_000)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = Tokenizer(backend, eos_token="<|endoftext|>")
    meta = prepare_corpus(
        iter(["w1 w69999 w65536", "w65535"]), big, tmp_path / "big", val_fraction=0, show_progress=False
    )
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert _stream(tmp_path / "big", "train").tolist() == [1, 69_999, 65_536, 0, 65_535, 0]
    shards = TokenShards(tmp_path / "big", big)
    assert shards.read("train", 0, 6).tolist() == [1, 69_999, 65_536, 0, 65_535, 0]


def test_prepare_again_replaces_old_shards(tok: Tokenizer, tmp_path: Path) -> None:
    texts = [_slice("luxun", 5000)] * 4
    prepare_corpus(iter(texts), tok, tmp_path, val_fraction=0, shard_tokens=500, show_progress=False)
    assert (tmp_path / "train_005.bin").exists()
    meta = prepare_corpus(iter(texts), tok, tmp_path, val_fraction=0, show_progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["train_000.bin"]
    assert meta["sources"] == ["<in-memory texts>"]


# ------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def prepared(corpus: Path, tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_corpus(corpus, tok, out, val_fraction=0.05, shard_tokens=1000, show_progress=False)
    return out


def test_batches_are_windows_of_the_stream(prepared: Path, tok: Tokenizer) -> None:
    shards = TokenShards(prepared, tok)
    stream = _stream(prepared, "train").astype(np.int64)
    assert len(shards) == shards.num_tokens("train") == len(stream)
    x, y = shards.batch("train", 64, 33, seed=0, step=0)
    assert x.shape == y.shape == (64, 33) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(stream, 34)
    starts = []
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        hits = np.flatnonzero((windows == row).all(axis=1))
        assert len(hits), "a batch row is not a window of the train stream"
        starts.append(hits[0])
    # With 1000-token shards and 64 random windows, some cross a shard boundary.
    assert any(s // 1000 != (s + 33) // 1000 for s in starts)


def test_batches_reproducible_from_seed_and_step(prepared: Path) -> None:
    shards = TokenShards(prepared)
    run = shards.batches("train", 4, 16, seed=7)
    first = [next(run) for _ in range(6)]
    resumed = shards.batches("train", 4, 16, seed=7, start_step=4)
    for step in (4, 5):
        x, y = next(resumed)
        assert torch.equal(x, first[step][0]) and torch.equal(y, first[step][1])
        assert torch.equal(x, shards.batch("train", 4, 16, seed=7, step=step)[0])
    # A fresh object (as after a restart) and a pickled copy (as in a worker process) draw the same.
    again = TokenShards(prepared)
    assert torch.equal(again.batch("train", 4, 16, 7, 2)[0], first[2][0])
    copy = pickle.loads(pickle.dumps(shards))
    assert torch.equal(copy.batch("train", 4, 16, 7, 3)[0], first[3][0])
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(shards.batch("train", 4, 16, seed=8)[0], first[0][0])
    assert not torch.equal(shards.batch("train", 4, 16, seed=7, rank=1)[0], first[0][0])
    xv, yv = shards.batch("val", 2, 16)
    assert xv.shape == (2, 16) and torch.equal(xv[:, 1:], yv[:, :-1])


# ------------------------------------------------------------------ errors
def test_error_tokenizer_mismatch(prepared: Path, tok: Tokenizer) -> None:
    other = train_tokenizer(iter(["something else entirely"] * 10), 300, show_progress=False)
    with pytest.raises(LmforgeError, match=r"meta.json: the shards were made with another tokenizer") as e:
        TokenShards(prepared, other)
    assert str(prepared) in str(e.value) and "prepare the corpus again" in str(e.value)
    TokenShards(prepared, tok)


def test_error_meta_missing_or_corrupt(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match=r"meta.json: no such file") as e:
        TokenShards(tmp_path)
    assert "prepare the corpus" in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in prepared.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    meta_text = (broken / "meta.json").read_text()
    (broken / "meta.json").write_text(meta_text[:50])
    with pytest.raises(LmforgeError, match=r"broken/meta.json: not valid JSON") as e:
        TokenShards(broken)
    assert "prepare the corpus again" in str(e.value)
    (broken / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LmforgeError, match=r"not a token-shards meta.json \(lacks version"):
        TokenShards(broken)
    (broken / "meta.json").write_text(meta_text)
    (broken / "meta.json").unlink()
    with pytest.raises(LmforgeError, match="no such file") as e:
        TokenShards(broken)
    assert "did not finish" in str(e.value)
    (broken / "meta.json").write_text(meta_text)
    with open(broken / "train_001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(LmforgeError, match=r"train_001.bin: 100 bytes, but meta.json says 1,000 tokens") as e:
        TokenShards(broken)
    assert "truncated" in str(e.value)
    (broken / "train_001.bin").unlink()
    with pytest.raises(LmforgeError, match=r"train_001.bin: missing"):
        TokenShards(broken)


def test_error_block_size_too_large(prepared: Path) -> None:
    shards = TokenShards(prepared)
    n = shards.num_tokens("val")
    shards.batch("val", 2, n - 1)  # the largest block that fits: a window and its next token
    with pytest.raises(
        LmforgeError, match=rf"the val split has {n:,} tokens, fewer than block_size \+ 1"
    ) as e:
        shards.batches("val", 2, n)
    assert str(prepared) in str(e.value) and "smaller block_size" in str(e.value)
    with pytest.raises(LmforgeError, match="no split 'test'"):
        shards.batch("test", 2, 8)


def test_error_empty_val_split(tok: Tokenizer, tmp_path: Path) -> None:
    prepare_corpus(iter(["some text here"] * 5), tok, tmp_path, val_fraction=0, show_progress=False)
    shards = TokenShards(tmp_path, tok)
    assert shards.num_tokens("val") == 0
    with pytest.raises(LmforgeError, match="the val split has 0 tokens") as e:
        shards.batch("val", 1, 4)
    assert "val_fraction" in str(e.value)


def test_error_empty_corpus_and_bad_inputs(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "in" / "blank.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"no text in the corpus \(.*empty.txt") as e:
        prepare_corpus(tmp_path / "in", tok, tmp_path / "out", show_progress=False)
    assert e.value.hint
    assert not list((tmp_path / "out").iterdir())  # nothing half-written left behind
    with pytest.raises(LmforgeError, match="missing.jsonl: no such file"):
        prepare_corpus(tmp_path / "missing.jsonl", tok, tmp_path / "out", show_progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: no 'text' field"):
        prepare_corpus(tmp_path / "bad.jsonl", tok, tmp_path / "out", workers=2, show_progress=False)
    assert not list((tmp_path / "out").iterdir())
    (tmp_path / "other.jsonl").write_text('{"content": "x"}\n{"content": "y", "text": 1}\n', encoding="utf-8")
    meta = prepare_corpus(
        tmp_path / "other.jsonl", tok, tmp_path / "out", text_field="content", show_progress=False
    )
    assert meta["documents"] == 2
    with pytest.raises(LmforgeError, match="val_fraction 1.5"):
        prepare_corpus(iter(["x"]), tok, tmp_path / "out", val_fraction=1.5)
    no_eos = Tokenizer(tok.backend)
    with pytest.raises(LmforgeError, match="no eos token"):
        prepare_corpus(iter(["x"]), no_eos, tmp_path / "out")
