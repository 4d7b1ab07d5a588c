#!/usr/bin/env python3
"""A pyfuse3 file system that does nothing: the fastest any pyfuse3 daemon can answer.

    .venv/bin/python bench/pyfuse3_ceiling.py MOUNTPOINT [SIZE]

One file, ``MOUNTPOINT/f``, of SIZE bytes (default 1 GiB): reads return zeros from memory,
writes are accepted and dropped, no network. ``bench/compare.py --ceiling`` measures it
beside nbdfs and nbdfuse, so the cost of FUSE through pyfuse3 and trio on this machine is
a figure, not a guess: a row where even this stays below nbdfuse cannot be won by any
pyfuse3 file system here. It runs in the foreground until unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INODE = 2
ZEROS = bytes(1 << 20)


class Nothing(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        directory = inode == pyfuse3.ROOT_INODE
        attr.st_mode = pyfuse3.ModeT(
            (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | 0o644)
        )
        attr.st_size = 0 if directory else self.size
        attr.attr_timeout = attr.entry_timeout = 60
        return attr

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(pyfuse3.InodeT(FILE_INODE))

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        # As nbdfs: O_DIRECT bypasses the page cache, anything else uses it.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=bool(flags & os.O_DIRECT))

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        n = max(0, min(size, self.size - off))
        return memoryview(ZEROS)[:n]  # type: ignore[return-value]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return len(buf)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    size = int(sys.argv[2]) if len(sys.argv) == 3 else 1 << 30
    pyfuse3.init(Nothing(size), sys.argv[1], set(pyfuse3.default_options) | {"fsname=ceiling"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
