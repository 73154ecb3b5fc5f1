"""Small file-system steps of the store, blocking: run them in the disk pool
(the writer runs :func:`move_into_place` on the reactor, see gateway.store.writer)."""

from __future__ import annotations

import ctypes
import errno
import os

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    f.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    f.restype = ctypes.c_int
    return f


_renameat2_f = _renameat2()


def move_into_place(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst``, replacing what is there; True when it replaced a file.

    One system call when nothing is there (Linux renameat2 with
    RENAME_NOREPLACE), a second one to replace; elsewhere, or on a file
    system without the flag, a look and a rename.  Raises OSError as
    os.replace does (FileNotFoundError for a missing directory).
    """
    f = _renameat2_f
    if f is not None:
        if f(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return False
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            os.replace(src, dst)
            return True
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src, None, dst)
    replaced = os.path.exists(dst)
    os.replace(src, dst)
    return replaced


def create_exclusive(path: str) -> int:
    """A new file for writing (never an existing one), readable by the group."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new file) survive a power failure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_same(path: str, inode: int | None) -> int:
    """Unlink ``path`` if it is still the file we indexed; return bytes freed.

    A later copy of the same SOP Instance (a new file, a new inode) is never
    removed on behalf of an older one.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    if inode is not None and st.st_ino != inode:
        return 0
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return st.st_size if st.st_nlink <= 1 else 0


def remove_all(items):
    freed = 0
    for _id, path, inode in items:
        freed += remove_if_same(path, inode)
    return freed
