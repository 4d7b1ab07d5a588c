"""--writeback-cache: the kernel keeps buffered writes and sends them later, many at once.
What a user sees change, against a real nbdkit: write() returns before the server has the
bytes, fsync makes them durable (every write, then a flush, reaches the server), and a
write past the end fails at fsync instead of at write()."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest

from .mounts import mounted
from .servers import nbdkit

pytestmark = pytest.mark.fuse
MiB = 1 << 20


def written(log: Path) -> int:
    """Bytes of the NBD_CMD_WRITEs nbdkit's log filter saw begin."""
    found = re.findall(r" Write id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", log.read_text())
    return sum(int(n, 16) for n in found)


def flushes(log: Path) -> int:
    return len(re.findall(r" Flush id=\d+ ", log.read_text()))


def test_writes_wait_in_the_page_cache_until_fsync(tmp: Path) -> None:
    log = tmp / "nbdkit.log"
    data = os.urandom(4 * MiB)
    with (
        nbdkit("--filter=log", "memory", "16M", f"logfile={log}") as srv,
        mounted(srv.address, tmp / "mnt", "-o", "writeback_cache") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_WRONLY)
        try:
            for i in range(4):
                assert os.pwrite(fd, data[i * MiB : (i + 1) * MiB], MiB + i * MiB) == MiB
            # (the kernel writes dirty pages back after 30 s, or at fsync)
            assert written(log) < len(data)
            os.fsync(fd)
            assert written(log) >= len(data)
            assert flushes(log) >= 1
        finally:
            os.close(fd)
        back = subprocess.run(["nbdcopy", srv.uri(), "-"], capture_output=True, check=True).stdout
    assert back[MiB : 5 * MiB] == data


def test_a_write_past_the_end_fails_at_fsync(tmp: Path) -> None:
    with (
        nbdkit("memory", "1M") as srv,
        mounted(srv.address, tmp / "mnt", "--writeback-cache") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, MiB)  # accepted into the page cache
            with pytest.raises(OSError) as info:
                os.fsync(fd)
            assert info.value.errno in (errno.ENOSPC, errno.EIO)
        finally:
            os.close(fd)
        # O_DIRECT writes still go straight to the server, and fail at once.
        fd = os.open(mnt / "%default%", os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            with pytest.raises(OSError) as info:
                os.pwrite(fd, buf, MiB)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
