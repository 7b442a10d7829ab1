"""The local model store: ``name:tag`` -> a model folder, with its lineage, recipe, data and metrics.

    ~/.lmforge                       (or $LMFORGE_HOME)
      blobs/sha256-<hex>             every file once, named by its content
      manifests/<name>/<tag>.json    name:tag -> files, config summary, parent, recipe, data, metrics
      snapshots/<hex>/               symlinks into blobs: the plain model folder ``LLM.load`` reads
      tmp/                           files being written; never entries, ``gc`` removes leftovers
      lock                           held while blobs, manifests or snapshots change
      inductor/                      not the store's: torch.compile's cache (``lmforge.runtime``)

Links: the store makes symbolic links only inside snapshots/<hex>/ (pointing into blobs/) and follows none
anywhere else, so a link planted in manifests/, blobs/ or tmp/ cannot make ``rm``, ``cp`` or ``gc`` read,
write or delete a file outside the store: such an entry is refused with one error naming the link. An imported
folder's own links are refused too (only store snapshots and hub downloads, whose layout is links, are read
through them). A blob is never more readable than its source file (a 0600 file stays 0600), and the user's
umask applies on top.

Crash safety: a blob is written to tmp/, fsynced and renamed into place; the manifest comes last, also by
rename, so a killed import leaves at most unreferenced blobs and temp files, never a half entry. Writers take
the store-wide lock (concurrent imports run one after the other); readers take none. Every blob is re-hashed
when a model is opened, so a damaged file is a one-line error instead of wrong outputs.

Why one module of ~730 lines: crash safety rests on every writer (put, cp, tag, rm, gc, add_metrics) sharing
one lock, one blob-then-manifest order and one rule about links; keeping them in one class keeps that
discipline visible.

The stored ``README.md`` is generated from the manifest (``formats.folder.model_card``) and is not part of a
model's identity: ``id`` hashes the other files, so adding eval results to a model does not make it a new one.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from lmforge.config import Config
from lmforge.errors import LmforgeError, ModelFormatError
from lmforge.formats.atomic import fsync_path
from lmforge.home import lmforge_home
from lmforge.limits import MAX_MANIFEST_BYTES, read_json_object
from lmforge.tokenizer import Tokenizer

DEFAULT_TAG = "latest"
MAX_NAME, MAX_TAG = 128, 64
LOCK_TIMEOUT_S = 600
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"(?:{_PART}/)?{_PART}")
_TAG = re.compile(_PART)
# A file inside a model folder, relative: "config.json" or "1_Pooling/config.json" (never "..", never absolute).
_FILE = re.compile(rf"{_PART}(?:/{_PART})*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20
_NAME_HINT = (
    "names look like 'my-model', 'my-model:v1' or 'team/my-model:v1': ASCII letters, digits, '.', '_', '-', "
    f"starting with a letter or digit, at most one '/' and one ':', names up to {MAX_NAME} and tags up to "
    f"{MAX_TAG} characters"
)

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Ref:
    """A validated store reference; ``str(ref)`` is ``name:tag``."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(text: str) -> Ref:
    """``name[:tag]`` -> Ref (tag ``latest`` by default); anything that could escape the store is refused."""
    name, colon, tag = str(text).partition(":")
    tag = tag if colon else DEFAULT_TAG
    if not (_NAME.fullmatch(name) and _TAG.fullmatch(tag) and len(name) <= MAX_NAME and len(tag) <= MAX_TAG):
        raise LmforgeError(f"invalid model name {text!r}", hint=_NAME_HINT)
    return Ref(name, tag)


def _try_ref(text: str) -> Ref | None:
    try:
        return parse_ref(text)
    except LmforgeError:
        return None


