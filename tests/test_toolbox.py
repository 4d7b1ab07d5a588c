"""nbdfs among the Linux tools: mount(8) and fstab, status, umount, the man page, --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import run_nbdfs
from .mounts import mounted, unmount
from .servers import nbdkit, require_tool

ROOT = Path(__file__).parent.parent
MiB = 1 << 20


def _mounts() -> str:
    with open("/proc/self/mounts") as f:
        return f.read()


@pytest.mark.fuse
def test_mount_helper_and_fstab_line(tmp: Path) -> None:
    require_tool("mount.fuse3")
    if shutil.which("nbdfs") is None:
        pytest.fail("nbdfs is not on PATH for mount(8): run scripts/install")
    mnt = tmp / "mnt"
    mnt.mkdir()
    with nbdkit("memory", "4M") as srv:
        try:
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "fuse.nbdfs",
                    srv.uri(""),
                    str(mnt),
                    "-o",
                    "ro,connections=2,timeout=5",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            line = next(ln for ln in _mounts().splitlines() if f" {mnt} " in ln)
            assert line.split()[2] == "fuse.nbdfs" and " ro," in line
            assert oct((mnt / "%default%").stat().st_mode & 0o777) == "0o444"
        finally:
            unmount(mnt)
        fstab = tmp / "fstab"
        fstab.write_text(
            f"{srv.uri('')} {mnt} fuse.nbdfs rw,cache_size=8M,_netdev,nofail,x-systemd.automount 0 0\n"
        )
        try:
            subprocess.run(
                ["mount", "-T", str(fstab), str(mnt)], check=True, capture_output=True, timeout=60
            )
            (mnt / "%default%").write_bytes(b"via fstab")
            assert (mnt / "%default%").read_bytes()[:9] == b"via fstab"
        finally:
            unmount(mnt)
    assert f" {mnt} " not in _mounts()


@pytest.mark.fuse
def test_status_reports_the_io_done(tmp: Path) -> None:
    with (
        nbdkit("memory", "16M") as srv,
        mounted(srv.address, tmp / "mnt", "--cache-size=4M") as mnt,
    ):
        path = mnt / "%default%"
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, MiB)
            buf.write(b"z" * MiB)
            os.pwritev(fd, [buf], 0)
            os.pwritev(fd, [buf], MiB)
            os.preadv(fd, [buf], 4 * MiB)
            os.preadv(fd, [buf], 4 * MiB)  # the second time from the cache
            for off in range(8 * MiB, 12 * MiB, MiB):  # a scan: read ahead, not cached
                os.preadv(fd, [buf], off)
        finally:
            os.close(fd)
        status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
        (export,) = status["exports"]
        assert export["active"] and export["bytes_written"] == 2 * MiB
        assert export["bytes_read"] >= MiB
        assert export["cache"]["hits"] >= 1 and status["cache"]["capacity"] == 4 * MiB
        assert 0 < export["cache"]["used"] == status["cache"]["used"] <= 4 * MiB
        assert export["unflushed"] == 2 * MiB and export["errors"] == 0
        assert 0 < status["cache"]["read_ahead"] <= MiB  # (a quarter of the cache)
        text = run_nbdfs("status", str(mnt)).stdout
        assert "written 2.0 MiB" in text and "unflushed 2.0 MiB" in text
        assert ", read-ahead " in text.splitlines()[0]


@pytest.mark.fuse
def test_a_sequential_scan_leaves_the_working_set_cached(tmp: Path) -> None:
    """A sequential reader is served by read-ahead outside the cache: a scan of the whole
    export through a small cache keeps the hot blocks (read through the status counters)."""
    import mmap

    def cache() -> dict[str, int]:
        status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
        return status["exports"][0]["cache"]  # type: ignore[no-any-return]

    with (
        nbdkit("pattern", "64M") as srv,
        mounted(srv.address, tmp / "mnt", "--cache-size=4M") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)
            hot = [i * 64 * 1024 for i in range(0, 2 * 16, 3)]  # scattered 4K reads,
            hot += [i * 5 * MiB + 12288 for i in range(1, 12)]  # some where read-ahead goes
            for off in hot * 2:
                os.preadv(fd, [memoryview(buf)[:4096]], off)
            before = cache()
            for off in range(0, 64 * MiB, MiB):  # the scan: 16 times the cache's size
                assert os.preadv(fd, [buf], off) == MiB
                assert buf[:8] == off.to_bytes(8, "big")  # (pattern: each 8 bytes its offset)
            after_scan = cache()
            for off in hot:
                os.preadv(fd, [memoryview(buf)[:4096]], off)
            after = cache()
        finally:
            os.close(fd)
    assert after_scan["used"] <= 2 * MiB, after_scan  # the scan did not fill the cache
    assert after["misses"] == after_scan["misses"], (before, after_scan, after)
    assert after["hits"] >= after_scan["hits"] + len(hot)


def resident_pages(fd: int) -> tuple[int, int]:
    """Of the file open as ``fd``, how many pages the kernel's page cache holds, and how
    many it has (mincore(2) on a mapping that is never touched, so nothing is read)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = os.fstat(fd).st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    start = ctypes.c_char.from_buffer(m)
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec):
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec), pages
    finally:
        del start
        m.close()


