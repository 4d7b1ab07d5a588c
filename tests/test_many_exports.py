"""A thousand exports: status answers for all of them, and the cache bounds the whole mount."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from .conftest import run_nbdfs
from .mounts import _daemon_pids, mounted
from .servers import nbdkit

pytestmark = pytest.mark.fuse
MiB = 1 << 20
EXPORTS = 1000


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_thousand_exports_read_within_the_cache_size(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    for i in range(EXPORTS):
        with open(exports / f"e{i:04}", "wb") as f:
            f.truncate(MiB)  # (sparse: reads as zeros, costs no disk)
    cache = 64 * MiB
    with (
        nbdkit("file", f"dir={exports}", "--threads=4") as srv,
        mounted(srv.address, tmp / "mnt", f"--cache-size={cache}", "--timeout", "60") as mnt,
    ):
        (pid,) = _daemon_pids(mnt)
        buf = mmap.mmap(-1, MiB)
        for i in range(EXPORTS):
            fd = os.open(mnt / f"e{i:04}", os.O_RDONLY | os.O_DIRECT)
            try:
                assert os.preadv(fd, [buf], 0) == MiB
            finally:
                os.close(fd)
        proc = run_nbdfs("status", "--json", str(mnt), timeout=120)
        status = json.loads(proc.stdout)
        assert len(status["exports"]) == EXPORTS and status["active"] == EXPORTS
        assert sum(e["bytes_read"] for e in status["exports"]) >= EXPORTS * MiB
        assert status["cache"]["used"] <= cache
        text = run_nbdfs("status", str(mnt), timeout=120).stdout
        assert text.count("\n  e") == EXPORTS and "1000 export(s), 1000 opened" in text
        peak = _peak_rss(pid)
    assert peak <= cache + 80 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
