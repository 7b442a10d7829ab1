"""Rebuild a Hugging Face ``tokenizers.Tokenizer`` from the tokenizer a GGUF file carries in its metadata.

A GGUF file has no ``tokenizer.json``: llama.cpp's converters store the vocabulary, merges, token types and
special-token ids as ``tokenizer.ggml.*`` keys, and leave the pre-tokenizer implied by a short name
(``tokenizer.ggml.pre``) whose meaning lives in llama.cpp's source. Serving or fine-tuning a GGUF model from
Python needs a tokenizer that splits text exactly as llama.cpp (and the original model) did, or the model
sees token sequences it was never trained on. This module turns that metadata back into a fast tokenizer:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The ``pre`` name picks llama.cpp's splitting regexes,
  applied one after the other like llama.cpp does, so models whose merges were learned on, say, single
  digits (``smollm``) or 1-3 digit groups (``llama-bpe``) keep that behaviour.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE over ``▁``-escaped text with ``<0xNN>`` byte
  fallback; merges come from the file or are rebuilt from the per-token scores.

``metadata`` is a plain mapping of GGUF key to value, e.g.
``{f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import ModelFormatError, UnsupportedError

# GGUF token types (llama.cpp's ``llama_token_type``).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
}

# The splitting regexes below are the ones the original ``tokenizer.json`` files use; llama.cpp rewrites
# ``(?i:...)`` into explicit case classes only because its own regex engine lacks inline flags, which
# Oniguruma (used by ``tokenizers``) has, so the originals are kept.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp handles one ``tokenizer.ggml.pre`` value."""

    # Applied in order; each one splits the pieces the previous one produced (llama.cpp's
    # ``unicode_regex_split`` semantics, which is ``Split(..., behavior="isolated")`` chained).
    regexes: tuple[str, ...]
    # Llama 3 style vocabularies look a whole pre-token up in the vocabulary before merging; without this
    # a word that is itself a token can come out as a different split.
    ignore_merges: bool = False
    # llama.cpp's default for ``add_bos`` when the file has no ``tokenizer.ggml.add_bos_token``.
    add_bos_default: bool = False


# llama.cpp's legacy fallback for BPE files with no (or an empty) ``pre`` name: extra passes that cut
# punctuation runs and numbers before the GPT-2 regex. Kept as llama.cpp does it, since that is how every
# llama.cpp user has been tokenizing such files.
_DEFAULT = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_PRE = _PreTokenizer((_GPT2,))
# StarCoder-family vocabularies were trained with every digit its own pre-token.
_DIGITS_PRE = _PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos_default=True)

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v1-en jina-v2-es jina-v2-de jina-v2-code roberta-bpe "
        "mpt olmo jais trillion".split(),
        _GPT2_PRE,
    ),
    **dict.fromkeys("smollm starcoder refact command-r codeshell exaone minerva-7b".split(), _DIGITS_PRE),
    **dict.fromkeys("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2".split(), _LLAMA3_PRE),
    # Same regex as Llama 3, but llama.cpp neither ignores merges nor adds BOS by default for these.
    **dict.fromkeys("dbrx smaug-bpe".split(), _PreTokenizer((_LLAMA3,))),
    **dict.fromkeys("qwen2 deepseek-r1-qwen megrez".split(), _PreTokenizer((_QWEN2,))),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
}