@pytest.mark.fuse
@pytest.mark.parametrize("kernel_cache", [False, True])
def test_kernel_cache_keeps_pages_across_opens(tmp: Path, kernel_cache: bool) -> None:
    """--kernel-cache: a file opened again keeps its pages in the kernel's page cache, and
    still shows what was written through the mount; without it every open drops them, so
    that every open reads through nbdfs.

    (The pages are counted at the open itself, not by the reads that reach nbdfs after it:
    the kernel may reclaim cached pages at any time, and on these machines DAMON's proactive
    reclaim pages out some within a second.)"""
    extra = ["-o", "kernel_cache"] if kernel_cache else []
    with nbdkit("memory", "4M") as srv, mounted(srv.address, tmp / "mnt", *extra) as mnt:
        path = mnt / "%default%"
        data = os.urandom(MiB)
        with open(path, "r+b") as f:
            f.write(data)
        assert path.read_bytes()[:MiB] == data  # every page read, so cached
        fd = os.open(path, os.O_RDONLY)  # opened again
        try:
            held, pages = resident_pages(fd)
            assert os.pread(fd, MiB, 0) == data
        finally:
            os.close(fd)
        if kernel_cache:
            assert held >= pages * 3 // 4, (held, pages)  # (not all: see above)
        else:
            assert held == 0, (held, pages)
        with open(path, "r+b") as f:
            f.seek(4096)
            f.write(b"new")
        assert path.read_bytes()[4096:4099] == b"new"


@pytest.mark.fuse
def test_umount_command(tmp: Path) -> None:
    with nbdkit("memory", "1M") as srv:
        mnt = tmp / "mnt"
        with mounted(srv.address, mnt):
            run_nbdfs("umount", str(mnt))
            assert f" {mnt} " not in _mounts()
    proc = run_nbdfs("umount", str(tmp), check=False)
    assert proc.returncode == 1 and "is not an nbdfs mount" in proc.stderr


def test_man_page_renders_cleanly() -> None:
    require_tool("groff")
    page = ROOT / "docs" / "nbdfs.1"
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stderr == ""
    text = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        env=dict(os.environ, MANPAGER="cat", MANWIDTH="100"),
    ).stdout
    for word in (
        "nbdfs list",
        "nbdfs mount",
        "tls-init",
        "status",
        "EXIT STATUS",
        "%default%",
        "losetup",
    ):
        assert word in text, word


def test_help_teaches_every_command() -> None:
    top = run_nbdfs("--help").stdout
    for command in ("list", "mount", "umount", "status", "tls-init"):
        assert command in top
        assert "usage: nbdfs " + command in run_nbdfs(command, "--help").stdout
    assert "nbds://" in run_nbdfs("mount", "--help").stdout


def test_bash_completion_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "contrib" / "nbdfs.bash-completion")], check=True)
