"""Why a path the user gave cannot be used, in words: missing, a broken link, a link loop."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def link_problem(path: str | os.PathLike[str]) -> str | None:
    """'a symbolic link loop' / 'a broken symbolic link to X' when `path` is one, else None."""
    p = Path(path)
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if p.is_symlink():
            return f"a broken symbolic link (to {os.readlink(p)})"
    return None


def missing_reason(path: str | os.PathLike[str]) -> str:
    """'does not exist', or what kind of broken link it is."""
    problem = link_problem(path)
    return f"is {problem}" if problem else "does not exist"