SUPPORTED_PRE_TOKENIZERS: tuple[str, ...] = tuple(sorted(_PRE_TOKENIZERS))
SUPPORTED_MODELS: tuple[str, ...] = ("gpt2", "llama")


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build the fast tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

    Raises ``UnsupportedError`` for tokenizer models or pre-tokenizers this module does not know, and
    ``ModelFormatError`` when a required key is missing or the values contradict each other.
    """
    model_type = _require(metadata, "tokenizer.ggml.model")
    if model_type not in SUPPORTED_MODELS:
        raise UnsupportedError(
            f"GGUF tokenizer type {model_type!r} is not supported",
            hint=f"lmforge reads tokenizer.ggml.model = {' or '.join(map(repr, SUPPORTED_MODELS))}; "
            "load this model's tokenizer.json from its original repository instead",
        )
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    token_types = _int_list(metadata, "tokenizer.ggml.token_type", len(tokens), default=TOKEN_NORMAL)

    if model_type == "gpt2":
        tokenizer, add_bos_default = _byte_level_bpe(metadata, tokens)
    else:
        tokenizer, add_bos_default = _sentencepiece_bpe(metadata, tokens, token_types)

    _add_special_tokens(tokenizer, tokens, token_types)
    _set_post_processor(tokenizer, metadata, tokens, add_bos_default)
    return tokenizer


def special_tokens_from_gguf(metadata: Mapping[str, Any]) -> dict[str, str | None]:
    """The ``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings, ``None`` where the file has no id.

    The keys match ``transformers``' keyword names, so the result can be passed straight to
    ``PreTrainedTokenizerFast(tokenizer_object=..., **special_tokens_from_gguf(metadata))``.
    """
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    return {name: _token_for(metadata, key, tokens) for name, key in _SPECIAL_TOKEN_KEYS.items()}


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> tuple[Tokenizer, bool]:
    pre_name = metadata.get("tokenizer.ggml.pre") or "default"  # llama.cpp treats a missing name as "default"
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedError(
            f"GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported",
            hint=f"supported pre-tokenizers: {', '.join(SUPPORTED_PRE_TOKENIZERS)}",
        )
    merges = _parse_merges(_string_list(metadata, "tokenizer.ggml.merges"))
    # Tokens are stored in GPT-2's printable byte alphabet (space is "Ġ"), which is exactly what
    # ``tokenizers``' byte-level BPE expects, so ids line up without any re-spelling.
    bpe = _build_bpe(_vocab(tokens), merges, ignore_merges=pre.ignore_merges)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in pre.regexes]
        # The regexes have already split the text; ByteLevel only maps bytes to the printable alphabet.
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre.add_bos_default


def _sentencepiece_bpe(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> tuple[Tokenizer, bool]:
    vocab = _vocab(tokens)
    if "tokenizer.ggml.merges" in metadata:
        merges = _parse_merges(_string_list(metadata, "tokenizer.ggml.merges"))
    else:
        scores = _float_list(metadata, "tokenizer.ggml.scores", len(tokens))
        merges = _merges_from_scores(tokens, token_types, scores, vocab)
    unk_token = _token_for(metadata, "tokenizer.ggml.unknown_token_id", tokens)
    tokenizer = Tokenizer(_build_bpe(vocab, merges, unk_token=unk_token, byte_fallback=True))

    # No pre-tokenizer: SentencePiece merges over the whole "▁"-escaped text. llama.cpp adds the dummy
    # prefix space to every stretch of text that starts the input or follows a special/user-defined token,
    # which is what ``Prepend`` does, since normalizers run on each stretch between added tokens.
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, True  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise


def _merges_from_scores(
    tokens: list[str], token_types: list[int], scores: list[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Rebuild BPE merges from SentencePiece scores.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose joined piece
    has the highest score; a BPE merge list ranked by that score does the same thing.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, token_type, score in zip(tokens, token_types, scores, strict=True):
        # Control, byte and unknown pieces are never produced by merging text.
        if token_type not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    ignore_merges: bool = False,
    unk_token: str | None = None,
    byte_fallback: bool = False,
) -> models.BPE:
    try:
        return models.BPE(
            vocab,
            merges,
            unk_token=unk_token,
            fuse_unk=unk_token is not None,
            byte_fallback=byte_fallback,
            ignore_merges=ignore_merges,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for merges that name unknown tokens
        raise ModelFormatError(
            f"GGUF tokenizer vocabulary and merges do not fit together: {exc}",
            hint="the file's tokenizer.ggml.tokens / tokenizer.ggml.merges look corrupt; re-convert the model",
        ) from exc


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Make control and user-defined tokens atomic, matched in the raw text before any splitting.

    Their content is already in the model vocabulary, so ``tokenizers`` keeps the file's ids for them.
    User-defined tokens (like ``<think>``) are not *special*: llama.cpp always matches and prints them, so
    they must survive ``decode(..., skip_special_tokens=True)``.
    """
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN) and token
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type == TOKEN_USER_DEFINED and token
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user_defined:
        tokenizer.add_tokens(user_defined)


