"""Small file-system steps of the store, blocking: run them in the disk pool."""

from __future__ import annotations

import os


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
