"""Tokenizer: Hugging Face ``tokenizers`` underneath, chat templates on top.

The files are the standard ones (``tokenizer.json`` + ``tokenizer_config.json``), so a folder written here loads
in transformers' ``AutoTokenizer`` and vice versa. Chat templates are the model's own Jinja templates, rendered
the way transformers renders them (sandboxed, trimmed blocks) so prompts match token for token.

``train_tokenizer`` makes a new one for pretraining: byte-level BPE (any string round-trips) or, for tiny
nanoGPT-style experiments, one token per character.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge import limits
from lmforge.corpus import Inputs, text_pieces
from lmforge.errors import LmforgeError, ModelFormatError

Message = dict[str, str]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (a printable stand-in character for each of the 256 bytes), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        # transformers applies a tokenizer.json's stored truncation/padding only when a call asks for it; so do
        # we (never: every caller checks lengths itself, and cutting text silently loses it).
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token,
            eos_token,
            pad_token,
            unk_token,
        )
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # Added tokens flagged special (control tokens) are what decode(skip_special_tokens=True) drops.
        self.special_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self) -> Callable[[int], str | None]:
        """A decoder for ids that arrive one at a time (``tokenizers``' ``DecodeStream``): each call takes the next
        id and returns the text it adds, or None while it ends inside a character (byte-level and byte-fallback
        tokens can split one). The pieces joined are ``decode`` of all the ids. Each call decodes the last few
        ids only: decoding the whole sequence again per token cost 41 us a token on average over 720 tokens of
        SmolLM2's vocabulary, and grew with the text; this costs ~1 us."""
        stream = decoders.DecodeStream(skip_special_tokens=False)
        return lambda token_id: stream.step(self.backend, token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when it is only part of a character (where ``decode`` gives
        U+FFFD): a byte-level BPE piece read through GPT-2's alphabet, a SentencePiece byte-fallback token
        (``<0xE4>``) as its byte, anything else as its decoded text."""
        piece = self.backend.id_to_token(token_id) or ""
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if isinstance(self.backend.decoder, decoders.ByteLevel):
            alphabet = _byte_level_alphabet()
            if piece and all(ch in alphabet for ch in piece):
                return bytes(alphabet[ch] for ch in piece)
        return self.decode([token_id]).encode("utf-8")

    # ------------------------------------------------------------ chat template
    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        template = self.chat_template or DEFAULT_CHAT_TEMPLATE
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LmforgeError(
                    f"chat message {i} is not a {{'role': ..., 'content': ...}} dict: {m!r}",
                    hint="pass messages like [{'role': 'user', 'content': 'Hello'}]",
                )
        try:
            return _compile_template(template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except TemplateError as e:
            raise LmforgeError(
                f"the chat template failed: {e}", hint="check the messages' roles and order"
            ) from None

    # ------------------------------------------------------------------- files
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
        }
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        text = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(
                f"{folder}: no tokenizer.json",
                hint="a model folder needs the tokenizer saved next to the weights",
            )
        limits.check_file_size(path, limits.MAX_TOKENIZER_BYTES, "tokenizer.json")  # parsed whole, in Rust
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ModelFormatError(
                f"{path}: not a valid tokenizer file ({e})", hint="re-save the tokenizer"
            ) from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = limits.read_json_object(cfg_path, what="tokenizer config") if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            limits.check_file_size(jinja_file, limits.MAX_CONFIG_BYTES, "chat template")
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ModelFormatError(f"{jinja_file}: not UTF-8 text ({e})", hint="fix the file") from None
        if isinstance(template, list):  # transformers also allows [{"name": "default", "template": ...}]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                None,
            )
        max_len = cfg.get("model_max_length")
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            unk_token=_token_text(cfg.get("unk_token")),
            chat_template=template if isinstance(template, str) else None,  # a file's value of another type
            model_max_length=max_len if isinstance(max_len, int) and max_len < 10**9 else None,
        )


# A ChatML template for models that bring none of their own (e.g. ones pretrained here).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
        token = token.get("content")
    return token if isinstance(token, str) else None  # a damaged file's number or list names no token


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(template: str) -> Any:
    if template not in _TEMPLATE_CACHE:
        # Same environment settings as transformers, so a model's template renders identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[template] = env.from_string(template)
    return _TEMPLATE_CACHE[template]


# ------------------------------------------------------------------ training
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2's pre-tokenizer split: GPT-4/Llama-3's pattern but one digit per piece, which small vocabularies
# need to learn arithmetic at all. Runs of letters stay together and \p{L} includes CJK ideographs, so BPE can
# learn multi-character Chinese words instead of stopping at single characters or bytes.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CHAR_UNK_TOKEN = "<|unk|>"


def train_tokenizer(
    files: Inputs,
    vocab_size: int | None = None,
    *,
    kind: Literal["bpe", "char"] = "bpe",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    text_field: str = "text",
    split_paragraphs: bool = False,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a tokenizer for pretraining on a corpus.

    ``files`` is read exactly as :func:`lmforge.data.prepare_corpus` reads it (one place decides what a
    document is): a path, folder or glob, or a list of them, for ``.txt`` and ``.jsonl`` files (the
    ``text_field`` of each line); any other iterable (e.g. ``iter(texts)``) yields the texts themselves.

    ``kind="bpe"`` is byte-level BPE: all 256 bytes are in the vocabulary, so every string (any script, emoji,
    control characters) encodes and decodes back exactly, and there is no unknown token. ``kind="char"`` makes
    one token per distinct character of the corpus plus the special tokens and ``<|unk|>`` (for characters
    the corpus lacks); ``vocab_size`` is then optional, an upper bound.

    The first special token ``<|endoftext|>`` (else the first given) is eos, bos and pad: it is what
    ``prepare_corpus`` puts between documents, so a model trained on the shards starts and ends texts with it.
    """
    specials = list(dict.fromkeys(special_tokens))
    if not specials:
        raise LmforgeError(
            "special_tokens is empty",
            hint="pretraining needs an end-of-text token between documents, e.g. special_tokens=['<|endoftext|>']",
        )
    if kind not in ("bpe", "char"):
        raise LmforgeError(f"unknown tokenizer kind {kind!r}", hint="use kind='bpe' or kind='char'")
    eos = "<|endoftext|>" if "<|endoftext|>" in specials else specials[0]
    seen_chars = 0

    def texts() -> Iterator[str]:
        nonlocal seen_chars
        for piece, _ in text_pieces(files, text_field=text_field, split_paragraphs=split_paragraphs):
            seen_chars += len(piece)
            yield piece

    def check_not_empty() -> None:
        if not seen_chars:
            raise LmforgeError(
                "the corpus has no text to train a tokenizer on",
                hint=f"check that the files are not empty (for .jsonl, that {text_field!r} is the text field)",
            )

    unk = None
    if kind == "char":
        unk = CHAR_UNK_TOKEN
        if unk not in specials:
            specials.append(unk)
        alphabet: set[str] = set()
        for text in texts():
            alphabet.update(text)
        check_not_empty()
        chars = sorted(alphabet.difference(specials))
        if vocab_size is not None and len(specials) + len(chars) > vocab_size:
            raise LmforgeError(
                f"vocab_size {vocab_size} is smaller than the alphabet: the corpus has {len(chars)} distinct "
                f"characters + {len(specials)} special tokens",
                hint=f"use vocab_size >= {len(specials) + len(chars)}, or leave it out for kind='char'",
            )
        vocab = {tok: i for i, tok in enumerate(specials + chars)}
        # A BPE model without merges is a plain character lookup that still saves as a standard tokenizer.json
        # (transformers loads it); unlike WordLevel it needs no pre-tokenizer to cut text into characters.
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
        backend.add_special_tokens(specials)
        backend.decoder = decoders.Fuse()
    else:
        if vocab_size is None:
            raise LmforgeError("vocab_size is required for kind='bpe'", hint="e.g. vocab_size=32000")
        alphabet_size = 256 + len(specials)
        if vocab_size < alphabet_size:
            raise LmforgeError(
                f"vocab_size {vocab_size} is smaller than the alphabet: 256 bytes + {len(specials)} special "
                f"tokens = {alphabet_size}",
                hint=f"use vocab_size >= {alphabet_size}; below 65536 keeps token shards at 2 bytes a token",
            )
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
                # use_regex=False: the split above replaces GPT-2's English-centric one.
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(texts(), trainer=trainer)
        check_not_empty()
    return Tokenizer(backend, bos_token=eos, eos_token=eos, pad_token=eos, unk_token=unk)
