"""A text corpus as documents: which files a user named (paths, folders, globs, JSONL fields, or strings in
memory) and how they are read, lazily, in pieces. Tokenizer training and token-shard preparation both read
through here, so "what a document is" is decided once:

- a ``.txt`` file is ONE document, as in nanoGPT's Shakespeare and litgpt's ``TextFiles``: most corpora are a
  file per book or article, and cutting prose at blank lines would put an eos between a chapter's paragraphs.
  ``split_paragraphs=True`` instead cuts at blank lines, for files that concatenate many short texts (poems,
  tweets); a paragraph's final line break is dropped, the eos takes its place.
- each line of a ``.jsonl`` file is one document, its ``text_field`` value;
- each string of an in-memory iterable is one document.

Nothing is read whole: files are read line by line, and a long document comes in pieces of about a million
characters cut just before a line that starts with a non-space character (a point where the byte-level
pre-tokenizer always splits anyway, so the ids are the same as encoding it whole).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeAlias

from lmforge.errors import LmforgeError

PathLike: TypeAlias = "str | os.PathLike[str]"
Inputs: TypeAlias = "PathLike | Sequence[PathLike] | Iterable[str]"

CORPUS_SUFFIXES = (".txt", ".jsonl")
# A module constant rather than an argument: it changes memory, never the output.
_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about this many characters


def resolve_inputs(inputs: Inputs) -> tuple[list[Path], Iterable[str] | None]:
    """Split ``inputs`` into files (paths, folders and globs expanded) or an iterable of texts.

    A path (``str`` or ``Path``) or a list/tuple of them names files; any other iterable (a generator,
    ``iter(texts)``) yields the documents themselves. The rule is by type, not by guessing whether a string
    looks like a path, so a typo in a file name is an error rather than a one-line "document".
    """
    if isinstance(inputs, (str, os.PathLike)):
        return expand_inputs([inputs]), None
    if isinstance(inputs, Sequence):
        return expand_inputs(inputs), None
    if isinstance(inputs, Iterable):
        return [], inputs
    raise LmforgeError(
        f"cannot read a corpus from a {type(inputs).__name__}",
        hint="pass a path, folder or glob, a list of them, or an iterator of strings",
    )


def expand_inputs(paths: Sequence[PathLike]) -> list[Path]:
    """The corpus files that ``paths`` names, in a fixed order (so prepared shards are reproducible).

    A folder means every ``.txt``/``.jsonl`` file under it (recursively, hidden ones skipped, sorted); a glob
    (``data/*.jsonl``, ``**`` allowed) its sorted matches; a file itself, whatever its suffix (read as
    JSONL if it ends in ``.jsonl``, as plain text otherwise). A file named twice is read once.
    """
    out: dict[Path, None] = {}
    for item in paths:
        if not isinstance(item, (str, os.PathLike)):
            raise LmforgeError(
                f"corpus input {item!r} is a {type(item).__name__}, not a path",
                hint="a list names files; to train on strings in memory pass an iterator: iter(texts)",
            )
        path = Path(item)
        if path.is_dir():
            found = _corpus_files_in(path)
            if not found:
                raise LmforgeError(
                    f"{path}: the folder has no {' or '.join(CORPUS_SUFFIXES)} files",
                    hint="point at the folder holding the corpus, or name the files (or a glob) directly",
                )
        elif path.is_file():
            found = [path]
        elif any(c in str(item) for c in "*?["):
            found = []
            for match in sorted(glob.glob(str(item), recursive=True)):
                m = Path(match)
                found.extend(_corpus_files_in(m) if m.is_dir() else [m] if m.is_file() else [])
            if not found:
                raise LmforgeError(f"{item}: the pattern matches no files", hint="check the glob")
        else:
            raise LmforgeError(
                f"{path}: no such file or folder",
                hint="check the path; to use strings in memory as the corpus pass an iterator: iter(texts)",
            )
        out.update(dict.fromkeys(p.resolve() for p in found))
    if not out:
        raise LmforgeError("no corpus files given", hint="pass a path, folder or glob")
    return list(out)


def _corpus_files_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in CORPUS_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def text_pieces(
    inputs: Inputs, *, text_field: str = "text", split_paragraphs: bool = False
) -> Iterator[tuple[str, bool]]:
    """The corpus as ``(text, ends_document)`` pieces, read lazily (see the module docstring for documents).

    A document is one piece unless it is a long text file, which comes in pieces that each encode exactly as
    that span of the whole, so tokenizer training and shard preparation never hold a whole file.
    """
    files, texts = resolve_inputs(inputs)
    if texts is not None:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LmforgeError(
                    f"corpus text {i} is a {type(text).__name__}, not a string",
                    hint="an iterator corpus yields the documents as strings; to name files pass a list of paths",
                )
            if text:
                yield text, True
        return
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_pieces(path, text_field)
        else:
            yield from _txt_pieces(path, split_paragraphs)


def iter_documents(
    inputs: Inputs, *, text_field: str = "text", split_paragraphs: bool = False
) -> Iterator[str]:
    """The corpus's documents as whole strings: what ``prepare_corpus`` puts an eos after (for inspection and
    tests; a document as large as a file is held whole here)."""
    parts: list[str] = []
    for text, end in text_pieces(inputs, text_field=text_field, split_paragraphs=split_paragraphs):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []


@contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    # newline="" keeps "\r\n" as written (the ids must reproduce the text); utf-8-sig drops a leading BOM.
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield f
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{path}: not UTF-8 text ({e.reason})",
            hint="convert the file to UTF-8, e.g. iconv -f GB18030 -t UTF-8",
        ) from None
    except OSError as e:
        raise LmforgeError(
            f"{path}: cannot read it ({e.strerror})", hint="check the file's permissions"
        ) from None


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (a BOM dropped, newlines as written); a file that is not UTF-8 or cannot be read is
    one ``LmforgeError`` naming it."""
    with _open_text(path) as f:
        return f.read()


def _txt_pieces(path: Path, split_paragraphs: bool) -> Iterator[tuple[str, bool]]:
    with _open_text(path) as f:
        buf: list[str] = []
        size = 0
        for line in f:
            if split_paragraphs and not line.strip():
                if buf:
                    yield "".join(buf).rstrip("\r\n"), True
                    buf, size = [], 0
                continue
            # Cut only before a line starting with a non-space: the pre-tokenizer always splits there, so the
            # pieces encode to exactly the ids of the whole document.
            if size >= _PIECE_CHARS and not line[0].isspace():
                yield "".join(buf), False
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            text = "".join(buf)
            yield (text.rstrip("\r\n") if split_paragraphs else text), True


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(
                    f"{path}:{lineno}: not valid JSON ({e.msg})",
                    hint="a .jsonl file holds one JSON object per line",
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                fields = f" (it has {', '.join(map(repr, record))})" if isinstance(record, dict) else ""
                raise LmforgeError(
                    f"{path}:{lineno}: no {text_field!r} field{fields}",
                    hint="pass text_field= naming the field that holds the text",
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise LmforgeError(
                    f"{path}:{lineno}: {text_field!r} is a {type(text).__name__}, not a string",
                    hint="the text field must hold the document's text",
                )
            if text:
                yield text, True
