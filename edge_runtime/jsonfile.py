"""Reading the project's small JSON files with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import EdgeError
from .paths import link_problem, missing_reason


def read_json_file(
    path: str | Path,
    what: str,
    error: type[EdgeError],
    expect: type | tuple[type, ...] = dict,
    missing_ok: bool = False,
) -> Any:
    """Parse `path`; a missing file, bad JSON or the wrong top-level type is one `error` line.

    `what` names the file's role ("cases file", "device report"); with `missing_ok` a missing
    file is None instead of an error.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise error(f"{what} {path} is not a file")
        if missing_ok and link_problem(path) is None:
            return None
        raise error(f"{what} {path} {missing_reason(path)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{what} {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, expect):
        raise error(f"{what} {path}: not a JSON {'object' if expect is dict else 'object or list'}")
    return data
