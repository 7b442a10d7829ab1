"""Token shards: a text corpus tokenized once into flat memory-mapped arrays, and a batch sampler over them.

Pretraining reads random windows from one long stream of token ids (nanoGPT's ``train.bin``), so preparing the
data means: find the files, cut them into documents, tokenize, put the eos id after every document, and write
the ids as raw little-endian ``uint16`` (vocabularies up to 65536) or ``uint32`` files, ``train_000.bin``,
``val_000.bin``... of at most ``shard_tokens`` ids each, plus a ``meta.json`` that says what they hold.

What a document is, and how files are read, is decided once in ``lmforge.corpus`` (shared with tokenizer
training).

Nothing is held whole: pieces of documents are encoded as they are read, and shards are appended to as ids
arrive.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from lmforge.corpus import Inputs, resolve_inputs, text_pieces
from lmforge.errors import LmforgeError
from lmforge.model import loss_terms
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer

META_FILE = "meta.json"
FORMAT = "lmforge-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Module constants rather than arguments: they change speed and memory, never the output.
_BATCH_CHARS = 1 << 20  # text per encode call (and per task sent to a worker)
_MOVE_TOKENS = 1 << 24  # ids copied at a time when the val split is topped up from the train tail


# ------------------------------------------------------------------ encoding
def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The sha256 of the tokenizer's ``tokenizer.json`` content, as ``tokenizers`` serialises it (compact), so
    it does not depend on how a file on disk happens to be formatted."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def _ordinary_backend(tokenizer_json: str) -> HFTokenizer:
    backend = HFTokenizer.from_str(tokenizer_json)
    # A literal "<|endoftext|>" inside a document is text, not a document boundary (tiktoken's
    # encode_ordinary, as nanoGPT uses): otherwise scraped text could forge separators.
    backend.encode_special_tokens = True
    return backend


def _encode(backend: HFTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # add_special_tokens=False: no BOS/EOS from a post-processor; the one separator is ours.
    # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not use.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    flat = itertools.chain.from_iterable(e.ids for e in encodings)
    return np.fromiter(flat, dtype=np.uint32, count=int(lengths.sum())), lengths


_WORKER_BACKEND: HFTokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_BACKEND
    _WORKER_BACKEND = _ordinary_backend(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_BACKEND is not None
    return _encode(_WORKER_BACKEND, texts)


def _batched(pieces: Iterator[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= _BATCH_CHARS or len(texts) >= 4096:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _encoded_batches(
    pieces: Iterator[tuple[str, bool]], tokenizer_json: str, workers: int
) -> Iterator[tuple[list[bool], np.ndarray, np.ndarray]]:
    """``(ends, ids, lengths)`` per batch of pieces, in corpus order whatever the number of workers."""
    if workers <= 1:
        # encode_batch is already multi-threaded in Rust; one process is the fast default.
        backend = _ordinary_backend(tokenizer_json)
        for texts, ends in _batched(pieces):
            yield ends, *_encode(backend, texts)
        return
    # fork where there is one (like torch's DataLoader): workers start at once instead of re-importing torch.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # Each worker encodes on one thread (workers x cores threads would thrash), and a child that inherits
    # env=false gets no "forked after parallelism" warning from tokenizers.
    with _env("TOKENIZERS_PARALLELISM", "false"):
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,))
    try:
        # A bounded window of tasks instead of Pool.imap, whose feeder thread would read the whole corpus
        # into memory ahead of the workers.
        pending: deque[tuple[list[bool], Any]] = deque()
        for texts, ends in _batched(pieces):
            pending.append((ends, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * workers:
                done_ends, result = pending.popleft()
                yield done_ends, *result.get()
        while pending:
            done_ends, result = pending.popleft()
            yield done_ends, *result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------------ writing
class _ShardWriter:
    """Appends ids to ``{split}_000.bin``, ``{split}_001.bin``..., a new file every ``shard_tokens`` ids."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[list[Any]] = []  # [file name, tokens]
        self._file: io.BufferedWriter | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self.shards[-1][1] == self.shard_tokens:
                self._open_next()
            assert self._file is not None
            take = min(len(ids), self.shard_tokens - self.shards[-1][1])
            self._file.write(ids[:take].tobytes())
            self.shards[-1][1] += take
            ids = ids[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 — closed in close()
        self.shards.append([name, 0])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def move_tail_to(self, other: _ShardWriter, count: int) -> None:
        """Move this split's last ``count`` ids to the end of ``other``, in order, a block at a time."""
        self.close()
        start = self.tokens - count
        offset = 0
        for shard in self.shards:
            name, n = shard
            lo = max(start - offset, 0)
            for pos in range(lo, n, _MOVE_TOKENS):
                k = min(_MOVE_TOKENS, n - pos)
                other.write(
                    np.fromfile(
                        self.folder / name, dtype=self.dtype, count=k, offset=pos * self.dtype.itemsize
                    )
                )
            if lo < n:
                shard[1] = lo
                if lo:
                    os.truncate(self.folder / name, lo * self.dtype.itemsize)
                else:
                    (self.folder / name).unlink()
            offset += n
        self.shards = [s for s in self.shards if s[1]]


def _is_val(seed: int, document: int, fraction: float) -> bool:
    # A hash of (seed, index), not a running RNG: the choice for a document never depends on batching/workers.
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{document}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def _remove_previous(folder: Path) -> None:
    # meta.json first: a folder without it is never mistaken for a finished preparation.
    (folder / META_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in folder.glob(f"{split}_[0-9][0-9][0-9]*.bin"):
            old.unlink()


def prepare_corpus(
    inputs: Inputs,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    text_field: str = "text",
    split_paragraphs: bool = False,
    val_fraction: float = 0.005,
    workers: int = 1,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into train/val token shards in ``out_dir``; returns what it writes to ``meta.json``.

    Every document is followed by the tokenizer's eos id (a BERT tokenizer's [SEP]: it has no eos). The val
    split takes whole documents, each with probability ``val_fraction`` from a hash of ``(seed, document
    index)``; when that gives fewer than half of ``val_fraction`` of all tokens (a single-file corpus such as Shakespeare, a handful of documents), the
    shortfall is cut from the end of the train stream instead, nanoGPT's 90/10 split. The output depends only
    on the corpus, the tokenizer, ``val_fraction``, ``seed`` and ``shard_tokens``: ``workers`` (processes
    encoding in parallel) changes the speed, never a byte. The tokenizer is saved in ``out_dir`` too, so the
    folder says how to decode itself; shards or meta.json from an earlier run there are replaced.
    """
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction {val_fraction} is not in [0, 1)", hint="e.g. val_fraction=0.005")
    if workers < 1 or shard_tokens < 1:
        raise LmforgeError("workers and shard_tokens must be at least 1", hint="e.g. workers=4")
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.token_to_id("[SEP]")
    if eos_id is None:
        raise LmforgeError(
            "the tokenizer has no eos token to separate documents",
            hint="set tokenizer.eos_token (e.g. '<|endoftext|>'), or use one made by train_tokenizer",
        )
    files, texts = resolve_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    vocab_size = tokenizer.vocab_size
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    pieces = text_pieces(
        texts if texts is not None else files, text_field=text_field, split_paragraphs=split_paragraphs
    )
    eos = np.array([eos_id], dtype=dtype)
    documents = val_documents = 0
    to_val = _is_val(seed, 0, val_fraction)
    bar = progress_bar(desc="tokenizing", unit=" docs", disable=not show_progress)
    try:
        for ends, ids, lengths in _encoded_batches(pieces, tokenizer.backend.to_str(), workers):
            # Gather the batch per split and write each once: far fewer writes than one per document.
            parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
            stops = np.cumsum(lengths)
            for end, start, stop in zip(ends, stops - lengths, stops, strict=True):
                dest = parts["val" if to_val else "train"]
                dest.append(ids[start:stop])
                if end:
                    dest.append(eos)
                    documents += 1
                    val_documents += to_val
                    to_val = _is_val(seed, documents, val_fraction)
            for split, arrays in parts.items():
                if arrays:
                    writers[split].write(np.concatenate(arrays))
            bar.update(sum(ends))
            bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)
        total = writers["train"].tokens + writers["val"].tokens
        if total == 0:
            raise LmforgeError(
                f"no text in the corpus ({_describe(files)})",
                hint=f"the inputs are empty (for .jsonl: check that {text_field!r} is the text field)",
            )
        target = math.ceil(val_fraction * total)
        if writers["val"].tokens * 2 < target:
            writers["train"].move_tail_to(writers["val"], target - writers["val"].tokens)
    except BaseException:
        for w in writers.values():
            w.close()
        _remove_previous(out)
        raise
    finally:
        bar.close()
    for w in writers.values():
        w.close()
    tokenizer.save(out)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos_id,
        "eos_token": tokenizer.eos_token or "[SEP]",
        "documents": documents,
        "val_documents": val_documents,
        "tokens": {split: writers[split].tokens for split in SPLITS},
        "shards": {split: [{"file": f, "tokens": n} for f, n in writers[split].shards] for split in SPLITS},
        "sources": [str(f) for f in files] if texts is None else ["<in-memory texts>"],
        "text_field": text_field,
        "split_paragraphs": split_paragraphs,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / META_FILE)  # last and atomic: meta.json's presence means the shards are complete
    return meta


def _describe(files: list[Path]) -> str:
    if not files:
        return "the texts given"
    return ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


# ------------------------------------------------------------------ reading
class TokenShards:
    """A folder made by :func:`prepare_corpus`, opened read-only, with a batch sampler for pretraining.

    ``len(shards)`` is the number of train tokens (what one epoch means). The shards are memory-mapped on
    first use, so opening is cheap and the object can be handed to worker processes.
    """

    def __init__(self, folder: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> None:
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._files: dict[str, list[tuple[Path, int]]] = {}
        self._starts: dict[str, np.ndarray] = {}
        for split in SPLITS:
            entries = [
                (self.folder / s["file"], int(s["tokens"])) for s in self.meta["shards"].get(split, [])
            ]
            for path, n in entries:
                _check_shard(path, n, self.dtype.itemsize)
            self._files[split] = entries
            self._starts[split] = np.cumsum([0] + [n for _, n in entries])
        self._maps: dict[str, list[np.memmap]] = {}
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    # ------------------------------------------------------------ facts
    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def num_tokens(self, split: str = "train") -> int:
        return int(self._starts[self._split(split)][-1])

    def __len__(self) -> int:
        return self.num_tokens("train")

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in SPLITS)
        return f"TokenShards({str(self.folder)!r}, {counts} tokens, {self.meta['dtype']})"

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise unless ``tokenizer`` is the one the shards were made with: other ids would train nonsense."""
        digest = tokenizer_sha256(tokenizer)
        if digest != self.meta["tokenizer_sha256"]:
            raise LmforgeError(
                f"{self.folder / META_FILE}: the shards were made with another tokenizer "
                f"(sha256 {self.meta['tokenizer_sha256'][:12]}…, vocab {self.vocab_size}); this one is "
                f"{digest[:12]}…, vocab {tokenizer.vocab_size}",
                hint=f"use the tokenizer saved in {self.folder}, or prepare the corpus again with this one",
            )

    def tokenizer(self) -> Tokenizer:
        """The tokenizer ``prepare_corpus`` saved next to the shards."""
        return Tokenizer.load(self.folder)

    # ------------------------------------------------------------ reading
    def read(self, split: str, start: int, length: int) -> np.ndarray:
        """``length`` ids from position ``start`` of the split's stream, across shard boundaries."""
        split = self._split(split)
        maps = self._memmaps(split)
        starts = self._starts[split]
        if start < 0 or start + length > starts[-1]:
            raise IndexError(f"{split}[{start}:{start + length}] is outside 0..{starts[-1]}")
        i = int(np.searchsorted(starts, start, side="right")) - 1
        lo = start - int(starts[i])
        if lo + length <= len(maps[i]):
            return np.asarray(maps[i][lo : lo + length])
        parts = []
        while length > 0:
            take = min(length, len(maps[i]) - lo)
            parts.append(maps[i][lo : lo + take])
            length -= take
            i, lo = i + 1, 0
        return np.concatenate(parts)

    def batch(
        self, split: str, batch_size: int, block_size: int, seed: int = 0, step: int = 0, *, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``(x, y)`` int64 ``(batch_size, block_size)``, ``y`` = ``x`` shifted by one.

        Random windows as in nanoGPT, but the window starts are a hash of ``(seed, rank, split, step)`` alone,
        so the sampler has no state to save: a run resumed at step N draws exactly the batches the
        uninterrupted run would have. ``rank`` gives each data-parallel process its own windows.
        """
        split = self._split(split)
        if batch_size < 1 or block_size < 1:
            raise LmforgeError(
                f"batch_size {batch_size} and block_size {block_size} must be at least 1",
                hint="e.g. 8 and 256",
            )
        n = self.num_tokens(split)
        if block_size + 1 > n:
            raise LmforgeError(
                f"{self.folder}: the {split} split has {n:,} tokens, fewer than block_size + 1 = "
                f"{block_size + 1:,} (a window and its next token)",
                hint="use a smaller block_size, or prepare more text (or a larger val_fraction for val)",
            )
        key = f"lmforge-batch:{seed}:{rank}:{split}:{step}".encode()
        # shake_128 rather than a seeded RNG: its output is fixed forever, numpy's streams are not promised to be.
        raw = np.frombuffer(hashlib.shake_128(key).digest(8 * batch_size), dtype="<u8")
        starts = raw % np.uint64(n - block_size)  # modulo bias < 2**-24 for any corpus that fits on a disk
        windows = np.stack([self.read(split, int(s), block_size + 1) for s in starts]).astype(np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def batches(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        start_step: int = 0,
        *,
        rank: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``batch(split, batch_size, block_size, seed, step)`` for step = start_step, start_step+1, ..."""
        # Checked now, not at the first next(): a bad block_size should fail where it is passed.
        self.batch(split, 1, block_size, seed, start_step, rank=rank)
        return (
            self.batch(split, batch_size, block_size, seed, step, rank=rank)
            for step in itertools.count(start_step)
        )

    # ------------------------------------------------------------ internals
    def _split(self, split: str) -> str:
        if split not in self._files:
            raise LmforgeError(f"no split {split!r} in {self.folder}", hint="use 'train' or 'val'")
        return split

    def _memmaps(self, split: str) -> list[np.memmap]:
        if split not in self._maps:
            self._maps[split] = [np.memmap(p, dtype=self.dtype, mode="r") for p, _ in self._files[split]]
        return self._maps[split]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # each process maps the files itself
        return state


# --------------------------------------------------------------- objectives over shards
Batch = dict[str, torch.Tensor]


class WindowObjective:
    """What every pretraining objective on ``TokenShards`` shares, for the one Trainer (``train.Objective``):
    random windows of the shards, a global batch drawn per step with each process taking its rows (N processes
    see exactly what one process would), a fixed sample of validation windows per evaluation, and ``val_loss``
    their mean loss. A subclass says what a batch of windows becomes (``batch``)."""

    EVAL_BATCHES = 20  # the val shard's windows are countless: a fixed sample of them per evaluation
    TASK = ""  # the lineage's name for the objective

    def __init__(self, shards: TokenShards, micro_batch_size: int, seed: int = 1337) -> None:
        self.shards, self.micro_batch_size, self.seed = shards, micro_batch_size, seed

    def batch(self, split: str, batch_size: int, seed: int, index: int) -> Batch:
        """Batch ``index`` of ``batch_size`` windows of ``split`` (a pure function of its arguments)."""
        raise NotImplementedError

    def train_batch(self, index: int, rank: int, world_size: int) -> Batch:
        b = self.micro_batch_size
        batch = self.batch("train", b * world_size, self.seed, index)
        return {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}

    def val_batches(self, count: int | None) -> Iterator[Batch]:
        for i in range(self.EVAL_BATCHES if count is None else count):
            yield self.batch("val", self.micro_batch_size, self.seed + 1, i)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["targets"])[1]

    def loss_terms(self, batch: Batch) -> int:
        return loss_terms(batch["targets"])

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        losses = [self.loss(model, batch).float() for batch in batches]
        return {"val_loss": float(torch.stack(losses).mean())} if losses else {}

    def describe(self) -> dict[str, Any]:
        meta = self.shards.meta
        return {
            "task": self.TASK,
            "data": str(self.shards.folder),
            "data_tokens": meta.get("tokens"),
            "tokenizer_sha256": meta.get("tokenizer_sha256"),
        }


class LanguageModelingObjective(WindowObjective):
    """Next-token prediction on prepared token shards (random windows, nanoGPT style)."""

    TASK = "language-modeling"

    def __init__(self, shards: TokenShards, micro_batch_size: int, block_size: int, seed: int = 1337) -> None:
        super().__init__(shards, micro_batch_size, seed)
        self.block_size = block_size

    def batch(self, split: str, batch_size: int, seed: int, index: int) -> Batch:
        x, y = self.shards.batch(split, batch_size, self.block_size, seed, index)
        return {"input_ids": x, "targets": y}


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    redo = "prepare the corpus again (lmforge.data.prepare_corpus)"
    if not path.is_file():
        hint = (
            "this is not a prepared token folder: prepare the corpus into it first"
            if not folder.is_dir() or not any(folder.glob("*.bin"))
            else "the preparation did not finish: " + redo
        )
        raise LmforgeError(f"{path}: no such file", hint=hint)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})", hint=redo) from None
    required = ("format", "version", "tokenizer_sha256", "vocab_size", "dtype", "eos_id", "tokens", "shards")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != FORMAT:
        what = (
            f"lacks {', '.join(missing)}" if missing else f"format is {meta.get('format')!r}, not {FORMAT!r}"
        )
        raise LmforgeError(f"{path}: not a token-shards meta.json ({what})", hint=redo)
    if meta["version"] > FORMAT_VERSION:
        raise LmforgeError(
            f"{path}: format version {meta['version']} is newer than this lmforge reads ({FORMAT_VERSION})",
            hint="upgrade lmforge, or prepare the corpus again with this version",
        )
    if meta["dtype"] not in ("uint16", "uint32") or not isinstance(meta["shards"], dict):
        raise LmforgeError(f"{path}: corrupt (dtype {meta['dtype']!r})", hint=redo)
    return meta


def _check_shard(path: Path, tokens: int, itemsize: int) -> None:
    if not path.is_file():
        raise LmforgeError(
            f"{path}: missing (meta.json lists it)", hint="the folder is incomplete: prepare again"
        )
    size = path.stat().st_size
    if tokens < 1:
        raise LmforgeError(
            f"{path}: meta.json lists it with {tokens} tokens", hint="prepare the corpus again"
        )
    if size != tokens * itemsize:
        raise LmforgeError(
            f"{path}: {size:,} bytes, but meta.json says {tokens:,} tokens of {itemsize} bytes",
            hint="the file is truncated or was overwritten: prepare the corpus again",
        )
