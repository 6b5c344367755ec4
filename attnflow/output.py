"""How attnflow writes every file it produces: all at once or not at all, never through a link, never over
a file the same command reads, and deleting only folders it can prove it made.

Writing an output file, of any kind::

    from attnflow.output import atomic_output

    with atomic_output(path, reads=[input_a, input_b], flag="-o") as tmp:
        with open(tmp, "w", newline="") as handle:  # or h5py.File(tmp, "r+"), fig.savefig(tmp, format=...), ...
            handle.write(text)

The block writes a fresh temporary file beside ``path`` (created with ``O_EXCL | O_NOFOLLOW``, so no
pre-existing file or link is ever written through). When the block ends without an error the file is
flushed to disk and renamed onto ``path`` (a link at ``path`` is replaced, its target untouched); on an
error it is removed and ``path`` keeps what it held. Before anything is written, ``path`` is refused when it
is a folder, its folder is missing, or it is (or links to, or is a hard link of) one of ``reads``.

A working folder (an unfinished run's ``<path>.partial/``) is made with :func:`make_run_folder`, which
leaves a marker file inside it; :func:`check_run_folder` tells whether a folder found on disk is one of
attnflow's, and :func:`remove_run_folder` removes only such a folder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .errors import AttnflowError

__all__ = [
    "RUN_MARKER", "refuse_output_that_is_read", "check_output_path", "atomic_output", "write_new_file", "fsync",
    "make_run_folder", "run_folder_marker", "check_run_folder", "remove_run_folder", "file_system_errors",
]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# The file whose presence in a real (not linked) folder proves that attnflow made the folder.
RUN_MARKER = "attnflow-run.json"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def refuse_output_that_is_read(path: str | Path, reads: Iterable[str | Path], *, flag: str = "-o") -> None:
    """Refuse ``path`` when it is one of the files ``reads`` (the same file through a link, a hard link or
    another spelling counts): writing it would destroy an input. Costs a ``stat`` per input only when
    ``path`` exists."""
    target = _identity(Path(path))
    if target is None:
        return
    for read in reads:
        if _identity(Path(read)) == target:
            same = "" if os.path.abspath(read) == os.path.abspath(path) else f" (it is {read})"
            raise AttnflowError(f"{flag} {path} is one of this command's inputs{same}; write the output elsewhere")


def check_output_path(path: str | Path, *, reads: Iterable[str | Path] = (), flag: str = "-o") -> Path:
    """Refuse, before any work, an output that is a folder, lies in a missing folder, or is an input."""
    path = Path(path)
    if path.is_dir():
        raise AttnflowError(f"{path} is a directory; the output must be a file path")
    if not path.absolute().parent.is_dir():
        raise AttnflowError(f"cannot write {path}: no such directory {path.absolute().parent}")
    refuse_output_that_is_read(path, reads, flag=flag)
    return path


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file beside ``path`` and its descriptor; the random part makes a name no one else holds."""
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue
    raise AttnflowError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_output(path: str | Path, *, reads: Iterable[str | Path] = (), flag: str = "-o",
                  resumable: bool = False) -> Iterator[Path]:
    """Yield the path of a fresh temporary file for the caller to write; commit it to ``path`` when the
    block ends cleanly (see the module's docstring). A file system's refusal becomes one line naming the
    file; ``resumable`` adds that the run continues with ``--resume``."""
    try:
        path = check_output_path(path, reads=reads, flag=flag)
    except AttnflowError as e:
        if resumable:  # found only now, after the work: the committed batches stay
            raise AttnflowError(f"{e}, then rerun with --resume") from None
        raise
    with file_system_errors(path, resumable=resumable):
        tmp, fd = _new_temporary(path)
        os.close(fd)
    try:
        with file_system_errors(tmp, resumable=resumable):
            yield tmp
            fsync(tmp)
            os.replace(tmp, path)
            fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, durably; refuses (``FileExistsError``) if anything, a link
    included, is already there. For files inside attnflow's own run folders."""
    fd = os.open(path, _CREATE_FLAGS, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's data to disk, so that a rename after it never exposes a torn file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- working folders -----------------------------------------------------------------------------------


def make_run_folder(folder: Path, owner: Path, run_id: str) -> None:
    """Create ``folder`` (it must not exist) with the marker naming the run and the file it belongs to."""
    folder.mkdir()  # fails on anything already there, a link included
    write_new_file(folder / RUN_MARKER, json.dumps({"run_id": run_id, "output": str(owner)}).encode())


def run_folder_marker(folder: Path) -> dict | None:
    """The marker of attnflow's run folder ``folder``; None when ``folder`` is a link, not a folder, or holds
    no readable marker (then attnflow did not make it, or cannot prove it did)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or not stat.S_ISREG(os.lstat(folder / RUN_MARKER).st_mode):
            return None
        marker = json.loads((folder / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("run_id"), str) else None


def check_run_folder(folder: Path) -> dict:
    """The marker of ``folder``, or one line refusing to touch a folder attnflow cannot prove it made."""
    marker = run_folder_marker(folder)
    if marker is None:
        what = "a link" if folder.is_symlink() else ("not a folder" if not folder.is_dir() else "a folder without attnflow's marker")
        raise AttnflowError(f"{folder} is in the way: it is {what}, so attnflow did not make it and leaves it alone; "
                            "move it away or write elsewhere")
    return marker


def remove_run_folder(folder: Path, *, first: Iterable[str] = ()) -> None:
    """Remove attnflow's run folder ``folder`` (checked by its marker), the names ``first`` first and the
    marker last: a kill part-way leaves a folder that is still provably attnflow's, or an empty one."""
    if run_folder_marker(folder) is None:
        with contextlib.suppress(OSError):
            folder.rmdir()  # an empty folder holds nothing of anyone's
        return
    for name in first:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for entry in folder.iterdir():
        if entry.name == RUN_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / RUN_MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


# -- a file system's refusal, in one line ---------------------------------------------------------------


def _os_errno(error: Exception) -> int | None:
    """The errno of a failed write, also where h5py only names it in its message (``errno = 28``)."""
    if getattr(error, "errno", None) is not None:
        return error.errno
    found = re.search(r"errno = (\d+)", str(error))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def file_system_errors(path: Path, *, resumable: bool, remove: Path | None = None):
    """Turn a file system's refusal (full disk, quota, read-only, permissions) while writing ``path`` into
    one line that says what to do, after removing the half-written ``remove``."""
    from .store.validate import hdf5_reason

    try:
        yield
    except (OSError, RuntimeError) as e:
        if not isinstance(e, OSError) and _os_errno(e) is None:
            raise  # a RuntimeError is a file system's only when HDF5 names the errno (it does so on close)
        if remove is not None:
            with contextlib.suppress(OSError):
                remove.unlink()
        code = _os_errno(e)
        reason = os.strerror(code).lower() if code else hdf5_reason(e, "i/o error")
        advice = {
            errno.ENOSPC: "free space", errno.EDQUOT: "free space within your quota",
            errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere",
        }.get(code, "check that the location is writable")
        if resumable:
            advice += ", then rerun with --resume"
        raise AttnflowError(f"{reason} writing {path}; {advice}") from None
