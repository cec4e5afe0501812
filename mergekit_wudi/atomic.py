"""Writing a file or a directory so that a stopped run never leaves a half one
that looks whole: it is written beside its place, then renamed into it."""

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(partial)`` makes the file or directory at a sibling path, which
    then replaces ``path`` (a directory there is removed first)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    _remove(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    write(partial)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(partial, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