def human_bytes(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


# ------------------------------------------------------------------- hashing
def _hash_into(src: IO[bytes], dst: IO[bytes] | None = None) -> tuple[str, int]:
    """sha256 hex and size of ``src``, copying it into ``dst`` on the way when one is given."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def hash_file(path: str | Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return _hash_into(f)


def _digest_of(files: Mapping[str, Mapping[str, Any]], skip: str | None = None) -> str:
    """One sha256 over a folder's (file name, content digest) pairs."""
    lines = "".join(f"{name}\0{entry['digest']}\n" for name, entry in sorted(files.items()) if name != skip)
    return hashlib.sha256(lines.encode()).hexdigest()


def fingerprint(paths: Sequence[str | Path]) -> dict[str, Any]:
    """sha256 of each data file (folders: every file inside) plus one digest over all of their contents.

    The combined digest depends on the contents and their order only, so the same data elsewhere matches.
    """
    files = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise LmforgeError(f"{path}: no such data file or folder", hint="check the data path")
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            if member.name.startswith("."):
                continue
            digest, size = hash_file(member)
            files.append({"path": str(member.resolve()), "sha256": digest, "size": size})
    combined = hashlib.sha256("".join(f["sha256"] + "\n" for f in files).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def _read_manifest(path: Path) -> Manifest:
    """A manifest's contents; ValueError when it is not one (so no name in it can point outside the store), also
    when it is over ``MAX_MANIFEST_BYTES`` (checked before it is read)."""
    try:
        manifest = read_json_object(path, MAX_MANIFEST_BYTES, "store manifest")
    except ModelFormatError as e:
        raise ValueError(e.message) from None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        _FILE.fullmatch(name) and isinstance(e, dict) and _DIGEST.fullmatch(str(e.get("digest")))
        for name, e in files.items()
    ):
        raise ValueError("not an lmforge store manifest")
    return manifest


def _folder_files(folder: Path, follow_links: bool) -> list[Path]:
    """The files in ``folder`` and its subfolders, sorted; a link in it is an error unless ``follow_links``."""
    files = []
    for top, folders, names in os.walk(folder, followlinks=follow_links):
        for name in (*folders, *names):
            path = Path(top) / name
            if path.is_symlink() and not follow_links:
                raise LmforgeError(
                    f"{path} is a symbolic link (to {os.readlink(path)}): only a folder's own files are "
                    "imported, so that nothing outside it is copied into the store",
                    hint="replace the link with a copy of what it points to (`cp -L`), or import the folder "
                    "it belongs to",
                )
        files += [Path(top) / name for name in names if (Path(top) / name).is_file()]
    return sorted(files)


def _remove(path: Path) -> int:
    """Delete a file, link or folder of the store without following links; returns the bytes freed."""
    if path.is_symlink() or not path.is_dir():
        size = path.lstat().st_size
        path.unlink()
        return size
    size = sum(p.lstat().st_size for p in path.rglob("*"))
    shutil.rmtree(path)  # rmtree removes links inside, never what they point to
    return size


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------- reports
@dataclass
class VerifyReport:
    """What ``verify`` found: ``ok`` when every entry's blobs are present and hash to their names, and every
    snapshot link points at the blob its entry names."""

    entries: int = 0
    blobs: int = 0
    bytes: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # digest -> entries that need it
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # manifest files that cannot be read (or are links)
    bad_links: dict[str, str] = field(default_factory=dict)  # "snapshots/<hex>/<file>" -> what is wrong
    unreferenced: int = 0  # blobs no entry uses (``gc`` frees them)
    temp: int = 0  # leftovers of interrupted writes (``gc`` removes them)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.damaged or self.bad_links)


@dataclass
class GcReport:
    blobs: int = 0
    snapshots: int = 0
    temp: int = 0
    bytes_freed: int = 0


# ----------------------------------------------------------------------- store
class Store:
    """A model store rooted at ``root`` (default ``$LMFORGE_HOME`` or ``~/.lmforge``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else lmforge_home()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.snapshots = self.root / "snapshots"
        self.tmp = self.root / "tmp"
        self._lock = FileLock(self.root / "lock", timeout=LOCK_TIMEOUT_S)

    # ------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            for folder in (self.blobs, self.manifests, self.snapshots, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmforgeError(
                f"cannot create the model store at {self.root}: {e.strerror}",
                hint="set LMFORGE_HOME to a writable folder",
            ) from None
        try:
            with self._lock:
                for folder in (self.blobs, self.manifests, self.snapshots, self.tmp):
                    self._own(folder)
                yield
        except Timeout:
            raise LmforgeError(
                f"the model store {self.root} stayed locked for {LOCK_TIMEOUT_S} s",
                hint="another lmforge process is writing to it; wait for it to finish and try again",
            ) from None

    def _own(self, path: Path) -> Path:
        """``path``, a place in the store, after checking that nothing below the root on the way is a link.

        Names are validated (no "..", no "/" at the start), so without links every such path stays inside.
        """
        current = self.root
        for part in path.relative_to(self.root).parts:
            current = current / part
            if current.is_symlink():
                raise LmforgeError(
                    f"{current} is a symbolic link: the model store follows no links in its own folders",
                    hint=f"lmforge never makes one there: delete the link itself (`rm {current}`), then run "
                    "`lmforge verify`",
                )
        return path

    def _manifest_path(self, ref: Ref) -> Path:
        return self._own(self.manifests / ref.name / f"{ref.tag}.json")

    def _blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def _temp_path(self, suffix: str = "") -> Path:
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def _add_blob(self, path: Path) -> dict[str, Any]:
        """Store one file unless its content is there already; returns its manifest entry. Needs the lock."""
        hexdigest, size = hash_file(path)
        digest = f"sha256:{hexdigest}"
        blob = self._blob_path(digest)
        # Never wider than the source (a 0600 key file stays private); os.open applies the umask on top.
        mode = os.stat(path).st_mode & 0o666
        # An existing blob is re-hashed, so that importing a model again repairs a corrupted copy (or
        # replaces a planted link: os.replace swaps the link itself, never its target).
        if not blob.is_symlink() and blob.is_file() and hash_file(blob) == (hexdigest, size):
            held = blob.stat().st_mode & 0o777
            if held & ~mode:  # the same bytes, stored before from a more readable file: narrow to both
                os.chmod(blob, held & mode)
            return {"digest": digest, "size": size}
        temp = self._temp_path(".part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with open(fd, "wb") as dst, open(path, "rb") as src:
            copied, _ = _hash_into(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        if copied != hexdigest:
            temp.unlink()
            raise LmforgeError(f"{path} changed while it was being stored", hint="store it again when idle")
        os.replace(temp, blob)
        fsync_path(self.blobs)
        return {"digest": digest, "size": size}

    def _write_json(self, target: Path, data: Mapping[str, Any]) -> None:
        temp = self._temp_path(".json")
        with open(temp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        fsync_path(target.parent)

    def _link_problem(self, link: Path, digest: str) -> str | None:
        """What is wrong with one snapshot file ``link`` that should show the blob ``digest``, or None.

        Only where the link points is checked here (cheap); whether the blob's bytes hash to its name is
        ``open``'s and ``verify``'s re-hashing.
        """
        blob = self._blob_path(digest)
        if link.is_symlink():
            target = os.path.normpath(link.parent / os.readlink(link))
            if target != os.path.normpath(blob):
                return f"points to {os.readlink(link)}, not to its blob {blob.name}"
        elif not link.is_file():
            return "is missing"
        elif not (blob.is_file() and os.path.samefile(link, blob)):  # a hard link (no symlinks here)
            return f"is not a link to its blob {blob.name}"
        if blob.is_symlink() or not blob.is_file():
            return f"points to the blob {blob.name}, which is missing"
        return None

    def _snapshot_problems(self, folder: Path, files: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        """``snapshots/<hex>/<file>`` -> what is wrong with it, for every file that is not as ``files`` says."""
        label = f"{folder.parent.name}/{folder.name}"
        if folder.is_symlink() or not folder.is_dir():
            return {label: "is not a folder of the store"}
        present = {
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()
        }
        problems = {f"{label}/{name}": "is not a file of its entry" for name in sorted(present - set(files))}
        for name, entry in files.items():
            problem = self._link_problem(folder / name, entry["digest"])
            if problem:
                problems[f"{label}/{name}"] = problem
        return problems

    def _snapshot(self, manifest: Manifest) -> Path:
        """The folder view of an entry: symlinks named like the files, pointing into blobs/."""
        files = manifest["files"]
        folder = self.snapshots / _digest_of(files)

        def complete() -> bool:
            return not self._snapshot_problems(folder, files)

        if complete():
            return folder
        with self._locked():
            if complete():  # another process made it while we waited for the lock
                return folder
            temp = self._temp_path()
            temp.mkdir()
            for name, entry in files.items():
                # Relative links: snapshots/<hex>/ and tmp/<hex>/ sit equally deep, and the store can move.
                depth = name.count("/")  # files in subfolders (sentence-transformers' 1_Pooling/) go deeper
                target = Path(*[".."] * (2 + depth), "blobs", self._blob_path(entry["digest"]).name)
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    (temp / name).symlink_to(target)
                except OSError:  # no symlinks (Windows without developer mode): hard links work as well
                    os.link(self._blob_path(entry["digest"]), temp / name)
            if folder.is_symlink() or folder.exists():
                _remove(folder)
            temp.rename(folder)
        return folder

    def _entries(self) -> Iterator[tuple[str, Manifest | None]]:
        """(``name:tag``, manifest or None when unreadable) for every manifest file.

        Links are not followed: a linked manifest, or a linked name folder (``name:*``), is unreadable.
        """
        if not self._own(self.manifests).is_dir():
            return
        found: list[tuple[str, Path | None]] = []
        for top, folders, names in os.walk(self.manifests):  # never descends into linked folders
            rel = Path(top).relative_to(self.manifests).as_posix()
            rel = "" if rel == "." else rel  # a stray file right in manifests/ has no name: ":tag"
            prefix = f"{rel}/" if rel else ""
            found += [(f"{prefix}{d}:*", None) for d in folders if (Path(top) / d).is_symlink()]
            for name in names:
                path = Path(top) / name
                if name.endswith(".json"):
                    found.append((f"{rel}:{name[:-5]}", None if path.is_symlink() else path))
        for ref, path in sorted(found):
            try:
                yield ref, None if path is None else _read_manifest(path)
            except (OSError, ValueError):
                yield ref, None

    def _card(self, folder: Path, manifest: Manifest) -> Path:
        """Write the model card for ``manifest`` (lineage, recipe, data, metrics) to a temp file.

        Its title is the stored name without the tag, so tags of one model share one card.
        """
        # formats.folder imports torch: only the writing operations import it, so `lmforge list` need not.
        from lmforge.formats.folder import CONFIG_FILE, model_card

        config = Config.load(folder / CONFIG_FILE).replace(name=manifest["name"])
        record = {
            "description": manifest.get("description"),
            "lineage": [describe_parent(p) for p in self.lineage(manifest.get("parent"))],
            "recipe": manifest.get("recipe"),
            "data": manifest.get("data"),
            "metrics": manifest.get("metrics"),
        }
        path = self._temp_path(".md")
        path.write_text(model_card(config, Tokenizer.load(folder), record), encoding="utf-8")
        return path

    def _finish(self, ref: Ref, manifest: Manifest, folder: Path) -> Manifest:
        """Add the generated card, then the manifest (last, atomically) and its snapshot. Needs the lock."""
        from lmforge.formats.folder import CARD_FILE  # see _card

        card = self._card(folder, manifest)
        try:
            manifest["files"][CARD_FILE] = self._add_blob(card)
        finally:
            card.unlink()
        files = manifest["files"]
        manifest.update(
            id=f"sha256:{_digest_of(files, skip=CARD_FILE)}", size=sum(e["size"] for e in files.values())
        )
        self._write_json(self._manifest_path(ref), manifest)
        self._snapshot(manifest)
        return manifest

    # ------------------------------------------------------------- operations
    def _not_found(self, ref: Ref) -> LmforgeError:
        return LmforgeError(
            f"no model {str(ref)!r} in the store {self.root}",
            hint=self.near_names_hint(str(ref)) or "see `lmforge list` for the stored models",
        )

    def near_names(self, text: str, limit: int = 5) -> list[str]:
        """Stored ``name:tag``s that ``text`` (a name that matched nothing) probably meant: the name's own tags
        (``mine`` or ``mine:v2`` when only ``mine:v1`` exists), else those of the names closest in spelling."""
        refs = sorted(f"{m['name']}:{m['tag']}" for m in self.list_models())
        name = text.partition(":")[0]
        names = sorted({ref.partition(":")[0] for ref in refs})
        close = [name] if name in names else difflib.get_close_matches(name, names, n=limit)
        return [ref for n in close for ref in refs if ref.partition(":")[0] == n][:limit]

    def near_names_hint(self, text: str) -> str | None:
        """``near_names`` as an error's hint, None when there are none."""
        near = self.near_names(text)
        if not near:
            return None
        if near[0].partition(":")[0] == text.partition(":")[0]:
            return f"the store has {', '.join(near)}: name the tag"
        return f"did you mean {' or '.join(near)}? (`lmforge list` shows the stored models)"

    def get(self, name: str) -> Manifest:
        """The manifest of ``name[:tag]``."""
        ref = parse_ref(name)
        path = self._manifest_path(ref)
        try:
            return _read_manifest(path)
        except FileNotFoundError:
            raise self._not_found(ref) from None
        except ValueError as e:
            raise LmforgeError(
                f"{path}: damaged manifest ({e})", hint=f"re-import the model, or `lmforge rm {ref}`"
            ) from None

    def has(self, name: str) -> bool:
        ref = _try_ref(name)
        return ref is not None and self._manifest_path(ref).is_file()

    def put(
        self,
        folder: str | Path,
        name: str,
        *,
        parent: Mapping[str, Any] | None = None,
        recipe: Mapping[str, Any] | None = None,
        data: Sequence[str | Path] = (),
        metrics: Mapping[str, Any] | None = None,
        description: str = "",
        follow_links: bool = False,
    ) -> Manifest:
        """Store a model folder as ``name[:tag]`` (replacing what that tag held) and return its manifest.

        Links inside ``folder`` are refused (one error naming the first), so that nothing outside it is
        copied into the store; ``follow_links`` reads through them, for folders whose layout is links: a
        store snapshot or a hub download (``lmforge.loading.import_model`` says which).

        ``parent`` is the lineage record of where the model came from (``lmforge.loading.describe_source``
        makes one from a store name, folder, .gguf file or hub id); ``recipe`` the
        training settings (default: the training record in config.json); ``data`` the files it was trained on
        (fingerprinted by sha256). Its files are stored, subfolders included (sentence-transformers keeps the
        pooling in ``1_Pooling/``); ``README.md`` is regenerated from the manifest.
        """
        from lmforge.formats.folder import CARD_FILE, CONFIG_FILE, TRAINER_FILES  # see _card

        ref = parse_ref(name)
        self._manifest_path(ref)  # a planted link where the manifest goes fails before anything is copied
        folder = Path(folder)
        if not folder.is_dir():
            raise LmforgeError(f"{folder}: no such model folder", hint="check the path")
        skip = (CARD_FILE, *TRAINER_FILES)
        files = {
            p.relative_to(folder).as_posix(): p
            for p in _folder_files(folder, follow_links)
            if _FILE.fullmatch(p.relative_to(folder).as_posix()) and p.name not in skip
        }
        if CONFIG_FILE not in files:
            raise LmforgeError(f"{folder}: not a model folder (no config.json)", hint="give a model folder")
        config = Config.load(files[CONFIG_FILE])
        manifest: Manifest = {
            "schema": 1,
            "name": ref.name,
            "tag": ref.tag,
            "created": _now(),
            "description": description,
            "config": {
                "name": config.name,
                "model_type": config.model_type,
                "parameters": config.num_parameters(),
                "context": config.block_size,
                "vocab_size": config.vocab_size,
                "labels": config.labels,
            },
            "parent": dict(parent) if parent else None,
            "recipe": dict(recipe) if recipe is not None else config.extra.get("lineage"),
            "data": fingerprint(data) if data else None,
            "metrics": dict(metrics or {}),
        }
        with self._locked():
            manifest["files"] = {filename: self._add_blob(path) for filename, path in files.items()}
            return self._finish(ref, manifest, folder)

    def open(self, name: str) -> Path:
        """The folder of a stored model, after checking every file's sha256 against the manifest."""
        ref = parse_ref(name)
        manifest = self.get(name)
        for filename, entry in manifest["files"].items():
            blob = self._blob_path(entry["digest"])
            problem = None
            if blob.is_symlink():
                problem = "is a symbolic link, not a stored file"
            elif not blob.is_file():
                problem = "is missing"
            elif blob.stat().st_size != entry["size"] or f"sha256:{hash_file(blob)[0]}" != entry["digest"]:
                problem = "is corrupt (its sha256 does not match the manifest)"
            if problem:
                raise LmforgeError(
                    f"stored model {ref}: {filename} ({blob.name[:19]}…) {problem}",
                    hint=f"run `lmforge verify`, then re-import it (`lmforge import SOURCE --name {ref}`) "
                    f"or `lmforge rm {ref}`",
                )
        return self._snapshot(manifest)

    def find(self, source: str) -> Path | None:
        """The checked folder of ``source`` when it names a stored model, else None (for ``locate_model``)."""
        return self.open(source) if self.has(source) else None

    def list_models(self) -> list[Manifest]:
        """Every readable manifest, sorted by name and tag (damaged ones show up in ``verify``)."""
        return [m for _, m in self._entries() if m is not None]

    def lineage(self, parent: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """The chain of ancestors starting at ``parent``, nearest first, walked through the store.

        Each link is the parent record plus, for store parents, that entry's ``recipe`` name; ``missing``
        marks an ancestor no longer stored, ``changed`` a tag that now points to a different model.
        """
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        while parent:
            link = dict(parent)
            chain.append(link)
            ref = parent.get("ref")
            if not ref or ref in seen:  # not a store model, or a cycle made by re-pointing tags
                break
            seen.add(ref)
            if not self.has(ref):
                link["missing"] = True
                break
            ancestor = self.get(ref)
            link["recipe"] = (ancestor.get("recipe") or {}).get("recipe", "import")
            if parent.get("id") and ancestor.get("id") != parent["id"]:
                link["changed"] = True
                break
            parent = ancestor.get("parent")
        return chain

    def show(self, name: str) -> Manifest:
        """The manifest plus ``lineage``: the parent chain, nearest first."""
        manifest = self.get(name)
        return {**manifest, "lineage": self.lineage(manifest.get("parent"))}

    def rm(self, name: str) -> Ref:
        """Remove an entry, damaged or not (its blobs stay until ``gc``, as other entries may share them)."""
        ref = parse_ref(name)
        with self._locked():
            path = self._manifest_path(ref)
            if not path.is_file():
                raise self._not_found(ref)
            path.unlink()
            # Drop the now-empty name (and namespace) folders, never manifests/ itself.
            for folder in path.parents:
                if folder == self.manifests or any(folder.iterdir()):
                    break
                folder.rmdir()
        return ref

    def cp(self, src: str, dst: str) -> Manifest:
        """Give the model ``src`` a second name ``dst`` (same files, nothing copied; replaces ``dst``)."""
        target = parse_ref(dst)
        with self._locked():
            manifest = {**self.get(src), "name": target.name, "tag": target.tag}
            self._write_json(self._manifest_path(target), manifest)
        return manifest

    def tag(self, src: str, new: str) -> Manifest:
        """``cp`` where ``new`` may be just a tag: ``tag("spam:v3", "best")`` makes ``spam:best``."""
        return self.cp(src, new if ":" in new else f"{parse_ref(src).name}:{new}")

    def add_metrics(self, name: str, metrics: Mapping[str, Any]) -> Manifest:
        """Merge ``metrics`` into an entry's metrics (same keys are replaced); regenerate its model card."""
        ref = parse_ref(name)
        with self._locked():
            manifest = self.get(name)
            manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
            return self._finish(ref, manifest, self._snapshot(manifest))

    def verify(self) -> VerifyReport:
        """Re-hash every blob; report the missing or corrupt blobs entries need, damaged manifests, and
        snapshot links that do not point at the blob their entry names."""
        report = VerifyReport()
        needed: dict[str, list[str]] = {}
        for ref, manifest in self._entries():
            if manifest is None:
                report.damaged.append(ref)
                continue
            report.entries += 1
            for entry in manifest["files"].values():
                needed.setdefault(entry["digest"], []).append(ref)
            folder = self.snapshots / _digest_of(manifest["files"])
            if folder.is_symlink() or folder.exists():  # none yet is fine: ``open`` makes it
                report.bad_links.update(self._snapshot_problems(folder, manifest["files"]))
        present = sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []
        for blob in present:
            digest = blob.name.replace("-", ":", 1)
            report.blobs += 1
            if blob.is_symlink():  # its bytes live outside the store: never read through it
                report.corrupt[digest] = needed.get(digest, [])
                continue
            hexdigest, size = hash_file(blob)
            report.bytes += size
            if f"sha256:{hexdigest}" != digest:
                report.corrupt[digest] = needed.get(digest, [])
            report.unreferenced += digest not in needed
        names = {blob.name for blob in present}
        report.missing = {d: refs for d, refs in needed.items() if self._blob_path(d).name not in names}
        report.temp = len(os.listdir(self.tmp)) if self.tmp.is_dir() else 0
        return report

    def gc(self) -> GcReport:
        """Delete blobs and snapshots no entry uses, and leftovers of interrupted writes; report the bytes."""
        report = GcReport()
        with self._locked():  # writers hold the lock, so nothing in tmp/ is in use now
            manifests = []
            for ref, manifest in self._entries():
                if manifest is None:
                    raise LmforgeError(
                        f"the manifest of {ref} is damaged, so gc cannot tell which blobs it needs",
                        hint=f"re-import it or `lmforge rm {ref}`, then run gc again",
                    )
                manifests.append(manifest)
            blobs = {self._blob_path(e["digest"]).name for m in manifests for e in m["files"].values()}
            snapshots = {_digest_of(m["files"]) for m in manifests}
            # Snapshots first: with hard links (no symlinks) they would keep removed blobs' bytes alive.
            for folder in self.snapshots.iterdir():
                if folder.name not in snapshots or folder.is_symlink():
                    _remove(folder)
                    report.snapshots += 1
            for blob in self.blobs.iterdir():
                if blob.name not in blobs:
                    report.bytes_freed += _remove(blob)
                    report.blobs += 1
            for leftover in self.tmp.iterdir():
                report.bytes_freed += _remove(leftover)
                report.temp += 1
        return report


# ----------------------------------------------------------------- provenance
def describe_parent(link: Mapping[str, Any]) -> str:
    """One line for a lineage link, as ``show`` and the model card print it."""
    if "ref" in link:
        text = f"{link['ref']} ({link.get('recipe', '?')}"
        text += f", id {link['id'][7:19]})" if link.get("id") else ")"
        if link.get("missing"):
            text += " — no longer in the store"
        if link.get("changed"):
            text += " — the tag now points to another model"
        return text
    if "hub" in link:
        return f"hub {link['hub']}"
    if "packaged" in link:
        return f"{link['packaged']} (packaged)"
    if "path" in link:
        return link["path"] + (f" (sha256 {link['sha256'][:12]})" if "sha256" in link else "")
    return str(link.get("source"))


# ---------------------------------------------------------- module functions
def put(folder: str | Path, name: str, **options: Any) -> Manifest:
    """``Store().put``: see there for the options (parent, recipe, data, metrics, description)."""
    return Store().put(folder, name, **options)


def list_models() -> list[Manifest]:
    return Store().list_models()


def show(name: str) -> Manifest:
    return Store().show(name)


def rm(name: str) -> Ref:
    return Store().rm(name)


def cp(src: str, dst: str) -> Manifest:
    return Store().cp(src, dst)


def tag(src: str, new: str) -> Manifest:
    return Store().tag(src, new)


def verify() -> VerifyReport:
    return Store().verify()


def gc() -> GcReport:
    return Store().gc()


def add_metrics(name: str, metrics: Mapping[str, Any]) -> Manifest:
    return Store().add_metrics(name, metrics)
