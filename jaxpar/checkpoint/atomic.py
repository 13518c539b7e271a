"""Errors of the converters, and writing a folder atomically.

A conversion writes into a temporary folder beside its destination and renames it into
place at the very end, so a destination either is complete or does not exist: an
exception removes the temporary folder; a killed process leaves one behind, which the
next conversion to the same destination removes (its owner process is gone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from jaxpar.loading.sources import CheckpointError


class ConversionError(CheckpointError):
    """A conversion cannot proceed (bad source, bad destination, inconsistent checkpoint)."""


class DestinationExistsError(ConversionError):
    """The destination exists and `overwrite` was not given."""


class UnsupportedModelError(ConversionError):
    """The model (family, block kind or parameter layout) cannot be converted."""


_TMP_TAG = ".jaxpar-tmp-"
_OLD_TAG = ".jaxpar-old-"


def check_destination(dst: str | Path, overwrite: bool, *, src: str | Path | None = None) -> Path:
    """Refuses an existing destination (unless `overwrite`) and one that overlaps `src`."""
    dst = Path(dst)
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or s in d.parents or d in s.parents:
            raise ConversionError(f"the destination {dst} overlaps the source {src}")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise DestinationExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) "
                                         "to replace it")
        if not dst.is_dir() and not dst.is_symlink():
            raise ConversionError(f"{dst} exists and is not a folder; refusing to replace it")
    return dst


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Removes temporary folders of earlier conversions to `dst` whose process is gone."""
    removed = []
    if not dst.parent.is_dir():
        return removed
    for tag in (_TMP_TAG, _OLD_TAG):
        for cand in dst.parent.glob(f".{dst.name}{tag}*"):
            try:
                pid = int(cand.name[len(f".{dst.name}{tag}"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(cand, ignore_errors=True)
                removed.append(cand)
    return removed


def temporary_name(dst: Path) -> Path:
    return dst.parent / f".{dst.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(dst: str | Path, *, overwrite: bool = False,
                     src: str | Path | None = None) -> Iterator[Path]:
    """Yields an empty temporary folder beside `dst`; on success it becomes `dst`.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and
    `dst` is left as it was.
    """
    dst = check_destination(dst, overwrite, src=src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = temporary_name(dst)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    check_destination(dst, overwrite)  # it may have appeared while we worked
    old = dst.parent / f".{dst.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
