"""File helpers shared by data, models and checkpoints: content hashes, atomic writes, the user's umask."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
