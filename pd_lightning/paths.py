"""Output paths checked before the work starts, and OS write errors turned into one line.

``check_output_dir`` / ``check_output_file`` find the first existing ancestor of the target and refuse, naming the
flag: a target that is a file where a folder is wanted (or the reverse), an ancestor that is a file (nothing can be
created under it), and an ancestor where no file can be created. The last is probed by creating and deleting a
hidden temporary file there, which is what tells a read-only file system (``EROFS``) from a writable one even for
root (``os.access`` answers True for root on any mode bits). Free space cannot be checked for work whose size is
not known up front; ``describe_os_error`` turns a ``No space left on device`` met later into one line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# OS errors that mean "this output cannot be written"; cli.main reports them in one line, exit code 2.
WRITE_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "it exists already",
    errno.ENAMETOOLONG: "the name is too long",
}


def _first_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling symlink: creating under it fails
            return p
        p = p.parent
    return p


# Outputs checked in this process (flag, path): named by ``describe_os_error`` when an OS error carries no file name
# (a failed write() or fsync() does not say which file it was writing).
CHECKED: list[tuple[str, str]] = []


def _probe_writable(folder: Path, flag: str, target: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".pd-lightning-write-check-", dir=folder)
    except OSError as e:
        why = WRITE_ERRNOS.get(e.errno, e.strerror or str(e))
        raise ValueError(f"{flag} {target!r}: cannot write in {str(folder)!r} ({why}); choose another path") from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse a folder that could not be created or written: ``path`` is a file, an ancestor is a file, or the
    nearest existing ancestor is not writable. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file, not a folder; give a folder path")
    anc = _first_existing(p)
    if not anc.is_dir():
        raise ValueError(f"{flag} {str(p)!r}: {str(anc)!r} is a file, so no folder can be created under it")
    _probe_writable(anc, flag, str(p))
    CHECKED.append((flag, str(p)))
    return p


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse a file that could not be written: ``path`` is a folder, an ancestor is a file, or the nearest existing
    folder is not writable (an existing file must be replaceable: its folder must be writable). Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a folder; give a file name")
    if str(p).endswith(os.sep):
        raise ValueError(f"{flag} {str(p)!r} ends with {os.sep!r}; give a file name")
    anc = _first_existing(p.parent)
    if not anc.is_dir():
        raise ValueError(f"{flag} {str(p)!r}: {str(anc)!r} is a file, so no folder can be created under it")
    _probe_writable(anc, flag, str(p))
    CHECKED.append((flag, str(p)))
    return p


def describe_os_error(e: OSError) -> str | None:
    """One line for an OS error met while writing an output, or None when it is not a write error."""
    seen = e
    while seen is not None and WRITE_ERRNOS.get(getattr(seen, "errno", None)) is None:
        seen = seen.__cause__ or seen.__context__  # a writer thread's error re-raised without its errno
    if not isinstance(seen, OSError):
        return None
    e, why = seen, WRITE_ERRNOS[seen.errno]
    if e.filename is not None:
        where = f" {str(e.filename)!r}"
    elif CHECKED:
        where = " under " + ", ".join(f"{flag} {path!r}" for flag, path in dict.fromkeys(CHECKED))
    else:
        where = ""
    todo = (
        "free space or choose another output path" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another path"
    )
    return f"cannot write{where}: {why} ([Errno {e.errno}]); {todo}, then rerun"
