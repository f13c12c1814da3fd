"""The one rule for every path we write (bundle, checkpoint, report): nothing of the user's is lost.

- Everything is written into a temp sibling (`.NAME.tmp-PID-XXXX`) and renamed into place at the end;
  a failure, Ctrl-C or SIGTERM (see `sigterm_raises`) removes the temp sibling, and one left by a
  killed run (SIGKILL, power loss) is removed by the next run writing the same path, once its PID is
  gone.
- An existing path is replaced only when it is a complete artifact of ours, recognised by a full
  schema check (`is_ours` of the caller: a bundle's manifest validated against its schema and no file
  it does not list; a checkpoint's config.json and weights), or an empty directory. Replacing one of
  ours is said on stderr. Anything else is refused with one line before any work is done.
- `--out .`, a path under a regular file, an unwritable or read-only parent: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import InputError

Say = Callable[[str], None]
# is_ours(path) -> None when `path` is a complete artifact of ours, else the reason it is not
IsOurs = Callable[[Path], str | None]


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of ours
    """SIGTERM, raised in the main thread so every `finally` and temp-dir cleanup runs."""

    exit_code = 143


_RECEIVED: list[int] = []  # signals seen by this process (see `signal_received`)


def _on_signal(signum: int, frame: object) -> None:
    _RECEIVED.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt


def signal_received() -> int | None:
    """The last SIGINT / SIGTERM received since `sigterm_raises`: a C extension being imported when
    it arrives (onnxruntime, torch) turns the exception into an ImportError, which is then no bug."""
    return _RECEIVED[-1] if _RECEIVED else None


def sigterm_raises() -> object:
    """Turn SIGTERM into `Terminated` and SIGINT into KeyboardInterrupt, both remembered (from the main
    thread; elsewhere a no-op); returns the handlers replaced, for `restore_sigterm`."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _RECEIVED.clear()
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current is not signal.default_int_handler:
            continue  # SIGINT ignored (a background job) or handled by a host program: leave it
        with contextlib.suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, _on_signal)
    return previous


def restore_sigterm(previous: object) -> None:
    if isinstance(previous, dict) and threading.current_thread() is threading.main_thread():
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler)


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(out: Path, is_ours: IsOurs | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` siblings of `out` whose process is gone, and `.NAME.old-PID` ones (the
    previous artifact, set aside while being replaced) only when `is_ours` recognises them: versions
    before this rule renamed a user's file there, which must not be deleted now."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)(-.*)?$")
    removed = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match or int(match.group(2)) == os.getpid() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and (
            is_ours is None or not sibling.is_dir() or sibling.is_symlink() or is_ours(sibling) is not None
        ):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                sibling.unlink()
        removed.append(sibling)
    return removed


def check_out_path(out: Path, flag: str = "--out") -> None:
    """Refuse paths we can never write: the current directory or one above it, a path under a regular
    file, an unwritable or read-only parent."""
    out = Path(out)
    absolute = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if out.name in ("", ".", "..") or absolute == cwd or absolute in cwd.parents:
        raise InputError(
            f"{flag} {out} is the current directory or one above it; name a new directory to write into"
        )
    for ancestor in absolute.parents:
        if not ancestor.exists():
            if ancestor.is_symlink():
                raise InputError(f"{flag} {out}: {ancestor} is a broken symbolic link")
            continue
        if not ancestor.is_dir():
            raise InputError(f"{flag} {out}: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(
                f"{flag} {out}: cannot write in {ancestor} (read-only file system or no permission)"
            )
        try:  # access() does not know every file system (/proc, /sys, some FUSE mounts): try it
            Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-probe", dir=ancestor)).rmdir()
        except OSError as exc:
            raise InputError(f"{flag} {out}: cannot write in {ancestor} ({exc.strerror or exc})") from None
        break


def _refusal(out: Path, what: str, is_ours: IsOurs | None, flag: str) -> str | None:
    """Why `out` must not be replaced (None: it may be)."""
    if out.is_symlink():
        return f"refusing to replace {out}: it is a symbolic link"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"refusing to replace {out}: it is a file, not a {what}"
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        return f"refusing to replace {out}: cannot read it ({exc.strerror})"
    if empty:
        return None
    reason = is_ours(out) if is_ours is not None else "it is not empty"
    if reason is None:
        return None
    return (
        f"refusing to replace {out}: it exists and is not a {what} of ours ({reason}); choose another {flag}"
    )


def preflight(out: Path, what: str, is_ours: IsOurs | None, flag: str = "--out") -> bool:
    """All checks before any work: True when `out` holds one of ours that will be replaced."""
    out = Path(out)
    check_out_path(out, flag)
    reason = _refusal(out, what, is_ours, flag)
    if reason is not None:
        raise InputError(reason)
    return out.is_dir() and any(out.iterdir())


def _mkdtemp(out: Path, flag: str) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise InputError(f"{flag} {out}: cannot write there ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_output_dir(
    out: Path, what: str, is_ours: IsOurs | None, flag: str = "--out", say: Say | None = None
) -> Iterator[Path]:
    """Yield a temp sibling of `out` to fill; on success it takes `out`'s place in one rename (an old
    artifact of ours there is replaced, and that is said); on any error or signal it vanishes."""
    out = Path(out)
    say = say or _stderr
    preflight(out, what, is_ours, flag)
    clean_stale_temps(out, is_ours)
    tmp = _mkdtemp(out, flag)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other directory
    try:
        yield tmp
        reason = _refusal(out, what, is_ours, flag)  # checked again: something may have appeared
        if reason is not None:
            raise InputError(reason)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            say(f"replaced the previous {what} at {out}")
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: Path, what: str, is_ours: Callable[[bytes], bool], flag: str) -> bool:
    """Checks before any work for an output file: True when `path` holds a `what` of ours to replace."""
    path = Path(path)
    check_out_path(path, flag)
    if not (path.exists() or path.is_symlink()):
        return False
    if path.is_symlink() or not path.is_file():
        raise InputError(f"refusing to replace {path}: it is not a regular file")
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise InputError(f"refusing to replace {path}: cannot read it ({exc.strerror})") from None
    if not is_ours(head):
        raise InputError(f"refusing to replace {path}: it is not a {what} of ours; choose another {flag}")
    return True


def write_output_file(
    path: Path,
    data: str | bytes,
    what: str,
    is_ours: Callable[[bytes], bool],
    flag: str,
    say: Say | None = None,
) -> Path:
    """Write a report file through a temp sibling; replace an existing file only when `is_ours`
    recognises its content (a report we wrote), never a directory or somebody else's file."""
    path = Path(path)
    say = say or _stderr
    existed = check_output_file(path, what, is_ours, flag)
    clean_stale_temps(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise InputError(f"{flag} {path}: cannot write there ({exc.strerror})") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if existed:
        say(f"replaced the previous {what} at {path}")
    return path