def _set_post_processor(
    tokenizer: Tokenizer, metadata: Mapping[str, Any], tokens: list[str], add_bos_default: bool
) -> None:
    """Add BOS/EOS around each sequence as llama.cpp does when the file asks for them (pairs: each side)."""
    wrap: dict[str, tuple[str, int] | None] = {}
    for side, default in (("bos", add_bos_default), ("eos", False)):
        flag = f"tokenizer.ggml.add_{side}_token"
        id_key = f"tokenizer.ggml.{side}_token_id"
        token = _token_for(metadata, id_key, tokens)
        wanted = bool(metadata.get(flag, default))
        if wanted and token is None and flag in metadata:
            # Only a default (not stated in the file) without an id quietly means nothing to add.
            raise ModelFormatError(
                f"GGUF metadata sets '{flag}' but has no '{id_key}'",
                hint="the tokenizer metadata is incomplete; re-convert the model",
            )
        wrap[side] = (token, metadata[id_key]) if wanted and token is not None else None
    if wrap["bos"] is None and wrap["eos"] is None:
        return
    tokenizer.post_processor = _template_processor(wrap["bos"], wrap["eos"])


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.PostProcessor:
    # Built from its serialized form: TemplateProcessing's string syntax ("<s>:0 $A:0") cannot express tokens
    # containing ":" or starting with "$", which some vocabularies have.
    def sequence(type_id: int, name: str) -> list[dict[str, Any]]:
        def special(token: tuple[str, int] | None) -> list[dict[str, Any]]:
            return [] if token is None else [{"SpecialToken": {"id": token[0], "type_id": type_id}}]

        return [*special(bos), {"Sequence": {"id": name, "type_id": type_id}}, *special(eos)]

    template = {
        "type": "TemplateProcessing",
        "single": sequence(0, "A"),
        "pair": sequence(0, "A") + sequence(1, "B"),
        "special_tokens": {
            token: {"id": token, "ids": [token_id], "tokens": [token]}
            for token, token_id in (t for t in (bos, eos) if t is not None)
        },
    }
    carrier = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": template,
        "decoder": None,
        "model": {"type": "BPE", "vocab": {}, "merges": []},
    }
    processor = Tokenizer.from_str(json.dumps(carrier)).post_processor
    assert processor is not None
    return processor


def _vocab(tokens: list[str]) -> dict[str, int]:
    # Like llama.cpp, a text stored twice maps to its last id.
    return {token: index for index, token in enumerate(tokens)}


def _parse_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelFormatError(
                f"GGUF merge #{index} {merge!r} is not two tokens separated by one space",
                hint="tokenizer.ggml.merges looks corrupt; re-convert the model",
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _token_for(metadata: Mapping[str, Any], key: str, tokens: list[str]) -> str | None:
    token_id = metadata.get(key)
    if token_id is None:
        return None
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise ModelFormatError(
            f"GGUF metadata '{key}' = {token_id!r} is not a token id (vocabulary has {len(tokens)} tokens)",
            hint="the tokenizer metadata is corrupt; re-convert the model",
        )
    return tokens[token_id]


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ModelFormatError(
            f"GGUF metadata has no '{key}'",
            hint="this file carries no (complete) tokenizer; pass the model's tokenizer.json instead",
        )
    return metadata[key]


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    values = _require(metadata, key)
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or not all(isinstance(v, str) for v in values)
    ):
        raise ModelFormatError(f"GGUF metadata '{key}' is not a list of strings", hint="re-convert the model")
    return list(values)


def _int_list(metadata: Mapping[str, Any], key: str, length: int, default: int) -> list[int]:
    if key not in metadata:
        return [default] * length
    return [int(v) for v in _checked_list(metadata, key, length)]


def _float_list(metadata: Mapping[str, Any], key: str, length: int) -> list[float]:
    return [float(v) for v in _checked_list(metadata, key, length)]


def _checked_list(metadata: Mapping[str, Any], key: str, length: int) -> Sequence[Any]:
    values = _require(metadata, key)
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != length:
        raise ModelFormatError(
            f"GGUF metadata '{key}' should be a list with one entry per token ({length})",
            hint="the tokenizer metadata is corrupt; re-convert the model",
        )
    return values
