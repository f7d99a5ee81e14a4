"""File helpers shared by every room: content hashes, atomic writes of files and directories, JSON lines,
the user's umask."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from dwmtrain.errors import OutputExistsError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; when the block ends it becomes ``path`` (synced to disk,
    with the mode a plain ``open`` gives), so readers see the old file or the whole new one, never a part.
    On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # no ".jsonl" suffix: input globs never see it
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        follow_umask(tmp)  # safetensors and mkstemp write 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` to fill; when the block ends it becomes ``path``. An existing
    ``path`` is refused unless ``overwrite``, and then replaced only once the new one is complete. On an
    exception the temporary directory is removed and ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it (only after a successful run)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        follow_umask(tmp)
        if path.exists() or path.is_symlink():  # overwrite only now that the new one is complete
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the old one back: a failure leaves what the user had
                raise
            old.unlink() if old.is_symlink() else shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (metrics.jsonl, meta/stageK.jsonl); [] if it does not exist. A line cut
    short by a kill (only ever the last) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object written by dwmtrain (a part's marker, a pointer); None if it is missing, unreadable or not
    an object: a marker that does not say what it should is one that was never written."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and a directory's files) the mode a plain ``open``/``mkdir`` would: mkstemp, mkdtemp
    and safetensors create 0600/0700, which would keep a run's outputs from the user's group."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for f in path.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def remove_tree(path: str | os.PathLike) -> None:
    """``shutil.rmtree`` that another process removing the same tree at once does not fail (two nodes' local
    rank 0 clearing one leftover on shared storage: the SLURM chaos soak); any other error is raised."""

    def gone_ok(func, name, exc):  # onexc (3.12+) passes the exception, onerror (3.11) its exc_info
        exc = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=gone_ok)
    else:
        shutil.rmtree(path, onerror=gone_ok)
