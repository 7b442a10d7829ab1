"""Atomic writes: everything goes to a temporary sibling folder (or file), is fsynced, then renamed into place,
so a crash or a full disk mid-save leaves the previous one intact. Every model-folder and GGUF writer goes
through here.

Files get the mode the user's umask gives any new file (0644 under umask 022, 0640 under 027): safetensors
creates its files 0600 whatever the umask, which made weights unreadable to the user's group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError


def atomic_write_folder(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)``, then swap the finished folder into ``target`` in one rename.

    If ``write`` fails the target is untouched and the temporary folder removed.
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(
            f"cannot create {parent}: {e.strerror}", hint="choose a writable location"
        ) from None
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        mask = current_umask()
        for f in tmp.rglob("*"):  # subfolders too (an encoder's 1_Pooling/)
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~mask)
            fsync_path(f)
        fsync_path(tmp)
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old aside, then drop it.
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_path(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmforgeError(
            f"could not save to {target}: {e.strerror or e}",
            hint="check free disk space and write permission",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_file(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_file)`` (a temporary sibling of ``target``), fsync it, then rename it over ``target``.

    If ``write`` fails (a check of the finished file too) the target is untouched and the temporary file removed.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(
            f"cannot create {target.parent}: {e.strerror}", hint="choose a writable location"
        ) from None
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LmforgeError(
            f"could not write {target}: {e.strerror or e}", hint="check free disk space and write permission"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc (no change, so no race with other threads creating files);
    elsewhere it can only be read by setting it, briefly."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    # Directories need fsync too (on Linux) for the rename to survive a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
